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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscope.hashing import sha256_bytes
from vitscope.store import NotFound, Store

FORMAT = "vitscope.activations"
VERSION = 1
PREFIX = "activations"

# Stored dtypes. numpy has no bfloat16, so bf16 is stored as its raw 16-bit patterns.
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
}


class FormatError(ValueError):
    """A manifest or shard does not follow the format it claims."""


@dataclass(frozen=True)
class TokenLayout:
    """Which stored token is which, per image: CLS first (if kept), then registers (if kept),
    then the patch grid row-major. Never implied: always written in the manifest."""

    n_cls: int
    n_registers: int
    grid: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens_per_image(self) -> int:
        return self.n_cls + self.n_registers + self.n_patches

    @property
    def patch_start(self) -> int:
        return self.n_cls + self.n_registers

    def kinds(self) -> list[str]:
        """One label per stored token: 'cls', 'reg0'.., 'patch'."""
        return ["cls"] * self.n_cls + [f"reg{i}" for i in range(self.n_registers)] + ["patch"] * self.n_patches

    def token_indices(self, kinds: Sequence[str]) -> np.ndarray:
        """Stored token positions of the requested kinds ('cls', 'registers', 'patches', 'all')."""
        wanted = set(kinds)
        unknown = wanted - {"cls", "registers", "patches", "all"}
        if unknown:
            raise ValueError(f"unknown token kinds {sorted(unknown)}: use cls, registers, patches or all")
        idx: list[int] = []
        if "all" in wanted or "cls" in wanted:
            if self.n_cls == 0 and "all" not in wanted:
                raise ValueError("CLS tokens were requested but this activation set stores none")
            idx += list(range(self.n_cls))
        if "all" in wanted or "registers" in wanted:
            if self.n_registers == 0 and "all" not in wanted:
                raise ValueError("register tokens were requested but this activation set stores none")
            idx += list(range(self.n_cls, self.patch_start))
        if "all" in wanted or "patches" in wanted:
            idx += list(range(self.patch_start, self.tokens_per_image))
        return np.asarray(idx, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_cls": self.n_cls,
            "n_registers": self.n_registers,
            "grid": list(self.grid),
            "tokens_per_image": self.tokens_per_image,
            "kinds": self.kinds_summary(),
        }

    def kinds_summary(self) -> dict[str, list[int]]:
        """Half-open [start, end) ranges of each token kind within an image's tokens."""
        return {
            "cls": [0, self.n_cls],
            "registers": [self.n_cls, self.patch_start],
            "patches": [self.patch_start, self.tokens_per_image],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenLayout:
        layout = cls(int(d["n_cls"]), int(d["n_registers"]), (int(d["grid"][0]), int(d["grid"][1])))
        if "tokens_per_image" in d and int(d["tokens_per_image"]) != layout.tokens_per_image:
            raise FormatError("token layout's tokens_per_image disagrees with its parts")
        return layout


@dataclass(frozen=True)
class ShardRecord:
    """One shard: which images it holds and the checksum of each of its files."""

    index: int
    first_image: int
    n_images: int
    files: dict[str, dict[str, Any]]  # relative key -> {"sha256", "nbytes"}
    # The slice of the dataset's canonical order this shard covers (skipped images included),
    # so that a resumed run knows where to continue.
    dataset_start: int = 0
    dataset_end: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(int(d["index"]), int(d["first_image"]), int(d["n_images"]), dict(d["files"]),
                   int(d.get("dataset_start", 0)), int(d.get("dataset_end", 0)), list(d.get("skipped", [])))


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def layer_file(layer: int) -> str:
    return f"layer-{layer}.bin"


@dataclass
class Manifest:
    """Everything needed to read a set and to know what it is, without the dataset or model."""

    set_id: str
    model: dict[str, Any]
    layers: list[int]  # absolute block indices, ascending
    layers_requested: list[int]  # as the user wrote them (e.g. -2), same order as ``layers``
    d_model: int
    dtype: str
    layout: TokenLayout
    transform: dict[str, Any]
    dataset: dict[str, Any]
    images_per_shard: int = 0  # dataset positions per shard (the last shard may cover fewer)
    n_images: int = 0
    shards: list[ShardRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    vitscope_version: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layout"] = self.layout.to_json()
        d["shards"] = [s.to_json() for s in self.shards]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise FormatError(f"not an activation manifest (format={d.get('format')!r})")
        if int(d.get("version", 0)) > VERSION:
            raise FormatError(
                f"activation set uses format version {d['version']}, this vitscope reads up to {VERSION}: upgrade vitscope"
            )
        if d["dtype"] not in DTYPES:
            raise FormatError(f"unknown stored dtype {d['dtype']!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["layout"] = TokenLayout.from_json(d["layout"])
        kw["shards"] = [ShardRecord.from_json(s) for s in d["shards"]]
        return cls(**kw)

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype of the stored elements (raw uint16 patterns for bf16)."""
        return DTYPES[self.dtype][0]

    @property
    def bytes_per_token(self) -> int:
        return self.d_model * self.np_dtype.itemsize

    @property
    def image_bytes(self) -> int:
        """Bytes of one image's tokens in one layer file: the stride between its rows."""
        return self.layout.tokens_per_image * self.bytes_per_token

    def layer_nbytes(self, shard: ShardRecord) -> int:
        """The size one of ``shard``'s layer files must have."""
        return shard.n_images * self.image_bytes

    def layer_position(self, layer: int) -> int:
        """Resolve a layer given as absolute or as requested (e.g. -2) to an absolute index."""
        if layer in self.layers:
            return layer
        if layer in self.layers_requested:
            return self.layers[self.layers_requested.index(layer)]
        raise ValueError(f"layer {layer} is not in this activation set; it has layers {self.layers}")

    def check_heldout(self, heldout: Manifest, layers: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``heldout`` (a set of other images) holds tokens an SAE
        trained on this set reads the same way: the same model and preprocessing, width and
        ``layers``. What a held-out measurement compares must differ in its images only."""
        if heldout.model.get("spec") != self.model.get("spec") or heldout.transform != self.transform:
            raise ValueError(f"held-out set {heldout.set_id} comes from {heldout.model.get('spec')!r}, but set "
                             f"{self.set_id} from {self.model.get('spec')!r}: extract the held-out images with the "
                             "same model and settings")
        if heldout.d_model != self.d_model:
            raise ValueError(f"held-out set {heldout.set_id} has d={heldout.d_model}, set {self.set_id} d={self.d_model}")
        missing = sorted(set(layers) - set(heldout.layers))
        if missing:
            raise ValueError(f"held-out set {heldout.set_id} stores layers {heldout.layers}, not {missing}")


def part_block(n_shards: int, part: int, parts: int) -> range:
    """The contiguous block of shards that ``part`` of ``parts`` covers (blocks of equal size but
    the last): how extraction and analysis split a set over processes or machines."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in 0..{parts - 1}")
    per = -(-n_shards // parts)
    return range(min(part * per, n_shards), min((part + 1) * per, n_shards))


def set_prefix(set_id: str) -> str:
    return f"{PREFIX}/{set_id}"


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


def list_sets(store: Store) -> list[Manifest]:
    """Every published activation set in the store (manifests only)."""
    return [Manifest.from_json(json.loads(store.get_bytes(k))) for k in store.list(f"{PREFIX}/")
            if k.endswith("/manifest.json") and k.count("/") == 2]


def set_exists(store: Store, set_id: str) -> bool:
    return store.exists(f"{set_prefix(set_id)}/manifest.json")


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
        try:
            raw = store.get_bytes(f"{set_prefix(set_id)}/manifest.json")
        except NotFound:
            raise NotFound(f"no published activation set {set_id!r} in {store.uri}") from None
        return cls(store, Manifest.from_json(json.loads(raw)))

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

