"""Serving benchmark: GetLatent and EncodeImage from 32 concurrent clients over a real gRPC port,
against the same work done in-process, one call after another.

GetLatent (16 top images with heatmaps) runs on the synthetic activation set of
``bench_analyze`` (float16, d=768, 14x14 patches) with its sparse random SAE, analysed once. A
call reads the analysis (cached), 16 images' rows (ranged reads) and encodes them for the
heatmaps. Baseline: the in-process handler (``AnalyzerService.GetLatent``).

EncodeImage runs on an activation set extracted with a ViT-B/16-sized open_clip model with
random weights (width 768, 12 blocks, 224 px, loaded through ``local-dir:``) from planted images
(scikit-image photos), and a sparse random SAE of block 10's patches, in two variants:

- uploads: a distinct PNG per call (the server caches codes per image, so a repeated image would
  be answered from memory), decoded, resized and cropped, run through the ViT up to the SAE's
  block and encoded. Baseline: the bare work in-process, as the server's ``_live_codes`` does
  it: PIL decode, ``ViT.activations`` and ``Sae.encode`` of the same PNG.
- dataset images by name (``activationSets/{set}/images/{n}`` of the SAE's own set): the image's
  stored rows are encoded, no ViT. Baseline: ``ActivationSet.image_tokens`` and ``Sae.encode``.

Figures per RPC: p50/p99 latency at the clients, served throughput, the in-process handler's
and the bare baseline's throughput one call after another, and the ratios of throughput (how
much the server, gRPC and the concurrency add or, with several cores, win back). The three runs
alternate order each round; ratios are per round.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from _common import (
    SYNTHETIC_LAYER,
    Figure,
    base_parser,
    median,
    paired_ratios,
    print_environment,
    report,
    write_activation_set,
)
from bench_analyze import SAE_ID, publish_sae
from PIL import Image

from vitscope.analyzer import AnalyzeConfig, ServeConfig, analyze, serve
from vitscope.analyzer.server import LIVE_ENCODES, AnalyzerService
from vitscope.extractor import ExtractConfig, extract
from vitscope.models import ModelSpec, load_vit, save_open_clip_dir
from vitscope.proto import names, pb, rpc
from vitscope.sae import Sae
from vitscope.shards import ActivationSet, from_storage
from vitscope.store import LocalStore
from vitscope.synthetic import make_planted_dataset

SAE = names.sae(SAE_ID)
VIT_B16 = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=3)
    p.add_argument("--images", type=int, default=512, help="images of GetLatent's synthetic set")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--calls", type=int, default=8, help="GetLatent calls per client per round")
    p.add_argument("--encode-images", type=int, default=64, help="images extracted with the ViT (the by-name variant)")
    p.add_argument("--encode-calls", type=int, default=2, help="EncodeImage calls per client per round, per variant")
    args = p.parse_args()
    if args.quick:
        args.images, args.d_sae, args.clients, args.calls, args.repeats = 64, 512, 8, 2, 1
        args.encode_images, args.encode_calls = 20, 1
    return args


class _Context:
    """What a handler asks of its call when it is called in-process: no deadline, still wanted."""

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def peer(self) -> str:
        return "in-process"

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


@dataclass
class Measured:
    """One RPC under load: calls/s per round three ways, and every served call's latency."""

    served: list[float] = field(default_factory=list)
    handler: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)


def _concurrent(call: Callable[[Any], object], inputs: Sequence[Any], clients: int, m: Measured) -> float:
    """``clients`` threads, each making its share of the calls one after another: calls/s."""
    def client(share: Sequence[Any]) -> None:
        for x in share:
            t = time.perf_counter()
            try:
                call(x)
            except grpc.RpcError as e:
                m.refused[e.code().name] += 1
                continue
            m.latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(inputs[c::clients],)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(inputs) / (time.perf_counter() - t0)


def _sequential(call: Callable[[Any], object], inputs: Sequence[Any]) -> float:
    t0 = time.perf_counter()
    for x in inputs:
        call(x)
    return len(inputs) / (time.perf_counter() - t0)


def measure(args: argparse.Namespace, calls_per_client: int, item: Callable[[int], Any],
            served: Callable[[Any], object], handler: Callable[[Any], object],
            bare: Callable[[Any], object] | None = None) -> Measured:
    """Each round, ``clients * calls_per_client`` inputs ``item(i)``, new ones every round: through
    ``served`` from ``clients`` threads at once, and one after another through ``handler`` and
    ``bare``, in alternating order. ``item(-1)`` warms every path up first."""
    runs = {"served": served, "handler": handler} | ({"bare": bare} if bare is not None else {})
    for run in runs.values():
        run(item(-1))
    m = Measured()
    n = args.clients * calls_per_client
    for r in range(args.repeats):
        inputs = [item(r * n + i) for i in range(n)]
        for name in list(runs) if r % 2 == 0 else reversed(list(runs)):
            run = runs[name]
            rate = _concurrent(run, inputs, args.clients, m) if name == "served" else _sequential(run, inputs)
            getattr(m, name).append(rate)
    return m


def figures(m: Measured, handler: str, bare: str | None = None) -> list[Figure]:
    lat = np.asarray(m.latencies or [np.nan]) * 1e3
    out = [Figure("latency p50 at the clients", float(np.percentile(lat, 50)), "ms"),
           Figure("latency p99 at the clients", float(np.percentile(lat, 99)), "ms"),
           Figure("served throughput", median(m.served), "calls/s"),
           Figure(handler, median(m.handler), "calls/s")]
    if bare is None:
        out.append(Figure.ratio("ratio served / in-process throughput", paired_ratios(m.served, m.handler)))
    else:
        out += [Figure(bare, median(m.bare), "calls/s"),
                Figure.ratio("ratio served / bare throughput", paired_ratios(m.served, m.bare)),
                Figure.ratio("ratio in-process handler / bare throughput", paired_ratios(m.handler, m.bare))]
    out += [Figure(f"calls refused: {code}", count) for code, count in sorted(m.refused.items())]
    return out


def published(store: LocalStore, aset: ActivationSet, d_sae: int) -> Sae:
    """The benchmark's sparse random SAE of the set's layer, published in ``store``."""
    assert aset.manifest.layers == [SYNTHETIC_LAYER], aset.manifest.layers
    x = torch.cat([from_storage(a, aset.manifest.dtype) for _, a in aset.iter_shards(SYNTHETIC_LAYER)])
    return publish_sae(store, aset.manifest, x, d_sae)


def _server(store: LocalStore, args: argparse.Namespace):
    return serve(ServeConfig(store=str(store.root), port=0, workers=8, max_queued_calls=4 * args.clients))


def bench_get_latent(tmp: Path, args: argparse.Namespace) -> None:
    store = LocalStore(tmp / "synthetic-store")
    aset = ActivationSet(store, write_activation_set(store, args.images, images_per_shard=64))
    published(store, aset, args.d_sae)
    analyze(AnalyzeConfig(sae=SAE_ID, store=str(store.root), top_images=16, device="cpu", progress=False))
    rng = np.random.default_rng(0)
    latents = rng.integers(0, args.d_sae, size=args.clients * args.calls * args.repeats + 1).tolist()

    def request(i: int) -> pb.GetLatentRequest:
        return pb.GetLatentRequest(name=names.latent(SAE_ID, latents[i]), top_images=16, heatmaps=True)

    service = AnalyzerService(store)
    running = _server(store, args)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rpc.AnalyzerStub(channel)
            m = measure(args, args.calls, request, lambda r: stub.GetLatent(r, timeout=120),
                        lambda r: service.GetLatent(r, _Context()))
    finally:
        running.stop(grace=None)
    report(f"GetLatent, 16 top images with heatmaps: d_sae {args.d_sae}, {args.images} images, "
           f"{args.clients} concurrent clients x {args.calls} calls x {args.repeats} rounds",
           figures(m, "in-process handler, one call after another"))


def _png(path: Path) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def bench_encode_image(tmp: Path, args: argparse.Namespace) -> None:
    import open_clip

    torch.manual_seed(0)
    model = save_open_clip_dir(open_clip.CLIP(**VIT_B16), VIT_B16, tmp / "vit-b16")
    calls = args.clients * args.encode_calls
    uploads_needed = calls * args.repeats + 1
    data = tmp / "images"
    make_planted_dataset(data, n_images=max(args.encode_images, uploads_needed), size=256, square=36)
    store = LocalStore(tmp / "vit-store")
    res = extract(ExtractConfig(data=str(data), store=str(store.root), model=model, pretrained=None, layers=(-2,),
                                dtype="float16", max_images=args.encode_images, workers=0, device="cpu",
                                progress=False))
    aset = ActivationSet.open(store, res.set_id)
    sae = published(store, aset, args.d_sae)
    vit = load_vit(ModelSpec(model), device="cpu")
    # Distinct uploads: every call's image is new to the server's per-image cache.
    uploads = [_png(p) for p in sorted(data.rglob("*.jpg"))[:uploads_needed]]
    sizes = [len(u) for u in uploads]
    service = AnalyzerService(store)
    layer = SYNTHETIC_LAYER

    def bare_upload(png: bytes) -> None:
        image = Image.open(io.BytesIO(png))
        image.load()
        with torch.inference_mode():
            sae.encode(vit.activations(image, layer, aset.layout)[layer][0].float().cpu())

    def bare_by_name(index: int) -> None:
        with torch.inference_mode():
            sae.encode(aset.image_tokens(layer, index))

    def upload(png: bytes) -> pb.EncodeImageRequest:
        return pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image_data=png))

    def by_name(index: int) -> pb.EncodeImageRequest:
        return pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image=names.image(aset.manifest.set_id, index)))

    running = _server(store, args)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rpc.AnalyzerStub(channel)
            up = measure(args, args.encode_calls, lambda i: uploads[i],
                         lambda png: stub.EncodeImage(upload(png), timeout=120),
                         lambda png: service.EncodeImage(upload(png), _Context()), bare_upload)
            # By name, images repeat across rounds, but only after more than the cache's 16
            # other images, so none is answered from memory (the set has at least 17 images).
            named = measure(args, args.encode_calls, lambda i: i % len(aset),
                            lambda i: stub.EncodeImage(by_name(i), timeout=120),
                            lambda i: service.EncodeImage(by_name(i), _Context()), bare_by_name)
    finally:
        running.stop(grace=None)
    common = (f"ViT-B/16-sized (random weights), block {layer}, d_sae {args.d_sae}, {args.clients} concurrent "
              f"clients x {args.encode_calls} calls x {args.repeats} rounds")
    report(f"EncodeImage, uploaded PNGs ({min(sizes) // 1024}-{max(sizes) // 1024} KiB, 256x256, a new one each call; "
           f"{LIVE_ENCODES} encoded at once): {common}",
           figures(up, "in-process handler, one call after another", "bare decode + ViT forward + SAE encode"))
    report(f"EncodeImage, dataset images by name (stored rows, {len(aset)} images): {common}",
           figures(named, "in-process handler, one call after another", "bare stored rows + SAE encode"))


def main() -> None:
    args = parse_args()
    print_environment(args)
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-serve-") as name:
        bench_get_latent(Path(name), args)
        bench_encode_image(Path(name), args)


if __name__ == "__main__":
    main()
