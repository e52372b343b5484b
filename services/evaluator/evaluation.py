"""``vitscope evaluate``: one report per (SAE, evaluation set, settings), every section computed
on the same images, spread evenly over the set:

1. reconstruction and sparsity of their stored tokens (the kinds the SAE trained on);
2. the decoder's duplicated features (maximum cosine between rows);
3. substitution: the SAE's reconstruction spliced into the ViT at its layer, the rest of the
   network run, and readouts of the final embedding (a linear probe trained on the clean
   embeddings, CLIP zero-shot) as the fraction recovered between the layer ablated and clean;
4. probing: a logistic probe on per-image pooled latents against one on pooled activations,
   and sparse probes on the best 1 and 5 latents per class;
5. label alignment of patches, when the dataset has patch labels, against PCA and k-means;
6. stability against SAEs trained with other seeds; 7. ground truth on synthetic sets.

A section whose data is missing (no labels, images gone, no text tower) says why it was skipped.
Definitions: docs/evaluation.md (DESIGN.md §13).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitscope.datasets import DatasetError, load_image_by_id
from vitscope.device import resolve_device
from vitscope.groundtruth import GroundTruth, recovery
from vitscope.models import ModelLoadError, ModelSpec, TransformInfo, load_text_tower, load_vit
from vitscope.reports import load_report, report_exists, report_id, save_report
from vitscope.sae import Sae, SaeRecord, load_sae_from
from vitscope.shards import ActivationSet
from vitscope.splice import ZERO_SHOT_TEMPLATE, Splice, zero_shot_logits
from vitscope.store import Store, open_store

from .config import EvaluateConfig
from .labels import (
    BACKGROUND,
    PATCH_CLASSES,
    box_patch_labels,
    image_classes,
    mask_classes,
    mask_patch_labels,
    planted_boxes,
)
from .metrics import (
    LogisticProbe,
    ReconstructionStats,
    fraction_recovered,
    kmeans_scores,
    max_decoder_cosine,
    pca_scores,
    probe1d,
    sparse_probe,
    stability,
)
from .plots import report_plots

log = logging.getLogger(__name__)

BASELINE_COMPONENTS = 64
"""PCA components and k-means centroids of the label-alignment baselines (fewer when the
activations have fewer dimensions or there are fewer patches)."""
PURITY_K = 16
COVERAGE_TAU = 0.3


def _probe(n_train: int) -> LogisticProbe:
    """The probes' regularisation: scikit-learn's default (C = 1, i.e. a penalty of 1/n per
    sample), which keeps a probe on thousands of latents from fitting a few hundred images' noise."""
    return LogisticProbe(l2=1.0 / max(n_train, 1))


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked (a held-out set of another model, say)."""


@dataclass
class EvaluateResult:
    report_id: str
    reused: bool
    report: dict[str, Any]


def spread(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` image indices spread evenly over ``0..n-1`` (the same for every run)."""
    k = min(n, k)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64)) if k else np.zeros(0, dtype=np.int64)


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible half/half split of ``n`` images into the probes' train and test images."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def _skipped(why: str) -> dict[str, str]:
    return {"skipped": why}


def _resolve(store: Store, cfg: EvaluateConfig, sae: Sae, record: SaeRecord) -> ActivationSet:
    aset = ActivationSet.open(store, cfg.heldout or record.activation_set_id)
    m = aset.manifest
    if m.d_model != sae.cfg.d_in:
        raise EvaluationError(f"SAE {record.sae_id} reads d={sae.cfg.d_in} but set {m.set_id} has d={m.d_model}")
    if record.layer not in m.layers:
        raise EvaluationError(f"SAE {record.sae_id} reads layer {record.layer}; set {m.set_id} stores {m.layers}")
    if cfg.heldout:
        try:
            ActivationSet.open(store, record.activation_set_id).manifest.check_heldout(m, [record.layer])
        except ValueError as e:
            raise EvaluationError(f"SAE {record.sae_id}: {e}") from None
    return aset


class _Tokens:
    """What the sections need of the chosen images' stored tokens, gathered in one pass."""

    def __init__(self) -> None:
        self.stats = ReconstructionStats()
        self.pooled_z: list[torch.Tensor] = []
        self.pooled_x: list[torch.Tensor] = []
        self.patch_z: list[torch.Tensor] = []
        self.patch_x: list[torch.Tensor] = []
        self.patch_y: list[torch.Tensor] = []
        self.patches = 0


def _batches(n: int, cfg: EvaluateConfig, desc: str) -> Iterator[int]:
    """The first index of each batch of ``cfg.batch_images`` images of ``n``, with a bar in
    images that counts a batch once the loop's body is done with it."""
    with tqdm(total=n, desc=desc, unit="img", disable=not cfg.progress) as bar:
        for lo in range(0, n, cfg.batch_images):
            yield lo
            bar.update(min(cfg.batch_images, n - lo))


@torch.no_grad()
def _token_pass(aset: ActivationSet, sae: Sae, record: SaeRecord, chosen: np.ndarray,
                patch_labels: dict[int, np.ndarray] | None, cfg: EvaluateConfig, device: torch.device) -> _Tokens:
    m = aset.manifest
    positions = torch.as_tensor(m.layout.token_indices(record.tokens), device=device)
    patch_slice = slice(m.layout.patch_start, m.layout.tokens_per_image)
    out = _Tokens()
    for lo in _batches(len(chosen), cfg, "evaluate: SAE on tokens"):
        batch = chosen[lo:lo + cfg.batch_images]
        rows = torch.stack([aset.image_tokens(record.layer, int(i)) for i in batch]).to(device)
        x = rows[:, positions]
        xn = sae.normalize(x)
        x_hat, z = sae.forward_normalized(xn)
        out.stats.update(xn.reshape(-1, xn.shape[-1]), x_hat.reshape(-1, xn.shape[-1]), z.reshape(-1, z.shape[-1]))
        # A latent says a concept is in the image when it fires anywhere (max); activations are
        # pooled as linear-probe baselines pool them (mean).
        out.pooled_z.append(z.amax(dim=1).cpu())
        out.pooled_x.append(x.mean(dim=1).cpu())
        labelled = [j for j, i in enumerate(batch) if patch_labels is not None and int(i) in patch_labels]
        if not labelled or out.patches >= cfg.patch_tokens:
            continue
        pn = sae.normalize(rows[labelled][:, patch_slice]).reshape(-1, sae.cfg.d_in)
        room = cfg.patch_tokens - out.patches
        out.patch_x.append(pn[:room].cpu())
        out.patch_z.append(sae.encode_normalized(pn[:room]).cpu())
        out.patch_y.append(torch.as_tensor(np.concatenate([patch_labels[int(batch[j])] for j in labelled]))[:room])
        out.patches += len(out.patch_x[-1])
    return out


@torch.no_grad()
def _image_pass(aset: ActivationSet, sae: Sae, record: SaeRecord, records: list[dict[str, Any]],
                cfg: EvaluateConfig, device: torch.device
                ) -> tuple[dict[str, torch.Tensor] | str, list[tuple[int, int]] | str, Any]:
    """Final embeddings of the images of ``records`` clean, with the SAE spliced in and with the layer
    ablated; the images' sizes (for patch labels); the ViT's spec. A string instead says why
    there are none."""
    m = aset.manifest
    if m.dataset.get("kind") == "ground-truth":
        why = "a synthetic activation set: no images"
        return why, why, None
    spec = ModelSpec.from_record(record.model_record or m.model)
    try:
        vit = load_vit(spec, device=device)
    except ModelLoadError as e:
        vit, why_model = None, f"the ViT could not be loaded ({e})"
    splice = Splice.of(vit, sae, record) if vit is not None else None
    embeds: dict[str, list[torch.Tensor]] = {"clean": [], "sae": [], "ablated": []}
    sizes: list[tuple[int, int]] = []
    # Three ViT passes an image (clean, the SAE spliced in, the layer ablated): the slow part.
    for lo in _batches(len(records), cfg, "evaluate: ViT x3 on images"):
        try:
            images = [load_image_by_id(m.dataset, r["id"]) for r in records[lo:lo + cfg.batch_images]]
        except (OSError, DatasetError) as e:
            why = f"the set's images could not be read ({type(e).__name__}: {e})"
            return why, why, spec
        sizes += [im.size for im in images]
        if splice is None:
            continue
        pixels = vit.preprocess(images)
        embeds["clean"].append(splice.embed(pixels).cpu())
        embeds["sae"].append(splice.embed(pixels, splice.substitute()).cpu())
        embeds["ablated"].append(splice.embed(pixels, splice.ablate(cfg.ablation)).cpu())
    if splice is None:
        return why_model, sizes, spec
    return {k: torch.cat(v) for k, v in embeds.items()}, sizes, spec


def _readout(scores: dict[str, float]) -> dict[str, float]:
    return {**scores, "recovered": fraction_recovered(scores["sae"], scores["ablated"], scores["clean"])}


def _substitution(embeds: dict[str, torch.Tensor] | str, classes: tuple[list[str], np.ndarray] | None,
                  spec: Any, cfg: EvaluateConfig, device: torch.device) -> dict[str, Any]:
    if isinstance(embeds, str):
        return _skipped(embeds)
    cos = torch.nn.functional.cosine_similarity
    out: dict[str, Any] = {
        "ablation": cfg.ablation,
        "cosine_sae": float(cos(embeds["clean"], embeds["sae"], dim=-1).mean()),
        "cosine_ablated": float(cos(embeds["clean"], embeds["ablated"], dim=-1).mean()),
    }
    if torch.equal(embeds["clean"], embeds["ablated"]):
        # Patch tokens after the last block of a CLS-pooled model, say: fractions are then 0/0.
        out["note"] = ("ablating the SAE's tokens at this layer leaves the final embedding unchanged: they do not "
                       "reach the readout, so substitution cannot tell SAEs apart here (fractions are NaN)")
    if classes is None:
        out["linear_probe"] = out["zero_shot"] = _skipped("the images have no class labels (two or more classes)")
        return out
    names, y_np = classes
    y = torch.as_tensor(y_np)
    train, test = _split(len(y), cfg.seed)
    probe = _probe(len(train)).fit(embeds["clean"][train], y[train], len(names))
    out["linear_probe"] = {
        "train_images": len(train), "test_images": len(test),
        "accuracy": _readout({k: probe.accuracy(e[test], y[test]) for k, e in embeds.items()}),
        "log_likelihood": _readout({k: probe.log_likelihood(e[test], y[test]) for k, e in embeds.items()}),
    }
    text = load_text_tower(spec, device) if spec is not None else None
    if text is None:
        out["zero_shot"] = _skipped("the model has no text tower (zero-shot needs a CLIP-family model)")
        return out
    prompts = text([ZERO_SHOT_TEMPLATE.format(n) for n in names]).cpu()
    acc, ll = {}, {}
    for k, e in embeds.items():
        logits = zero_shot_logits(e, prompts)
        acc[k] = float((logits.argmax(dim=1) == y).float().mean())
        ll[k] = float(logits.log_softmax(dim=1).gather(1, y[:, None]).mean())
    out["zero_shot"] = {"template": ZERO_SHOT_TEMPLATE, "classes": names, "images": len(y),
                        "accuracy": _readout(acc), "log_likelihood": _readout(ll)}
    return out


def _probing(tokens: _Tokens, classes: tuple[list[str], np.ndarray] | None, cfg: EvaluateConfig) -> dict[str, Any]:
    if classes is None:
        return _skipped("the images have no class labels (two or more classes)")
    names, y_np = classes
    y = torch.as_tensor(y_np)
    z, x = torch.cat(tokens.pooled_z), torch.cat(tokens.pooled_x)
    train, test = _split(len(y), cfg.seed)
    acc_z = _probe(len(train)).fit(z[train], y[train], len(names)).accuracy(z[test], y[test])
    acc_x = _probe(len(train)).fit(x[train], y[train], len(names)).accuracy(x[test], y[test])
    return {"classes": names, "train_images": len(train), "test_images": len(test),
            "pooling": {"latents": "max over the image's tokens", "activations": "mean over the image's tokens"},
            "accuracy_latents": acc_z, "accuracy_activations": acc_x, "delta": acc_z - acc_x,
            "sparse": sparse_probe(z[train], y[train], len(names), ks=(1, 5), test=(z[test], y[test]),
                                   l2=1.0 / max(len(train), 1))}


def _alignment_scores(result: Any, classes: list[str]) -> dict[str, Any]:
    """mAP, Purity@16 and Coverage@0.3 over the object classes present (background, which nearly
    every score ranks well, would flatter every method alike), and per class its best latent's AP."""
    present = result.present.numpy()
    scored = np.array([c for c, name in enumerate(classes) if name != BACKGROUND and present[c]], dtype=np.int64)
    ap = result.ap.numpy()
    purity = result.purity_at(min(PURITY_K, result.top_labels.shape[1])).numpy()
    return {"map": float(np.nanmean(ap[scored])), f"purity_at_{PURITY_K}": float(np.nanmean(purity[scored])),
            f"coverage_at_{COVERAGE_TAU}": float(np.mean(ap[scored] >= COVERAGE_TAU)),
            "ap": [float(a) for a in ap], "best": [int(b) for b in result.best_latent],
            "purity": [float(p) for p in purity]}


def _label_alignment(tokens: _Tokens, classes: list[str] | None, source: str, record: SaeRecord,
                     cfg: EvaluateConfig) -> dict[str, Any]:
    if classes is None:
        return _skipped("the dataset has no patch labels (give --masks, or use a planted-object set)")
    if not tokens.patch_z:
        return _skipped("no labelled patches among the evaluated images")
    z, x, y = torch.cat(tokens.patch_z), torch.cat(tokens.patch_x), torch.cat(tokens.patch_y)
    used = torch.unique(y)
    classes = [classes[int(c)] for c in used]  # only the classes some patch has: each is a column of probe1d
    y = torch.searchsorted(used, y)
    k = max(1, min(BASELINE_COMPONENTS, x.shape[1], len(x) // 4))
    n = len(classes)
    if n < 2:
        return _skipped(f"the labelled patches are all of one class ({classes[0]})")
    return {"classes": classes, "source": source, "patches": len(y),
            "class_patches": torch.bincount(y, minlength=n).tolist(),
            "sae_tokens": list(record.tokens), "baseline_components": k,
            "sae": _alignment_scores(probe1d(z, y, n), classes),
            "pca": _alignment_scores(probe1d(pca_scores(x, k), y, n), classes),
            "kmeans": _alignment_scores(probe1d(kmeans_scores(x, k, seed=cfg.seed), y, n), classes)}


def _stability(store: Store, sae: Sae, others: tuple[str, ...]) -> dict[str, Any] | list[dict[str, Any]]:
    if not others:
        return _skipped("no other seeds given (--compare)")
    out = []
    for other_id in others:
        other, _ = load_sae_from(store, other_id, sae.W_dec.device)
        out.append({"sae_id": other_id, **stability(sae.W_dec, other.W_dec)})
    return out


def _ground_truth(aset: ActivationSet, sae: Sae, record: SaeRecord) -> dict[str, Any]:
    described = aset.manifest.dataset
    if described.get("kind") != "ground-truth":
        return _skipped("the set has no known directions (only synthetic ground-truth sets do)")
    fields = GroundTruth.__dataclass_fields__
    gt = GroundTruth(**{k: tuple(v) if isinstance(v, list) else v for k, v in described.items() if k in fields})
    directions = gt.directions(record.layer).to(sae.W_dec.device)
    dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return {"directions": gt.n_directions, "recovery_at_0.9": recovery(sae.W_dec, directions, 0.9),
            "mean_best_cosine": float((directions @ dec.T).max(dim=1).values.mean())}


def _patch_labels(m: Any, chosen: np.ndarray, records: list[dict[str, Any]], sizes: list[tuple[int, int]] | str,
                  cfg: EvaluateConfig) -> tuple[dict[int, np.ndarray] | None, list[str] | None, str]:
    """Patch labels of the chosen images that have them, by image index, with the class names and
    where they came from: the masks folder, else planted boxes, else none."""
    transform = TransformInfo.from_json(m.transform) if m.transform else None
    if cfg.masks:
        classes = mask_classes(cfg.masks)
        labels = {int(i): y for i, r in zip(chosen, records, strict=True)
                  if (y := mask_patch_labels(cfg.masks, r["id"], transform, m.layout.grid, len(classes))) is not None}
        return labels, classes, f"masks in {cfg.masks}"
    boxes = planted_boxes(m.dataset)
    if boxes is None or isinstance(sizes, str):
        return None, None, ""
    labels = {int(i): box_patch_labels(boxes.get(r["id"]), size, transform, m.layout.grid)
              for i, r, size in zip(chosen, records, sizes, strict=True)}
    return labels, list(PATCH_CLASSES), "planted boxes"


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate the SAE ``cfg.sae`` (or find the report, if one with these settings exists) and
    publish the report under ``evaluations/<report_id>/``."""
    if cfg.images < 2:
        raise ValueError("images must be at least 2 (the probes split them in halves)")
    store = open_store(cfg.store)
    device = resolve_device(cfg.device)
    sae, record = load_sae_from(store, cfg.sae, device)
    aset = _resolve(store, cfg, sae, record)
    m = aset.manifest
    settings = {"images": cfg.images, "masks": cfg.masks, "patch_tokens": cfg.patch_tokens, "compare": sorted(cfg.compare),
                "ablation": cfg.ablation, "seed": cfg.seed}
    rid = report_id(record.sae_id, m.set_id, settings)
    if report_exists(store, rid):
        log.info("evaluation report %s already published in %s: reusing it", rid, store.uri)
        return EvaluateResult(rid, True, load_report(store, rid))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    chosen = spread(len(aset), cfg.images)
    records = [aset.image_record(int(i)) for i in chosen]
    classes = image_classes(records)

    t = time.perf_counter()
    embeds, sizes, spec = _image_pass(aset, sae, record, records, cfg, device)
    timings["images"] = time.perf_counter() - t
    patch_labels, patch_classes, label_source = _patch_labels(m, chosen, records, sizes, cfg)
    t = time.perf_counter()
    tokens = _token_pass(aset, sae, record, chosen, patch_labels, cfg, device)
    timings["tokens"] = time.perf_counter() - t

    reconstruction = tokens.stats.result()
    maxcos = max_decoder_cosine(sae.W_dec).cpu()
    report: dict[str, Any] = {
        "report_id": rid, "sae_id": record.sae_id, "activation_set_id": m.set_id,
        "trained_on": record.activation_set_id, "layer": record.layer, "tokens": list(record.tokens),
        "split": "held-out" if cfg.heldout and cfg.heldout != record.activation_set_id else "training",
        "images": len(chosen), "settings": settings,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reconstruction": reconstruction,
        "decoder": {"max_cosine_mean": float(maxcos.mean()), "max_cosine_max": float(maxcos.max()),
                    "duplicates_above_0.9": int((maxcos > 0.9).sum())},
    }
    t = time.perf_counter()
    report["substitution"] = _substitution(embeds, classes, spec, cfg, device)
    timings["substitution"] = time.perf_counter() - t
    t = time.perf_counter()
    report["probing"] = _probing(tokens, classes, cfg)
    timings["probing"] = time.perf_counter() - t
    t = time.perf_counter()
    report["label_alignment"] = _label_alignment(tokens, patch_classes, label_source, record, cfg)
    timings["label_alignment"] = time.perf_counter() - t
    report["stability"] = _stability(store, sae, cfg.compare)
    report["ground_truth"] = _ground_truth(aset, sae, record)
    timings["total"] = time.perf_counter() - t0
    report["timings_s"] = timings
    save_report(store, report, report_plots(report, tokens.stats.frequency(), maxcos.numpy()))
    log.info("published evaluation report %s of SAE %s (%.1fs)", rid, record.sae_id, timings["total"])
    return EvaluateResult(rid, False, load_report(store, rid))

