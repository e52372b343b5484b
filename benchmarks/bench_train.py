"""Training benchmark: does the data path keep up with the optimiser, what do sweeps and sparse
decoding buy, and does each SAE family find a known answer?

On a synthetic activation set written in the real shard format (float16, d=768, 1 CLS + 14x14
patches per image, several shards, read from the page cache), no ViT needed:

(a) loader alone: ``TokenStream`` (chunks read one window ahead, straight into the window's
    shuffled order; batches are slices of it) tokens/s over three epochs of the patch tokens
    (``--loader-epochs``: several windows, as in training, not only the first), against raw
    sequential reads of the same shard files (``np.fromfile``). Target: ratio >= 0.8 for batches
    in the stored float16 (what the trainer sends to a GPU, which converts). Also reported: a
    read into one reused buffer (``readinto``, a bare memcpy from the page cache), float32
    batches (the CPU path) against a raw read plus the float32 conversion, and the stream's
    time to its first batch.
(b) training: ``vitscope.trainer.training.train`` (its optimisation loop, as timed by the trainer:
    real loader, decoder-norm tricks, Adam, schedule) against the trainer's own per-SAE step
    (``SaeTrainer.step``) on batches sliced from an in-memory float32 tensor (on the training
    device): same SAE, batch and step count. Target: time ratio <= 1.1.
(c) the standard configuration (d=768, d_sae=32x768, TopK k=64, batch 4096): trainer tokens/s
    (the trainer's default path: sparse on a CPU, as in (d); dense on CUDA).
(d) TopK (k=32, d_sae=16384, d=768) training step, through ``train()``: dense, sparse
    decoding (``embedding_bag`` over the selected decoder rows), and sparse decoding plus the
    sparse encoder backward (gradients through the selected latents only).
(e) a sweep of 8 TopK SAEs (k and lr varied) in one pass (``train_sweep``) against the same 8
    trained one by one (``train``), wall time end to end (sample, training, evaluation,
    publishing). On a CPU the SAEs' compute dominates, so this shows the least a sweep saves; on
    a GPU reading the data dominates, and one pass should take <= 0.3 of the single runs' time.
(h) data-parallel: `vitscope train` (TopK k=32, d_sae ``--ddp-expansion`` x 768, batch 4096) under
    ``torchrun --nproc-per-node 2`` against one process, on the same tokens (the same SAE id):
    the training loop's time (the trainer's own ``train_seconds``: rank 0's, all-reduces
    included) and the published weights' largest difference. On a CPU the two gloo processes get
    half the cores each, against one process with all of them and one with half (the ideal ratio
    to the latter is 0.5); on CUDA (2 GPUs or more; skipped with fewer) NCCL between two GPUs
    against one GPU.
(f) quality: on a ground-truth set (128 known unit directions in 64 dimensions, 4 active per
    token, noise 0.05), the fraction of directions each family's decoder recovers at
    cosine > 0.9, all five trained in one sweep through the real loader.
(g) end to end, as a user runs it: ``train()`` on the config `vitscope train` builds from its
    command line (the CLI's parser and defaults: its normalisation sample, its final metrics pass
    of ``--eval-tokens``, dead-latent counting, the stream) for TopK k=32, d_sae 16384, batch 4096
    over ``--e2e-tokens`` tokens, against (d)'s sparse step (``--sparse all``) in the same run:
    the loop per step within 1.2x of it, the final metrics pass at most 0.1 of the loop; then
    once with dead latents from the start (AuxK in every step), its step reported.

Token counts are scaled down so that the default run takes a few minutes on 2 CPU cores; the
figures are per token or per step, or ratios, so they do not depend on the count. Every section
trains on ``--device`` (cpu by default); ``--gpu`` sizes the run for an H100/H200 (about 3
minutes for (b) to (e)), with bf16 autocast as the trainer's default there (``--no-autocast``:
float32). Each title says which device (and precision) its figures come from. On CUDA every
timed loop waits for the queued GPU work before its clock stops.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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

from vitscope.groundtruth import GroundTruth, recovery, write_ground_truth_set
from vitscope.sae import (
    BatchTopKHyper,
    JumpReluHyper,
    MatryoshkaHyper,
    ReluHyper,
    TopKHyper,
    fit_normalizer,
    load_sae_from,
)
from vitscope.shards import ActivationSet, Manifest
from vitscope.store import LocalStore
from vitscope.trainer.config import TrainConfig
from vitscope.trainer.config import train_config as flat_config
from vitscope.trainer.stream import TokenStream
from vitscope.trainer.training import SaeTrainer, plan_saes, train, train_sweep

D_MODEL = 768
L1_COEFF = 5.0
LR = 4e-4


GPU_PRESET = dict(images=4096, batch_size=4096, expansion=16, steps=200, standard_steps=300, decode_steps=100,
                  sweep_steps=190, sweep_expansion=1, cold=True)
"""Sizes for an H100/H200 (``--gpu``): enough steps to time a GPU that does the standard step in a
few ms, and a set large enough (4096 images, 1.2 GiB float16) that the sweep (e) reads real data:
each of its runs trains on just under one epoch, read from the disk (``cold``: the page cache is
emptied first, as it is for a set larger than memory), which is where one pass saves most. Its
SAEs are as wide as on a CPU (d_sae 768); wider ones (``--sweep-expansion 4``) spend more of each
step on the GPU, which one pass cannot share. Meant to keep sections (b) to (e) within about 3 minutes there (check the "section took" lines)."""


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=3)
    p.add_argument("--gpu", action="store_true",
                   help="sizes for an H100/H200 (explicit options still win) and --device cuda unless given: "
                        + ", ".join(f"{k}={v}" for k, v in GPU_PRESET.items()))
    p.add_argument("--device", default=None,
                   help="where every section trains: cpu (the default), cuda (the default with --gpu), cuda:1, ...")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (TrainConfig.autocast; ignored on a CPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="capture training steps as CUDA graphs (TrainConfig.cuda_graphs; ignored on a CPU; "
                        "(c) measures both)")
    p.add_argument("--images", type=int, default=1536, help="images in the activation set (197 tokens each)")
    p.add_argument("--images-per-shard", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step in (a) to (e)")
    p.add_argument("--expansion", type=int, default=2, help="d_sae / d in (b)")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per run in (b)")
    p.add_argument("--standard-steps", type=int, default=3, help="optimiser steps in (c)")
    p.add_argument("--decode-steps", type=int, default=2, help="optimiser steps per run in (d)")
    p.add_argument("--sweep-steps", type=int, default=4, help="optimiser steps per SAE in (e)")
    p.add_argument("--sweep-expansion", type=int, default=1, help="d_sae / d of the sweep's SAEs in (e)")
    p.add_argument("--loader-epochs", type=int, default=3,
                   help="epochs per timed run in (a): several windows, as in training, not just the first")
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=False,
                   help="(e): evict the set from the page cache before every run, as for a set larger than memory")
    p.add_argument("--quality-tokens", type=int, default=100_000, help="training tokens per SAE in (f)")
    p.add_argument("--e2e-tokens", type=int, default=204_800,
                   help="training tokens of (g)'s run (the default: 50 steps, the run the figures in docs are of)")
    p.add_argument("--ddp-steps", type=int, default=8, help="optimiser steps of each run in (h)")
    p.add_argument("--ddp-expansion", type=int, default=4, help="d_sae / d in (h)")
    p.add_argument("--sections", default="abcdefgh", help="which of (a) to (h) to run, e.g. --sections ad")
    if p.parse_known_args()[0].gpu:
        p.set_defaults(**GPU_PRESET)
    args = p.parse_args()
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.quick:
        args.images, args.images_per_shard, args.repeats = 256, 32, 1
        args.batch_size, args.expansion, args.steps, args.standard_steps = 1024, 1, 4, 1
        args.decode_steps, args.sweep_steps, args.quality_tokens, args.e2e_tokens = 1, 2, 30_000, 2 * 4096
        args.ddp_steps, args.ddp_expansion = 4, 1
    return args


@dataclass(frozen=True)
class Setup:
    store: LocalStore
    manifest: Manifest
    positions: np.ndarray  # stored token positions of the patches


def set_files(setup: Setup) -> list[Path]:
    """The layer files of the benchmark's activation set."""
    m = setup.manifest
    return [setup.store.root / "activations" / m.set_id / rel for s in m.shards for rel in s.files
            if rel.endswith(".bin")]


def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache, so the next read comes from the disk, as it does for
    a set larger than memory (``POSIX_FADV_DONTNEED`` drops clean pages; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader(setup: Setup, args: argparse.Namespace) -> None:
    m = setup.manifest
    aset = ActivationSet(setup.store, m)
    streams = {"stored": TokenStream(aset, SYNTHETIC_LAYER, setup.positions, args.batch_size, out_dtype=None),
               "f32": TokenStream(aset, SYNTHETIC_LAYER, setup.positions, args.batch_size)}
    files = set_files(setup)
    epochs = args.loader_epochs
    tokens = epochs * streams["f32"].tokens_per_epoch
    first_batch: list[float] = []
    reused = np.empty(max(f.stat().st_size for f in files), np.uint8)

    def warm_cache() -> None:
        """Read every file once, untimed: this VM reclaims page cache it thinks is cold, and a
        timed run that hits the disk measures the disk, not the loader."""
        for f in files:
            np.fromfile(f, dtype=np.uint8)

    def warmed(measure: Callable[[], float]) -> Callable[[], float]:
        return lambda: (warm_cache(), measure())[1]

    def run_stream(stream: TokenStream) -> float:
        t0 = time.perf_counter()
        for i, _ in enumerate(stream.batches(0, tokens)):
            if i == 0:
                first_batch.append(time.perf_counter() - t0)
        return time.perf_counter() - t0

    def run_raw() -> None:
        for _ in range(epochs):
            warm_cache()  # the same sequential read, timed

    def run_readinto() -> None:
        for _ in range(epochs):
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    fh.readinto(memoryview(reused)[:f.stat().st_size])

    def run_raw_f32() -> None:
        for _ in range(epochs):
            for f in files:
                np.fromfile(f, dtype=np.float16).astype(np.float32)

    t = interleaved({"stored": warmed(lambda: run_stream(streams["stored"])),
                     "f32": warmed(lambda: run_stream(streams["f32"])), "raw": warmed(wall(run_raw)),
                     "readinto": warmed(wall(run_readinto)), "raw_f32": warmed(wall(run_raw_f32))}, args.repeats)
    mib = sum(f.stat().st_size for f in files) / 2**20
    report(f"(a) loader: {epochs} epochs of {tokens // epochs:,} patch tokens from {len(files)} shards "
           f"({mib:,.0f} MiB float16, page cache warm), batch {args.batch_size}, window {streams['f32'].buffer_tokens:,} "
           f"tokens", [
        Figure("TokenStream, float16 batches (the GPU path)", tokens / median(t["stored"]), "tok/s"),
        Figure("TokenStream, float32 batches (the CPU path)", tokens / median(t["f32"]), "tok/s"),
        Figure("raw sequential read (np.fromfile)", tokens / median(t["raw"]), "tok/s"),
        Figure("raw read into one reused buffer (readinto)", tokens / median(t["readinto"]), "tok/s"),
        Figure("raw read + float32 conversion", tokens / median(t["raw_f32"]), "tok/s"),
        Figure.ratio("ratio TokenStream float16 / raw read", paired_ratios(t["raw"], t["stored"]), ">= 0.8",
                     lambda r: r >= 0.8),
        Figure.ratio("ratio TokenStream float16 / readinto", paired_ratios(t["readinto"], t["stored"])),
        Figure.ratio("ratio TokenStream float32 / raw read + float32", paired_ratios(t["raw_f32"], t["f32"])),
        Figure("TokenStream time to first batch", median(first_batch[-2 * args.repeats:]), "s"),
    ])


def on_cuda(args: argparse.Namespace) -> bool:
    return torch.device(args.device).type == "cuda"


def where(args: argparse.Namespace) -> str:
    """The device (and precision) every figure was measured with, for the section titles."""
    if not on_cuda(args):
        return args.device
    return (f"{args.device} {torch.cuda.get_device_name(args.device)}, {'bf16 autocast' if args.autocast else 'float32'}"
            f"{'' if args.cuda_graphs else ', eager steps'}")


def synchronize(args: argparse.Namespace) -> None:
    """Wait for the queued GPU work (before a clock is read)."""
    if on_cuda(args):
        torch.cuda.synchronize(args.device)


def train_config(setup: Setup, args: argparse.Namespace, d_sae: int, batch_size: int, steps: int,
                 variant: str = "relu", **kw: object) -> TrainConfig:
    """The benchmark's settings in the flat form of `vitscope train` (the family's own settings
    among them: the L1 weight for relu)."""
    family = {"l1_coeff": L1_COEFF} if variant == "relu" else {}
    return flat_config(dict(activations=setup.manifest.set_id, store=str(setup.store.root), d_sae=d_sae,
                            variant=variant, **family, lr=LR, batch_size=batch_size, n_tokens=steps * batch_size,
                            init_sample=1 << 14, eval_tokens=batch_size, device=args.device,
                            autocast=args.autocast, cuda_graphs=args.cuda_graphs, progress=False) | kw)


def train_seconds(setup: Setup, cfg: TrainConfig) -> tuple[float, dict[str, float]]:
    """Run the trainer; return its optimisation-loop time (excluding init, evaluation, saving)
    and its metrics, then remove the checkpoint so that the next run trains again."""
    metrics = train(cfg).metrics
    setup.store.delete_prefix("saes/")
    return metrics["train_seconds"], metrics


def training(setup: Setup, args: argparse.Namespace) -> None:
    d_sae = args.expansion * D_MODEL
    cfg = train_config(setup, args, d_sae, args.batch_size, args.steps)
    n = args.steps * args.batch_size
    aset = ActivationSet(setup.store, setup.manifest)
    # At most 64 batches in memory (on the device), cycled through: the step does not care
    # which tokens it gets, and a long GPU run would not fit otherwise.
    data = TokenStream(aset, SYNTHETIC_LAYER, setup.positions, args.batch_size).sample(min(n, 64 * args.batch_size))
    [plan] = plan_saes([cfg], aset, n)
    mean, scale = fit_normalizer(data[: cfg.init_sample])
    device = torch.device(args.device)
    data = data.to(device)
    in_memory_batches = len(data) // args.batch_size
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if on_cuda(args) and args.autocast
                else contextlib.nullcontext())  # as the trainer does

    def run_in_memory() -> float:
        """The trainer's own optimisation step, on slices of a tensor already in memory (timed
        like the trainer times its loop: set-up excluded, queued GPU work included)."""
        member = SaeTrainer(plan, args.steps, device)
        member.init_from_sample(mean, scale, torch.zeros(D_MODEL))
        synchronize(args)
        t0 = time.perf_counter()
        for step in range(args.steps):
            lo = step % in_memory_batches * args.batch_size
            member.step(member.sae.normalize(data[lo:lo + args.batch_size]), step, autocast)
        synchronize(args)
        return time.perf_counter() - t0

    t = interleaved({"trainer": lambda: train_seconds(setup, cfg)[0], "memory": run_in_memory}, args.repeats)
    report(f"(b) training [{where(args)}]: relu, d_sae {d_sae}, batch {args.batch_size}, {args.steps} steps", [
        Figure("train() with TokenStream", n / median(t["trainer"]), "tok/s"),
        Figure("same steps from an in-memory tensor", n / median(t["memory"]), "tok/s"),
        Figure.ratio("time ratio train() / in-memory", paired_ratios(t["trainer"], t["memory"]), "<= 1.1",
                     lambda r: r <= 1.1),
    ])


def standard(setup: Setup, args: argparse.Namespace) -> None:
    d_sae = 32 * D_MODEL
    cfg = train_config(setup, args, d_sae, args.batch_size, args.standard_steps, variant="topk", k=64)
    path = "dense (the CUDA default)" if on_cuda(args) else "sparse decoding and encoder backward (the CPU default)"
    title = (f"(c) standard config [{where(args)}]: TopK k=64, d {D_MODEL}, d_sae {d_sae}, batch {args.batch_size}, "
             f"{args.standard_steps} steps, {path}")
    if not on_cuda(args):
        seconds, metrics = train_seconds(setup, cfg)
        report(title, [Figure("train() tokens/s", metrics["tokens_per_s"], "tok/s"),
                       Figure("seconds per step", seconds / metrics["steps"], "s")])
        return
    # On CUDA: the step captured as a CUDA graph (the default) against eager launches; both
    # must train the same weights.
    weights: dict[bool, torch.Tensor] = {}

    def run(graphs: bool) -> float:
        c = replace(cfg, cuda_graphs=graphs)
        result = train(c)
        weights[graphs] = load_sae_from(setup.store, result.sae_id)[0].W_dec.detach().clone()
        setup.store.delete_prefix("saes/")
        return result.metrics["train_seconds"]

    t = interleaved({"graphs": lambda: run(True), "eager": lambda: run(False)}, args.repeats)
    tokens = args.standard_steps * args.batch_size
    report(title, [
        Figure("train() tokens/s, step as a CUDA graph (default)", tokens / median(t["graphs"]), "tok/s"),
        Figure("train() tokens/s, eager step (--no-cuda-graphs)", tokens / median(t["eager"]), "tok/s"),
        Figure("seconds per step, CUDA graph", median(t["graphs"]) / args.standard_steps, "s"),
        Figure.ratio("time ratio CUDA graph / eager", paired_ratios(t["graphs"], t["eager"])),
        Figure("max |W_dec difference| CUDA graph vs eager", float((weights[True] - weights[False]).abs().max()), ""),
    ])


def decoding(setup: Setup, args: argparse.Namespace) -> None:
    cfgs = {mode: train_config(setup, args, 16384, args.batch_size, args.decode_steps, variant="topk", k=32,
                               sparse=mode)
            for mode in ("off", "decode", "all")}
    # A warm-up round on a GPU only (there it is cheap, and the first sparse run pays for cuSPARSE's set-up).
    t = interleaved({mode: lambda c=c: train_seconds(setup, c)[0] for mode, c in cfgs.items()}, args.repeats,
                    warmup=on_cuda(args))
    steps = args.decode_steps
    report(f"(d) [{where(args)}] TopK k=32, d_sae 16384, d {D_MODEL}, batch {args.batch_size}: sparse vs dense "
           f"training step", [
        Figure("dense (matmuls) seconds per step", median(t["off"]) / steps, "s"),
        Figure("sparse decoding (embedding_bag) seconds per step", median(t["decode"]) / steps, "s"),
        Figure("+ sparse encoder backward seconds per step", median(t["all"]) / steps, "s"),
        Figure.ratio("step time ratio sparse decoding / dense", paired_ratios(t["decode"], t["off"])),
        Figure.ratio("step time ratio sparse decoding + encoder backward / dense", paired_ratios(t["all"], t["off"])),
    ])


def end_to_end(setup: Setup, args: argparse.Namespace) -> None:
    from vitscope.composition.cli import parse

    argv = ["--activations", setup.manifest.set_id, "--store", str(setup.store.root), "--variant", "topk", "--k", "32",
            "--d-sae", "16384", "--n-tokens", str(args.e2e_tokens), "--device", args.device, "--no-progress"]
    cli_cfg = parse("train", argv)
    step_cfg = train_config(setup, args, 16384, 4096, args.decode_steps, variant="topk", k=32, sparse="all")
    runs: list[dict[str, float]] = []

    def user_run() -> float:
        t0 = time.perf_counter()
        runs.append(train(cli_cfg).metrics | {"wall": time.perf_counter() - t0})
        setup.store.delete_prefix("saes/")
        return runs[-1]["train_seconds"] / runs[-1]["steps"]

    def sparse_step() -> float:
        seconds, metrics = train_seconds(setup, step_cfg)
        return seconds / metrics["steps"]

    # Two rounds, the step first in one and last in the other, so each user run (a minute) has a
    # step run (a few seconds) next to it in time.
    t = interleaved({"step": sparse_step, "user": user_run}, repeats=2, warmup=False)
    run = runs[0]
    # Once more with dead latents from the start (a latent is dead after 2 silent steps), so the
    # AuxK loss runs in almost every step.
    aux_cfg = parse("train", [*argv, "--dead-window", str(2 * cli_cfg.batch_size)])
    aux = train(aux_cfg).metrics
    setup.store.delete_prefix("saes/")
    report(f"(g) end to end [{where(args)}]: `vitscope train --variant topk --k 32 --d-sae 16384` on "
           f"{args.e2e_tokens:,} tokens (CLI defaults: batch {cli_cfg.batch_size}, eval {cli_cfg.eval_tokens:,} tokens)", [
        Figure("train() wall time", median([r["wall"] for r in runs]), "s"),
        Figure("training loop seconds per step", median(t["user"]), "s"),
        Figure("(d)'s sparse step, same run", median(t["step"]), "s"),
        Figure.ratio("step time ratio user run / (d) sparse step", paired_ratios(t["user"], t["step"]), "<= 1.2",
                     lambda r: r <= 1.2),
        Figure("the same with the AuxK loss on (--dead-window 8192), per step", aux["train_seconds"] / aux["steps"], "s"),
        Figure.ratio("step time ratio AuxK run / (d) sparse step", [aux["train_seconds"] / aux["steps"] / median(t["step"])]),
        Figure("final metrics pass", median([r["eval_seconds"] for r in runs]), "s"),
        Figure.ratio("time ratio final pass / training loop", [r["eval_seconds"] / r["train_seconds"] for r in runs],
                     "<= 0.1", lambda r: r <= 0.1),
        Figure("published NMSE / L0", run["nmse"], f"/ {run['l0']:.1f}"),
    ])


def sweep(setup: Setup, args: argparse.Namespace) -> None:
    d_sae = args.sweep_expansion * D_MODEL
    cfgs = [train_config(setup, args, d_sae, args.batch_size, args.sweep_steps, variant="topk", k=k, lr=lr,
                         eval_tokens=4 * args.batch_size)
            for k in (16, 32, 64, 128) for lr in (2e-4, 4e-4)]

    files = set_files(setup)

    def one_pass() -> None:
        if args.cold:
            evict(files)
        train_sweep(cfgs)
        setup.store.delete_prefix("saes/")

    def one_by_one() -> None:
        for cfg in cfgs:
            if args.cold:
                evict(files)
            train(cfg)
        setup.store.delete_prefix("saes/")

    t = interleaved({"sweep": wall(one_pass), "singles": wall(one_by_one)}, args.repeats, warmup=False)
    n = len(cfgs) * args.sweep_steps * args.batch_size
    # On a GPU the SAEs' compute is small and reading the data dominates, which one pass does once.
    target = dict(target="<= 0.3", met=lambda r: r <= 0.3) if on_cuda(args) else {}
    report(f"(e) sweep [{where(args)}]: {len(cfgs)} TopK SAEs (d_sae {d_sae}, k 16..128, 2 lrs), "
           f"{args.sweep_steps} steps each, batch {args.batch_size}, "
           f"{'set read from disk by every run (page cache evicted)' if args.cold else 'set in the page cache'}", [
        Figure("one pass (train_sweep)", median(t["sweep"]), "s"),
        Figure("8 single runs (train)", median(t["singles"]), "s"),
        Figure("one pass: SAE-tokens trained per second", n / median(t["sweep"]), "tok/s"),
        Figure.ratio("wall-time ratio one pass / single runs", paired_ratios(t["sweep"], t["singles"]), **target),
    ])


def data_parallel(setup: Setup, args: argparse.Namespace) -> None:
    title = (f"(h) data-parallel [{where(args)}]: `vitscope train --variant topk --k 32 --d-sae "
             f"{args.ddp_expansion * D_MODEL}`, batch {args.batch_size}, {args.ddp_steps} steps, torchrun with "
             "2 processes against 1")
    if on_cuda(args) and torch.cuda.device_count() < 2:
        report(title, [])
        print(f"  skipped: needs 2 GPUs, torch sees {torch.cuda.device_count()}")
        return
    argv = ["train", "--activations", setup.manifest.set_id, "--store", str(setup.store.root), "--variant", "topk",
            "--k", "32", "--d-sae", str(args.ddp_expansion * D_MODEL), "--batch-size", str(args.batch_size),
            "--n-tokens", str(args.ddp_steps * args.batch_size), "--lr", str(LR), "--init-sample", str(1 << 14),
            "--eval-tokens", str(args.batch_size), "--device", "cuda" if on_cuda(args) else "cpu",
            f"--{'' if args.autocast else 'no-'}autocast", "--no-progress"]
    bin_dir = Path(sys.executable).parent
    half = max(1, (os.cpu_count() or 2) // 2)
    # name -> (processes, threads each); on a GPU the threads hardly matter
    runs = {"2 processes": (2, half), "1 process": (1, 2 * half)}
    if not on_cuda(args):
        runs[f"1 process, {half} thread(s)"] = (1, half)
    published: dict[str, tuple[dict[str, torch.Tensor], dict[str, float]]] = {}

    def measure(name: str) -> float:
        nproc, threads = runs[name]
        launcher = [] if nproc == 1 else [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
                                          "--no-python"]
        out = subprocess.run([*launcher, str(bin_dir / "vitscope"), *argv], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if out.returncode:
            raise RuntimeError(f"(h) {name} failed:\n{out.stderr[-3000:]}")
        sae, record = load_sae_from(setup.store, out.stdout.split()[-1])
        published[name] = ({k: v.clone() for k, v in sae.state_dict().items()}, record.metrics)
        setup.store.delete_prefix("saes/")
        return record.metrics["train_seconds"]

    t = interleaved({name: lambda name=name: measure(name) for name in runs}, args.repeats, warmup=False)
    ddp, one = published["2 processes"], published["1 process"]
    figures = [Figure(f"{name} ({n} x {threads} thread(s)): seconds per step", median(t[name]) / args.ddp_steps, "s")
               for name, (n, threads) in runs.items()]
    figures += [Figure.ratio(f"time ratio 2 processes / {name}", paired_ratios(t["2 processes"], t[name]))
                for name in runs if name != "2 processes"]
    figures += [Figure(f"max |{w} difference| 2 processes vs 1", float((ddp[0][w] - one[0][w]).abs().max()))
                for w in ("W_dec", "W_enc")]
    if not on_cuda(args):  # the rounding that thread count alone changes, for scale
        other = published[f"1 process, {half} thread(s)"]
        figures.append(Figure(f"max |W_dec difference| 1 process, {2 * half} vs {half} thread(s)",
                              float((other[0]["W_dec"] - one[0]["W_dec"]).abs().max())))
    figures.append(Figure("published NMSE, 2 processes / 1", ddp[1]["nmse"], f"/ {one[1]['nmse']:.6f}"))
    report(title, figures)


def quality(tmp: Path, args: argparse.Namespace) -> None:
    gt = GroundTruth(n_images=1024, grid=(4, 4))
    store = LocalStore(tmp / "ground-truth")
    m = write_ground_truth_set(store, gt)
    common = dict(activations=m.set_id, store=str(store.root), tokens=("all",), expansion=4, lr=5e-3, batch_size=512,
                  n_tokens=args.quality_tokens, dead_window=20_000, eval_tokens=8192, device=args.device,
                  autocast=args.autocast, cuda_graphs=args.cuda_graphs, progress=False)
    cfgs = [TrainConfig(sae=TopKHyper(k=4), **common), TrainConfig(sae=BatchTopKHyper(k=4), **common),
            TrainConfig(sae=MatryoshkaHyper(k=4), **common), TrainConfig(sae=ReluHyper(l1_coeff=1.0), **common),
            TrainConfig(sae=JumpReluHyper(l0_coeff=0.5), **common)]
    figures = []
    for cfg, res in zip(cfgs, train_sweep(cfgs), strict=True):
        sae, _ = load_sae_from(store, res.sae_id)
        found = recovery(sae.W_dec, gt.directions())
        figures.append(Figure(f"{cfg.variant}: directions recovered (nmse {res.metrics['nmse']:.3f}, "
                              f"L0 {res.metrics['l0']:.1f})", 100 * found, "%",
                              target=">= 95" if cfg.variant == "topk" else "",
                              met=found >= 0.95 if cfg.variant == "topk" else None))
    report(f"(f) quality [{where(args)}]: {gt.n_directions} directions in d={gt.d_model}, {gt.active} active per token, "
           f"noise {gt.noise}; {args.quality_tokens:,} tokens, d_sae {4 * gt.d_model}, lr 5e-3, cosine > 0.9", figures)


def main() -> None:
    args = parse_args()
    print_environment(args)
    print(f"training on {where(args)}" + (f" (CUDA {torch.version.cuda})" if on_cuda(args) else ""))
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-train-") as name:
        store = LocalStore(Path(name) / "store")
        t0 = time.perf_counter()
        manifest = write_activation_set(store, args.images, D_MODEL, images_per_shard=args.images_per_shard)
        print(f"wrote a synthetic activation set of {args.images} images in {time.perf_counter() - t0:.1f}s")
        setup = Setup(store, manifest, manifest.layout.token_indices(["patches"]))
        sections = dict(zip("abcdefgh", (loader, training, standard, decoding, sweep,
                                         lambda _, args: quality(Path(name), args), end_to_end, data_parallel),
                            strict=True))
        for section, run in sections.items():
            if section in args.sections:
                t0 = time.perf_counter()
                run(setup, args)
                print(f"  (section ({section}) took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
