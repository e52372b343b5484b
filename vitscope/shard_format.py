"""The records of the activation shard format (docs/shard-format.md), readable without torch:
a set's manifest, its token layout and its shards' records, and where they live in a store.

The analyzer answers what an SAE reads (image count, patch grid, model) from the manifest
alone, before torch is imported. Reading and writing the activations themselves is
:mod:`vitscope.shards`'s, which re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitscope.store import NotFound, Store

FORMAT = "vitscope.activations"
VERSION = 1
PREFIX = "activations"

STORED_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
"""The dtypes a set may store, by manifest name (torch's names), as numpy holds their elements:
numpy has no bfloat16, so bf16 is stored as its raw 16-bit patterns."""


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
        if d["dtype"] not in STORED_DTYPES:
            raise FormatError(f"unknown stored dtype {d['dtype']!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["layout"] = TokenLayout.from_json(d["layout"])
        kw["shards"] = [ShardRecord.from_json(s) for s in d["shards"]]
        return cls(**kw)

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype of the stored elements (raw uint16 patterns for bf16)."""
        return STORED_DTYPES[self.dtype]

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


def set_prefix(set_id: str) -> str:
    return f"{PREFIX}/{set_id}"


def list_sets(store: Store) -> list[Manifest]:
    """Every published activation set in the store (manifests only)."""
    return [Manifest.from_json(json.loads(store.get_bytes(k))) for k in store.list(f"{PREFIX}/")
            if k.endswith("/manifest.json") and k.count("/") == 2]


def set_exists(store: Store, set_id: str) -> bool:
    return store.exists(f"{set_prefix(set_id)}/manifest.json")


def load_manifest(store: Store, set_id: str) -> Manifest:
    """The manifest of published activation set ``set_id``."""
    try:
        raw = store.get_bytes(f"{set_prefix(set_id)}/manifest.json")
    except NotFound:
        raise NotFound(f"no published activation set {set_id!r} in {store.uri}") from None
    return Manifest.from_json(json.loads(raw))
