"""Activation shard format v1 (the written spec is docs/shard-format.md; code that diverges
from it is a bug).

A set lives under ``activations/<set_id>/``::

    manifest.json                 written last; readers trust only what it lists
    shard-000000/layer-10.bin     [n_images, tokens_per_image, d_model], little-endian, raw
    shard-000000/images.jsonl     one {"id", "label"} line per image, in row order
    shard-000000/index.json       the shard's own record (lets an interrupted run resume)

No shard is padded: each records its exact image count, and the last one is as long as it is.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscope.hashing import sha256_bytes

# The manifest and its parts need no torch: they live in shard_format, for what reads a set's
# description without its activations (the analyzer's listings); they are this module's names too.
from vitscope.shard_format import (  # noqa: F401
    FORMAT,
    PREFIX,
    STORED_DTYPES,
    VERSION,
    FormatError,
    Manifest,
    ShardRecord,
    TokenLayout,
    layer_file,
    list_sets,
    load_manifest,
    set_exists,
    set_prefix,
    shard_name,
)
from vitscope.store import NotFound, Store

DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    name: (np_dtype, getattr(torch, name)) for name, np_dtype in STORED_DTYPES.items()}
"""Each stored dtype as numpy holds its elements and as torch reads them."""


def part_block(n_shards: int, part: int, parts: int) -> range:
    """The contiguous block of shards that ``part`` of ``parts`` covers (blocks of equal size but
    the last): how extraction and analysis split a set over processes or machines."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in 0..{parts - 1}")
    per = -(-n_shards // parts)
    return range(min(part * per, n_shards), min((part + 1) * per, n_shards))


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Convert activations to their stored little-endian representation."""
    np_dtype, t_dtype = DTYPES[dtype]
    t = x.detach().to("cpu", t_dtype).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np_dtype)
    return t.numpy().astype(np_dtype, copy=False)


def storage_view(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of the stored dtype sharing ``a``'s memory (bf16 is kept as raw bits): for
    reading stored rows without a copy, or for writing into them (``copy_`` converts)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array -> float32 tensor."""
    if dtype == "bfloat16":  # np.array copies: memory-mapped pages are read-only
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy() if a.dtype == np.float32 else a.astype(np.float32))


class ShardWriter:
    """Writes one activation set: shards in any order, then the manifest last.

    Each finished shard also gets an ``index.json`` written after its data, so that a killed
    run (or another process) can tell which shards are complete (:meth:`completed_shards`).
    """

    def __init__(self, store: Store, manifest: Manifest, images_per_shard: int):
        if images_per_shard <= 0:
            raise ValueError("images_per_shard must be positive")
        self.store = store
        self.manifest = manifest
        self.images_per_shard = images_per_shard
        self.prefix = set_prefix(manifest.set_id)

    def completed_shards(self) -> dict[int, ShardRecord]:
        """Shards whose data and index are written, by shard index."""
        done = {}
        for key in self.store.list(f"{self.prefix}/shard-"):
            if key.endswith("/index.json"):
                rec = ShardRecord.from_json(json.loads(self.store.get_bytes(key)))
                done[rec.index] = rec
        return done

    def write_shard(
        self, index: int, acts: dict[int, np.ndarray], records: list[dict[str, Any]],
        dataset_range: tuple[int, int], skipped: list[dict[str, str]] | None = None,
    ) -> ShardRecord:
        """Write one shard's files (``acts[layer]`` of shape [n, tokens, d] in stored dtype).

        The shard's place among the set's rows (``first_image``) is only known once every
        earlier shard is done, so it is assigned when the set is published."""
        n = len(records)
        m = self.manifest
        files: dict[str, dict[str, Any]] = {}
        for layer in m.layers:
            a = acts[layer]
            expected = (n, m.layout.tokens_per_image, m.d_model)
            if a.shape != expected or a.dtype != m.np_dtype:
                raise FormatError(f"layer {layer} shard has shape {a.shape} {a.dtype}, expected {expected} {m.dtype}")
            # the rows' own memory as bytes: no copy to hash or to write
            data = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            rel = f"{shard_name(index)}/{layer_file(layer)}"
            self.store.put_bytes(f"{self.prefix}/{rel}", data)
            files[rel] = {"sha256": sha256_bytes(data), "nbytes": data.nbytes}
        ids = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        rel = f"{shard_name(index)}/images.jsonl"
        self.store.put_bytes(f"{self.prefix}/{rel}", ids)
        files[rel] = {"sha256": sha256_bytes(ids), "nbytes": len(ids)}
        rec = ShardRecord(index=index, first_image=-1, n_images=n, files=files,
                          dataset_start=dataset_range[0], dataset_end=dataset_range[1], skipped=list(skipped or []))
        self.store.put_bytes(f"{self.prefix}/{shard_name(index)}/index.json", json.dumps(rec.to_json()).encode())
        return rec

    def finish(self, shards: list[ShardRecord]) -> Manifest:
        """Publish: number the shards' rows, check they tile the dataset, write the manifest last."""
        placed: list[ShardRecord] = []
        first = dataset_pos = 0
        for i, s in enumerate(shards):
            if s.index != i or s.dataset_start != dataset_pos:
                raise FormatError(f"shard {i} does not follow its predecessor")
            placed.append(dataclasses.replace(s, first_image=first))
            first += s.n_images
            dataset_pos = s.dataset_end
        m = self.manifest
        m.shards = placed
        m.n_images = first
        m.skipped = [s for shard in placed for s in shard.skipped]
        from vitscope import __version__

        m.vitscope_version = __version__
        self.store.put_bytes(f"{self.prefix}/manifest.json", json.dumps(m.to_json(), indent=1).encode())
        return m


class ActivationSet:
    """Read side of a published set. Local stores are memory-mapped; S3 uses ranged GETs."""

    def __init__(self, store: Store, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self.prefix = set_prefix(manifest.set_id)
        self._starts = np.asarray([s.first_image for s in manifest.shards], dtype=np.int64)
        self._last_records: tuple[str, list[dict[str, Any]]] | None = None

    @classmethod
    def open(cls, store: Store, set_id: str) -> ActivationSet:
        return cls(store, load_manifest(store, set_id))

    @property
    def layout(self) -> TokenLayout:
        return self.manifest.layout

    def __len__(self) -> int:
        return self.manifest.n_images

    def layer_key(self, shard: ShardRecord, layer: int) -> str:
        """Store key of ``shard``'s file for ``layer`` (absolute, or as requested, e.g. -2)."""
        return f"{self.prefix}/{shard.name}/{layer_file(self.manifest.layer_position(layer))}"

    def local_file(self, shard: ShardRecord, layer: int) -> Path | None:
        """The layer file on a local filesystem (to memory-map or read with vectored reads),
        or None when the store is remote and rows can only be fetched by range."""
        return self.store.local_path(self.layer_key(shard, layer))

    def read_rows(self, shard: ShardRecord, layer: int, lo: int, hi: int) -> np.ndarray:
        """Image rows [lo, hi) of ``shard``'s layer file as [hi - lo, tokens, d] in the stored
        dtype, with one ranged read (a file read locally, a ranged GET on S3)."""
        m = self.manifest
        raw = self.store.get_range(self.layer_key(shard, layer), lo * m.image_bytes, (hi - lo) * m.image_bytes)
        return np.frombuffer(raw, dtype=m.np_dtype).reshape(hi - lo, m.layout.tokens_per_image, m.d_model)

    def shard_array(self, shard: ShardRecord, layer: int) -> np.ndarray:
        """All of one shard's activations for a layer: [n_images, tokens, d] in stored dtype,
        memory-mapped from a local file, else read whole."""
        m = self.manifest
        shape = (shard.n_images, m.layout.tokens_per_image, m.d_model)
        if shard.n_images == 0:  # every image of its range was unreadable
            return np.empty(shape, dtype=m.np_dtype)
        path = self.local_file(shard, layer)
        if path is None:
            return self.read_rows(shard, layer, 0, shard.n_images)
        if not path.exists():
            raise NotFound(f"{self.store.uri}/{self.layer_key(shard, layer)}")
        return np.memmap(path, dtype=m.np_dtype, mode="r", shape=shape)

    def iter_shards(self, layer: int) -> Iterator[tuple[ShardRecord, np.ndarray]]:
        for shard in self.manifest.shards:
            yield shard, self.shard_array(shard, layer)

    def locate(self, image_index: int) -> tuple[ShardRecord, int]:
        """(shard, row within shard) of a global image index."""
        if not 0 <= image_index < self.manifest.n_images:
            raise IndexError(f"image index {image_index} out of range [0, {self.manifest.n_images})")
        i = int(np.searchsorted(self._starts, image_index, side="right") - 1)
        shard = self.manifest.shards[i]
        return shard, image_index - shard.first_image

    def image_tokens(self, layer: int, image_index: int) -> torch.Tensor:
        """One image's stored tokens for a layer as float32 [tokens, d], read by range."""
        shard, row = self.locate(image_index)
        return from_storage(self.read_rows(shard, layer, row, row + 1)[0], self.manifest.dtype)

    def shard_records(self, shard: ShardRecord) -> list[dict[str, Any]]:
        raw = self.store.get_bytes(f"{self.prefix}/{shard.name}/images.jsonl")
        return [json.loads(line) for line in io.StringIO(raw.decode())]

    def image_record(self, image_index: int) -> dict[str, Any]:
        """{"id", "label"} of one image. The last shard's records are kept, so reading the
        images of a shard in turn reads its list once, not once per image."""
        shard, row = self.locate(image_index)
        cached = self._last_records  # one read of the attribute: other threads may replace it
        if cached is None or cached[0] != shard.name:
            cached = (shard.name, self.shard_records(shard))
            self._last_records = cached
        return cached[1][row]

    def verify(self, progress: bool = False) -> list[str]:
        """Check every listed file's size and checksum and every shard's counts.

        Returns a list of problems (empty when the set is intact)."""
        from tqdm.auto import tqdm

        m = self.manifest
        problems: list[str] = []
        first = dataset_pos = 0
        for shard in tqdm(m.shards, desc=f"verify {m.set_id}", disable=not progress, unit="shard"):
            if shard.first_image != first:
                problems.append(f"{shard.name}: starts at image {shard.first_image}, expected {first}")
            if shard.dataset_start != dataset_pos:
                problems.append(f"{shard.name}: covers the dataset from {shard.dataset_start}, expected {dataset_pos}")
            first = shard.first_image + shard.n_images
            dataset_pos = shard.dataset_end
            expected_layers = {f"{shard.name}/{layer_file(layer)}" for layer in m.layers}
            missing = expected_layers - set(shard.files)
            if missing:
                problems.append(f"{shard.name}: manifest lists no {sorted(missing)}")
            for rel, info in shard.files.items():
                try:
                    data = self.store.get_bytes(f"{self.prefix}/{rel}")
                except NotFound:
                    problems.append(f"{rel}: missing")
                    continue
                if len(data) != info["nbytes"]:
                    problems.append(f"{rel}: {len(data)} bytes, manifest says {info['nbytes']}")
                elif sha256_bytes(data) != info["sha256"]:
                    problems.append(f"{rel}: checksum mismatch")
                elif rel.endswith(".bin"):
                    expected = m.layer_nbytes(shard)
                    if len(data) != expected:
                        problems.append(f"{rel}: {len(data)} bytes for {shard.n_images} images, expected {expected}")
                elif rel.endswith("images.jsonl"):
                    n_lines = data.count(b"\n")
                    if n_lines != shard.n_images:
                        problems.append(f"{rel}: {n_lines} image records for {shard.n_images} images")
        if first != m.n_images:
            problems.append(f"shards hold {first} images, manifest says {m.n_images}")
        return problems

