"""Compare page: two SAEs side by side, the sidebar's on the left and any other on the right
(of the same model and layer or not): their metrics, their firing-frequency histograms overlaid,
and for a latent of the left one the latents of the right one most like it."""

import altair as alt
import pandas as pd
import streamlit as st

from vitscope.explorer.client import sae_id
from vitscope.explorer.data import (
    Connection,
    Tile,
    analyzer_errors,
    client,
    connection,
    get_sae,
    label_text,
    latent_link,
    list_saes,
    publish_to_url,
    sae_label,
    seed_from_url,
    selected_sae,
    thumbnails,
    url_state,
)
from vitscope.explorer.summary import fmt, frequency_fractions, metric_values, never_fired
from vitscope.metrics import METRICS
from vitscope.proto import names, pb

COLOURS = ("#4c78a8", "#f58518")  # left, right
MATCHES = 10
STRIP = 6
"""Top images shown per latent."""
MATCH_TIMEOUT = 180.0
"""Seconds the explorer waits for matches: across spaces the analyzer encodes every sampled image
with the right SAE, through its ViT when it reads another activation set."""


def pick_other(saes: list[pb.Sae], left: str) -> str:
    """The right-hand SAE (URL ``other``): by default the first of the store that is not ``left``."""
    by_id = {sae_id(s): s for s in saes}
    raw = st.query_params.get("other")
    if raw is not None and raw not in by_id:
        st.warning(f"No SAE `{raw}` in this store to compare with; showing another.", icon=":material/warning:")
    fallback = next((i for i in by_id if i != left), left)
    seed_from_url("other", raw, raw if raw in by_id else None, fallback)
    if st.session_state["other"] not in by_id:  # it left the store since the last run
        st.session_state["other"] = fallback
    chosen = st.selectbox("Compare with", list(by_id), key="other", format_func=lambda i: sae_label(by_id[i]))
    publish_to_url("other", chosen)
    return chosen


def side_names(left: pb.Sae, right: pb.Sae) -> tuple[str, str]:
    """Column and legend names of the two sides (distinct even when both are one SAE)."""
    return f"left · {sae_id(left)[:12]}", f"right · {sae_id(right)[:12]}"


def side_by_side(left: pb.Sae, right: pb.Sae) -> pd.DataFrame:
    """What each SAE is, then its value of every metric, a row each (named by the index), with
    right − left where the two were counted alike (never-fired latents are counted over the
    analysis pass once analysed, else over the trainer's evaluation tokens)."""
    columns = side_names(left, right)

    def describe(s: pb.Sae) -> list[str]:
        return [s.variant, s.model, str(s.layer), f"{s.d_in} → {s.d_sae}",
                names.parse_activation_set(s.activation_set)[:12], "yes" if s.analysis else "no"]

    df = pd.DataFrame({"metric": ["Family", "Model", "Layer", "d_in → d_sae", "Activation set", "Analysed"],
                       columns[0]: describe(left), columns[1]: describe(right), "right − left": ""})
    mine, theirs = metric_values(left), metric_values(right)
    alike = (never_fired(left) is None) == (never_fired(right) is None)
    rows = [{"metric": m.label, columns[0]: fmt(mine[key], m.format), columns[1]: fmt(theirs[key], m.format),
             "right − left": "" if mine[key] is None or theirs[key] is None or (key == "never_fired" and not alike)
             else fmt(theirs[key] - mine[key], "+" + m.format)} for key, m in METRICS.items()]
    return pd.concat([df, pd.DataFrame(rows)], ignore_index=True).set_index("metric").rename_axis(None)


def histogram_overlay(left: pb.Sae, right: pb.Sae) -> pd.DataFrame:
    """Both firing-frequency histograms as fractions of each SAE's latents, a row per bin and
    side (a side with no histogram, not analysed yet, has no rows)."""
    frames = [pd.DataFrame({"sae": side, "lo": list(s.log_frequency_edges)[:-1], "hi": list(s.log_frequency_edges)[1:],
                            "fraction": frequency_fractions(s)})
              for side, s in zip(side_names(left, right), (left, right), strict=True) if s.log_frequency_counts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def frequencies(left: pb.Sae, right: pb.Sae) -> None:
    """The two histograms overlaid, or a note for each SAE that has none yet."""
    st.subheader("Firing frequency")
    bars = histogram_overlay(left, right)
    for sid in dict.fromkeys(sae_id(s) for s in (left, right) if not s.log_frequency_counts):
        st.info(f"SAE `{sid}` has not been analysed yet, so it has no frequency histogram: run "
                f"`vitscope analyze --sae {sid}`.", icon=":material/hourglass_empty:")
    if bars.empty:
        return
    sides = list(side_names(left, right))
    chart = alt.Chart(bars).mark_bar(opacity=0.55).encode(
        x=alt.X("lo:Q", title="log10 firing frequency"), x2="hi:Q",
        y=alt.Y("fraction:Q", title="fraction of the SAE's latents", axis=alt.Axis(format="%")), y2=alt.datum(0),
        color=alt.Color("sae:N", title=None, scale=alt.Scale(domain=sides, range=list(COLOURS)),
                        legend=alt.Legend(orient="top")),
        tooltip=["sae:N", alt.Tooltip("lo:Q", title="from", format=".2f"),
                 alt.Tooltip("hi:Q", title="to", format=".2f"), alt.Tooltip("fraction:Q", format=".2%")])
    st.altair_chart(chart, width="stretch")
    never = [f"{side} {s.never_fired / s.d_sae:.1%}" for side, s in zip(sides, (left, right), strict=True)
             if s.HasField("never_fired")]
    st.caption("Each bar is a fraction of its own SAE's latents, so SAEs of different widths compare. The latents "
               f"that never fired over the analysis pass are in no bin (never fired: {', '.join(never)}).")


@st.cache_data(ttl=600, show_spinner=False, max_entries=256)
def strip(conn: Connection, sae: str, latent: int) -> tuple[str, list[Tile]]:
    """A latent's label ("" without one) and its strongest images, as thumbnails."""
    lat = client(conn).get_latent(sae, latent, heatmaps=False)
    label = label_text(lat.label) if lat.HasField("label") else ""
    return label, thumbnails(conn, tuple(lat.examples[:STRIP]), (lat.grid_rows, lat.grid_cols))


@st.cache_data(ttl=600, show_spinner=False, max_entries=256)
def matches(conn: Connection, sae: str, latent: int, other: str) -> pb.FindSimilarLatentsResponse:
    """The right SAE's latents most like a latent of the left one."""
    return client(conn).find_similar_latents(sae, latent, other, MATCHES, timeout=MATCH_TIMEOUT)


def strip_of(conn: Connection, s: pb.Sae, latent: int) -> tuple[str, list[Tile]]:
    """A latent's label and top images; none while its SAE has not been analysed."""
    if not s.analysis:
        return "", []
    with analyzer_errors(conn):
        return strip(conn, sae_id(s), latent)


def show_latent(s: pb.Sae, latent: int, text: str, label: str, tiles: list[Tile]) -> None:
    """A link to a latent's page, its label under it, and its top images beside them."""
    link, images = st.columns([1, 3], vertical_alignment="center")
    latent_link(sae_id(s), latent, text, where=link)
    if label:
        link.caption(label)
    if tiles:
        images.image([t.data for t in tiles], caption=[t.caption for t in tiles], width=96, output_format="PNG")


def method_note(found: pb.FindSimilarLatentsResponse, left: pb.Sae) -> str:
    """How the matches were found, in words."""
    if found.method == pb.SIMILARITY_METHOD_DECODER_COSINE:
        return (f"By **decoder cosine**: both SAEs read the same activations ({left.model}, layer {left.layer}), so "
                "latents compare by the directions they write (cosine of unit decoder rows, from −1 to 1).")
    return (f"By **co-firing**: the SAEs read different activations, so latents compare by the images they fire "
            f"on: the Jaccard index of the images where both fire (at any patch), over {found.sampled_images} "
            "images of the left SAE's activation set, encoded by both.")


def latent_matches(conn: Connection, left: pb.Sae, right: pb.Sae) -> None:
    """A latent of the left SAE (URL ``latent``) and the right SAE's latents most like it."""
    lid, rid = sae_id(left), sae_id(right)
    st.subheader("Closest latents of the right SAE")
    url_state("latent", lambda raw: int(raw) if raw.isdigit() and int(raw) < left.d_sae else None, 0)
    # Another SAE may have been picked on the left since: keep the index inside its range.
    st.session_state["latent"] = min(st.session_state["latent"], left.d_sae - 1)
    latent = st.columns([1, 3])[0].number_input("Latent of the left SAE", min_value=0, max_value=left.d_sae - 1,
                                                step=1, key="latent")
    publish_to_url("latent", latent)
    show_latent(left, latent, f"Latent {latent} of the left SAE", *strip_of(conn, left, latent))
    with analyzer_errors(conn), st.spinner("Matching latents…"):
        found = matches(conn, lid, latent, rid)
    st.caption(method_note(found, left))
    if not right.analysis:
        st.caption(f"The right SAE has not been analysed, so its latents show no labels or top images "
                   f"(`vitscope analyze --sae {rid}`).")
    cosine = found.method == pb.SIMILARITY_METHOD_DECODER_COSINE
    if not found.latents and not cosine:
        st.info(f"No latent of the right SAE fires on the sampled images where latent {latent} does "
                "(it may fire on none of them).", icon=":material/search_off:")
    measure = "cosine" if cosine else "Jaccard"
    for m in found.latents:
        show_latent(right, m.latent_index, f"Latent {m.latent_index} · {measure} {m.similarity:.3f}",
                    *strip_of(conn, right, m.latent_index))

conn = connection()
left_sae = selected_sae(conn)
with analyzer_errors(conn):
    store_saes = list_saes(conn)
st.title("Compare SAEs")
st.caption(f"Left: the sidebar's SAE `{sae_id(left_sae)}`. Right: the one picked here.")
right_id = pick_other(store_saes, sae_id(left_sae))
with analyzer_errors(conn):
    right_sae = get_sae(conn, right_id)
if right_id == sae_id(left_sae):
    alone = " (the store has no other)" if len(store_saes) == 1 else ""
    st.info(f"Both sides are the same SAE{alone}: its figures coincide, and its closest latents are the left "
            "latent's nearest in its own SAE. Pick another SAE to compare two.", icon=":material/info:")
st.table(side_by_side(left_sae, right_sae))
frequencies(left_sae, right_sae)
latent_matches(conn, left_sae, right_sae)
