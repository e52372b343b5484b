"""What the explorer's pages share: the analyzer connection, cached gRPC results, the current
selection (mirrored into the URL so a link reopens the same view) and error display."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import streamlit as st

from .client import AnalyzerClient, AnalyzerError, Latent, LatentOrder, LatentPage, SaeInfo
from .heatmap import overlay, to_png

DEFAULT_ANALYZER = "127.0.0.1:50051"
TILE_SIZE = 256  # pixels on the longer side of each top-k image


@dataclass(frozen=True)
class Connection:
    target: str
    token: str | None


@dataclass(frozen=True)
class Tile:
    png: bytes
    caption: str


def connection() -> Connection:
    """The analyzer address (``VITSCOPE_ANALYZER``) and bearer token (``VITSCOPE_TOKEN``)."""
    return Connection(os.environ.get("VITSCOPE_ANALYZER") or DEFAULT_ANALYZER, os.environ.get("VITSCOPE_TOKEN") or None)


@st.cache_resource(show_spinner=False)
def _client(conn: Connection) -> AnalyzerClient:
    # One channel per address for the whole server process: channels are thread-safe and costly.
    return AnalyzerClient(conn.target, conn.token)


# SAE lists and metrics change when training or analysis finishes, so they expire quickly;
# a published analysis never changes, so latent results may live longer.
@st.cache_data(ttl=30, show_spinner=False)
def list_saes(conn: Connection) -> list[SaeInfo]:
    return _client(conn).list_saes()


@st.cache_data(ttl=30, show_spinner=False)
def get_sae(conn: Connection, sae_id: str) -> SaeInfo:
    return _client(conn).get_sae(sae_id)


@st.cache_data(ttl=600, show_spinner=False, max_entries=512)
def list_latents(conn: Connection, sae_id: str, page_size: int, page_token: str, order: LatentOrder,
                 min_frequency: float, max_frequency: float) -> LatentPage:
    return _client(conn).list_latents(sae_id, page_size, page_token, order, min_frequency, max_frequency)


# Tiles are ~100 kB each, so keep only the latents looked at most recently.
@st.cache_data(ttl=600, show_spinner=False, max_entries=32)
def latent_tiles(conn: Connection, sae_id: str, latent: int, top_images: int | None) -> tuple[Latent, list[Tile]]:
    """A latent with its top-k images, each overlaid with its patch heatmap, as PNG tiles.

    All tiles share one colour scale (the strongest activation among them), so tiles compare."""
    client = _client(conn)
    lat = client.get_latent(sae_id, latent, top_images=top_images, heatmaps=True)
    # Images are independent calls; fetching them concurrently hides a remote analyzer's latency.
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(lambda e: client.get_image(sae_id, e.image_index), lat.examples))
    vmax = max((max(e.heatmap, default=0.0) for e in lat.examples), default=0.0) or None
    tiles = []
    for e, img in zip(lat.examples, images, strict=True):
        pic = overlay(img.data, e.heatmap, (lat.grid_rows, lat.grid_cols), e.patch, vmax=vmax, size=TILE_SIZE)
        label = f"{e.label} · " if e.label else ""
        tiles.append(Tile(to_png(pic), f"{label}{e.score:.3g} · #{e.image_index}"))
    return lat, tiles


@contextmanager
def analyzer_errors(conn: Connection) -> Iterator[None]:
    """Show a failed analyzer call as a message and stop the page, instead of a traceback."""
    try:
        yield
    except AnalyzerError as e:
        if e.unreachable:
            st.error(f"Cannot reach the analyzer at `{conn.target}` ({e.code.name}). Start it with "
                     "`vitscope serve`, or point `VITSCOPE_ANALYZER` at a running one.", icon=":material/power_off:")
        elif e.code == grpc.StatusCode.UNAUTHENTICATED:
            st.error("The analyzer refused this explorer's token: set `VITSCOPE_TOKEN` to the "
                     "token the analyzer was started with.", icon=":material/lock:")
        elif e.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.FAILED_PRECONDITION):
            st.warning(e.details, icon=":material/warning:")
        else:
            st.error(f"The analyzer failed: {e}")
        st.stop()


def pick_sae(conn: Connection) -> None:
    """The sidebar's SAE picker (rendered once per run, by the app, for every page). Stops the
    run with a message when the analyzer is unreachable or its store has no SAEs."""
    with analyzer_errors(conn):
        saes = list_saes(conn)
    if not saes:
        st.info("The analyzer's store has no SAEs yet. Train some with `vitscope train` "
                "(or run `vitscope pipeline`), then reload this page.", icon=":material/inbox:")
        st.stop()
    by_id = {s.sae_id: s for s in saes}
    raw = st.query_params.get("sae")
    if raw is not None and raw not in by_id:
        st.sidebar.warning(f"No SAE `{raw}` in this store; showing another.")
    seed_from_url("sae", raw, raw if raw in by_id else None, fallback=saes[0].sae_id)
    if st.session_state["sae"] not in by_id:  # it vanished from the store since the last run
        st.session_state["sae"] = saes[0].sae_id
    sae_id = st.sidebar.selectbox("SAE", list(by_id), key="sae", format_func=lambda i: sae_label(by_id[i]))
    publish_to_url("sae", sae_id)


def seed_from_url(key: str, raw: str | None, value: object | None, fallback: object) -> None:
    """Set the state of the widget with ``key`` before it renders.

    A URL parameter ``raw`` that this session did not write itself means a link was followed:
    its parsed ``value`` wins (when valid, i.e. not None). Otherwise the widget keeps its state.
    A widget that lost its state (first visit, another page shown, ``st.switch_page``) takes the
    URL's value, or ``fallback`` without one."""
    lost = key not in st.session_state
    if value is not None and (lost or st.session_state.get(f"_{key}_url") != raw):
        st.session_state[key] = value
    elif lost:
        st.session_state[key] = fallback


def publish_to_url(key: str, value: object) -> None:
    """Mirror the current choice into the URL, so the address bar always links to this view."""
    st.query_params[key] = str(value)
    st.session_state[f"_{key}_url"] = str(value)


def open_latent(sae_id: str, latent: int) -> None:
    """Go to the Latent page showing ``latent`` of ``sae_id``."""
    st.switch_page("views/latent.py", query_params={"sae": sae_id, "latent": str(latent)})


def require_analysis(sae: SaeInfo) -> None:
    """Stop the page with a hint when the SAE has no analysis yet (latent pages need one)."""
    if not sae.analyzed:
        st.info(f"SAE `{sae.sae_id}` has not been analysed yet: run "
                f"`vitscope analyze --sae {sae.sae_id}` to compute its latents' statistics and top images.",
                icon=":material/hourglass_empty:")
        st.stop()


def selected_sae(conn: Connection) -> SaeInfo:
    """The SAE picked in the sidebar, in full (metrics and histogram)."""
    with analyzer_errors(conn):
        return get_sae(conn, st.session_state["sae"])


def sae_label(s: SaeInfo) -> str:
    """A short human label: id, layer, width and sparsity."""
    l0 = s.metrics.get("l0")
    return f"{s.sae_id[:12]} · L{s.layer} · {s.d_sae}" + (f" · L0 {l0:.1f}" if l0 is not None else "")
