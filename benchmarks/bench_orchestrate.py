"""Orchestration benchmark: what running stages as Prefect flows and tasks costs, and what a sweep
split into groups on a Dask cluster gains.

(a) A sweep of 8 TopK SAEs (k 16..128, 2 learning rates, d_sae = d = 768) on a synthetic
    activation set in the real shard format (float16, 1 CLS + 14x14 patches per image, in the
    page cache): ``sweep_flow`` with ``groups=2`` on a 2-worker Dask ``LocalCluster`` (worker
    processes of one thread each, started once, as a running cluster would be) against one pass
    in this process (``train_sweep``, torch on every core), and ``sweep_flow`` in one group (the
    same pass as a flow and a task). Each run trains every SAE anew and publishes it; the figures
    say whether the groups published the SAEs of one pass (ids and weights).
(b) Prefect's cost per task run: a trivial task (``x + 1``) called N times in a flow, and mapped
    over N inputs on the flow's thread pool, against calling the function N times, less an
    empty flow's run (the fixed cost of a flow). These runs have the flow-run heartbeat off
    (PREFECT_FLOWS_HEARTBEAT_FREQUENCY None): when a flow run ends, Prefect 3.9 joins its
    heartbeat thread, which sleeps in steps of 1 s, so with heartbeats on (the default, every
    180 s) every flow run, subflows included, lasts a whole number of seconds; an empty flow with
    heartbeats on shows it.
(c) The pipeline's orchestration: ``pipeline_flow`` (extract -> train -> analyze -> evaluate
    on a tiny random CLIP and generated planted-square images) against the same four stage calls
    (``extract``, ``train``, ``analyze``, ``evaluate`` with the configs the flow builds) made
    one after the other outside Prefect, each into a fresh store; the difference is what the
    flow adds: flow and task runs, subflows, state and result handling, and its artifacts
    (metrics tables, the frequency histogram drawn with matplotlib, markdown). The flow runs
    again with heartbeats off, to tell the whole seconds of (b) from the rest.

Every Prefect run reports to a temporary local server (``prefect_test_harness``: SQLite under
a temporary PREFECT_HOME, analytics off), with Prefect's log level at WARNING so that the
figures exclude printing each run's INFO lines (they still go to the server).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from _common import (
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

from vitscope.sae import load_sae_from
from vitscope.store import LocalStore

D_MODEL = 768
GROUPS, WORKERS = 2, 2


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=3)
    p.add_argument("--images", type=int, default=512, help="(a): images in the set (196 patch tokens each)")
    p.add_argument("--images-per-shard", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4096, help="(a): tokens per step")
    p.add_argument("--sweep-steps", type=int, default=24, help="(a): optimiser steps per SAE")
    p.add_argument("--tasks", type=int, default=200, help="(b): task runs per flow")
    p.add_argument("--pipeline-images", type=int, default=96, help="(c): planted-square images")
    p.add_argument("--pipeline-tokens", type=int, default=100_000, help="(c): training tokens of the SAE")
    p.add_argument("--sections", default="abc", help="which of (a) to (c) to run, e.g. --sections b")
    args = p.parse_args()
    if args.quick:
        args.images, args.images_per_shard, args.batch_size, args.sweep_steps, args.repeats = 128, 32, 1024, 4, 1
        args.tasks, args.pipeline_images, args.pipeline_tokens = 50, 32, 20_000
    return args


def sweep_on_dask(args: argparse.Namespace, root: Path) -> None:
    """(a) sweep_flow in GROUPS groups on a WORKERS-worker LocalCluster, against one pass."""
    from distributed import LocalCluster

    from vitscope.composition.flows import sweep_flow
    from vitscope.trainer import SweepConfig, sweep_configs, train_sweep

    store = LocalStore(root / "store")
    manifest = write_activation_set(store, args.images, D_MODEL, images_per_shard=args.images_per_shard)
    sweep = SweepConfig(activations=manifest.set_id, store=str(store.root), grid=("k=16,32,64,128", "lr=2e-4,4e-4"),
                        set=("variant=topk", "expansion=1", f"batch_size={args.batch_size}",
                             f"n_tokens={args.sweep_steps * args.batch_size}", "init_sample=16384",
                             f"eval_tokens={args.batch_size}", "device=\"cpu\"", "progress=false"))
    cfgs = sweep_configs(sweep)
    published: dict[str, list[dict[str, torch.Tensor]]] = {"one": [], "groups": []}

    def run(name: str, fn: Callable[[], list]) -> Callable[[], None]:
        def go() -> None:
            results = fn()
            assert not any(r.reused for r in results), "a run found SAEs of an earlier one"
            published[name].append({r.sae_id: load_sae_from(store, r.sae_id)[0].state_dict() for r in results})
            store.delete_prefix("saes/")
            store.delete_prefix("runs/")
        return go

    # Worker processes of one torch thread each (the nanny's OMP_NUM_THREADS=1): the two of them
    # share the machine's cores as this process's two threads do.
    t0 = time.perf_counter()
    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, silence_logs=logging.ERROR) as cluster:
        started = time.perf_counter() - t0
        t = interleaved({
            "one": wall(run("one", lambda: train_sweep(cfgs))),
            "flow": wall(run("one", lambda: sweep_flow(sweep))),
            "groups": wall(run("groups", lambda: sweep_flow(sweep, groups=GROUPS, dask_address=cluster.scheduler_address))),
        }, args.repeats)
    first = published["one"][0]

    def same(run_: dict[str, dict[str, torch.Tensor]]) -> bool:
        return run_.keys() == first.keys() and all(torch.equal(run_[i][k], first[i][k]) for i in first for k in first[i])

    n = len(cfgs) * args.sweep_steps * args.batch_size
    report(f"(a) a sweep of {len(cfgs)} TopK SAEs (d_sae {D_MODEL}, k 16..128, 2 lrs), {args.sweep_steps} steps of "
           f"{args.batch_size} each, {args.images} images: {GROUPS} groups through sweep_flow on a {WORKERS}-worker Dask "
           f"LocalCluster (1 thread each) against one pass in this process ({torch.get_num_threads()} threads)", [
        Figure("Dask LocalCluster start (once, not timed below)", started, "s"),
        Figure("one pass: train_sweep", median(t["one"]), "s"),
        Figure("one pass as sweep_flow (groups=1: a flow, a task)", median(t["flow"]), "s"),
        Figure(f"sweep_flow, {GROUPS} groups on Dask", median(t["groups"]), "s"),
        Figure("SAE-tokens trained per second, one pass", n / median(t["one"]), "tok/s"),
        Figure(f"SAE-tokens trained per second, {GROUPS} groups", n / median(t["groups"]), "tok/s"),
        Figure.ratio(f"wall-time ratio {GROUPS} groups on Dask / one pass", paired_ratios(t["groups"], t["one"])),
        Figure.ratio("wall-time ratio sweep_flow (1 group) / train_sweep", paired_ratios(t["flow"], t["one"])),
        Figure("CPU seconds, one pass / groups (this process only: the workers' are not counted)",
               median(t.cpu["one"]), f"/ {median(t.cpu['groups']):.2f} s"),
        Figure("grouped runs publishing the ids and weights of the first one pass",
               sum(map(same, published["groups"])), f"of {len(published['groups'])}",
               target=str(len(published["groups"])), met=all(map(same, published["groups"]))),
        Figure("one-pass runs (train_sweep, sweep_flow) publishing the same weights",
               sum(map(same, published["one"])), f"of {len(published['one'])}"),
    ])


def task_overhead(args: argparse.Namespace, root: Path) -> None:
    """(b) a trivial task N times in a flow (called, and mapped), against N plain calls."""
    from prefect import flow, task
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    def add_one(x: int) -> int:
        return x + 1

    trivial = task(add_one, name="add-one")

    @flow(name="bench-tasks")
    def called(n: int) -> None:
        for i in range(n):
            trivial(i)

    @flow(name="bench-mapped")
    def mapped(n: int) -> None:
        trivial.map(range(n)).result()

    @flow(name="bench-empty")
    def empty() -> None:
        return None

    def no_heartbeat(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                return fn()
        return run

    n = args.tasks
    t = interleaved({"direct": wall(lambda: [add_one(i) for i in range(n)]), "heartbeat": wall(empty),
                     "empty": wall(no_heartbeat(empty)), "called": wall(no_heartbeat(lambda: called(n))),
                     "mapped": wall(no_heartbeat(lambda: mapped(n)))}, args.repeats)
    per_task = [(c - e) / n for c, e in zip(t["called"], t["empty"], strict=True)]
    per_mapped = [(m - e) / n for m, e in zip(t["mapped"], t["empty"], strict=True)]
    report(f"(b) Prefect's cost per task run: a trivial task {n} times in a flow, against {n} plain calls "
           "(flow-run heartbeats off but in the first line)", [
        Figure("an empty flow's run, heartbeats on (Prefect's default)", median(t["heartbeat"]) * 1e3, "ms"),
        Figure(f"{n} plain calls", median(t["direct"]) * 1e3, "ms"),
        Figure("an empty flow's run", median(t["empty"]) * 1e3, "ms"),
        Figure(f"a flow calling the task {n} times", median(t["called"]), "s"),
        Figure(f"a flow mapping the task over {n} inputs (thread pool)", median(t["mapped"]), "s"),
        Figure("per task run, called (flow minus the empty flow, / N)", median(per_task) * 1e3, "ms"),
        Figure("per task run, mapped", median(per_mapped) * 1e3, "ms"),
        Figure("CPU seconds per task run, called", (median(t.cpu["called"]) - median(t.cpu["empty"])) / n * 1e3, "ms"),
    ])


def pipeline_overhead(args: argparse.Namespace, root: Path) -> None:
    """(c) pipeline_flow against its four stage calls made directly, each into a fresh store."""
    import open_clip
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from vitscope.analyzer import analyze
    from vitscope.composition.flows import pipeline_flow
    from vitscope.composition.pipeline import (
        AnalyzeStage,
        EvaluateStage,
        ExtractStage,
        PipelineConfig,
        TrainStage,
    )
    from vitscope.evaluator import evaluate
    from vitscope.extractor import extract
    from vitscope.models import save_open_clip_dir, tiny_open_clip_config
    from vitscope.synthetic import make_planted_dataset
    from vitscope.trainer import train, train_config

    torch.manual_seed(0)
    model_cfg = tiny_open_clip_config(image_size=112)
    model = save_open_clip_dir(open_clip.CLIP(**model_cfg), model_cfg, root / "model")
    data = root / "images"
    make_planted_dataset(data, n_images=args.pipeline_images, size=112, square=32, seed=1)
    store = root / "store"
    cfg = PipelineConfig(
        data=str(data), store=str(store),
        extract=ExtractStage(model=model, pretrained=None, layers=(-1,), workers=0, images_per_shard=16,
                             device="cpu", progress=False),
        train=train_config({"variant": "topk", "k": 16, "expansion": 8, "batch_size": 1024,
                            "n_tokens": args.pipeline_tokens, "device": "cpu", "progress": False},
                           TrainStage),
        analyze=AnalyzeStage(top_images=8, device="cpu", progress=False),
        evaluate=EvaluateStage(images=min(64, args.pipeline_images), device="cpu", progress=False))
    stage_seconds: dict[str, list[float]] = {"extract": [], "train": [], "analyze": [], "evaluate": []}

    def timed(stage: str, fn: Callable[[], object]):
        t0 = time.perf_counter()
        out = fn()
        stage_seconds[stage].append(time.perf_counter() - t0)
        return out

    def fresh() -> None:
        shutil.rmtree(store, ignore_errors=True)

    def stages() -> None:
        # The configs pipeline_flow builds with parts=1, no held-out data and evaluation on.
        fresh()
        s = str(store)
        ex = timed("extract", lambda: extract(replace(cfg.extract, data=str(data), store=s)))
        tr = timed("train", lambda: train(replace(cfg.train, activations=ex.set_id, store=s)))
        timed("analyze", lambda: analyze(replace(cfg.analyze, sae=tr.sae_id, store=s)))
        timed("evaluate", lambda: evaluate(replace(cfg.evaluate, sae=tr.sae_id, store=s)))

    def flow_run() -> None:
        fresh()
        result = pipeline_flow(cfg)
        assert not result.skipped, result.skipped

    def flow_run_without_heartbeats() -> None:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            flow_run()

    t = interleaved({"stages": wall(stages), "flow": wall(flow_run), "quiet": wall(flow_run_without_heartbeats)},
                    args.repeats)
    overhead = [f - s for f, s in zip(t["flow"], t["stages"], strict=True)]
    quiet = [f - s for f, s in zip(t["quiet"], t["stages"], strict=True)]
    report(f"(c) pipeline_flow against its stages called directly: a tiny random CLIP (2 blocks of width 64, 112 px), "
           f"{args.pipeline_images} planted-square images, a TopK SAE over {args.pipeline_tokens:,} tokens", [
        # The first of each stage's times is the untimed warm-up run's.
        *[Figure(f"{name} alone", median(xs[1:]), "s") for name, xs in stage_seconds.items()],
        Figure("the four stages, one after the other", median(t["stages"]), "s"),
        Figure("pipeline_flow", median(t["flow"]), "s"),
        Figure("the flow's orchestration: pipeline_flow minus the stages", median(overhead), "s",
               (min(overhead), max(overhead))),
        Figure.ratio("wall-time ratio pipeline_flow / stages", paired_ratios(t["flow"], t["stages"])),
        Figure("pipeline_flow, heartbeats off", median(t["quiet"]), "s"),
        Figure("the flow's orchestration, heartbeats off", median(quiet), "s", (min(quiet), max(quiet))),
    ])


def main() -> None:
    args = parse_args()
    print_environment(args)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-orchestrate-") as name:
        # Before Prefect is imported: its home (settings, the test server's database) and no telemetry.
        os.environ["PREFECT_HOME"] = str(Path(name) / "prefect")
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        from prefect.testing.utilities import prefect_test_harness

        t0 = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=180):
            print(f"temporary Prefect server started in {time.perf_counter() - t0:.1f}s")
            for section, run in zip("abc", (sweep_on_dask, task_overhead, pipeline_overhead), strict=True):
                if section in args.sections:
                    t0 = time.perf_counter()
                    run(args, Path(name) / section)
                    print(f"  (section ({section}) took {time.perf_counter() - t0:.0f} s)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
