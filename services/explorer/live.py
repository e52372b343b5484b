"""What the Image probe and Concept search pages share: the analyzer's live calls (encode,
heatmap, search) with cached results, latents' labels for the lists they show, and the
handling of images a researcher uploads."""

from __future__ import annotations

import io
import warnings

import streamlit as st
from PIL import Image

from vitscope.proto import pb

from .client import ImageRef, sae_id
from .data import Connection, client, label_text
from .heatmap import to_png

MAX_UPLOAD_MB = 15
"""Largest upload, in MB: the analyzer refuses requests over 16 MiB, and the message around the
image needs a little room too."""
SHOWN_SIZE = 448  # pixels on the longer side of an upload as kept for display
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]
"""File types the upload widgets offer (the analyzer reads whatever Pillow does)."""
TOP_LATENTS = 8  # latents listed per patch, for the whole image and its CLS token


class UnreadableImage(ValueError):
    """Uploaded bytes that are not an image (or not one this explorer would decode)."""


# An SAE never changes once trained (its id is its content), so live results may live long;
# uploads make entries large, hence the bounds.
@st.cache_data(ttl=3600, show_spinner=False, max_entries=64)
def encode(conn: Connection, sae: str, image: ImageRef) -> pb.EncodedImage:
    """The strongest latents of every patch of an image, of its whole and of its CLS token."""
    return client(conn).encode_image(sae, image, top_latents=TOP_LATENTS)


@st.cache_data(ttl=3600, show_spinner=False, max_entries=256)
def heatmap(conn: Connection, sae: str, latent: int, image: ImageRef) -> pb.Heatmap:
    """One latent's activation on every patch of an image."""
    return client(conn).get_heatmap(sae, latent, image)


@st.cache_data(ttl=3600, show_spinner=False, max_entries=64)
def search(conn: Connection, sae: str, positives: tuple[pb.SearchExample, ...],
           negatives: tuple[pb.SearchExample, ...], top_latents: int) -> pb.SearchLatentsResponse:
    """The latents that fire on the positive examples and not on the negative ones, best first."""
    return client(conn).search_latents(sae, positives, negatives, top_latents=top_latents)


# Labels are edited on the Latent page, so a list shows a new one within half a minute.
@st.cache_data(ttl=30, show_spinner=False)
def _labels(conn: Connection, sae: str) -> dict[int, str]:
    return {lat.index: label_text(lat.label) for lat in client(conn).labelled_latents(sae)}


def labels(conn: Connection, sae: pb.Sae) -> dict[int, str]:
    """Every labelled latent's label, by index (none before the SAE is analysed: labels are
    listed with the analysis' statistics)."""
    return _labels(conn, sae_id(sae)) if sae.analysis else {}


def latent_text(index: int, labels: dict[int, str], figure: str = "") -> str:
    """A latent's line in a list: its index, a figure (an activation, a score) and its label."""
    return " · ".join(p for p in (f"**{index}**", figure, labels.get(index, "")) if p)


@st.cache_data(show_spinner=False, max_entries=64)
def as_seen(data: bytes, grid: tuple[int, int]) -> bytes:
    """An uploaded image as the model sees it, near enough to lay its patch grid over: cropped
    about its centre to the grid's shape (the ViT's transform crops so), as PNG of at most
    :data:`SHOWN_SIZE` pixels. Raises :class:`UnreadableImage` for bytes that are no image."""
    try:
        # The analyzer refuses decompression bombs; so does the explorer, before decoding one.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"not an image this explorer can read ({type(e).__name__})") from None
    rows, cols = grid
    img = img.convert("RGB")
    width = min(img.width, round(img.height * cols / rows))
    height = min(img.height, round(img.width * rows / cols))
    left, top = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((left, top, left + width, top + height))
    img.thumbnail((SHOWN_SIZE, SHOWN_SIZE), Image.Resampling.BICUBIC)
    return to_png(img)
