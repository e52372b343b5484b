"""Training benchmark: does the data path keep up with the optimiser, what do sweeps and sparse
decoding buy, and does each SAE family find a known answer?

On a synthetic activation set written in the real shard format (float16, d=768, 1 CLS + 14x14
patches per image, several shards, read from the page cache), no ViT needed:

(a) loader alone: ``TokenStream`` (chunk reads one window ahead, token-level shuffle through
    the bounded window, batches gathered in a background thread) tokens/s over one epoch of the
    patch tokens, against a raw sequential read of the same shard files (``np.fromfile``).
    Target: ratio >= 0.8 for batches in the stored float16 (what the trainer sends to a GPU,
    which converts). Also reported: float32 batches (the CPU path) against a raw read plus the
    float32 conversion, and the stream's time to its first batch.
(b) training: ``vitscope.trainer.train.train`` (its optimisation loop, as timed by the trainer:
    real loader, decoder-norm tricks, Adam, schedule) against the trainer's own per-SAE step
    (``SaeTrainer.step``) on batches sliced from an in-memory float32 tensor: same SAE, batch and
    step count. Target: time ratio <= 1.1.
(c) the standard configuration (d=768, d_sae=32x768, TopK k=64, batch 4096): trainer tokens/s
    (on a CPU the trainer's default is the sparse path, as in (d)).
(d) TopK (k=32, d_sae=16384, d=768) training step, through ``train()``: dense, sparse
    decoding (``embedding_bag`` over the selected decoder rows), and sparse decoding plus the
    sparse encoder backward (gradients through the selected latents only).
(e) a sweep of 8 TopK SAEs (k and lr varied) in one pass (``train_sweep``) against the same 8
    trained one by one (``train``), wall time end to end (sample, training, evaluation,
    publishing). On a CPU the SAEs' compute dominates, so this shows the least a sweep saves.
(f) quality: on a ground-truth set (128 known unit directions in 64 dimensions, 4 active per
    token, noise 0.05), the fraction of directions each family's decoder recovers at
    cosine > 0.9, all five trained in one sweep through the real loader.

Token counts are scaled down so that the default run takes a few minutes on 2 CPU cores; the
figures are per token or per step, or ratios, so they do not depend on the count.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
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

from vitscope.sae import fit_normalizer, load_sae_from
from vitscope.shards import ActivationSet, Manifest
from vitscope.store import LocalStore
from vitscope.trainer.config import TrainConfig
from vitscope.trainer.groundtruth import GroundTruth, recovery, write_ground_truth_set
from vitscope.trainer.stream import TokenStream
from vitscope.trainer.train import SaeTrainer, plan_saes, train, train_sweep

D_MODEL = 768
L1_COEFF = 5.0
LR = 4e-4


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=3)
    p.add_argument("--images", type=int, default=1536, help="images in the activation set (197 tokens each)")
    p.add_argument("--images-per-shard", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step in (a) to (e)")
    p.add_argument("--expansion", type=int, default=2, help="d_sae / d in (b)")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per run in (b)")
    p.add_argument("--standard-steps", type=int, default=3, help="optimiser steps in (c)")
    p.add_argument("--decode-steps", type=int, default=2, help="optimiser steps per run in (d)")
    p.add_argument("--sweep-steps", type=int, default=4, help="optimiser steps per SAE in (e)")
    p.add_argument("--sweep-expansion", type=int, default=1, help="d_sae / d of the sweep's SAEs in (e)")
    p.add_argument("--quality-tokens", type=int, default=100_000, help="training tokens per SAE in (f)")
    p.add_argument("--sections", default="abcdef", help="which of (a) to (f) to run, e.g. --sections ad")
    args = p.parse_args()
    if args.quick:
        args.images, args.images_per_shard, args.repeats = 256, 32, 1
        args.batch_size, args.expansion, args.steps, args.standard_steps = 1024, 1, 4, 1
        args.decode_steps, args.sweep_steps, args.quality_tokens = 1, 2, 30_000
    return args


@dataclass(frozen=True)
class Setup:
    store: LocalStore
    manifest: Manifest
    positions: np.ndarray  # stored token positions of the patches


def loader(setup: Setup, args: argparse.Namespace) -> None:
    m, root = setup.manifest, setup.store.root
    aset = ActivationSet(setup.store, m)
    streams = {"stored": TokenStream(aset, SYNTHETIC_LAYER, setup.positions, args.batch_size, out_dtype=None),
               "f32": TokenStream(aset, SYNTHETIC_LAYER, setup.positions, args.batch_size)}
    files = [root / "activations" / m.set_id / rel for s in m.shards for rel in s.files if rel.endswith(".bin")]
    first_batch: list[float] = []

    def run_stream(stream: TokenStream) -> float:
        t0 = time.perf_counter()
        for i, _ in enumerate(stream.epoch(0)):
            if i == 0:
                first_batch.append(time.perf_counter() - t0)
        return time.perf_counter() - t0

    def run_raw() -> None:
        for f in files:
            np.fromfile(f, dtype=np.uint8)

    def run_raw_f32() -> None:
        for f in files:
            np.fromfile(f, dtype=np.float16).astype(np.float32)

    t = interleaved({"stored": lambda: run_stream(streams["stored"]), "f32": lambda: run_stream(streams["f32"]),
                     "raw": wall(run_raw), "raw_f32": wall(run_raw_f32)}, args.repeats)
    tokens = streams["f32"].tokens_per_epoch
    mib = sum(f.stat().st_size for f in files) / 2**20
    report(f"(a) loader: one epoch, {tokens:,} patch tokens from {len(files)} shards ({mib:,.0f} MiB float16), "
           f"batch {args.batch_size}", [
        Figure("TokenStream, float16 batches (the GPU path)", tokens / median(t["stored"]), "tok/s"),
        Figure("TokenStream, float32 batches (the CPU path)", tokens / median(t["f32"]), "tok/s"),
        Figure("raw sequential read (np.fromfile)", tokens / median(t["raw"]), "tok/s"),
        Figure("raw read + float32 conversion", tokens / median(t["raw_f32"]), "tok/s"),
        Figure.ratio("ratio TokenStream float16 / raw read", paired_ratios(t["raw"], t["stored"]), ">= 0.8",
                     lambda r: r >= 0.8),
        Figure.ratio("ratio TokenStream float32 / raw read + float32", paired_ratios(t["raw_f32"], t["f32"])),
        Figure("TokenStream time to first batch", median(first_batch[-2 * args.repeats:]), "s"),
    ])


def train_config(setup: Setup, d_sae: int, batch_size: int, steps: int, **kw: object) -> TrainConfig:
    cfg = TrainConfig(activations=setup.manifest.set_id, store=str(setup.store.root), d_sae=d_sae,
                      l1_coeff=L1_COEFF, lr=LR, batch_size=batch_size, n_tokens=steps * batch_size,
                      init_sample=1 << 14, eval_tokens=batch_size, device="cpu", progress=False)
    return replace(cfg, **kw)


def train_seconds(setup: Setup, cfg: TrainConfig) -> tuple[float, dict[str, float]]:
    """Run the trainer; return its optimisation-loop time (excluding init, evaluation, saving)
    and its metrics, then remove the checkpoint so that the next run trains again."""
    metrics = train(cfg).metrics
    setup.store.delete_prefix("saes/")
    return metrics["train_seconds"], metrics


def training(setup: Setup, args: argparse.Namespace) -> None:
    d_sae = args.expansion * D_MODEL
    cfg = train_config(setup, d_sae, args.batch_size, args.steps)
    n = args.steps * args.batch_size
    aset = ActivationSet(setup.store, setup.manifest)
    data = TokenStream(aset, SYNTHETIC_LAYER, setup.positions, args.batch_size).sample(n)
    [plan] = plan_saes([cfg], aset, n)
    mean, scale = fit_normalizer(data[: cfg.init_sample])

    def run_in_memory() -> float:
        """The trainer's own optimisation step, on slices of a tensor already in memory (timed
        like the trainer times its loop: set-up excluded)."""
        member = SaeTrainer(plan, args.steps, torch.device("cpu"))
        member.init_from_sample(mean, scale, torch.zeros(D_MODEL))
        t0 = time.perf_counter()
        for step, lo in enumerate(range(0, n, args.batch_size)):
            member.step(member.sae.normalize(data[lo:lo + args.batch_size]), step, contextlib.nullcontext())
        return time.perf_counter() - t0

    t = interleaved({"trainer": lambda: train_seconds(setup, cfg)[0], "memory": run_in_memory}, args.repeats)
    report(f"(b) training: relu, d_sae {d_sae}, batch {args.batch_size}, {args.steps} steps", [
        Figure("train() with TokenStream", n / median(t["trainer"]), "tok/s"),
        Figure("same steps from an in-memory tensor", n / median(t["memory"]), "tok/s"),
        Figure.ratio("time ratio train() / in-memory", paired_ratios(t["trainer"], t["memory"]), "<= 1.1",
                     lambda r: r <= 1.1),
    ])


def standard(setup: Setup, args: argparse.Namespace) -> None:
    d_sae = 32 * D_MODEL
    cfg = train_config(setup, d_sae, args.batch_size, args.standard_steps, variant="topk", k=64)
    seconds, metrics = train_seconds(setup, cfg)
    report(f"(c) standard config: TopK k=64, d {D_MODEL}, d_sae {d_sae}, batch {args.batch_size}, "
           f"{args.standard_steps} steps, sparse decoding and encoder backward", [
        Figure("train() tokens/s", metrics["tokens_per_s"], "tok/s"),
        Figure("seconds per step", seconds / metrics["steps"], "s"),
    ])


def decoding(setup: Setup, args: argparse.Namespace) -> None:
    cfgs = {mode: train_config(setup, 16384, args.batch_size, args.decode_steps, variant="topk", k=32, sparse=mode)
            for mode in ("off", "decode", "all")}
    t = interleaved({mode: lambda c=c: train_seconds(setup, c)[0] for mode, c in cfgs.items()}, args.repeats,
                    warmup=False)
    steps = args.decode_steps
    report(f"(d) TopK k=32, d_sae 16384, d {D_MODEL}, batch {args.batch_size}: sparse vs dense training step", [
        Figure("dense (matmuls) seconds per step", median(t["off"]) / steps, "s"),
        Figure("sparse decoding (embedding_bag) seconds per step", median(t["decode"]) / steps, "s"),
        Figure("+ sparse encoder backward seconds per step", median(t["all"]) / steps, "s"),
        Figure.ratio("step time ratio sparse decoding / dense", paired_ratios(t["decode"], t["off"])),
        Figure.ratio("step time ratio sparse decoding + encoder backward / dense", paired_ratios(t["all"], t["off"])),
    ])


def sweep(setup: Setup, args: argparse.Namespace) -> None:
    d_sae = args.sweep_expansion * D_MODEL
    cfgs = [train_config(setup, d_sae, args.batch_size, args.sweep_steps, variant="topk", k=k, lr=lr,
                         eval_tokens=4 * args.batch_size)
            for k in (16, 32, 64, 128) for lr in (2e-4, 4e-4)]

    def one_pass() -> None:
        train_sweep(cfgs)
        setup.store.delete_prefix("saes/")

    def one_by_one() -> None:
        for cfg in cfgs:
            train(cfg)
        setup.store.delete_prefix("saes/")

    t = interleaved({"sweep": wall(one_pass), "singles": wall(one_by_one)}, args.repeats, warmup=False)
    n = len(cfgs) * args.sweep_steps * args.batch_size
    report(f"(e) sweep: {len(cfgs)} TopK SAEs (d_sae {d_sae}, k 16..128, 2 lrs), {args.sweep_steps} steps each, "
           f"batch {args.batch_size}", [
        Figure("one pass (train_sweep)", median(t["sweep"]), "s"),
        Figure("8 single runs (train)", median(t["singles"]), "s"),
        Figure("one pass: SAE-tokens trained per second", n / median(t["sweep"]), "tok/s"),
        Figure.ratio("wall-time ratio one pass / single runs", paired_ratios(t["sweep"], t["singles"])),
    ])


def quality(tmp: Path, args: argparse.Namespace) -> None:
    gt = GroundTruth(n_images=1024, grid=(4, 4))
    store = LocalStore(tmp / "ground-truth")
    m = write_ground_truth_set(store, gt)
    common = dict(activations=m.set_id, store=str(store.root), tokens=("all",), expansion=4, lr=5e-3, batch_size=512,
                  n_tokens=args.quality_tokens, dead_window=20_000, eval_tokens=8192, device="cpu", progress=False)
    cfgs = [TrainConfig(variant="topk", k=4, **common), TrainConfig(variant="batchtopk", k=4, **common),
            TrainConfig(variant="matryoshka", k=4, **common), TrainConfig(variant="relu", l1_coeff=1.0, **common),
            TrainConfig(variant="jumprelu", l0_coeff=0.5, **common)]
    figures = []
    for cfg, res in zip(cfgs, train_sweep(cfgs), strict=True):
        sae, _ = load_sae_from(store, res.sae_id)
        found = recovery(sae.W_dec, gt.directions())
        figures.append(Figure(f"{cfg.variant}: directions recovered (nmse {res.metrics['nmse']:.3f}, "
                              f"L0 {res.metrics['l0']:.1f})", 100 * found, "%",
                              target=">= 95" if cfg.variant == "topk" else "",
                              met=found >= 0.95 if cfg.variant == "topk" else None))
    report(f"(f) quality: {gt.n_directions} directions in d={gt.d_model}, {gt.active} active per token, "
           f"noise {gt.noise}; {args.quality_tokens:,} tokens, d_sae {4 * gt.d_model}, lr 5e-3, cosine > 0.9", figures)


def main() -> None:
    args = parse_args()
    print_environment(args)
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-train-") as name:
        store = LocalStore(Path(name) / "store")
        t0 = time.perf_counter()
        manifest = write_activation_set(store, args.images, D_MODEL, images_per_shard=args.images_per_shard)
        print(f"wrote a synthetic activation set of {args.images} images in {time.perf_counter() - t0:.1f}s")
        setup = Setup(store, manifest, manifest.layout.token_indices(["patches"]))
        for section, run in zip("abcde", (loader, training, standard, decoding, sweep), strict=True):
            if section in args.sections:
                run(setup, args)
        if "f" in args.sections:
            quality(Path(name), args)


if __name__ == "__main__":
    main()
