"""Extraction benchmark: how close `vitscope extract` comes to the bare cost of the ViT forward.

Measured, on a ViT-S/16-sized open_clip model with random weights (width 384, 12 blocks, 6 heads
of 64, patch 16, 224 px) loaded through ``local-dir:``, and real JPEGs (scikit-image photos):

1. throughput: ``vitscope.extractor.extraction.extract`` end to end (listing, model load, JPEG
   decoding and transforms in loader workers, the hooked forward, fp16 conversion, shard
   writes, manifest) against a forward-only loop (``ViT.residuals`` up to the same block) over
   the same images already decoded and transformed into one tensor: same model, batch size
   and torch threads. Target: ratio >= 0.9.
2. memory: peak RSS of a fresh extraction process for N and 4N images (shard size fixed, so
   both runs span several shards). Target: within 10%. With ``--shard-memory``, also how much
   the peak grows per MiB of shard (the extractor buffers a shard before writing it).
3. storage: bytes written per stored token for float32, float16 and bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    Figure,
    base_parser,
    interleaved,
    median,
    paired_ratios,
    peak_rss_mib,
    print_environment,
    report,
    wall,
)

from vitscope.datasets import open_source
from vitscope.extractor import ExtractConfig, extract
from vitscope.models import ModelSpec, load_vit, save_open_clip_dir
from vitscope.synthetic import make_planted_dataset

LAYERS = (-2,)  # the extractor's default: the residual stream after block 10 of 12

VIT_S16 = {
    "embed_dim": 384,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 384, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

_EXTRACT_CHILD = """
import json, sys
from vitscope.extractor import ExtractConfig, extract
extract(ExtractConfig(**json.loads(sys.argv[1])))
"""


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=5)
    p.add_argument("--images", type=int, default=192, help="images per throughput run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None,
                   help="extractor image-decoding processes (default: the extractor's own)")
    p.add_argument("--image-size", type=int, default=256,
                   help="side of the generated JPEGs (the model resizes and crops them to 224)")
    p.add_argument("--rss-images", type=int, default=48, help="N of the memory runs (the other run has 4N)")
    p.add_argument("--rss-images-per-shard", type=int, default=16)
    p.add_argument("--dtype-images", type=int, default=4, help="images per run of the bytes-per-token check")
    p.add_argument("--shard-memory", action="store_true",
                   help="also measure how peak RSS grows with the shard size (4N images, all layers, in 16-image "
                        "shards and in one shard; adds ~2-3 min)")
    args = p.parse_args()
    if args.quick:
        args.images, args.batch_size, args.repeats = 16, 8, 1
        args.rss_images, args.rss_images_per_shard, args.dtype_images = 8, 4, 2
    return args


def build_model(folder: Path) -> str:
    """A random ViT-S/16-sized CLIP saved as a hub-style folder; returns its ``local-dir:`` name."""
    import open_clip

    torch.manual_seed(0)
    return save_open_clip_dir(open_clip.CLIP(**VIT_S16), VIT_S16, folder)


def extract_config(data: Path, store: Path, model: str, n_images: int, args: argparse.Namespace,
                   **overrides: object) -> ExtractConfig:
    cfg = dict(data=str(data), store=str(store), model=model, pretrained=None, layers=LAYERS, dtype="float16",
               batch_size=args.batch_size, workers=args.workers, device="cpu", max_images=n_images, progress=False)
    return ExtractConfig(**(cfg | overrides))


def throughput(tmp: Path, data: Path, model: str, args: argparse.Namespace) -> None:
    vit = load_vit(ModelSpec(model), device="cpu")
    layers = vit.resolve_layers(LAYERS)
    source = open_source(str(data), max_images=args.images)
    transform = vit.transform.tensor()
    pixels = torch.stack([transform(source.load(i)) for i in range(len(source))])
    runs = 0

    def run_extract(n_images: int) -> Callable[[], None]:
        def run() -> None:
            nonlocal runs
            runs += 1
            store = tmp / f"store-{runs}"
            extract(extract_config(data, store, model, n_images, args))
            shutil.rmtree(store)

        return run

    def run_forward() -> None:
        for lo in range(0, len(pixels), args.batch_size):
            vit.residuals(pixels[lo:lo + args.batch_size], layers)

    def fixed_cost() -> None:
        """What every extract() call pays once, whatever N: the model load and its content hash."""
        spec = ModelSpec(model)
        load_vit(spec, device="cpu")
        spec.identity()

    n = len(pixels)
    t = interleaved({"extract": wall(run_extract(n)), "extract_half": wall(run_extract(n // 2)),
                     "forward": wall(run_forward), "fixed": wall(fixed_cost)}, args.repeats)
    without_fixed = [e - f for e, f in zip(t["extract"], t["fixed"], strict=True)]
    # The second half of the images costs t(N) - t(N/2): every per-call cost (model load, loader
    # start, the first forward's allocations, the manifest) cancels, leaving the per-image rate.
    marginal = [e - h for e, h in zip(t["extract"], t["extract_half"], strict=True)]
    forward_half = [f * (n - n // 2) / n for f in t["forward"]]
    report(f"throughput: {n} JPEGs of {args.image_size} px, batch {args.batch_size}, {args.workers if args.workers is not None else 'default'} workers, "
           f"{torch.get_num_threads()} torch threads", [
        Figure("extract() end to end", n / median(t["extract"]), "img/s"),
        Figure("forward-only loop on a pre-transformed tensor", n / median(t["forward"]), "img/s"),
        Figure.ratio("ratio extract / forward-only", paired_ratios(t["forward"], t["extract"]),
                     ">= 0.9", lambda r: r >= 0.9),
        Figure.ratio("CPU-time ratio forward-only / extract (incl. workers)",
                     paired_ratios(t.cpu["forward"], t.cpu["extract"])),
        Figure("model load + weights hash (paid once per call)", median(t["fixed"]), "s"),
        Figure.ratio("ratio without model load + hash (estimate)", paired_ratios(t["forward"], without_fixed)),
        Figure("extract() marginal rate, N/2 -> N images", (n - n // 2) / median(marginal), "img/s"),
        Figure.ratio("marginal ratio extract / forward-only (per-call costs cancel)",
                     paired_ratios(forward_half, marginal), ">= 0.9", lambda r: r >= 0.9),
    ])


def peak_rss_of_extract(tmp: Path, data: Path, model: str, n_images: int, images_per_shard: int,
                        args: argparse.Namespace, layers: tuple[int | str, ...] = LAYERS) -> float:
    """Peak RSS (MiB) of a fresh process that extracts ``n_images`` into a new store."""
    store = tmp / f"rss-{n_images}-{images_per_shard}-{len(layers)}"
    cfg = extract_config(data, store, model, n_images, args, images_per_shard=images_per_shard, layers=layers)
    peak = peak_rss_mib([sys.executable, "-c", _EXTRACT_CHILD, json.dumps(dataclasses.asdict(cfg))])
    shutil.rmtree(store)
    return peak


def memory(tmp: Path, data: Path, model: str, args: argparse.Namespace) -> None:
    n, per_shard = args.rss_images, args.rss_images_per_shard
    small = peak_rss_of_extract(tmp, data, model, n, per_shard, args)
    large = peak_rss_of_extract(tmp, data, model, 4 * n, per_shard, args)
    report(f"memory: peak RSS of a fresh extraction process ({per_shard} images per shard)", [
        Figure(f"N = {n} images", small, "MiB"),
        Figure(f"4N = {4 * n} images", large, "MiB"),
        Figure.ratio("ratio 4N / N", [large / small], "<= 1.10", lambda r: r <= 1.10),
    ])
    if not args.shard_memory:
        return
    # All 12 layers make a shard big enough for its buffers to stand out of the RSS noise.
    split = peak_rss_of_extract(tmp, data, model, 4 * n, per_shard, args, layers=("all",))
    whole = peak_rss_of_extract(tmp, data, model, 4 * n, 4 * n, args, layers=("all",))
    vit = VIT_S16["vision_cfg"]
    shard_mib = 4 * n * vit["layers"] * (1 + (vit["image_size"] // vit["patch_size"]) ** 2) * vit["width"] * 2 / 2**20
    report(f"shard buffers: peak RSS, {4 * n} images x all {vit['layers']} layers (float16)", [
        Figure(f"{per_shard} images per shard", split, "MiB"),
        Figure(f"one shard of {4 * n} images ({shard_mib:,.0f} MiB)", whole, "MiB"),
        Figure("extra peak per MiB of shard", (whole - split) / shard_mib, "x"),
    ])


def storage(tmp: Path, data: Path, model: str, args: argparse.Namespace) -> None:
    figures = []
    for dtype in ("float32", "float16", "bfloat16"):
        store = tmp / f"dtype-{dtype}"
        m = extract(extract_config(data, store, model, args.dtype_images, args, dtype=dtype)).manifest
        tokens = m.n_images * m.layout.tokens_per_image * len(m.layers)
        data_bytes = sum(f["nbytes"] for s in m.shards for rel, f in s.files.items() if rel.endswith(".bin"))
        all_bytes = sum(p.stat().st_size for p in (store / "activations" / m.set_id).rglob("*") if p.is_file())
        figures += [Figure(f"{dtype}: activation bytes per token (d={m.d_model})", data_bytes / tokens, "B"),
                    Figure(f"{dtype}: all bytes written per token (+ records, manifest)", all_bytes / tokens, "B")]
        shutil.rmtree(store)
    report(f"storage: bytes written per stored token ({args.dtype_images} images)", figures)


def main() -> None:
    args = parse_args()
    print_environment(args)
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-extract-") as name:
        tmp = Path(name)
        model = build_model(tmp / "model")
        data = tmp / "images"
        make_planted_dataset(data, n_images=max(args.images, 4 * args.rss_images, args.dtype_images),
                             size=args.image_size, square=args.image_size // 7)
        throughput(tmp, data, model, args)
        memory(tmp, data, model, args)
        storage(tmp, data, model, args)


if __name__ == "__main__":
    main()
