"""Patch heatmaps drawn over the image the model saw."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def overlay(image_png: bytes, heatmap: Sequence[float], grid: tuple[int, int], best_patch: int | None = None,
            vmax: float | None = None, alpha: float = 0.6, cmap: str = "inferno",
            size: int | None = None) -> Image.Image:
    """The image with its per-patch activations laid over it.

    ``heatmap`` holds ``rows * cols`` activations in row-major order, one per patch. Each patch
    is coloured with ``cmap`` at an opacity proportional to its activation (up to ``alpha``), so
    patches where the latent is silent show the photo untouched. ``vmax`` is the activation that
    gets full colour (default: the heatmap's own maximum; pass a shared value to compare images).
    ``best_patch`` (row-major index) gets a box. ``size`` scales the longer side first, so the box
    stays crisp when a small model input is shown large.
    """
    from matplotlib import colormaps  # a third of a second to import: only pages that draw heatmaps pay it

    rows, cols = grid
    values = np.asarray(heatmap, dtype=np.float32)
    if values.size != rows * cols:
        raise ValueError(f"heatmap has {values.size} values, grid {rows}x{cols} needs {rows * cols}")
    img = Image.open(io.BytesIO(image_png)).convert("RGB")
    if size is not None:
        scale = size / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)

    top = float(values.max()) if vmax is None else vmax
    strength = np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values)
    # Nearest upsampling keeps patch borders honest: each patch is one block of colour.
    grid_img = Image.fromarray(strength.reshape(rows, cols)).resize(img.size, Image.Resampling.NEAREST)
    s = np.asarray(grid_img, dtype=np.float32)
    colour = colormaps[cmap](s)[..., :3] * 255.0
    a = (alpha * s)[..., None]
    blended = (1.0 - a) * np.asarray(img, dtype=np.float32) + a * colour
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))

    if best_patch is not None and 0 <= best_patch < rows * cols:
        r, c = divmod(best_patch, cols)
        pw, ph = out.width / cols, out.height / rows
        box = (round(c * pw), round(r * ph), round((c + 1) * pw) - 1, round((r + 1) * ph) - 1)
        ImageDraw.Draw(out).rectangle(box, outline=(0, 255, 170), width=max(2, out.width // 100))
    return out


def to_jpeg(img: Image.Image, quality: int = 85) -> bytes:
    """JPEG bytes of ``img``: a photo with its heatmap is about a sixth of its PNG's size at quality 85."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_png(img: Image.Image) -> bytes:
    """PNG bytes of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
