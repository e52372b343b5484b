"""Image sources in a canonical, deterministic order.

The order is defined here and nowhere else: row i of an activation set is the i-th image of
this order that decoded, whatever the number of loader workers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vitscope.models import load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


@dataclass(frozen=True)
class ImageEntry:
    id: str  # stable id: path relative to the dataset root, '/'-separated
    label: str | None
    path: str


class DatasetError(ValueError):
    """The dataset cannot be read as asked (missing folder, no images)."""


class ImageFolderSource:
    """A folder of images: class folders (``root/<class>/<img>``, labels from folder names, as
    ImageNet and iNat21 ship) or a flat folder (no labels). Sorted by relative path."""

    def __init__(self, root: str | os.PathLike, max_images: int | None = None):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist")
        entries: list[ImageEntry] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                    entries.append(ImageEntry(rel, None, full))
        entries.sort(key=lambda e: e.id)
        if not entries:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        # Class-folder layout when every image sits exactly one folder deep.
        self.layout = "class-folders" if all(e.id.count("/") == 1 for e in entries) else "flat"
        if self.layout == "class-folders":
            entries = [ImageEntry(e.id, e.id.split("/", 1)[0], e.path) for e in entries]
        self.entries = entries[:max_images] if max_images else entries

    def __len__(self) -> int:
        return len(self.entries)

    def identity(self) -> dict[str, Any]:
        """What determines the dataset's content and order, for content ids: the root plus
        every image's id and size (cheap to compute, unlike hashing every file)."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(f"{e.id}\0{os.path.getsize(e.path)}\n".encode())
        return {"kind": "image-folder", "root": str(self.root), "layout": self.layout,
                "n": len(self.entries), "listing_sha256": h.hexdigest()}

    def describe(self) -> dict[str, Any]:
        """What the manifest records so that images can be found again (the analyzer shows them)."""
        return {"kind": "image-folder", "root": str(self.root), "layout": self.layout, "n_listed": len(self.entries)}


class DecodedImages(Dataset):
    """Map-style dataset: index -> (index, pixels or None, error). Decoding failures are
    returned, not raised, so that one bad file never stops a run."""

    def __init__(self, entries: list[ImageEntry], transform):
        self.entries = entries
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.entries[i].path)), ""
        except Exception as e:  # PIL raises many types for bad files; all mean "skip this one"
            return i, None, f"{type(e).__name__}: {e}"


def collate(batch):
    """Keep the batch's order; split decoded images from failures."""
    ok = [(i, x) for i, x, err in batch if x is not None]
    failed = [(i, err) for i, x, err in batch if x is None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed
