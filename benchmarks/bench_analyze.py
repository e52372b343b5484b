"""Analysis benchmark: what the statistics, top-k bookkeeping and I/O add to encoding.

On a synthetic activation set in the real shard format (float16, d=768, 1 CLS + 14x14 patches
per image) and a ReLU SAE published with ``vitscope.sae.save_sae``:

- ``vitscope.analyzer.analysis.analyze`` end to end (SAE load, memory-mapped shard reads,
  float16 -> float32, encoding, per-latent frequency/mean/max, best-patch top-k merge, results
  written), against
- a bare loop that only encodes the same tokens, batch by batch, from a float32 tensor already
  in memory, with the same SAE and batch size.

The ratio (analysis images/s over bare-encode images/s) is the share of time spent encoding;
1 - ratio is the overhead. The SAE's encoder bias is set so that about 2% of latents fire, as in
a trained SAE (a random one fires half the time).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import (
    SYNTHETIC_LAYER,
    Figure,
    base_parser,
    interleaved,
    median,
    paired_ratios,
    print_environment,
    report,
    wall,
    write_activation_set,
)

from vitscope.analyzer import AnalyzeConfig, analyze
from vitscope.sae import Sae, SaeConfig, SaeRecord, build_sae, fit_normalizer, save_sae
from vitscope.shards import ActivationSet, Manifest, from_storage
from vitscope.store import LocalStore

D_MODEL = 768
SAE_ID = "bench-sae"


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=3)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--images-per-shard", type=int, default=256)
    p.add_argument("--batch-images", type=int, default=128, help="images encoded at once (AnalyzeConfig.batch_images)")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--top-images", type=int, default=32, help="top images kept per latent")
    args = p.parse_args()
    if args.quick:
        args.images, args.images_per_shard, args.batch_images, args.d_sae, args.repeats = 64, 32, 16, 768, 1
    return args


def publish_sae(store: LocalStore, manifest: Manifest, x: torch.Tensor, d_sae: int) -> Sae:
    """A random ReLU SAE with the set's normalisation, sparse like a trained one, saved as a checkpoint."""
    sae = build_sae(SaeConfig.of("relu", D_MODEL, d_sae))
    sample = x[:, manifest.layout.patch_start:].reshape(-1, D_MODEL)[: 1 << 15]
    mean, scale = fit_normalizer(sample)
    with torch.no_grad():
        sae.norm_mean.copy_(mean)
        sae.norm_scale.fill_(scale)
        pre = sae.pre_acts(sae.normalize(sample[:4096]))
        sae.b_enc.copy_(-pre.quantile(0.98, dim=0))  # each latent fires on ~2% of tokens
    save_sae(store, sae, SaeRecord(sae_id=SAE_ID, config=sae.cfg, activation_set_id=manifest.set_id,
                                   layer=SYNTHETIC_LAYER, tokens=["patches"]))
    return sae.requires_grad_(False).eval()


def main() -> None:
    args = parse_args()
    print_environment(args)
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-analyze-") as name:
        store = LocalStore(Path(name) / "store")
        manifest = write_activation_set(store, args.images, D_MODEL, images_per_shard=args.images_per_shard)
        aset = ActivationSet(store, manifest)
        x = torch.cat([from_storage(a, manifest.dtype) for _, a in aset.iter_shards(SYNTHETIC_LAYER)])
        sae = publish_sae(store, manifest, x, args.d_sae)
        cfg = AnalyzeConfig(sae=SAE_ID, store=str(store.root), top_images=args.top_images, batch_images=args.batch_images,
                            device="cpu", progress=False)

        def run_analyze() -> None:
            analyze(cfg)
            store.delete_prefix("analyses/")  # or the next run would find it published

        @torch.no_grad()
        def run_encode() -> None:
            for lo in range(0, len(x), args.batch_images):
                sae.encode(x[lo:lo + args.batch_images])

        firing = (sae.encode(x[:8]) > 0).float().mean().item()
        t = interleaved({"analyze": wall(run_analyze), "encode": wall(run_encode)}, args.repeats)
        n = len(x)
        report(f"analysis: {n} images x {manifest.layout.tokens_per_image} tokens, d_sae {args.d_sae}, "
               f"batch {args.batch_images} images, top {args.top_images} images, {firing:.1%} of latents firing", [
            Figure("analyze() end to end", n / median(t["analyze"]), "img/s"),
            Figure("bare encode loop on an in-memory float32 tensor", n / median(t["encode"]), "img/s"),
            Figure.ratio("ratio analyze / bare encode", paired_ratios(t["encode"], t["analyze"])),
            Figure.ratio("CPU-time ratio bare encode / analyze", paired_ratios(t.cpu["encode"], t.cpu["analyze"])),
        ])


if __name__ == "__main__":
    main()
