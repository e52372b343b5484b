"""Labels an evaluation can score against: each image's class (its record's ``label``) and,
where the dataset has them, each patch's class.

Patch labels come from the planted-object sidecar that :func:`vitscope.synthetic.make_planted_dataset`
writes beside its images (``<root>.planted.json``: a box per planted image). A box is drawn as a
mask of the image's own size and sent through the model's geometric transform (the same resize
and crop as the pixels), then pooled over the patch grid: a patch belongs to the object when at
least half of it is covered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitscope.models import TransformInfo

PATCH_CLASSES = ("background", "object")
"""The classes of planted-object patch labels."""
COVERED = 0.5
"""Share of a patch the box must cover for the patch to count as the object."""


def image_classes(records: list[dict[str, Any]]) -> tuple[list[str], np.ndarray] | None:
    """(class names, class index per image) from the records' labels; None unless every image
    has a label and there are at least two classes."""
    labels = [r.get("label") for r in records]
    if any(label is None for label in labels):
        return None
    names = sorted(set(map(str, labels)))
    if len(names) < 2:
        return None
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[str(label)] for label in labels], dtype=np.int64)


def planted_boxes(dataset: dict[str, Any]) -> dict[str, tuple[int, int, int, int] | None] | None:
    """Image id -> planted box (None: no object) for a planted image folder; None for any other
    dataset."""
    if dataset.get("kind") != "image-folder":
        return None
    root = Path(dataset["root"])
    sidecar = root.parent / f"{root.name}.planted.json"
    if not sidecar.is_file():
        return None
    return {item["id"]: (tuple(item["box"]) if item.get("box") else None) for item in json.loads(sidecar.read_text())}


def box_patch_labels(box: tuple[int, int, int, int] | None, image_size: tuple[int, int], transform: TransformInfo,
                     grid: tuple[int, int]) -> np.ndarray:
    """Per patch (row-major over ``grid``) 1 where the box covers at least :data:`COVERED` of it
    in the model's input, else 0. ``image_size`` is the original image's (width, height)."""
    if box is None:
        return np.zeros(grid[0] * grid[1], dtype=np.int64)
    mask = Image.new("L", image_size, 0)
    mask.paste(255, box)
    seen = np.asarray(transform.geometric()(mask).convert("L"), dtype=np.float64) / 255.0
    rows, cols = grid
    h, w = seen.shape
    cover = seen[: h - h % rows, : w - w % cols].reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3))
    return (cover >= COVERED).astype(np.int64).reshape(-1)
