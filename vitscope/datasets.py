"""Image datasets in a canonical, deterministic order.

The order is defined here and nowhere else: row i of an activation set is the i-th image of
this order that decoded. An activation set's manifest records the dataset's description
(:meth:`ImageSource.describe`), from which :func:`reopen_source` finds any image again, so the
analyzer can show images without re-listing the dataset.

Sources:

- an image folder: class folders (``root/<class>/<img>``, as ImageNet and iNat21 ship; labels from
  folder names) or a flat folder (no labels); sorted by relative path
- webdataset tar shards (as TreeOfLife-10M ships): a ``.tar`` file, a brace pattern
  (``/data/tol/shard-{000000..000063}.tar``) or a text file listing shards, local or ``s3://``;
  samples grouped by key in tar order, the image in a jpg/png/webp member, an optional label
  in a ``cls``/``label``/``txt`` member
- a list of images: a ``.csv`` (columns ``path`` or ``uri``, optional ``label``) or ``.jsonl``
  (``{"path"|"uri": ..., "label": ...}``); relative paths are relative to the list's folder,
  URIs may be ``s3://``, ``file://`` or ``http(s)://``; the list's order is the canonical order
"""

from __future__ import annotations

import abc
import csv
import functools
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from vitscope.store import StoreError, open_store

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
LABEL_EXTENSIONS = ("cls", "label", "txt")


class DatasetError(ValueError):
    """The dataset cannot be read as asked (missing folder, no images, bad list)."""


@dataclass(frozen=True, slots=True)  # slots: a listing of millions of images stays small
class ImageEntry:
    id: str  # stable id within the dataset
    label: str | None
    location: Any = None  # source-specific: a URI, (tar path, offset, size), or None (derived from id)


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) as RGB."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.load()
        return im.convert("RGB")


class ImageSource(abc.ABC):
    """An ordered list of images that can be decoded by index, from any process."""

    entries: list[ImageEntry]

    def __len__(self) -> int:
        return len(self.entries)

    @abc.abstractmethod
    def read(self, entry: ImageEntry) -> bytes | str:
        """The entry's encoded bytes, or a local path to them."""

    def load(self, i: int) -> Image.Image:
        return decode_image(self.read(self.entries[i]))

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What determines the images and their order, for content ids."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What a manifest records so that the images can be found again."""

    @staticmethod
    def _limit(entries: list[ImageEntry], max_images: int | None, where: object) -> list[ImageEntry]:
        if not entries:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
        return entries[:max_images] if max_images else entries


def _listing_hash(entries: list[ImageEntry], size_of) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.id}\0{e.label}\0{size_of(e)}\n".encode())
    return h.hexdigest()


class ImageFolderSource(ImageSource):
    """A folder of images, sorted by relative path; class-folder labels when every image sits
    exactly one folder deep."""

    def __init__(self, root: str | os.PathLike, max_images: int | None = None):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist")
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames.sort()
            for name in filenames:
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    found.append(os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/"))
        found.sort()
        self.layout = "class-folders" if found and all(rel.count("/") == 1 for rel in found) else "flat"
        # The path is root + id, so entries hold no copy of it; labels are interned (one string
        # per class, not per image).
        entries = [ImageEntry(rel, sys.intern(rel.split("/", 1)[0]) if self.layout == "class-folders" else None)
                   for rel in found]
        self.entries = self._limit(entries, max_images, self.root)

    def read(self, entry: ImageEntry) -> str:
        return os.path.join(self.root, entry.id)

    def identity(self) -> dict[str, Any]:
        # Ids and sizes: cheap to compute, unlike hashing every file.
        return {"kind": "image-folder", "root": str(self.root), "layout": self.layout, "n": len(self.entries),
                "listing_sha256": _listing_hash(self.entries, lambda e: os.path.getsize(self.read(e)))}

    def describe(self) -> dict[str, Any]:
        return {"kind": "image-folder", "root": str(self.root), "layout": self.layout, "n_listed": len(self.entries)}


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` -> the three names (zero padding kept), as webdataset writes them."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    names = [pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():] for i in range(int(lo), int(hi) + 1)]
    return [n for name in names for n in expand_braces(name)]


def _cache_dir() -> Path:
    """$VITSCOPE_CACHE, default a folder in the system's temporary directory."""
    return Path(os.environ.get("VITSCOPE_CACHE") or Path(tempfile.gettempdir()) / "vitscope-cache")


def _is_remote(uri: str) -> bool:
    return uri.startswith(("s3://", "http://", "https://"))


@functools.cache
def _bucket(bucket: str, pid: int):
    """One S3 client per bucket and process (boto3 clients must not cross a fork into the
    loader's worker processes, and making one per image costs more than the GET)."""
    return open_store(f"s3://{bucket}")


def _s3_object(uri: str):
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return _bucket(bucket, os.getpid()), key


def read_uri(uri: str) -> bytes:
    """Bytes of an s3://, http(s)://, file:// URI or a local path."""
    if uri.startswith("s3://"):
        store, key = _s3_object(uri)
        return store.get_bytes(key)
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri, timeout=60) as r:
            return r.read()
    return Path(uri.removeprefix("file://")).read_bytes()


_BLOCK = 4 << 20  # a batch of a loader worker's images, give or take


def _read_range(uri: str, offset: int, size: int, object_size: int) -> bytes:
    """``size`` bytes at ``offset`` of a local file or of a remote object of ``object_size``
    bytes. Remote reads go through blocks of :data:`_BLOCK` bytes cached per process (and per
    object size, so a rewritten object of another size is read afresh): a loader reads a tar's
    images in order, so a batch of them costs a GET or two instead of one per image."""
    if not _is_remote(uri):
        with open(uri.removeprefix("file://"), "rb") as f:
            f.seek(offset)
            return f.read(size)
    if size > _BLOCK:
        return _get(uri, offset, size)
    first, last = offset // _BLOCK, (offset + max(size, 1) - 1) // _BLOCK
    data = b"".join(_block(uri, object_size, b, os.getpid()) for b in range(first, last + 1))
    start = offset - first * _BLOCK
    return data[start:start + size]


@functools.lru_cache(maxsize=8)
def _block(uri: str, object_size: int, index: int, pid: int) -> bytes:
    start = index * _BLOCK
    return _get(uri, start, min(_BLOCK, object_size - start))


def _get(uri: str, offset: int, size: int) -> bytes:
    """One ranged GET of a remote object."""
    if uri.startswith("s3://"):
        store, key = _s3_object(uri)
        return store.get_range(key, offset, size)
    if size == 0:
        return b""
    req = urllib.request.Request(uri, headers={"Range": f"bytes={offset}-{offset + size - 1}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
    if len(data) != size:  # a server that ignores Range sends the whole object
        raise DatasetError(f"{uri}: asked for {size} bytes at {offset}, got {len(data)}")
    return data


def _remote_size(uri: str) -> int:
    if uri.startswith("s3://"):
        store, key = _s3_object(uri)
        return store.size(key)
    with urllib.request.urlopen(urllib.request.Request(uri, method="HEAD"), timeout=60) as r:
        return int(r.headers["Content-Length"])


class _SequentialReader(io.RawIOBase):
    """A forward-only reader over a remote object, in large ranged GETs: what tarfile's stream
    mode needs to walk a tar's headers without a local copy of the tar."""

    BLOCK = 16 << 20

    def __init__(self, uri: str, size: int):
        self.uri, self.size, self.pos = uri, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        buf[:n] = _get(self.uri, self.pos, n)
        self.pos += n
        return n


class TarSource(ImageSource):
    """Webdataset-style tar shards. Each sample is a group of members sharing a key (the name up
    to the first dot); samples keep the tar order. A tar is listed by walking its headers once
    (a remote tar is streamed, never copied to disk; its listing is cached in $VITSCOPE_CACHE
    by URI and size); an image is then one read at its offset (a ranged GET when remote)."""

    def __init__(self, spec: str | list[str], max_images: int | None = None):
        self.shards = self._shard_list(spec)
        entries: list[ImageEntry] = []
        for uri in self.shards:
            entries += self._index(uri)
            if max_images and len(entries) >= max_images:
                break
        self.entries = self._limit(entries, max_images, spec)

    @staticmethod
    def _shard_list(spec: str | list[str]) -> list[str]:
        if isinstance(spec, list):
            return spec
        if spec.endswith((".txt", ".shards")):
            base = Path(spec).parent
            lines = [ln.strip() for ln in Path(spec).read_text().splitlines() if ln.strip()]
            return [ln if "://" in ln or os.path.isabs(ln) else str(base / ln) for ln in lines]
        return expand_braces(spec)

    @staticmethod
    def _index(uri: str) -> list[ImageEntry]:
        """The shard's samples that have an image, in tar order."""
        try:
            if not _is_remote(uri):
                with open(uri.removeprefix("file://"), "rb") as f:
                    return _scan_tar(uri, f, os.fstat(f.fileno()).st_size)
            size = _remote_size(uri)
            cache = _cache_dir() / "tar-index" / f"{hashlib.sha256(uri.encode()).hexdigest()[:32]}.json"
            try:
                cached = json.loads(cache.read_text())
                if cached.get("format") == 1 and cached["uri"] == uri and cached["size"] == size:
                    return [ImageEntry(i, label, (uri, offset, n, size)) for i, label, offset, n in cached["entries"]]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no usable cached listing: walk the tar
            with io.BufferedReader(_SequentialReader(uri, size), buffer_size=_SequentialReader.BLOCK) as f:
                entries = _scan_tar(uri, f, size)
        except (tarfile.TarError, OSError, StoreError) as e:
            raise DatasetError(f"cannot read tar shard {uri}: {e}") from e
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps({"format": 1, "uri": uri, "size": size,
                                   "entries": [[e.id, e.label, e.location[1], e.location[2]] for e in entries]}))
        os.replace(tmp, cache)
        return entries

    def read(self, entry: ImageEntry) -> bytes:
        return _read_range(*entry.location)

    def identity(self) -> dict[str, Any]:
        return {"kind": "webdataset", "shards": self.shards, "n": len(self.entries),
                "listing_sha256": _listing_hash(self.entries, lambda e: e.location[2])}

    def describe(self) -> dict[str, Any]:
        return {"kind": "webdataset", "shards": self.shards, "n_listed": len(self.entries)}


def _scan_tar(uri: str, fileobj, tar_size: int) -> list[ImageEntry]:
    """Walk a tar's headers in one forward pass (tarfile's stream mode: no seeking), reading
    only the small label members. Locations are (uri, offset, size, the tar's size)."""
    images: dict[str, list[tuple[int, int]]] = {}  # key -> its image members (offset, size), in tar order
    labels: dict[str, str] = {}
    order: list[str] = []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            key = member.name[: len(member.name) - len(base)] + key
            if key not in images:
                images[key] = []
                order.append(key)
            ext = ext.lower()
            if ext in LABEL_EXTENSIONS:
                labels.setdefault(key, tar.extractfile(member).read().decode().strip())
            elif "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                images[key].append((member.offset_data, member.size))
    name = Path(uri).name
    # A sample without an image (e.g. metadata only) is not an image of the dataset.
    return [ImageEntry(f"{name}/{key}", labels.get(key), (uri, *images[key][0], tar_size))
            for key in order if images[key]]


class ListSource(ImageSource):
    """A CSV or JSONL list of image paths or URIs with optional labels, in list order."""

    def __init__(self, list_file: str | os.PathLike, max_images: int | None = None):
        self.list_file = Path(list_file).expanduser().resolve()
        if not self.list_file.is_file():
            raise DatasetError(f"image list {self.list_file} does not exist")
        raw = self.list_file.read_bytes()
        self._sha256 = hashlib.sha256(raw).hexdigest()
        rows = self._rows(raw.decode())
        base = self.list_file.parent
        entries = []
        for n, row in enumerate(rows, start=1):
            ref = row.get("path") or row.get("uri") or row.get("image")
            if not ref:
                raise DatasetError(f"{self.list_file} row {n} has no path/uri/image field")
            location = ref if "://" in ref or os.path.isabs(ref) else str(base / ref)
            label = row.get("label")
            entries.append(ImageEntry(ref, None if label in (None, "") else str(label), location))
        self.entries = self._limit(entries, max_images, self.list_file)

    def _rows(self, text: str) -> list[dict[str, Any]]:
        if self.list_file.suffix == ".jsonl":
            try:
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise DatasetError(f"{self.list_file} is not valid JSONL: {e}") from e
        return list(csv.DictReader(io.StringIO(text)))

    def read(self, entry: ImageEntry) -> bytes | str:
        loc = entry.location
        return read_uri(loc) if "://" in loc else loc

    def identity(self) -> dict[str, Any]:
        return {"kind": "list", "file": str(self.list_file), "sha256": self._sha256, "n": len(self.entries)}

    def describe(self) -> dict[str, Any]:
        return {"kind": "list", "file": str(self.list_file), "n_listed": len(self.entries)}


def open_source(data: str, max_images: int | None = None) -> ImageSource:
    """The source for ``data``: a folder, tar shard(s), or a .csv/.jsonl list."""
    if data.endswith((".csv", ".jsonl")):
        return ListSource(data, max_images)
    if data.endswith((".tar", ".shards")) or ".tar" in data and "{" in data or data.endswith(".txt"):
        return TarSource(data, max_images)
    if data.startswith("s3://"):
        raise DatasetError(f"{data}: S3 datasets are read as webdataset tars (…/shard-{{000..099}}.tar) or lists")
    return ImageFolderSource(data, max_images)


def load_image_by_id(described: dict[str, Any], image_id: str) -> Image.Image:
    """Decode one image of a published set from its manifest's ``dataset`` entry and its id,
    without listing the whole dataset. Raises FileNotFoundError when it is gone."""
    kind = described.get("kind")
    if kind == "image-folder":
        return decode_image(Path(described["root"]) / image_id)
    if kind == "list":
        base = Path(described["file"]).parent
        loc = image_id if "://" in image_id or os.path.isabs(image_id) else str(base / image_id)
        return decode_image(read_uri(loc) if "://" in loc else loc)
    if kind == "webdataset":
        shard_name, _, key = image_id.partition("/")
        for uri in described["shards"]:
            entry = _tar_index(uri).get(image_id) if Path(uri).name == shard_name else None
            if entry is not None:
                return decode_image(_read_range(*entry.location))
        raise FileNotFoundError(f"no image {image_id!r} in the listed tar shards")
    raise DatasetError(f"unknown dataset kind {kind!r}")


@functools.lru_cache(maxsize=64)
def _tar_index(uri: str) -> dict[str, ImageEntry]:
    """A shard's samples by id, indexed once per process (the analyzer looks images up often)."""
    return {e.id: e for e in TarSource._index(uri)}


class DecodedImages(Dataset):
    """Map-style dataset: index -> (index, pixels or None, error). Decoding failures are
    returned, not raised, so that one bad file never stops a run."""

    def __init__(self, source: ImageSource, transform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(self.source.load(i)), ""
        except Exception as e:  # PIL and I/O raise many types for bad files; all mean "skip this one"
            return i, None, f"{type(e).__name__}: {e}"


def collate(batch):
    """Keep the batch's order; split decoded images from failures."""
    ok = [(i, x) for i, x, err in batch if x is not None]
    failed = [(i, err) for i, x, err in batch if x is None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed
