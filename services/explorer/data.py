"""What the explorer's pages share: the analyzer connection, cached gRPC results, the current
selection (mirrored into the URL so a link reopens the same view) and error display."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import streamlit as st

from vitscope.proto import pb

from .client import AnalyzerClient, AnalyzerError, image_index, sae_id
from .heatmap import overlay, to_jpeg, to_png

DEFAULT_ANALYZER = "127.0.0.1:50051"
TILE_SIZE = 256  # pixels on the longer side of each top-k image
THUMB_SIZE = 128  # band samples, search examples

VIEWS = {"best_patch": pb.TOP_IMAGES_VIEW_BEST_PATCH, "cls": pb.TOP_IMAGES_VIEW_CLS, "mean": pb.TOP_IMAGES_VIEW_MEAN}
"""URL spelling of each top-images view."""
VIEW_LABELS = {"best_patch": "Best patch", "cls": "CLS token", "mean": "Image mean"}


@dataclass(frozen=True)
class Connection:
    target: str
    token: str | None


@dataclass(frozen=True)
class Tile:
    data: bytes  # the picture, encoded as ``mime`` says
    caption: str
    image: str  # activationSets/{set}/images/{n}
    patch: int  # the example's best patch
    mime: str = "image/png"


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
def list_saes(conn: Connection) -> list[pb.Sae]:
    # Every page's first call: `vitscope explore` starts the app and the analyzer together, so a
    # page opened at once waits for the analyzer rather than saying it is down.
    return _client(conn).list_saes(wait_for_ready=True)


@st.cache_data(ttl=30, show_spinner=False)
def get_sae(conn: Connection, sae: str) -> pb.Sae:
    return _client(conn).get_sae(sae)


@st.cache_data(ttl=30, show_spinner=False, max_entries=64)
def get_evaluation(conn: Connection, sae: str) -> pb.Evaluation | None:
    # Short-lived: `vitscope evaluate` may publish a newer report while the page is open.
    return _client(conn).get_evaluation(sae)


# Short-lived: the pages carry labels, which anyone may change (a save here clears it at once).
@st.cache_data(ttl=30, show_spinner=False, max_entries=512)
def list_latents(conn: Connection, sae: str, page_size: int, page_token: str, order_by: str,
                 min_frequency: float, max_frequency: float, label_query: str = "") -> pb.ListLatentsResponse:
    return _client(conn).list_latents(sae, page_size, page_token, order_by, min_frequency, max_frequency,
                                      label_query)


# A dataset image never changes; ~50 kB each at the model's input size.
@st.cache_data(show_spinner=False, max_entries=512)
def dataset_image(conn: Connection, image: str) -> pb.Image:
    return _client(conn).get_image(image)


def _images(conn: Connection, examples) -> list[pb.Image]:
    # Independent calls: fetched concurrently to hide a remote analyzer's latency.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda e: dataset_image(conn, e.image), examples))


def caption(e: pb.Example) -> str:
    """label · score · image row, under a tile."""
    label = f"{e.label} · " if e.label else ""
    return f"{label}{e.score:.3g} · #{image_index(e)}"


# Tiles are ~10 kB each (JPEG), so keep only the latents looked at most recently.
@st.cache_data(ttl=600, show_spinner=False, max_entries=32)
def latent_tiles(conn: Connection, sae: str, latent: int, top_images: int | None,
                 view: str = "") -> tuple[pb.Latent, list[Tile]]:
    """A latent (in ``view``, a key of :data:`VIEWS`; "" for the analysis' default) with its
    top-k images, each overlaid with its patch heatmap, as JPEG tiles (a sixth of PNG's bytes,
    which the browser fetches and decodes on every visit).

    All tiles share one colour scale (the strongest activation among them), so tiles compare."""
    lat = _client(conn).get_latent(sae, latent, top_images=top_images, heatmaps=True,
                                   view=VIEWS.get(view, pb.TOP_IMAGES_VIEW_UNSPECIFIED))
    vmax = max((max(e.heatmap, default=0.0) for e in lat.examples), default=0.0) or None
    tiles = []
    for e, img in zip(lat.examples, _images(conn, lat.examples), strict=True):
        pic = overlay(img.data, e.heatmap, (lat.grid_rows, lat.grid_cols), e.patch, vmax=vmax, size=TILE_SIZE)
        tiles.append(Tile(to_jpeg(pic), caption(e), e.image, e.patch, "image/jpeg"))
    return lat, tiles


@st.cache_data(ttl=600, show_spinner=False, max_entries=256)
def thumbnails(conn: Connection, examples: tuple[pb.Example, ...], grid: tuple[int, int]) -> list[Tile]:
    """Small tiles of examples without heatmaps (band samples): the image, its best patch boxed."""
    rows, cols = grid
    return [Tile(to_png(overlay(img.data, [0.0] * (rows * cols), grid, e.patch, size=THUMB_SIZE)), caption(e),
                 e.image, e.patch) for e, img in zip(examples, _images(conn, examples), strict=True)]


@st.cache_data(ttl=600, show_spinner=False, max_entries=256)
def similar_latents(conn: Connection, sae: str, latent: int, other: str | None = None,
                    top_latents: int = 10) -> pb.FindSimilarLatentsResponse:
    return _client(conn).find_similar_latents(sae, latent, other, top_latents)


def client(conn: Connection) -> AnalyzerClient:
    """The shared client, for calls whose results must not be cached (labels)."""
    return _client(conn)


@contextmanager
def analyzer_errors(conn: Connection) -> Iterator[None]:
    """Show a failed analyzer call as a message and stop the page, instead of a traceback."""
    try:
        yield
    except AnalyzerError as e:
        if e.unreachable:
            st.error(f"Cannot reach the analyzer at `{conn.target}` ({e.code.name}). Start it with "
                     "`vitscope serve`, or point `VITSCOPE_ANALYZER` at a running one.", icon=":material/power_off:")
            st.button("Retry", icon=":material/refresh:", key="_retry")  # a click reruns the page
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
    by_id = {sae_id(s): s for s in saes}
    raw = st.query_params.get("sae")
    if raw is not None and raw not in by_id:
        st.sidebar.warning(f"No SAE `{raw}` in this store; showing another.")
    seed_from_url("sae", raw, raw if raw in by_id else None, fallback=sae_id(saes[0]))
    if st.session_state["sae"] not in by_id:  # it vanished from the store since the last run
        st.session_state["sae"] = sae_id(saes[0])
    chosen = st.sidebar.selectbox("SAE", list(by_id), key="sae", format_func=lambda i: sae_label(by_id[i]))
    publish_to_url("sae", chosen)


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


def url_state(key: str, parse: Callable[[str], object | None], fallback: object) -> None:
    """Seed a widget's state from URL parameter ``key`` (see :func:`seed_from_url`);
    ``parse`` turns the parameter into the widget's value, or None when it is not a valid one."""
    raw = st.query_params.get(key)
    seed_from_url(key, raw, parse(raw) if raw is not None else None, fallback)


def publish_to_url(key: str, value: object) -> None:
    """Mirror the current choice into the URL, so the address bar always links to this view."""
    st.query_params[key] = str(value)
    st.session_state[f"_{key}_url"] = str(value)


def open_latent(sae: str, latent: int) -> None:
    """Go to the Latent page showing ``latent`` of SAE ``sae`` (an id)."""
    st.switch_page("views/latent.py", query_params={"sae": sae, "latent": str(latent)})


def latent_link(sae: str, latent: int, text: str, where=st) -> None:
    """A link to the Latent page of ``latent`` (it keeps the session, and its URL is the page's)."""
    where.page_link("views/latent.py", label=text, query_params={"sae": sae, "latent": str(latent)})


def label_text(label: pb.LatentLabel) -> str:
    """A latent's label for a list or a caption ("" when it has none)."""
    return label.text if label.revision else ""


def require_analysis(sae: pb.Sae) -> None:
    """Stop the page with a hint when the SAE has no analysis yet (latent pages need one)."""
    if not sae.analysis:
        st.info(f"SAE `{sae_id(sae)}` has not been analysed yet: run "
                f"`vitscope analyze --sae {sae_id(sae)}` to compute its latents' statistics and top images.",
                icon=":material/hourglass_empty:")
        st.stop()


def selected_sae(conn: Connection) -> pb.Sae:
    """The SAE picked in the sidebar, in full (metrics and histogram)."""
    with analyzer_errors(conn):
        return get_sae(conn, st.session_state["sae"])


def sae_label(s: pb.Sae) -> str:
    """A short human label: id, layer, width and sparsity."""
    l0 = s.metrics.get("l0")
    return f"{sae_id(s)[:12]} · L{s.layer} · {s.d_sae}" + (f" · L0 {l0:.1f}" if l0 is not None else "")
