"""Analysis benchmark: what the statistics, top-k bookkeeping and I/O add to encoding, how a
split pass runs on a Dask cluster, and how much memory a pass holds.

On synthetic activation sets in the real shard format (float16, d=768, 1 CLS + 14x14 patches
per image) and ReLU SAEs published with ``vitscope.sae.save_sae`` (encoder bias set so that
about 2% of latents fire, as in a trained SAE; a random one fires half the time):

(a) ``vitscope.analyzer.analyze`` end to end (SAE load, memory-mapped shard reads, float16 ->
    float32, encoding, statistics, histograms, top-k of three views, band samples, co-firing,
    results written) against a bare loop that only encodes the same tokens, batch by batch,
    from a float32 tensor already in memory, with the same SAE and batch size. The ratio
    (bare-encode time over analysis time) is the share of the pass spent encoding; the
    analyzer issue's target is >= 0.9. The same loop over the pass's own cache-sized chunks is
    reported as the stricter baseline.
(b) The same pass split into 4 parts (one per shard) through the pipeline's ``analyze_flow``
    on a 2-worker Dask ``LocalCluster`` (one thread each, started once, as a running cluster
    would be) against one process, and whether each run publishes byte-identical statistics.
(c) Peak resident memory of a whole pass in a fresh process, for d_sae 16,384 and 65,536 at N
    and 4N images: what a pass holds is per batch and per latent, so it must not grow with the
    number of images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    SYNTHETIC_LAYER,
    Figure,
    base_parser,
    interleaved,
    median,
    paired_ratios,
    peak_rss_mib,
    print_environment,
    report,
    wall,
    write_activation_set,
)

from vitscope.analyzer import AnalyzeConfig, analyze
from vitscope.analyzer.analysis import CHUNK_BYTES
from vitscope.analyzer.results import COFIRE_TOKENS, analysis_prefix
from vitscope.sae import Sae, SaeConfig, SaeRecord, build_sae, fit_normalizer, save_sae
from vitscope.shards import ActivationSet, Manifest, from_storage
from vitscope.store import LocalStore

D_MODEL = 768
SAE_ID = "bench-sae"
DASK_PARTS, DASK_WORKERS = 4, 2
_ANALYZE_CHILD = "import json, sys; from vitscope.analyzer import AnalyzeConfig, analyze; " \
                 "analyze(AnalyzeConfig(**json.loads(sys.argv[1])))"


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=3)
    p.add_argument("--images", type=int, default=512, help="(a), (b): images in the set")
    p.add_argument("--images-per-shard", type=int, default=128, help=f"(a), (b): {DASK_PARTS} shards by default")
    p.add_argument("--batch-images", type=int, default=128, help="images encoded at once (AnalyzeConfig.batch_images)")
    p.add_argument("--d-sae", type=int, default=2048, help="(a), (b)")
    p.add_argument("--top-images", type=int, default=32, help="top images kept per latent")
    p.add_argument("--sections", default="abc", help="which of (a) to (c) to run, e.g. --sections a")
    p.add_argument("--rss-d-sae", type=int, nargs="+", default=[16384, 65536], help="(c): SAE widths")
    p.add_argument("--rss-codes-mib", type=int, default=400,
                   help="(c): a batch's codes [images, tokens, d_sae] float32 of about this size, one shard per batch")
    args = p.parse_args()
    if args.quick:
        args.images, args.images_per_shard, args.batch_images, args.d_sae, args.repeats = 32, 8, 8, 512, 1
        args.rss_d_sae, args.rss_codes_mib = [2048], 25
    args.warmup = not args.quick
    return args


def bench_sae(manifest: Manifest, x: torch.Tensor, d_sae: int) -> Sae:
    """A random ReLU SAE with the set's normalisation, sparse like a trained one."""
    torch.manual_seed(0)
    sae = build_sae(SaeConfig.of("relu", D_MODEL, d_sae))
    sample = x[:, manifest.layout.patch_start:].reshape(-1, D_MODEL)[: 1 << 15]
    mean, scale = fit_normalizer(sample)
    with torch.no_grad():
        sae.norm_mean.copy_(mean)
        sae.norm_scale.fill_(scale)
        pre = sae.pre_acts(sae.normalize(sample[: min(4096, (1 << 25) // d_sae)]))  # 128 MiB at most
        sae.b_enc.copy_(-pre.quantile(0.98, dim=0))  # each latent fires on ~2% of tokens
    return sae.requires_grad_(False).eval()


def save_bench_sae(store: LocalStore, manifest: Manifest, sae: Sae) -> Sae:
    save_sae(store, sae, SaeRecord(sae_id=SAE_ID, config=sae.cfg, activation_set_id=manifest.set_id,
                                   layer=SYNTHETIC_LAYER, tokens=["patches"]))
    return sae


def publish_sae(store: LocalStore, manifest: Manifest, x: torch.Tensor, d_sae: int) -> Sae:
    """A :func:`bench_sae` for the set, saved as a checkpoint."""
    return save_bench_sae(store, manifest, bench_sae(manifest, x, d_sae))


def make_store(root: Path, images: int, images_per_shard: int, d_sae: int,
               sae: Sae | None = None) -> tuple[LocalStore, torch.Tensor, Sae]:
    """A store with a synthetic set (the first images of any larger one with the same shards)
    and an SAE on it (``sae``, or a :func:`bench_sae`), saved as a checkpoint; the set's
    activations as float32 too."""
    store = LocalStore(root)
    manifest = write_activation_set(store, images, D_MODEL, images_per_shard=images_per_shard)
    aset = ActivationSet(store, manifest)
    x = torch.cat([from_storage(a, manifest.dtype) for _, a in aset.iter_shards(SYNTHETIC_LAYER)])
    return store, x, save_bench_sae(store, manifest, sae or bench_sae(manifest, x, d_sae))


def stats_bytes(store: LocalStore, aid: str) -> bytes:
    return (store.root / analysis_prefix(aid) / "stats.safetensors").read_bytes()


def encode_overhead(args: argparse.Namespace, root: Path) -> None:
    """(a) analyze() against a bare encode loop over the same rows; and the same over the
    first half of the images, so that the second half's figures leave out every fixed cost."""
    store, x, sae = make_store(root / "all", args.images, args.images_per_shard, args.d_sae)
    half_store, _, _ = make_store(root / "half", args.images // 2, args.images_per_shard, args.d_sae, sae)
    n, half = len(x), args.images // 2

    def run_analyze(s: LocalStore) -> Callable[[], None]:
        cfg = AnalyzeConfig(sae=SAE_ID, store=str(s.root), top_images=args.top_images,
                            batch_images=args.batch_images, device="cpu", progress=False)

        def run() -> None:
            analyze(cfg)
            s.delete_prefix("analyses/")  # or the next run would find it published

        return run

    def run_encode(rows: torch.Tensor, step: int = args.batch_images) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            for lo in range(0, len(rows), step):
                sae.encode(rows[lo:lo + step])

        return run

    # The pass encodes a batch in cache-sized chunks; the same chunks without the bookkeeping
    # are the stricter baseline (a batch's codes at once pay for memory the chunks reuse).
    chunk = max(1, min(args.batch_images, CHUNK_BYTES // (x.shape[1] * args.d_sae * 4)))

    firing = (sae.encode(x[:8]) > 0).float().mean().item()
    t = interleaved({"analyze": wall(run_analyze(store)), "encode": wall(run_encode(x)),
                     "chunks": wall(run_encode(x, chunk)),
                     "analyze_half": wall(run_analyze(half_store)), "encode_half": wall(run_encode(x[:half]))},
                    args.repeats, args.warmup)
    second = {k: [a - b for a, b in zip(t[k], t[f"{k}_half"], strict=True)] for k in ("analyze", "encode")}
    report(f"(a) analysis: {n} images x {x.shape[1]} tokens, d_sae {args.d_sae}, batch {args.batch_images} images, "
           f"top {args.top_images} images, {firing:.1%} of latents firing", [
        Figure("analyze() end to end", n / median(t["analyze"]), "img/s"),
        Figure("bare encode loop on an in-memory float32 tensor", n / median(t["encode"]), "img/s"),
        Figure.ratio("ratio bare encode / analyze (wall time)", paired_ratios(t["encode"], t["analyze"]),
                     ">= 0.9", lambda r: r >= 0.9),
        Figure.ratio("ratio bare encode / analyze (CPU time)", paired_ratios(t.cpu["encode"], t.cpu["analyze"])),
        Figure(f"bare encode loop in the pass's chunks of {chunk} images", n / median(t["chunks"]), "img/s"),
        Figure.ratio("ratio bare chunked encode / analyze (wall time)", paired_ratios(t["chunks"], t["analyze"])),
        Figure.ratio(f"the same for the second {n - half} images alone (no fixed costs)",
                     paired_ratios(second["encode"], second["analyze"])),
    ])


def parts_on_dask(args: argparse.Namespace, root: Path) -> None:
    """(b) analyze_flow in DASK_PARTS parts on a DASK_WORKERS-worker LocalCluster against one process."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from vitscope.composition.flows import analyze_flow, task_runner

    store, x, _ = make_store(root, args.images, args.images_per_shard, args.d_sae)
    shards = -(-len(x) // args.images_per_shard)
    cfg = AnalyzeConfig(sae=SAE_ID, store=str(store.root), top_images=args.top_images, batch_images=args.batch_images,
                        device="cpu", progress=False)
    want = stats_bytes(store, analyze(cfg).analysis_id)
    store.delete_prefix("analyses/")
    identical: list[bool] = []

    def run(fn) -> None:
        identical.append(stats_bytes(store, fn().analysis_id) == want)
        store.delete_prefix("analyses/")

    # One torch thread per worker process: the two workers then share the machine's cores as
    # one process's two threads do. The smoke run keeps the workers in this process, sparing
    # their start (~15 s of importing torch).
    workers = {"processes": False} if args.quick else {"processes": True, "env": {"OMP_NUM_THREADS": "1"}}
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180), \
            LocalCluster(n_workers=DASK_WORKERS, threads_per_worker=1, silence_logs=logging.ERROR, **workers) as cluster:
        started = time.perf_counter() - t0
        runner = task_runner(DASK_PARTS, dask_address=cluster.scheduler_address)
        flow = analyze_flow.with_options(task_runner=runner)
        t = interleaved({"one": wall(lambda: run(lambda: analyze(cfg))),
                         "dask": wall(lambda: run(lambda: flow(cfg, parts=DASK_PARTS)))}, args.repeats, args.warmup)
    n = len(x)
    kind = "" if workers["processes"] else ", in this process"
    report(f"(b) {DASK_PARTS} parts through analyze_flow on a {DASK_WORKERS}-worker Dask LocalCluster (1 thread each{kind}) "
           f"against one process ({torch.get_num_threads()} threads): {n} images in {shards} shards, d_sae {args.d_sae}", [
        Figure("Prefect test server and cluster start (once, not timed below)", started, "s"),
        Figure("one process: analyze()", n / median(t["one"]), "img/s"),
        Figure(f"analyze_flow, {DASK_PARTS} parts on Dask, merged and published", n / median(t["dask"]), "img/s"),
        Figure.ratio("wall-time ratio one process / Dask flow", paired_ratios(t["one"], t["dask"])),
        Figure("runs publishing the same bytes as the first one-process run", sum(identical),
               f"of {len(identical)}", target=f"{len(identical)}", met=all(identical)),
    ])


def peak_rss(args: argparse.Namespace, root: Path) -> None:
    """(c) Peak RSS of a pass, per SAE width, at N and 4N images, N being enough images to fill
    the co-firing sample (which grows until then) and at least two shards."""
    figures = []
    cofiring_images = -(-COFIRE_TOKENS // 196)
    for d_sae in args.rss_d_sae:
        per_batch = max(1, (args.rss_codes_mib << 20) // (4 * 197 * d_sae))
        n = per_batch * max(2, -(-cofiring_images // per_batch))
        peaks = {}
        for images in (n, 4 * n):
            store, _, _ = make_store(root / f"{d_sae}-{images}", images, per_batch, d_sae)
            cfg = {"sae": SAE_ID, "store": str(store.root), "top_images": args.top_images,
                   "batch_images": per_batch, "device": "cpu", "progress": False}
            peaks[images] = peak_rss_mib([sys.executable, "-c", _ANALYZE_CHILD, json.dumps(cfg)])
        (n, small), (n4, large) = peaks.items()
        codes = per_batch * 197 * d_sae * 4 / 2**20
        figures += [Figure(f"d_sae {d_sae:,}, batch {per_batch} ({codes:,.0f} MiB of codes): {n} images", small, "MiB"),
                    Figure(f"d_sae {d_sae:,}: {n4} images", large, "MiB"),
                    Figure(f"d_sae {d_sae:,}: peak at {n4} / at {n} images", large / small, "x",
                           target="<= 1.10", met=large / small <= 1.10)]
    report("(c) peak RSS of analyze() in a fresh process (SAE weights, a batch's per-image results, a chunk's codes, the state)",
           figures)


def main() -> None:
    args = parse_args()
    print_environment(args)
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-analyze-") as name:
        for section, run in zip("abc", (encode_overhead, parts_on_dask, peak_rss), strict=True):
            if section in args.sections:
                t0 = time.perf_counter()
                run(args, Path(name) / section)
                print(f"  (section ({section}) took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
