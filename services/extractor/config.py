"""What ``vitscope extract`` is asked to do (kept apart from the extraction code so that reading
the options imports no model code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ExtractConfig:
    """Extract ViT activations from an image folder into an activation set."""

    data: str
    """Images: a folder (class folders root/<class>/<image> give labels, or flat), webdataset tar
    shards (x.tar, shard-{000..099}.tar, a .txt list of shards; local or s3://), or a .csv/.jsonl
    list of paths or URIs with optional labels."""
    store: str = ".vitscope/store"
    """Where to publish: a folder path, file:///path or s3://bucket/prefix."""
    model: str = "ViT-B-16"
    """open_clip model: a built-in name (ViT-B-16), hf-hub:org/repo (e.g. hf-hub:imageomics/bioclip) or
    local-dir:/path; or a timm ViT as timm:<name> (e.g. timm:vit_base_patch14_reg4_dinov2.lvd142m)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag, 'default' for timm's own weights, or a checkpoint file; ignored for
    hf-hub:/local-dir:. None = random init."""
    init_seed: int = 0
    """Seeds random weights (--pretrained None or the --allow-random-weights fallback), so that every
    run builds the same network; part of the set id of random-weight sets only."""
    model_options: str | None = None
    """JSON keyword arguments for the model factory, e.g. '{"img_size": 224}' for a timm DINOv2."""
    layers: tuple[int | Literal["all"], ...] = (-2,)
    """Blocks whose output (the residual stream) to store; negative counts from the end (-1 = last); 'all' for every block."""
    cls: bool = True
    """Store the CLS token (patch tokens are always stored)."""
    registers: bool = False
    """Store register tokens (DINOv2-reg and other models that have them)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """Stored precision: half precision halves storage and I/O."""
    batch_size: int = 64
    """Images per forward pass of the ViT."""
    workers: int | None = None
    """Image-decoding processes (default: 1 on a CPU, where the forward pass needs the cores and
    decoding costs a few % of it; up to 8 with a GPU). The stored bytes never depend on this."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    shard_mb: int = 256
    """Target shard size, all layers together (each layer is one file); bounds the memory a shard in flight takes."""
    images_per_shard: int | None = None
    """Dataset images per shard, overriding shard_mb (small values make tests exercise many shards)."""
    max_images: int | None = None
    """Only the first N images of the canonical order (quick trials)."""
    part: int = 0
    """Which part of the work this process does (0-based), when the set is split into --parts."""
    parts: int = 1
    """Split the shards into this many contiguous parts for separate processes or machines. With
    more than one part, each process writes its shards and `vitscope extract --finish` publishes."""
    finish: bool = False
    """Only publish the manifest of a set whose parts have all finished."""
    force: bool = False
    """Start even when the local target seems to lack the room the set needs."""
    allow_random_weights: bool = False
    """If pretrained weights cannot be fetched (offline), warn and use random weights instead of failing."""
    progress: bool = True
    """Show a progress bar (images and images/s)."""
