"""Latent page: one latent's statistics and its top images with patch heatmaps."""

import math

import streamlit as st

from vitscope.explorer.client import LatentStats
from vitscope.explorer.data import (
    analyzer_errors,
    connection,
    latent_tiles,
    publish_to_url,
    require_analysis,
    seed_from_url,
    selected_sae,
)

GRID_COLUMNS = 4


def parse_latent(raw: str | None, d_sae: int) -> int | None:
    """The latent a URL names, if it is a valid index."""
    try:
        n = int(raw) if raw is not None else None
    except ValueError:
        return None
    return n if n is not None and 0 <= n < d_sae else None


def step(delta: int, d_sae: int) -> None:
    st.session_state["latent"] = min(max(st.session_state["latent"] + delta, 0), d_sae - 1)


def seed_latent(d_sae: int) -> int:
    """The latent to show: from the URL when a link was followed, else the number input's state."""
    raw = st.query_params.get("latent")
    last = parse_latent(st.session_state.get("_latent_url"), d_sae)
    seed_from_url("latent", raw, parse_latent(raw, d_sae), fallback=last if last is not None else 0)
    # Another SAE may have been picked since: keep the index inside its range.
    st.session_state["latent"] = min(st.session_state["latent"], d_sae - 1)
    return st.session_state["latent"]


def controls(d_sae: int) -> None:
    c1, c2, c3, c4 = st.columns([1, 1, 2, 4], vertical_alignment="bottom")
    c1.button("Prev", icon=":material/chevron_left:", on_click=step, args=(-1, d_sae), width="stretch",
              help="previous latent")
    c2.button("Next", icon=":material/chevron_right:", on_click=step, args=(1, d_sae), width="stretch",
              help="next latent")
    n = c3.number_input("Latent", min_value=0, max_value=d_sae - 1, step=1, key="latent")
    # The analysis' k is not in the API, so the default defers to the server (16, or all kept).
    c4.selectbox("Top images", [None, 4, 8, 16, 32, 64], key="latent_top_images",
                 format_func=lambda k: "default" if k is None else str(k))
    publish_to_url("latent", n)


def stats_row(s: LatentStats, n_images: int) -> None:
    cols = st.columns(4)
    log_f = f" (10^{math.log10(s.frequency):.2f})" if s.frequency > 0 else ""
    cols[0].metric("Frequency", f"{s.frequency:.3e}", help=f"Fraction of tokens where it fires{log_f}")
    cols[1].metric("Mean activation", f"{s.mean_activation:.4f}", help="Mean over the tokens where it fires")
    cols[2].metric("Max activation", f"{s.max_activation:.4f}")
    cols[3].metric("Top images", n_images)


conn = connection()
sae = selected_sae(conn)
require_analysis(sae)
latent = seed_latent(sae.d_sae)
st.title(f"Latent {latent}")
st.caption(f"SAE `{sae.sae_id}` · layer {sae.layer} · {sae.model}")
controls(sae.d_sae)
with analyzer_errors(conn), st.spinner("Rendering heatmaps…"):
    lat, tiles = latent_tiles(conn, sae.sae_id, latent, st.session_state["latent_top_images"])
stats_row(lat.stats, len(tiles))
if not tiles:
    st.info("This latent never fired on the analysed images: it has no top images.")
    st.stop()
st.caption("Colour shows the latent's activation on each patch (one scale for all images); "
           "the box marks the strongest patch. Captions: label · activation · image row.")
for start in range(0, len(tiles), GRID_COLUMNS):  # the last row may be short, hence strict=False
    for col, tile in zip(st.columns(GRID_COLUMNS), tiles[start:start + GRID_COLUMNS], strict=False):
        col.image(tile.png, caption=tile.caption, width="stretch", output_format="PNG")
