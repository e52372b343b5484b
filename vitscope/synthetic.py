"""A small image set with a planted concept, built from photos that ship with scikit-image.

Half of the images carry a solid red square at a random place. It is the end-to-end check
that the pipeline works: some SAE latent should fire on exactly those images, and most
strongly on the square's patches. The demo uses the same set, so it needs no download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data photos that need no download (bundled with the package).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
           "immunohistochemistry", "hubble_deep_field", "retina", "logo", "grass", "gravel", "brick")


@dataclass(frozen=True)
class PlantedImage:
    id: str  # path relative to the dataset root
    has_object: bool
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) in pixels, when planted


def _backgrounds() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in _PHOTOS:
        try:
            img = getattr(data, name)()
        except Exception:  # a photo that would need a download, or a renamed one
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
        out.append(img)
    if len(out) < 4:
        raise RuntimeError("scikit-image's sample photos are missing; reinstall scikit-image")
    return out


def make_planted_dataset(root: str | Path, n_images: int = 64, size: int = 112, square: int = 32,
                         seed: int = 0, quality: int = 92, align: int = 1) -> list[PlantedImage]:
    """Write ``n_images`` JPEGs under ``root/{plain,square}/`` and ``root/../<name>.planted.json``.

    Every other image (in canonical order) carries a red ``square``×``square`` pixel square.
    Backgrounds are random crops of real photos, resized to ``size``×``size`` (the tiny test
    model's input size, so patch coordinates equal pixel coordinates / patch size). With ``align``
    (the patch size, say) the squares' corners sit on multiples of it, so every patch is either
    covered or not: labels without ambiguous edges, for tests of patch-level alignment."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    photos = _backgrounds()
    items: list[PlantedImage] = []
    for i in range(n_images):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        crop = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        im = Image.fromarray(photo[top:top + crop, left:left + crop]).resize((size, size), Image.BICUBIC)
        planted = i % 2 == 1
        box = None
        if planted:
            x, y = (int(rng.integers(0, (size - square) // align + 1)) * align for _ in range(2))
            arr = np.asarray(im).copy()
            arr[y:y + square, x:x + square] = (230, 20, 20)
            im = Image.fromarray(arr)
            box = (x, y, x + square, y + square)
        rel = f"{'square' if planted else 'plain'}/img_{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel, quality=quality)
        items.append(PlantedImage(rel, planted, box))
    sidecar = root.parent / f"{root.name}.planted.json"
    sidecar.write_text(json.dumps([item.__dict__ for item in items], indent=1))
    return items
