"""Run a ViT over an image dataset and publish the chosen layers' activations as shards.

Shard ``k`` holds the images of the dataset's canonical order in ``[k*S, (k+1)*S)`` that
decoded (``S`` = ``images_per_shard``). Because boundaries are dataset positions, not counts of
decoded images, shards are independent: separate processes or machines can each extract a
contiguous range of shards (a *part*), a killed run redoes only unfinished shards, and the
result is byte-identical however the work was split. A final step writes the manifest.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vitscope.datasets import DecodedImages, ImageSource, collate, open_source
from vitscope.device import resolve_device
from vitscope.hashing import content_id
from vitscope.models import ViT, load_vit
from vitscope.shards import (
    DTYPES,
    VERSION,
    ActivationSet,
    Manifest,
    ShardWriter,
    part_block,
    set_exists,
    set_prefix,
    shard_name,
    storage_view,
)
from vitscope.store import Store, open_store

from .config import ExtractConfig

log = logging.getLogger(__name__)


class ExtractError(RuntimeError):
    """Extraction cannot start or finish (not enough room, missing shards)."""


@dataclass
class ExtractResult:
    set_id: str
    manifest: Manifest | None  # None for a part that did not publish
    reused: bool  # True when the set already existed and nothing was computed


@dataclass
class ExtractPlan:
    """Everything fixed before the first image is read: what will be stored, and where."""

    store: Store
    source: ImageSource
    vit: ViT
    device: torch.device
    manifest: Manifest  # without shards yet
    images_per_shard: int

    @property
    def set_id(self) -> str:
        return self.manifest.set_id

    @property
    def n_shards(self) -> int:
        return -(-len(self.source) // self.images_per_shard)

    @property
    def bytes_per_image(self) -> int:
        m = self.manifest
        return len(m.layers) * m.layout.tokens_per_image * m.bytes_per_token

    def shard_range(self, k: int) -> tuple[int, int]:
        """Dataset positions [start, end) of shard ``k``."""
        return k * self.images_per_shard, min((k + 1) * self.images_per_shard, len(self.source))

    def part_shards(self, part: int, parts: int) -> range:
        """The contiguous block of shards that ``part`` of ``parts`` extracts."""
        return part_block(self.n_shards, part, parts)



def default_workers(device: torch.device) -> int:
    """Decoding processes: on a CPU one keeps up with the forward pass (more would take cores
    from it); a GPU needs as many as the cores allow."""
    cores = os.cpu_count() or 1
    return min(8, max(1, cores - 1)) if device.type == "cuda" else 1


def plan(cfg: ExtractConfig) -> ExtractPlan:
    """Load the model and the dataset listing, and derive the set's content id and layout."""
    store = open_store(cfg.store)
    source = open_source(cfg.data, max_images=cfg.max_images)
    device = resolve_device(cfg.device)
    vit = load_vit(cfg.model, cfg.pretrained, options=json.loads(cfg.model_options or "{}"), init_seed=cfg.init_seed,
                   device=str(device), allow_random=cfg.allow_random_weights)
    spec = vit.spec  # what was loaded: random weights, with their seed, when the fallback kicked in
    every = "all" in cfg.layers
    layers = vit.resolve_layers("all" if every else cfg.layers)
    requested = layers if every else [next(r for r in cfg.layers if int(r) % vit.n_layers == layer) for layer in layers]
    layout = vit.stored_layout(cls=cfg.cls, registers=cfg.registers)
    image_bytes = len(layers) * layout.tokens_per_image * vit.d_model * DTYPES[cfg.dtype][0].itemsize
    images_per_shard = cfg.images_per_shard or max(1, (cfg.shard_mb << 20) // image_bytes)
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
    manifest = Manifest(
        set_id=content_id(identity),
        model={"spec": spec.describe(), **spec.record(), "pretrained_loaded": vit.pretrained_loaded,
               "n_layers": vit.n_layers},
        layers=layers,
        layers_requested=requested,
        d_model=vit.d_model,
        dtype=cfg.dtype,
        layout=layout,
        transform=vit.transform.to_json(),
        dataset=source.describe(),
        images_per_shard=images_per_shard,
    )
    return ExtractPlan(store, source, vit, device, manifest, images_per_shard)


def check_room(p: ExtractPlan, n_images: int, force: bool) -> None:
    """Say how much storage the run needs; refuse when a local target lacks it (unless forced)."""
    need = n_images * p.bytes_per_image
    m = p.manifest
    log.info("extracting %d images x %d layers x %d tokens x %d dims x %d bytes = %.2f GiB into %s",
             n_images, len(m.layers), m.layout.tokens_per_image, m.d_model, DTYPES[m.dtype][0].itemsize,
             need / 2**30, p.store.uri)
    root = p.store.local_path(".free-space-probe")
    if root is None:
        return  # object stores report no free space
    folder = root.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free and not force:
        raise ExtractError(f"the set needs {need / 2**30:.2f} GiB but {folder} has {free / 2**30:.2f} GiB free; "
                           "free some space, pick another --store, or pass --force")


def extract_shards(p: ExtractPlan, shards: range, cfg: ExtractConfig) -> None:
    """Extract the given shards, skipping those a previous run finished."""
    writer = ShardWriter(p.store, p.manifest, p.images_per_shard)
    done = writer.completed_shards()
    todo = [k for k in shards if k not in done]
    if len(todo) < len(shards):
        log.info("resuming %s: %d of %d shards already complete", p.set_id, len(shards) - len(todo), len(shards))
    for k in todo:  # this part owns these shards: nothing else writes there
        p.store.discard_incomplete(f"{set_prefix(p.set_id)}/{shard_name(k)}/")
    indices = [i for k in todo for i in range(*p.shard_range(k))]
    if not indices:
        return
    check_room(p, len(indices), cfg.force)
    vit, source, device = p.vit, p.source, p.device
    layers = p.manifest.layers
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    loader = DataLoader(
        DecodedImages(source, vit.transform.tensor()),
        batch_size=cfg.batch_size,
        sampler=indices,  # a sampler is an ordered index list: only the unfinished shards
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    records: list[dict] = []
    skipped: list[dict[str, str]] = []
    pending: Future | None = None
    m = p.manifest
    # Each shard's rows are copied straight from the model's output into one array per layer,
    # sized for the shard's dataset range (torch's copy converts to the stored dtype on the
    # way); the writer takes the filled prefix as it is. No list of batches, no concatenation.
    buffers: dict[int, dict[int, np.ndarray]] = {}
    filled: dict[int, int] = {}

    def shard_buffers(n_images: int) -> dict[int, np.ndarray]:
        return {layer: np.empty((n_images, m.layout.tokens_per_image, m.d_model), DTYPES[m.dtype][0])
                for layer in layers}

    def store_rows(out: dict[int, torch.Tensor], decoded: list[int]) -> None:
        """Copy the batch's rows (images ``decoded``, ascending) into their shards' buffers."""
        for k, run in itertools.groupby(range(len(decoded)), key=lambda j: decoded[j] // p.images_per_shard):
            rows = list(run)
            a, b = rows[0], rows[-1] + 1
            if k not in buffers:
                start, end = p.shard_range(k)
                buffers[k], filled[k] = shard_buffers(end - start), 0
            pos = filled[k]
            for layer in layers:
                storage_view(buffers[k][layer][pos:pos + b - a], m.dtype).copy_(out[layer][a:b])
            filled[k] = pos + b - a

    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(
        total=len(indices), unit="img", desc=f"extract {p.set_id[:8]}", disable=not cfg.progress
    ) as bar:
        for batch_indices, pixels, failed in loader:
            if pixels is not None:
                store_rows(vit.activations(pixels, layers, m.layout), list(batch_indices))
            errors = dict(failed)
            # Walk the batch in dataset order so that each image, decoded or not, is charged to
            # the shard whose range holds it.
            for i in sorted([*batch_indices, *errors]):
                entry = source.entries[i]
                if i in errors:
                    log.warning("skipping unreadable image %s: %s", entry.id, errors[i])
                    skipped.append({"id": entry.id, "error": errors[i]})
                else:
                    records.append({"id": entry.id, "label": entry.label, "index": i})
                k = i // p.images_per_shard
                start, end = p.shard_range(k)
                if i == end - 1:
                    shard = buffers.pop(k, None) or shard_buffers(0)  # none: every image failed
                    n_rows = filled.pop(k, 0)
                    acts = {layer: a[:n_rows] for layer, a in shard.items()}
                    if pending is not None:
                        pending.result()  # at most one shard in flight: memory stays bounded
                    # The write overlaps the next batches' forward passes.
                    pending = pool.submit(writer.write_shard, k, acts, records, (start, end), skipped)
                    records, skipped = [], []
            bar.update(len(batch_indices) + len(failed))
        if pending is not None:
            pending.result()


def publish(p: ExtractPlan) -> Manifest:
    """Write the manifest once every shard is complete."""
    writer = ShardWriter(p.store, p.manifest, p.images_per_shard)
    done = writer.completed_shards()
    missing = [k for k in range(p.n_shards) if k not in done]
    if missing:
        raise ExtractError(f"cannot publish {p.set_id}: {len(missing)} of {p.n_shards} shards are not finished "
                           f"(first missing: {missing[0]}); run the remaining parts first")
    manifest = writer.finish([done[k] for k in range(p.n_shards)])
    if manifest.skipped:
        log.warning("%d unreadable images were skipped; they are listed in the manifest", len(manifest.skipped))
    log.info("published activation set %s: %d images in %d shards", p.set_id, manifest.n_images, p.n_shards)
    return manifest


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract (or find, if already published) the activation set ``cfg`` describes.

    With ``parts > 1`` only this part's shards are written; ``finish`` publishes the manifest."""
    p = plan(cfg)
    if set_exists(p.store, p.set_id):
        log.info("activation set %s already published in %s: reusing it", p.set_id, p.store.uri)
        return ExtractResult(p.set_id, ActivationSet.open(p.store, p.set_id).manifest, reused=True)
    if not cfg.finish:
        extract_shards(p, p.part_shards(cfg.part, cfg.parts), cfg)
        if cfg.parts > 1:
            return ExtractResult(p.set_id, None, reused=False)
    return ExtractResult(p.set_id, publish(p), reused=False)
