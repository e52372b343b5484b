"""Image probe page: which latents fire where on one image. Pick an image of the SAE's
activation set by its row (a link can name it) or upload one; see any latent's heatmap over it,
click a patch to list the latents strongest there, and read the image's strongest latents
overall, each linking to its latent page."""

import base64
import hashlib
from collections.abc import Callable, Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from vitscope.explorer import live
from vitscope.explorer.client import ImageRef, sae_id
from vitscope.explorer.data import (
    Connection,
    analyzer_errors,
    client,
    connection,
    dataset_image,
    latent_link,
    seed_from_url,
    selected_sae,
)
from vitscope.explorer.heatmap import overlay, to_png
from vitscope.explorer.search_basket import add_buttons, upload_name
from vitscope.proto import names, pb

SOURCES = {"dataset": "Dataset image", "upload": "Upload"}


def index_parser(count: int) -> Callable[[str], int | None]:
    """A URL parameter's parser for an index in [0, count): None for anything else."""
    return lambda raw: int(raw) if raw.isdigit() and int(raw) < count else None


def from_link(param: str, key: str, parse: Callable[[str], object | None], fallback: object, what: str) -> bool:
    """Seed the state ``key`` from URL parameter ``param`` (see :func:`seed_from_url`); True
    when the URL names a value this session did not write there (a link was followed). A value
    that does not parse is ignored, with a warning naming ``what`` it should be."""
    raw = st.query_params.get(param)
    value = parse(raw) if raw is not None else None
    if raw is not None and value is None:
        st.warning(f"Ignored `{param}={raw[:40]}` from the link: {what}.", icon=":material/link_off:")
    followed = value is not None and st.session_state.get(f"_{key}_url") != raw
    seed_from_url(key, raw, value, fallback)
    return followed


def publish(param: str, key: str, value: object) -> None:
    """Mirror state ``key`` into URL parameter ``param`` (and note that this session wrote it)."""
    st.query_params[param] = str(value)
    st.session_state[f"_{key}_url"] = str(value)


def choose_image(conn: Connection, sae: pb.Sae, set_id: str) -> tuple[ImageRef, bytes, str, bytes | None]:
    """The image to probe, from the source the user picked: (what the live calls take, PNG as
    the model sees it, its name for the concept search, the upload's bytes if it is one)."""
    if from_link("image", "probe_image", index_parser(sae.image_count), 0,
                 f"not an image row of this SAE's activation set (0 to {sae.image_count - 1})"):
        st.session_state["probe_source"] = "dataset"
    left, right = st.columns([1, 3], vertical_alignment="bottom")
    source = left.radio("Image", list(SOURCES), format_func=SOURCES.get, key="probe_source", horizontal=True)
    if source == "dataset":
        st.session_state["probe_image"] = min(st.session_state["probe_image"], sae.image_count - 1)
        index = right.number_input(f"Image # (0 to {sae.image_count - 1})", min_value=0,
                                   max_value=sae.image_count - 1, step=1, key="probe_image")
        name = names.image(set_id, index)
        with analyzer_errors(conn):
            img = dataset_image(conn, name)
        right.caption(f"`{img.source_id}`" + (f" · label {img.label}" if img.label else ""))
        publish("image", "probe_image", index)
        return name, img.data, name, None
    for param in ("image", "latent", "patch"):
        st.query_params.pop(param, None)
    upload = right.file_uploader("Upload an image", type=live.UPLOAD_TYPES, key="probe_upload",
                                 max_upload_size=live.MAX_UPLOAD_MB)
    right.caption("An upload stays in this browser session: a link to this page cannot carry it "
                  "(links open a dataset image).")
    if upload is None:
        st.info("Upload an image (PNG, JPEG, ...) to see which latents fire on it.", icon=":material/upload:")
        st.stop()
    data = upload.getvalue()
    try:
        shown = live.as_seen(data, (sae.grid_rows, sae.grid_cols))
    except live.UnreadableImage as e:
        st.warning(f"`{upload.name}` is {e}: upload a PNG, JPEG or another common image format.",
                   icon=":material/broken_image:")
        st.stop()
    return data, shown, upload_name(data), data


def patch_picker(picture, grid: tuple[int, int], heat: Sequence[float]) -> alt.LayerChart:
    """The picture with an invisible grid of patches over it: a click selects one (the point
    selection "patch", by the patch's row-major index); hovering shows its row, column and
    activation."""
    rows, cols = grid
    width, height = picture.size
    url = "data:image/png;base64," + base64.b64encode(to_png(picture)).decode()
    photo = alt.Chart(pd.DataFrame({"url": [url]})).mark_image(
        width=width, height=height, align="left", baseline="top", aspect=False).encode(
        x=alt.value(0), y=alt.value(0), url="url:N")
    patch = np.arange(rows * cols)
    cells = pd.DataFrame({"patch": patch, "row": patch // cols, "col": patch % cols,
                          "row_end": patch // cols + 1, "col_end": patch % cols + 1, "activation": list(heat)})
    pick = alt.selection_point(name="patch", fields=["patch"], on="click", clear=False)
    hover = alt.selection_point(name="hover", fields=["patch"], on="pointerover", clear="pointerout", empty=False)
    cells_layer = alt.Chart(cells).mark_rect(fill="#ffffff", strokeWidth=2).encode(
        x=alt.X("col:Q", scale=alt.Scale(domain=[0, cols], nice=False), axis=None), x2="col_end:Q",
        y=alt.Y("row:Q", scale=alt.Scale(domain=[0, rows], nice=False, reverse=True), axis=None), y2="row_end:Q",
        # Nearly transparent rather than not filled: a cell must still catch the click.
        fillOpacity=alt.value(0.001),
        stroke=alt.condition(hover, alt.value("#ffffff"), alt.value(None)),
        tooltip=[alt.Tooltip("row:Q"), alt.Tooltip("col:Q"), alt.Tooltip("activation:Q", format=".4g")],
    ).add_params(pick, hover)
    return alt.layer(photo, cells_layer).properties(
        width=width, height=height, padding=0, autosize=alt.AutoSizeParams(type="none")).configure_view(stroke=None)


def clicked_patch(event) -> int | None:
    """The patch a click on the picker selected, if any."""
    points = event.selection.get("patch") or []
    return int(points[0]["patch"]) if points and "patch" in points[0] else None


def set_patch(cols: int) -> None:
    st.session_state["probe_patch"] = st.session_state["probe_row"] * cols + st.session_state["probe_col"]


def show_heatmap(latent: int) -> None:
    st.session_state["probe_latent"] = latent


def latent_list(sid: str, acts: Sequence[pb.LatentActivation], labels: dict[int, str], key: str) -> None:
    """Latents with their activations, each a link to its page and a button showing its heatmap here."""
    if not acts:
        st.caption("No latent fires here.")
    for a in acts:
        link, show = st.columns([5, 1], vertical_alignment="center")
        latent_link(sid, a.latent_index, live.latent_text(a.latent_index, labels, f"{a.activation:.4g}"), where=link)
        show.button("", icon=":material/layers:", key=f"{key}_{a.latent_index}", on_click=show_heatmap,
                    args=(a.latent_index,), help="Show its heatmap on the image")


def probe(conn: Connection, sae: pb.Sae) -> None:
    """The page below its title: the image, its heatmap and patch picker, and the latent lists."""
    sid = sae_id(sae)
    set_id = names.parse_activation_set(sae.activation_set)
    image, shown, example_name, upload = choose_image(conn, sae, set_id)
    with analyzer_errors(conn), st.spinner("Encoding the image…"):
        encoded = live.encode(conn, sid, image)
    grid = (encoded.grid_rows, encoded.grid_cols)
    n_patches = grid[0] * grid[1]
    strongest = encoded.image_latents[0].latent_index if encoded.image_latents else 0
    from_link("latent", "probe_latent", index_parser(sae.d_sae), strongest,
              f"not a latent of this SAE (0 to {sae.d_sae - 1})")
    st.session_state["probe_latent"] = min(st.session_state["probe_latent"], sae.d_sae - 1)
    labels = live.labels(conn, sae)

    picture_col, lists_col = st.columns([3, 2], gap="large")
    with picture_col:
        pick_latent, open_latent = st.columns([2, 3], vertical_alignment="bottom")
        latent = pick_latent.number_input("Heatmap of latent", min_value=0, max_value=sae.d_sae - 1, step=1,
                                          key="probe_latent")
        latent_link(sid, latent, f"Open latent {latent}" + (f" · {labels[latent]}" if latent in labels else ""),
                    where=open_latent)
        with analyzer_errors(conn):
            heat = list(live.heatmap(conn, sid, latent, image).activation)
        from_link("patch", "probe_patch", index_parser(n_patches), int(np.argmax(heat)),
                  f"not a patch of the {grid[0]}x{grid[1]} grid (0 to {n_patches - 1})")
        if not 0 <= st.session_state["probe_patch"] < n_patches:  # another SAE's grid
            st.session_state["probe_patch"] = int(np.argmax(heat))
        patch = st.session_state["probe_patch"]
        picture = overlay(shown, heat, grid, patch, size=live.SHOWN_SIZE)
        event = st.altair_chart(patch_picker(picture, grid, heat), on_select="rerun", selection_mode="patch",
                                theme=None, width="content")
        chosen = clicked_patch(event)
        if chosen is not None and chosen != patch and 0 <= chosen < n_patches:
            st.session_state["probe_patch"] = chosen
            st.rerun()
        row, col = divmod(patch, grid[1])
        st.caption(f"Colour: latent {latent}'s activation on each patch (strongest here {max(heat):.4g}). "
                   f"Box: the selected patch, row {row}, column {col} ({heat[patch]:.4g}); click another to "
                   "select it.")
        st.session_state["probe_row"], st.session_state["probe_col"] = row, col
        r, c, add_patch, add_image = st.columns([1, 1, 1, 1], vertical_alignment="bottom")
        r.number_input("Patch row", min_value=0, max_value=grid[0] - 1, step=1, key="probe_row",
                       on_change=set_patch, args=(grid[1],))
        c.number_input("Patch column", min_value=0, max_value=grid[1] - 1, step=1, key="probe_col",
                       on_change=set_patch, args=(grid[1],))
        add_patch.caption("Search: this patch")
        add_buttons(add_patch, example_name, patch, key="probe_add_patch", upload=upload)
        add_image.caption("Search: whole image")
        add_buttons(add_image, example_name, None, key="probe_add_image", upload=upload)

    with lists_col:
        tabs = [f"Patch ({row}, {col})", "Whole image"] + (["CLS token"] if encoded.cls_latents else [])
        patch_tab, image_tab, *cls_tab = st.tabs(tabs)
        with patch_tab:
            st.caption("The latents strongest on the selected patch.")
            latent_list(sid, encoded.patches[patch].latents, labels, "probe_patch_latent")
        with image_tab:
            st.caption("The image's strongest latents, by their activation at its best patch.")
            latent_list(sid, encoded.image_latents, labels, "probe_image_latent")
        for tab in cls_tab:
            with tab:
                st.caption("The latents strongest on the image's CLS token.")
                latent_list(sid, encoded.cls_latents, labels, "probe_cls_latent")

    steer(conn, sid, image, latent)
    if upload is None:
        publish("latent", "probe_latent", latent)
        publish("patch", "probe_patch", patch)


def steer(conn: Connection, sid: str, image: ImageRef, latent: int) -> None:
    """Scale the latent inside the SAE's ViT for this image and show what the model's output does."""
    with st.expander(f"Steer latent {latent} inside the model", icon=":material/tune:"):
        st.caption("Multiplies the latent's activation at the SAE's layer (0 ablates it), keeps the SAE's error "
                   "term (so nothing else changes) and runs the rest of the ViT: how far the final embedding "
                   "moves and, for CLIP models on labelled sets, how the zero-shot classes change.")
        factor = st.number_input("Factor", min_value=-100.0, max_value=100.0, value=0.0, step=0.5,
                                 key="probe_steer_factor")
        what = (sid, image if isinstance(image, str) else hashlib.sha256(image).hexdigest(), latent, factor)
        if st.button("Steer", icon=":material/play_arrow:", key="probe_steer"):
            with analyzer_errors(conn), st.spinner("Running the ViT with the latent steered…"):
                st.session_state["probe_steered"] = (what, client(conn).steer_latents(sid, image, {latent: factor},
                                                                                      timeout=120))
        done = st.session_state.get("probe_steered")
        if done is None or done[0] != what:
            return
        reply = done[1]
        st.metric("Cosine of the final embeddings, before and after", f"{reply.embedding_cosine:.5f}")
        if reply.classes:
            st.dataframe(pd.DataFrame({"class": [c.label for c in reply.classes],
                                       "before": [c.before for c in reply.classes],
                                       "after": [c.after for c in reply.classes]}),
                         hide_index=True)
        else:
            st.info(reply.readout_note)


conn = connection()
sae = selected_sae(conn)
st.title("Image probe")
st.caption(f"SAE `{sae_id(sae)}` · layer {sae.layer} · {sae.model} · which latents fire where on one image")
probe(conn, sae)
