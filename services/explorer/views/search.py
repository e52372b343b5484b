"""Concept search page: the latents that fire on a few positive examples and not on the
negative ones. Examples come from the session's basket (the plus and minus buttons of the
Latent and Image probe pages) and from uploads and dataset images added here, each optionally
one patch; the ranked latents show the figures of their scores, the best few their top images."""

import streamlit as st

from vitscope.explorer import live
from vitscope.explorer.client import AnalyzerError, sae_id
from vitscope.explorer.data import (
    THUMB_SIZE,
    Connection,
    analyzer_errors,
    connection,
    dataset_image,
    latent_link,
    latent_tiles,
    selected_sae,
)
from vitscope.explorer.heatmap import overlay, to_png
from vitscope.explorer.search_basket import (
    KINDS,
    Example,
    add,
    examples,
    from_url,
    remove,
    to_url,
    upload_name,
)
from vitscope.proto import names, pb

PARAMS = {"positives": "pos", "negatives": "neg"}  # URL parameter of each kind
TOP_LATENTS = 20
WITH_IMAGES = 3  # results shown with a grid of their top images
GRID_IMAGES = 8
EXAMPLE_COLUMNS = 8


def seed_from_link(grid: tuple[int, int]) -> None:
    """Take the dataset examples of a followed link (``?pos=..&neg=..``, as :func:`to_url`
    writes them) in place of the session's, keeping its uploads (a link cannot carry them).
    Parts that name no image, or a patch outside the grid, are dropped with a warning."""
    raw = {kind: st.query_params.get(param) for kind, param in PARAMS.items()}
    written = {kind: st.session_state.get(f"_{param}_url") for kind, param in PARAMS.items()}
    if all(v is None for v in raw.values()) or raw == written:
        return
    dropped = 0
    for kind, value in raw.items():
        parts = [p for p in (value or "").split(",") if p]
        linked = [e for e in from_url(value or "") if e.patch is None or e.patch < grid[0] * grid[1]]
        dropped += len(parts) - len(linked)
        uploads = [e for e in examples(kind) if e.upload is not None]
        st.session_state[f"search_{kind}"] = list(dict.fromkeys(linked)) + uploads
    if dropped:
        st.warning(f"Ignored {dropped} example(s) of the link that name no dataset image "
                   f"(`activationSets/{{set}}/images/{{n}}`, optionally `@patch` below {grid[0] * grid[1]}).",
                   icon=":material/link_off:")


def publish_examples() -> None:
    """Mirror the dataset examples into the URL (``pos``, ``neg``), so a link reopens this search."""
    for kind, param in PARAMS.items():
        value = to_url(kind) or None
        if value is None:
            st.query_params.pop(param, None)
        else:
            st.query_params[param] = value
        st.session_state[f"_{param}_url"] = value


def patch_inputs(prefix: str, grid: tuple[int, int]) -> None:
    """A form's optional patch, as a row and a column (both empty: the whole image)."""
    left, right = st.columns(2)
    left.number_input("Patch row", min_value=0, max_value=grid[0] - 1, value=None, step=1, key=f"{prefix}_row",
                      placeholder="whole image")
    right.number_input("Patch column", min_value=0, max_value=grid[1] - 1, value=None, step=1, key=f"{prefix}_col",
                       placeholder="whole image")


def submit_buttons(key: str, on_click, *args) -> None:
    """A form's Positive and Negative buttons: ``on_click(kind, *args)`` adds what the form names."""
    pos, neg = st.columns(2)
    pos.form_submit_button("Positive", icon=":material/add:", key=f"{key}_pos", on_click=on_click,
                           args=("positives", *args), width="stretch")
    neg.form_submit_button("Negative", icon=":material/remove:", key=f"{key}_neg", on_click=on_click,
                           args=("negatives", *args), width="stretch")


def chosen_patch(prefix: str, cols: int) -> int | None:
    """The patch a form's row and column name (None: the whole image); ValueError for just one."""
    row, col = st.session_state[f"{prefix}_row"], st.session_state[f"{prefix}_col"]
    if (row is None) != (col is None):
        raise ValueError("give both a patch row and a column, or neither for the whole image")
    return None if row is None else int(row) * cols + int(col)


def add_dataset(kind: str, set_id: str, grid: tuple[int, int]) -> None:
    index = st.session_state["search_add_index"]
    try:
        if index is None:
            raise ValueError("give the row of a dataset image")
        add(kind, Example(names.image(set_id, int(index)), chosen_patch("search_add", grid[1])))
    except ValueError as e:
        st.session_state["_search_notice"] = f"Nothing added: {e}."


def add_upload(kind: str, grid: tuple[int, int]) -> None:
    upload = st.session_state["search_upload"]
    try:
        if upload is None:
            raise ValueError("choose an image file first")
        data = upload.getvalue()
        try:
            live.as_seen(data, grid)
        except live.UnreadableImage as e:
            raise ValueError(f"`{upload.name}` is {e}") from None
        add(kind, Example(upload_name(data), chosen_patch("search_upload", grid[1]), data))
    except ValueError as e:
        st.session_state["_search_notice"] = f"Nothing added: {e}."


def adders(sae: pb.Sae, set_id: str, grid: tuple[int, int]) -> None:
    """Forms that add a dataset image (by its row) or an upload, or one patch of either."""
    from_set, from_file = st.columns(2, gap="large")
    with from_set.form("search_add_dataset", border=True):
        st.number_input(f"Dataset image # (0 to {sae.image_count - 1})", min_value=0, max_value=sae.image_count - 1,
                        value=None, step=1, key="search_add_index")
        patch_inputs("search_add", grid)
        submit_buttons("search_add_dataset", add_dataset, set_id, grid)
    with from_file.form("search_add_upload", border=True):
        st.file_uploader("Upload an image", type=live.UPLOAD_TYPES, key="search_upload",
                         max_upload_size=live.MAX_UPLOAD_MB)
        patch_inputs("search_upload", grid)
        submit_buttons("search_add_upload", add_upload, grid)
    if notice := st.session_state.pop("_search_notice", None):
        st.warning(notice, icon=":material/warning:")


@st.cache_data(ttl=3600, show_spinner=False, max_entries=256)
def _thumbnail(png: bytes, grid: tuple[int, int], patch: int | None) -> bytes:
    return to_png(overlay(png, [0.0] * (grid[0] * grid[1]), grid, patch, size=THUMB_SIZE))


def describe(e: Example, grid: tuple[int, int]) -> str:
    """An example's caption: its image (row, or upload name) and patch."""
    what = e.image if e.upload is not None else f"#{names.parse_image(e.image)[1]}"
    return what + (" · whole image" if e.patch is None else " · patch ({}, {})".format(*divmod(e.patch, grid[1])))


def show_examples(conn: Connection, kind: str, grid: tuple[int, int]) -> None:
    """A kind's examples as thumbnails (the patch boxed), each with a remove button."""
    shown = examples(kind)
    st.markdown(f"**{kind.capitalize()}** ({len(shown)})")
    if not shown:
        st.caption("None yet.")
    for start in range(0, len(shown), EXAMPLE_COLUMNS):  # the last row may be short, hence strict=False
        for col, e in zip(st.columns(EXAMPLE_COLUMNS), shown[start:start + EXAMPLE_COLUMNS], strict=False):
            try:
                png = live.as_seen(e.upload, grid) if e.upload is not None else dataset_image(conn, e.image).data
            except AnalyzerError as err:
                if err.unreachable:
                    with analyzer_errors(conn):
                        raise
                col.warning(f"{e.image}: {err.details}")
            else:
                col.image(_thumbnail(png, grid, e.patch), caption=describe(e, grid), width="stretch")
            col.button("Remove", icon=":material/close:", key=f"search_remove_{kind}_{e.image}_{e.patch}",
                       on_click=remove, args=(kind, e), width="stretch")


def request(e: Example, cols: int) -> pb.SearchExample:
    """An example as SearchLatents takes it: its patch as a 1x1 region."""
    source = pb.ImageSource(image_data=e.upload) if e.upload is not None else pb.ImageSource(image=e.image)
    if e.patch is None:
        return pb.SearchExample(image=source)
    row, col = divmod(e.patch, cols)
    return pb.SearchExample(image=source, region=pb.PatchRegion(row_start=row, col_start=col, row_end=row + 1,
                                                                col_end=col + 1))


def explanation(m: pb.LatentMatch, n_pos: int, n_neg: int) -> str:
    """Where a match's score comes from, in words."""
    text = (f"score **{m.score:.3f}** = positives' mean {m.positive_mean:.3f} − negatives' mean "
            f"{m.negative_mean:.3f} · fires on {m.positives_fired}/{n_pos} positives")
    return text + (f", {m.negatives_fired}/{n_neg} negatives" if n_neg else "")


def results(conn: Connection, sae: pb.Sae, found: pb.SearchLatentsResponse, n_pos: int, n_neg: int) -> None:
    """The ranked latents, each a link to its page with its score explained; the best few with their top images."""
    sid = sae_id(sae)
    labels = live.labels(conn, sae)
    st.subheader("Latents, best first")
    st.caption("Scores compare each latent's strongest activation in an example (its patch, or anywhere) with "
               "its maximum over the dataset: 1 means as strong as it ever gets.")
    for rank, m in enumerate(found.latents):
        with st.container(border=True, key=f"search_result_{rank}"):
            head, why = st.columns([2, 5], vertical_alignment="center")
            latent_link(sid, m.latent_index, f"{rank + 1}. " + live.latent_text(m.latent_index, labels), where=head)
            raw = ", ".join(f"{a:.3g}" for a in m.positive_activations)
            raw_neg = ", ".join(f"{a:.3g}" for a in m.negative_activations)
            why.markdown(explanation(m, n_pos, n_neg), help=f"Raw activations: positives {raw}"
                                                         + (f"; negatives {raw_neg}" if n_neg else ""))
            if rank >= WITH_IMAGES:
                continue
            if not sae.analysis:
                st.caption(f"Analyse SAE `{sid}` to see its latents' top images.")
                continue
            with analyzer_errors(conn):
                _, tiles = latent_tiles(conn, sid, m.latent_index, None)
            for col, tile in zip(st.columns(GRID_IMAGES), tiles[:GRID_IMAGES], strict=False):
                col.image(tile.data, caption=tile.caption, width="stretch", output_format="auto")


def concept_search(conn: Connection, sae: pb.Sae) -> None:
    """The page below its title: the forms, the examples, and the search's results."""
    sid = sae_id(sae)
    set_id = names.parse_activation_set(sae.activation_set)
    grid = (sae.grid_rows, sae.grid_cols)
    seed_from_link(grid)
    with st.expander("Add examples", expanded=True, icon=":material/add_photo_alternate:"):
        adders(sae, set_id, grid)
    for kind in KINDS:
        show_examples(conn, kind, grid)
    publish_examples()
    positives, negatives = examples("positives"), examples("negatives")
    if not positives:
        st.info("Add at least one positive example: the plus button under a latent's top image or in the Image "
                "probe, or the forms above. Negative examples (minus) are optional.",
                icon=":material/add_photo_alternate:")
        return
    if any(e.upload is not None for kind in KINDS for e in examples(kind)):
        st.caption("Uploads stay in this browser session: a link to this search carries its dataset examples only.")
    with analyzer_errors(conn), st.spinner("Searching…"):
        found = live.search(conn, sid, tuple(request(e, grid[1]) for e in positives),
                            tuple(request(e, grid[1]) for e in negatives), TOP_LATENTS)
    if not found.latents:
        st.info("No latent fires on any positive example.")
        return
    results(conn, sae, found, len(positives), len(negatives))


conn = connection()
sae = selected_sae(conn)
st.title("Concept search")
st.caption(f"SAE `{sae_id(sae)}` · layer {sae.layer} · the latents that fire on the positive examples and not on "
           "the negative ones")
concept_search(conn, sae)
