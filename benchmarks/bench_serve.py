"""Serving benchmark: GetLatent (16 top images with heatmaps) from 32 concurrent clients over a
real gRPC port, against the same calls made in-process one after the other.

On the synthetic activation set of ``bench_analyze`` (float16, d=768, 14x14 patches) with its
sparse random SAE, analysed once. A call reads the analysis (cached), 16 images' rows (ranged
reads) and encodes them for the heatmaps. The figures: p50/p99 latency at 32 clients, their
throughput, and the ratio of that throughput to the in-process loop's (how much the server,
gRPC and the concurrency add or, with several cores, win back). EncodeImage needs a real ViT
behind the set and is not measured here.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from _common import (
    SYNTHETIC_LAYER,
    Figure,
    base_parser,
    median,
    print_environment,
    report,
    write_activation_set,
)
from bench_analyze import D_MODEL, SAE_ID, publish_sae

from vitscope.analyzer import AnalyzeConfig, ServeConfig, analyze, serve
from vitscope.analyzer.server import AnalyzerService
from vitscope.proto import pb, rpc
from vitscope.shards import ActivationSet, from_storage
from vitscope.store import LocalStore


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=3)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--calls", type=int, default=8, help="calls per client per round")
    args = p.parse_args()
    if args.quick:
        args.images, args.d_sae, args.clients, args.calls, args.repeats = 64, 512, 8, 2, 1
    return args


class _Context:
    """What a handler asks of its call when it is called in-process: no deadline, still wanted."""

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def main() -> None:
    args = parse_args()
    print_environment(args)
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-serve-") as name:
        store = LocalStore(Path(name) / "store")
        manifest = write_activation_set(store, args.images, D_MODEL, images_per_shard=64)
        aset = ActivationSet(store, manifest)
        x = torch.cat([from_storage(a, manifest.dtype) for _, a in aset.iter_shards(SYNTHETIC_LAYER)])
        publish_sae(store, manifest, x, args.d_sae)
        analyze(AnalyzeConfig(sae=SAE_ID, store=str(store.root), top_images=16, device="cpu", progress=False))
        rng = np.random.default_rng(0)
        latents = rng.integers(0, args.d_sae, size=args.clients * args.calls * (args.repeats + 1)).tolist()

        def request(i: int) -> pb.GetLatentRequest:
            return pb.GetLatentRequest(sae_id=SAE_ID, latent=latents[i], top_images=16, heatmaps=True)

        service = AnalyzerService(store)
        service.GetLatent(request(0), _Context())  # load the SAE and the analysis, as the server's first call does
        running = serve(ServeConfig(store=str(store.root), port=0, workers=8, max_queued_calls=4 * args.clients))
        try:
            with grpc.insecure_channel(running.address) as channel:
                stub = rpc.AnalyzerStub(channel)
                stub.GetLatent(request(0), timeout=60)
                served_rates, local_rates, latencies = [], [], []
                for r in range(args.repeats):
                    base = r * args.clients * args.calls
                    n = args.clients * args.calls
                    t0 = time.perf_counter()
                    for i in range(n):
                        service.GetLatent(request(base + i), _Context())
                    local_rates.append(n / (time.perf_counter() - t0))

                    def client(c: int, out: list[float], base: int = base) -> None:
                        for i in range(args.calls):
                            t = time.perf_counter()
                            stub.GetLatent(request(base + c * args.calls + i), timeout=120)
                            out.append(time.perf_counter() - t)

                    outs = [[] for _ in range(args.clients)]
                    threads = [threading.Thread(target=client, args=(c, outs[c])) for c in range(args.clients)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    served_rates.append(n / (time.perf_counter() - t0))
                    latencies += [x for out in outs for x in out]
        finally:
            running.stop(grace=None)
        lat = np.asarray(latencies) * 1e3
        ratios = [s / loc for s, loc in zip(served_rates, local_rates, strict=True)]
        report(f"GetLatent, 16 top images with heatmaps: d_sae {args.d_sae}, {args.images} images, "
               f"{args.clients} concurrent clients x {args.calls} calls x {args.repeats} rounds", [
            Figure("latency p50 at the clients", float(np.percentile(lat, 50)), "ms"),
            Figure("latency p99 at the clients", float(np.percentile(lat, 99)), "ms"),
            Figure("served throughput", median(served_rates), "calls/s"),
            Figure("in-process handler, one call after another", median(local_rates), "calls/s"),
            Figure.ratio("ratio served / in-process throughput", ratios),
        ])


if __name__ == "__main__":
    main()
