"""Helpers shared by the benchmarks: interleaved timing, peak-RSS measurement, a synthetic
activation set in the real shard format, and uniform reporting.

Every benchmark compares a vitscope stage with a baseline measured in the same run. Machines
are noisy (other jobs, thermal limits, page cache), so the measured and baseline runs alternate
(A B, B A, A B, ...) and each figure is the median over the repeats; ratios are taken per round
(paired) and their median is reported. Besides wall time, the CPU time each run consumed is
recorded: on a shared machine it is far less disturbed by other jobs than wall time, so a
CPU-time ratio tells extra work from bad luck.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from vitscope.hashing import content_id
from vitscope.shards import Manifest, ShardWriter, TokenLayout, to_storage
from vitscope.store import Store

QUICK_ENV = "VITSCOPE_BENCH_QUICK"
"""Set to 1 for the same smoke run as ``--quick``."""

Measure = Callable[[], float]
"""One run of something measured: does the work and returns its duration in seconds."""


def wall(fn: Callable[[], object]) -> Measure:
    """A :data:`Measure` timing the whole call of ``fn`` with a monotonic clock."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Timings(dict[str, list[float]]):
    """Per measure, one value per round: the seconds the measure reported (the mapping itself)
    and, in :attr:`cpu`, the CPU seconds the whole call consumed (all threads, plus child
    processes that ended during it)."""

    def __init__(self, names: list[str]):
        super().__init__({name: [] for name in names})
        self.cpu: dict[str, list[float]] = {name: [] for name in names}


def interleaved(measures: Mapping[str, Measure], repeats: int, warmup: bool = True) -> Timings:
    """Run every measure ``repeats`` times, alternating the order each round so that slow drift
    of the machine hits all of them alike. With ``warmup`` each runs once first, untimed
    (imports, allocator, page cache)."""
    names = list(measures)
    if warmup:
        for name in names:
            measures[name]()
    t = Timings(names)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            c0 = cpu_seconds()
            t[name].append(measures[name]())
            t.cpu[name].append(cpu_seconds() - c0)
    return t


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """numerator[i] / denominator[i] per round: runs of one round are neighbours in time, so
    their ratio is less noisy than a ratio of medians."""
    return [n / d for n, d in zip(numerator, denominator, strict=True)]


@dataclass(frozen=True)
class Figure:
    """One reported line: a name, a value with its unit, optionally the spread of the repeats
    it is the median of, and a target it is held to."""

    name: str
    value: float
    unit: str = ""
    spread: tuple[float, float] | None = None
    target: str = ""
    met: bool | None = None

    @classmethod
    def ratio(cls, name: str, ratios: list[float], target: str = "", met: Callable[[float], bool] | None = None) -> Figure:
        """The median of per-round ratios, with their range and, if given, the verdict."""
        value = median(ratios)
        return cls(name, value, "x", (min(ratios), max(ratios)), target, None if met is None else met(value))

    def line(self) -> str:
        value = _fmt(self.value)
        unit = f" {self.unit}" if self.unit else ""
        spread = f"  [{_fmt(self.spread[0])} .. {_fmt(self.spread[1])}]" if self.spread and self.spread[0] != self.spread[1] else ""
        verdict = "" if self.met is None else ("  ok" if self.met else "  MISSED")
        target = f"  target {self.target}{verdict}" if self.target else ""
        return f"  {self.name:<56} {value:>10}{unit}{spread}{target}"


def _fmt(x: float) -> str:
    if 0 < abs(x) < 0.001:
        return f"{x:.2e}"
    return f"{x:,.3f}" if abs(x) < 100 else f"{x:,.0f}"


def report(title: str, figures: list[Figure]) -> None:
    print(f"\n{title}")
    for f in figures:
        print(f.line())
    sys.stdout.flush()


def base_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has (--repeats, --quick)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed rounds per measurement (measured and baseline alternate; medians are reported)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get(QUICK_ENV) == "1",
                        help=f"a smoke run of under a minute with small sizes (also: {QUICK_ENV}=1)")
    return parser


def print_environment(args: argparse.Namespace) -> None:
    """Where and how the figures were measured."""
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()}  {os.cpu_count()} CPUs  "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)  python {platform.python_version()}")
    print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    sys.stdout.flush()


# --- peak memory of a fresh process -------------------------------------------------------------

_RSS_WRAPPER = """
import json, resource, subprocess, sys
argv = json.loads(sys.argv[1])
subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(argv: list[str]) -> float:
    """Peak resident memory (MiB) of the process ``argv`` (the largest of it and the children
    it waits for, e.g. data-loader workers).

    ``RUSAGE_CHILDREN`` keeps the maximum over every child a process ever waited for, so each
    measurement goes through a fresh wrapper process whose only child is ``argv``."""
    out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, json.dumps(argv)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # Linux reports KiB


# --- a synthetic activation set in the real format ------------------------------------------------

SYNTHETIC_LAYER = 10


def write_activation_set(store: Store, n_images: int, d_model: int = 768, grid: tuple[int, int] = (14, 14),
                         dtype: str = "float16", images_per_shard: int = 128, seed: int = 0) -> Manifest:
    """Publish an activation set with :class:`vitscope.shards.ShardWriter`, as the extractor
    would, without running a ViT: one layer (:data:`SYNTHETIC_LAYER`), a CLS token and a patch
    grid per image.

    Each token is a common offset plus a sparse sum of 4 of 512 random unit directions plus
    noise, so that an SAE has structure to find. Generated one shard at a time (memory stays
    bounded by a shard)."""
    layout = TokenLayout(n_cls=1, n_registers=0, grid=grid)
    params = {"n_images": n_images, "d_model": d_model, "grid": list(grid), "dtype": dtype,
              "images_per_shard": images_per_shard, "seed": seed}
    manifest = Manifest(
        set_id=content_id({"synthetic-benchmark-set": params}),
        model={"spec": "synthetic", "name": "synthetic", "pretrained": None, "n_layers": SYNTHETIC_LAYER + 2},
        layers=[SYNTHETIC_LAYER], layers_requested=[SYNTHETIC_LAYER], d_model=d_model, dtype=dtype,
        layout=layout, transform={}, dataset={"kind": "synthetic", **params}, images_per_shard=images_per_shard,
    )
    writer = ShardWriter(store, manifest, images_per_shard)
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(512, d_model, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    offset = torch.randn(d_model, generator=gen)
    shards = []
    for index, first in enumerate(range(0, n_images, images_per_shard)):
        n = min(images_per_shard, n_images - first)
        tokens = n * layout.tokens_per_image
        which = torch.randint(0, len(atoms), (tokens, 4), generator=gen)
        coef = torch.rand(tokens, 4, generator=gen) * 4
        x = offset + torch.einsum("tk,tkd->td", coef, atoms[which]) + 0.1 * torch.randn(tokens, d_model, generator=gen)
        acts = to_storage(x.reshape(n, layout.tokens_per_image, d_model), dtype)
        records = [{"id": f"synthetic/{i:06d}.jpg", "label": None, "index": i} for i in range(first, first + n)]
        shards.append(writer.write_shard(index, {SYNTHETIC_LAYER: acts}, records, (first, first + n)))
    return writer.finish(shards)

