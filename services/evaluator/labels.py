"""Labels an evaluation can score against: each image's class (its record's ``label``) and,
where the dataset has them, each patch's class.

Patch labels come from segmentation masks (``--masks``: a PNG per image whose pixels are class
indices) or from the planted-object sidecar that :func:`vitscope.synthetic.make_planted_dataset`
writes beside its images (``<root>.planted.json``: a box per planted image). Either is sent
through the model's geometric transform (the same resize and crop as the pixels; nearest
neighbour for masks, so no class is blended into another), then pooled over the patch grid: a
patch takes the class covering most of it, and belongs to a planted object when at least half
of it is covered."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitscope.models import TransformInfo

PATCH_CLASSES = ("background", "object")
"""The classes of planted-object patch labels."""
BACKGROUND = "background"
"""The class that label alignment does not score (nearly every score ranks it well)."""
MASK_CLASSES_FILE = "classes.txt"
"""In a masks folder: the class names, one per line, in the order of the mask values."""
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
    return (_patch_pixels(seen, grid).mean(axis=1) >= COVERED).astype(np.int64)


def _patch_pixels(seen: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """An image as the model sees it [H, W] cut into its patches: [patches (row-major), pixels]."""
    rows, cols = grid
    h, w = seen.shape
    cells = seen[: h - h % rows, : w - w % cols].reshape(rows, h // rows, cols, w // cols).transpose(0, 2, 1, 3)
    return cells.reshape(rows * cols, -1)


def mask_classes(masks: str | Path) -> list[str]:
    """The class names of a masks folder: its ``classes.txt``, or ``background`` for 0 and
    ``class <i>`` for the others (up to 255)."""
    listed = Path(masks) / MASK_CLASSES_FILE
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if len(names) < 2:
            raise ValueError(f"{listed} names {len(names)} class: label alignment needs two or more")
        return names
    return [BACKGROUND] + [f"class {i}" for i in range(1, 256)]


def mask_patch_labels(masks: str | Path, image_id: str, transform: TransformInfo, grid: tuple[int, int],
                      n_classes: int) -> np.ndarray | None:
    """Per patch the class covering most of it, from ``<masks>/<image id, extension .png>``; None
    when the image has no mask. Raises ValueError for a mask value beyond the class list."""
    path = (Path(masks) / image_id).with_suffix(".png")
    if not path.is_file():
        return None
    with Image.open(path) as mask:
        seen = np.asarray(replace(transform, interpolation="nearest").geometric()(mask.convert("L")).convert("L"))
    if int(seen.max()) >= n_classes:
        raise ValueError(f"mask {path} has class {int(seen.max())}, beyond the {n_classes} classes named")
    counts = np.apply_along_axis(np.bincount, 1, _patch_pixels(seen, grid).astype(np.int64), minlength=n_classes)
    return counts.argmax(axis=1).astype(np.int64)  # ties: the lower class
