"""Analysis results format v1: per-latent statistics and top-k examples of one SAE over one
activation set, under ``analyses/<analysis_id>/``::

    stats.safetensors   frequency, mean/max activation, top-k (score, image, patch) per latent
    manifest.json       written last

Top-k stores (score, image index, patch index) only. Heatmaps are recomputed on demand from the
stored shard rows, never kept as a dense d_sae x k x patches tensor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from vitscope.hashing import content_id
from vitscope.store import NotFound, Store

FORMAT = "vitscope.analysis"
VERSION = 1
PREFIX = "analyses"


@dataclass
class AnalysisManifest:
    analysis_id: str
    sae_id: str
    activation_set_id: str
    layer: int
    top_images: int
    """Top images kept per latent (fewer when the set has fewer images)."""
    d_sae: int
    n_images: int
    n_tokens: int  # tokens the statistics are over (the kinds the SAE was trained on)
    tokens: list[str]
    created_at: str = ""
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnalysisManifest:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an analysis manifest (format={d.get('format')!r})")
        if int(d.get("version", 0)) > VERSION:
            raise ValueError(f"analysis format {d['version']} is newer than this vitscope reads ({VERSION})")
        d = {"top_images": d["k"], **d} if "k" in d else d  # written as "k" before top_images had its name
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class LatentTable:
    """Per-latent arrays, all with d_sae rows. Top-k rows are sorted by score, descending;
    unused slots (fewer than k images ever fired) have image index -1 and score 0."""

    frequency: np.ndarray  # float64 [d_sae]: fraction of tokens where the latent is > 0
    mean_activation: np.ndarray  # float64 [d_sae]: mean over the tokens where it fires
    max_activation: np.ndarray  # float32 [d_sae]
    topk_score: np.ndarray  # float32 [d_sae, k]
    topk_image: np.ndarray  # int64 [d_sae, k]
    topk_patch: np.ndarray  # int32 [d_sae, k]

    @property
    def d_sae(self) -> int:
        return len(self.frequency)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LatentTable:
        return cls(**{k: t[k].numpy() for k in cls.__dataclass_fields__})


def analysis_id(sae_id: str, activation_set_id: str, top_images: int) -> str:
    # The hashed key keeps its first name, "k", so that published analyses keep their ids.
    return content_id({"format": FORMAT, "version": VERSION, "sae_id": sae_id, "set": activation_set_id,
                       "k": top_images})


def analysis_prefix(aid: str) -> str:
    return f"{PREFIX}/{aid}"


def save_analysis(store: Store, manifest: AnalysisManifest, table: LatentTable) -> None:
    from safetensors.torch import save

    prefix = analysis_prefix(manifest.analysis_id)
    store.put_bytes(f"{prefix}/stats.safetensors", save(table.to_tensors()))
    store.put_bytes(f"{prefix}/manifest.json", json.dumps(asdict(manifest), indent=1).encode())


def load_analysis(store: Store, aid: str) -> tuple[AnalysisManifest, LatentTable]:
    from safetensors.torch import load

    prefix = analysis_prefix(aid)
    try:
        manifest = AnalysisManifest.from_json(json.loads(store.get_bytes(f"{prefix}/manifest.json")))
    except NotFound:
        raise NotFound(f"no published analysis {aid!r} in {store.uri}") from None
    return manifest, LatentTable.from_tensors(load(store.get_bytes(f"{prefix}/stats.safetensors")))


def analysis_exists(store: Store, aid: str) -> bool:
    return store.exists(f"{analysis_prefix(aid)}/manifest.json")


def list_analyses(store: Store) -> list[AnalysisManifest]:
    """Every published analysis in the store (manifests only)."""
    out = []
    for key in store.list(f"{PREFIX}/"):
        if key.endswith("/manifest.json") and key.count("/") == 2:
            out.append(AnalysisManifest.from_json(json.loads(store.get_bytes(key))))
    return out

