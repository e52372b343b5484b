"""Analysis results format v2: per-latent statistics, activation histograms and top images in
several views of one SAE over one activation set, under ``analyses/<analysis_id>/``::

    stats.safetensors   frequency, mean/max activation, activation histogram, and per view the
                        top images (score, image, patch) of each latent
    manifest.json       written last

The views rank an image by the latent's activation at its best patch (``best_patch``), on its
CLS token (``cls``, sets that store one) or averaged over its patches (``mean``). Each example
stores (score, image index, patch index) only, the patch being the image's best one in every
view; heatmaps are recomputed on demand from the stored shard rows, never kept as a dense
d_sae x k x patches tensor.

Version 1 analyses (the best-patch view only, no histogram) still load.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vitscope.hashing import content_id
from vitscope.store import NotFound, Store

FORMAT = "vitscope.analysis"
VERSION = 2
PREFIX = "analyses"

VIEWS = ("best_patch", "cls", "mean")
"""Ways to rank a latent's top images: the activation at the image's best patch (each image
once), on its CLS token, or the mean over its patches."""
ACTIVATION_LOG10_EDGES = np.linspace(-4.0, 4.0, 41)
"""Bins of the per-latent activation histogram, log10-spaced (0.2 decade each) and the same for
every analysis, so that partial histograms add up. Codes live in the SAE's normalised space,
where activations span ~1e-3 to ~1e2; values outside fall into the first or last bin."""


SAMPLE_LOG10_EDGES = np.linspace(-4.0, 4.0, 21)
"""Activation bands (log10, 0.4 decade each) of the band samples: a few images of each band
show what a latent's typical activations look like, not only its strongest."""
SAMPLES_PER_BAND = 4
COFIRE_TOKENS = 1 << 13
"""Tokens (of whole images, chosen reproducibly) that co-firing is counted on: enough to rank a
latent's frequent partners, bounded whatever the set's size."""
COFIRE_PER_TOKEN = 16
"""A token's strongest latents among which pairs are counted (all of them for sparse codes)."""
COFIRE_TOP = 8
"""Co-firing partners kept per latent."""


def default_view(tokens: list[str]) -> str:
    """The view a latent's top images are shown in by default: CLS for an SAE trained on CLS
    tokens only, the best patch otherwise."""
    return "cls" if list(tokens) == ["cls"] else "best_patch"


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
    views: list[str] = field(default_factory=lambda: ["best_patch"])
    """The views whose top images the analysis keeps (version 1: best_patch only)."""
    default_view: str = "best_patch"
    histogram_log10_edges: list[float] = field(default_factory=list)
    """Bin edges of the activation histograms (empty for version 1, which has none)."""
    sample_log10_edges: list[float] = field(default_factory=list)
    """Band edges of the band samples (empty for version 1)."""
    cofiring_tokens: int = 0
    """Tokens co-firing was counted on (0 for version 1)."""
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
class TopImages:
    """One view's top images of every latent: rows sorted by score, descending; unused slots
    (fewer than k images ever made the latent fire) have image index -1 and score 0."""

    score: np.ndarray  # float32 [d_sae, k]
    image: np.ndarray  # int64 [d_sae, k]: row in the activation set
    patch: np.ndarray  # int32 [d_sae, k]: the image's best patch, row-major in the grid


@dataclass
class CoFiringTable:
    """Per latent, the latents that fire most often on the same tokens, by Jaccard index
    (shared tokens / tokens where either fires) over the co-firing sample; unused slots -1."""

    latent: np.ndarray  # int32 [d_sae, top]
    jaccard: np.ndarray  # float32 [d_sae, top], descending
    count: np.ndarray  # int64 [d_sae, top]: sampled tokens where both fire


@dataclass
class LatentTable:
    """Per-latent arrays, all with d_sae rows."""

    frequency: np.ndarray  # float64 [d_sae]: fraction of tokens where the latent is > 0
    mean_activation: np.ndarray  # float64 [d_sae]: mean over the tokens where it fires
    max_activation: np.ndarray  # float32 [d_sae]
    top: dict[str, TopImages]
    """Top images per view (see :data:`VIEWS`)."""
    histogram: np.ndarray | None = None
    """int64 [d_sae, bins]: tokens on which the latent fired, per activation bin
    (:data:`ACTIVATION_LOG10_EDGES`); None for version 1 analyses."""
    samples: TopImages | None = None
    """[d_sae, bands, per_band]: images drawn uniformly (reproducibly) from each band of
    best-patch activation (:data:`SAMPLE_LOG10_EDGES`), by priority within a band; empty slots
    have image -1. None for version 1 analyses."""
    cofiring: CoFiringTable | None = None
    """The latents that co-fire most with each (:data:`COFIRE_TOKENS`); None for version 1."""

    @property
    def d_sae(self) -> int:
        return len(self.frequency)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as stats.safetensors holds it, by tensor name."""
        arrays = {"frequency": self.frequency, "mean_activation": self.mean_activation,
                  "max_activation": self.max_activation}
        if self.histogram is not None:
            arrays["histogram"] = self.histogram
        for view, t in self.top.items():
            arrays.update({f"top.{view}.score": t.score, f"top.{view}.image": t.image, f"top.{view}.patch": t.patch})
        if self.samples is not None:
            t = self.samples
            arrays.update({"samples.score": t.score, "samples.image": t.image, "samples.patch": t.patch})
        if self.cofiring is not None:
            c = self.cofiring
            arrays.update({"cofiring.latent": c.latent, "cofiring.jaccard": c.jaccard, "cofiring.count": c.count})
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> LatentTable:
        """Read the arrays :meth:`to_arrays` wrote (or a version 1 analysis')."""
        if "topk_score" in a:  # version 1: the best-patch view only
            top = {"best_patch": TopImages(a["topk_score"], a["topk_image"], a["topk_patch"])}
        else:
            views = sorted({k.split(".")[1] for k in a if k.startswith("top.")}, key=VIEWS.index)
            top = {v: TopImages(a[f"top.{v}.score"], a[f"top.{v}.image"], a[f"top.{v}.patch"]) for v in views}
        samples = (TopImages(a["samples.score"], a["samples.image"], a["samples.patch"])
                   if "samples.image" in a else None)
        cofiring = (CoFiringTable(a["cofiring.latent"], a["cofiring.jaccard"], a["cofiring.count"])
                    if "cofiring.latent" in a else None)
        return cls(a["frequency"], a["mean_activation"], a["max_activation"], top, a.get("histogram"), samples,
                   cofiring)


def analysis_id(sae_id: str, activation_set_id: str, top_images: int) -> str:
    # The hashed key keeps its first name, "k", so that published analyses keep their ids.
    return content_id({"format": FORMAT, "version": VERSION, "sae_id": sae_id, "set": activation_set_id,
                       "k": top_images})


def analysis_prefix(aid: str) -> str:
    return f"{PREFIX}/{aid}"


def save_analysis(store: Store, manifest: AnalysisManifest, table: LatentTable) -> None:
    # numpy's safetensors, not torch's: the same file, and reading it needs no torch (the
    # analyzer answers the explorer's first page before importing torch).
    from safetensors.numpy import save

    prefix = analysis_prefix(manifest.analysis_id)
    store.put_bytes(f"{prefix}/stats.safetensors", save(table.to_arrays()))
    store.put_bytes(f"{prefix}/manifest.json", json.dumps(asdict(manifest), indent=1).encode())


def load_analysis(store: Store, aid: str) -> tuple[AnalysisManifest, LatentTable]:
    from safetensors.numpy import load

    manifest = load_analysis_manifest(store, aid)
    return manifest, LatentTable.from_arrays(load(store.get_bytes(f"{analysis_prefix(aid)}/stats.safetensors")))


def load_analysis_manifest(store: Store, aid: str) -> AnalysisManifest:
    """A published analysis' manifest, without its table."""
    try:
        return AnalysisManifest.from_json(json.loads(store.get_bytes(f"{analysis_prefix(aid)}/manifest.json")))
    except NotFound:
        raise NotFound(f"no published analysis {aid!r} in {store.uri}") from None


def load_frequency(store: Store, aid: str) -> np.ndarray:
    """A published analysis' per-latent firing frequency alone (float64 [d_sae]): three ranged
    reads of stats.safetensors (its header's length, the header, the one tensor) instead of
    the whole table, which is tens of MB where an SAE's listing needs a d_sae vector."""
    key = f"{analysis_prefix(aid)}/stats.safetensors"
    (header_length,) = struct.unpack("<Q", store.get_range(key, 0, 8))
    entry = json.loads(store.get_range(key, 8, header_length))["frequency"]
    if entry["dtype"] != "F64":
        raise ValueError(f"analysis {aid}: frequency is stored as {entry['dtype']}, not F64")
    start, end = entry["data_offsets"]  # from the end of the header
    return np.frombuffer(store.get_range(key, 8 + header_length + start, end - start), dtype="<f8")


def analysis_exists(store: Store, aid: str) -> bool:
    return store.exists(f"{analysis_prefix(aid)}/manifest.json")


def list_analyses(store: Store) -> list[AnalysisManifest]:
    """Every published analysis in the store (manifests only)."""
    out = []
    for key in store.list(f"{PREFIX}/"):
        if key.endswith("/manifest.json") and key.count("/") == 2:
            out.append(AnalysisManifest.from_json(json.loads(store.get_bytes(key))))
    return out

