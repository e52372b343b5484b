"""Run a ViT over an image dataset and publish the chosen layers' activations as shards."""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vitscope.hashing import content_id
from vitscope.models import ModelSpec, load_vit
from vitscope.shards import (
    DTYPES,
    VERSION,
    ActivationSet,
    Manifest,
    ShardRecord,
    ShardWriter,
    TokenLayout,
    set_exists,
    to_storage,
)
from vitscope.store import open_store

from .datasets import DecodedImages, ImageFolderSource, collate

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Extract ViT activations from an image folder into an activation set."""

    data: str
    """Image folder: class folders (root/<class>/<image>, labels from folder names) or a flat folder."""
    store: str = ".vitscope/store"
    """Where to publish: a folder path, file:///path or s3://bucket/prefix."""
    model: str = "ViT-B-16"
    """open_clip model: a built-in name (ViT-B-16), hf-hub:org/repo (e.g. hf-hub:imageomics/bioclip) or
    local-dir:/path; or a timm ViT as timm:<name> (e.g. timm:vit_base_patch14_reg4_dinov2.lvd142m)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag, 'default' for timm's own weights, or a checkpoint file; ignored for
    hf-hub:/local-dir:. None = random init."""
    model_options: str | None = None
    """JSON keyword arguments for the model factory, e.g. '{"img_size": 224}' for a timm DINOv2."""
    layers: tuple[int, ...] = (-2,)
    """Blocks whose output (the residual stream) to store; negative counts from the end (-1 = last)."""
    cls: bool = True
    """Store the CLS token (patch tokens are always stored)."""
    registers: bool = False
    """Store register tokens (DINOv2-reg and other models that have them)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """Stored precision: half precision halves storage and I/O."""
    batch_size: int = 64
    workers: int = 2
    """Image-decoding processes. The stored order never depends on this."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    shard_mb: int = 256
    """Target shard size; each layer of a shard is one file of at most this size."""
    images_per_shard: int | None = None
    """Images per shard, overriding shard_mb (small values make tests exercise many shards)."""
    max_images: int | None = None
    """Only the first N images of the canonical order (quick trials)."""
    allow_random_weights: bool = False
    """If pretrained weights cannot be fetched (offline), warn and use random weights instead of failing."""
    progress: bool = True


@dataclass
class ExtractResult:
    set_id: str
    manifest: Manifest
    reused: bool  # True when the set already existed and nothing was computed


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract (or find, if already published) the activation set ``cfg`` describes."""
    store = open_store(cfg.store)
    source = ImageFolderSource(cfg.data, max_images=cfg.max_images)
    device = resolve_device(cfg.device)
    options = tuple(sorted(json.loads(cfg.model_options).items())) if cfg.model_options else ()
    vit = load_vit(ModelSpec(cfg.model, cfg.pretrained, options), device=str(device),
                   allow_random=cfg.allow_random_weights)
    spec = ModelSpec(cfg.model, cfg.pretrained if vit.pretrained_loaded else None, options)
    layers = vit.resolve_layers(cfg.layers)
    requested = [next(r for r in cfg.layers if int(r) % vit.n_layers == layer) for layer in layers]
    if cfg.registers and vit.layout.n_registers == 0:
        raise ValueError(f"{spec.describe()} has no register tokens; drop --registers")
    full = vit.layout
    layout = TokenLayout(n_cls=full.n_cls if cfg.cls else 0, n_registers=full.n_registers if cfg.registers else 0,
                         grid=full.grid)
    # Positions of the stored tokens within the model's full token sequence.
    keep = np.concatenate([
        np.arange(layout.n_cls),
        np.arange(full.n_cls, full.n_cls + layout.n_registers),
        np.arange(full.patch_start, full.tokens_per_image),
    ])

    bytes_per_image = len(layers) * layout.tokens_per_image * vit.d_model * DTYPES[cfg.dtype][0].itemsize
    images_per_shard = cfg.images_per_shard or max(1, (cfg.shard_mb << 20) // (bytes_per_image // len(layers)))
    identity = {
        "format_version": VERSION,
        "model": spec.identity(),
        "layers": layers,
        "layout": layout.to_json(),
        "transform": vit.transform.to_json(),
        "dataset": source.identity(),
        "dtype": cfg.dtype,
        "images_per_shard": images_per_shard,
    }
    set_id = content_id(identity)
    if set_exists(store, set_id):
        log.info("activation set %s already published in %s: reusing it", set_id, store.uri)
        return ExtractResult(set_id, ActivationSet.open(store, set_id).manifest, reused=True)

    manifest = Manifest(
        set_id=set_id,
        model={"spec": spec.describe(), "name": spec.name, "pretrained": spec.pretrained,
               "pretrained_loaded": vit.pretrained_loaded, "n_layers": vit.n_layers},
        layers=layers,
        layers_requested=requested,
        d_model=vit.d_model,
        dtype=cfg.dtype,
        layout=layout,
        transform=vit.transform.to_json(),
        dataset=source.describe(),
    )
    writer = ShardWriter(store, manifest, images_per_shard)

    shards = writer.completed_shards()
    start = shards[-1].dataset_end if shards else 0
    if shards:
        log.info("resuming %s after %d complete shards (%d of %d images done)", set_id, len(shards), start, len(source))
    log.info("extracting %d images x %d layers x %d tokens x %d dims (%s): about %.1f MiB",
             len(source) - start, len(layers), layout.tokens_per_image, vit.d_model, cfg.dtype,
             (len(source) - start) * bytes_per_image / 2**20)

    loader = DataLoader(
        DecodedImages(source.entries, vit.transform.tensor()),
        batch_size=cfg.batch_size,
        sampler=range(start, len(source)),  # a sampler is an ordered index list: resume = skip ahead
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    rows: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    records: list[dict] = []
    skipped: list[dict[str, str]] = []
    next_image = shards[-1].first_image + shards[-1].n_images if shards else 0
    shard_start = start
    pending: Future | None = None

    def take_rows(n: int) -> dict[int, np.ndarray]:
        taken = {}
        for layer in layers:
            cat = np.concatenate(rows[layer]) if len(rows[layer]) > 1 else rows[layer][0]
            taken[layer], rows[layer] = cat[:n], [cat[n:]]
        return taken

    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(
        total=len(source), initial=start, unit="img", desc=f"extract {set_id[:8]}", disable=not cfg.progress
    ) as bar:

        def flush(dataset_end: int) -> None:
            nonlocal records, skipped, next_image, shard_start, pending
            acts = take_rows(len(records))
            if pending is not None:
                shards.append(pending.result())  # at most one shard in flight: memory stays bounded
            # The write overlaps the next batches' forward passes.
            pending = pool.submit(writer.write_shard, len(shards), next_image, acts, records,
                                  (shard_start, dataset_end), skipped)
            next_image += len(records)
            records, skipped, shard_start = [], [], dataset_end

        for indices, pixels, failed in loader:
            if pixels is not None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = vit.residuals(pixels.to(device, non_blocking=True), layers)
                for layer in layers:
                    rows[layer].append(to_storage(out[layer][:, keep], cfg.dtype))
            errors = dict(failed)
            # Walk the batch in dataset order so that skipped images are charged to the shard
            # whose range holds them; shards are cut at a fixed count of decoded images, so
            # boundaries depend on neither batch size nor worker count.
            for i in sorted([*indices, *errors]):
                entry = source.entries[i]
                if i in errors:
                    log.warning("skipping unreadable image %s: %s", entry.id, errors[i])
                    skipped.append({"id": entry.id, "error": errors[i]})
                    continue
                records.append({"id": entry.id, "label": entry.label, "index": i})
                if len(records) == images_per_shard:
                    flush(i + 1)
            bar.update(len(indices) + len(failed))
        if records:
            flush(len(source))
        if pending is not None:
            shards.append(pending.result())
    manifest = writer.finish(shards, trailing_skipped=skipped)
    if manifest.skipped:
        log.warning("%d unreadable images were skipped; they are listed in the manifest", len(manifest.skipped))
    log.info("published activation set %s: %d images in %d shards", set_id, manifest.n_images, len(shards))
    return ExtractResult(set_id, manifest, reused=False)

