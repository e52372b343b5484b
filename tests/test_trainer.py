"""The SAE, its recipe and the token stream, checked against hand-computed values."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from support import TINY_IMAGE, TINY_SQUARE

from vitscope.extractor import ExtractConfig, extract
from vitscope.sae import (
    SCHEMA_VERSION,
    ReluHyper,
    SaeConfig,
    SaeRecord,
    build_sae,
    fit_normalizer,
    geometric_median,
    load_sae_from,
    save_sae,
)
from vitscope.shards import ActivationSet
from vitscope.store import LocalStore, open_store
from vitscope.synthetic import make_planted_dataset
from vitscope.trainer.config import train_config
from vitscope.trainer.stream import TokenStream
from vitscope.trainer.training import SaePlan, SaeTrainer, TrainConfig, TrainingError, _schedule, train


@pytest.fixture(scope="module")
def small_set(planted_data, tiny_model_name, tmp_path_factory):
    """A 40-image activation set (7 shards, the last one short) with two layers."""
    data_root, _ = planted_data
    store = tmp_path_factory.mktemp("train-store")
    res = extract(ExtractConfig(data=str(data_root), store=str(store), model=tiny_model_name, pretrained=None,
                                layers=(0, 1), images_per_shard=6, max_images=40, workers=0, progress=False))
    return store, res.set_id


def test_relu_loss_matches_a_hand_computation():
    sae = build_sae(SaeConfig.of("relu", d_in=2, d_sae=3, l1_coeff=0.1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.25]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[1.5, 0.5], [0.5, 1.5]])
    # Row 1: x - b_dec = (1, 1); pre = (1, 1, -0.5) + b_enc = (1, 0, -0.25) -> z = (1, 0, 0)
    #        x_hat = 1*(1, 0) + b_dec = (1.5, -0.5); err^2 = 0 + 1 = 1
    #        L1 weighted by decoder norms (1, 2, 5): 1*1 = 1
    # Row 2: x - b_dec = (0, 2); pre = (0, 4, -2) + b_enc = (0, 3, -1.75) -> z = (0, 3, 0)
    #        x_hat = 3*(0, 2) + b_dec = (0.5, 5.5); err^2 = 0 + 16 = 16; L1 = 3*2 = 6
    parts = sae.loss(x)
    assert parts.recon.item() == pytest.approx((1 + 16) / 2)
    assert parts.terms["l1"].item() == pytest.approx((1 + 6) / 2)
    assert parts.loss.item() == pytest.approx((1 + 16) / 2 + 0.1 * (1 + 6) / 2)


def test_decoder_stays_unit_norm_and_parallel_gradient_is_removed():
    sae = build_sae(SaeConfig.of("relu", d_in=8, d_sae=16, l1_coeff=1.0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)  # encoder starts as decoder transpose
    x = torch.randn(32, 8)
    sae.loss(x).loss.backward()
    sae.remove_parallel_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(parallel, torch.zeros(16), atol=1e-5, rtol=0)


def test_normaliser_and_geometric_median():
    x = torch.randn(20_000, 16) * 3 + 7
    mean, scale = fit_normalizer(x)
    z = (x - mean) * scale
    assert z.norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-4)  # sqrt(16)
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(16), atol=1e-3, rtol=0)
    # One far outlier moves the mean but hardly the geometric median.
    pts = torch.cat([torch.zeros(999, 2), torch.tensor([[1000.0, 0.0]])])
    assert pts.mean(dim=0)[0].item() == pytest.approx(1.0)
    assert abs(geometric_median(pts)[0].item()) < 1e-2


def test_schedule_warms_up_and_decays():
    total = 100
    lrs = [_schedule(s, total, warmup=0.1, decay=0.2) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] == 1.0 and lrs[-1] == pytest.approx(0.05) and lrs[80] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[80:]))


@pytest.mark.parametrize("buffer_tokens", [64, 10_000])
def test_stream_covers_every_token_once_per_epoch_deterministically(small_set, buffer_tokens):
    store, set_id = small_set
    aset = ActivationSet.open(open_store(store), set_id)
    positions = aset.layout.token_indices(["patches"])
    stream = TokenStream(aset, 1, positions, batch_size=32, seed=3, buffer_tokens=buffer_tokens)
    ids = np.concatenate([b.ids for b in stream.epoch(0)])
    tpi = aset.layout.tokens_per_image
    expected = (np.arange(len(aset))[:, None] * tpi + positions[None]).ravel()
    assert len(ids) == len(expected) == stream.tokens_per_epoch
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected))  # each token exactly once
    assert not np.array_equal(ids, expected)  # and shuffled
    again = np.concatenate([b.ids for b in stream.epoch(0)])
    np.testing.assert_array_equal(ids, again)  # same seed and epoch: same order
    other = np.concatenate([b.ids for b in stream.epoch(1)])
    assert not np.array_equal(ids, other)
    # The tokens travel with their ids: check one batch against the stored rows.
    batch = next(iter(stream.epoch(0)))
    for tid, x in zip(batch.ids[:5], batch.x[:5], strict=True):
        image, pos = divmod(int(tid), tpi)
        torch.testing.assert_close(x, aset.image_tokens(1, image)[pos])


@pytest.mark.parametrize("kinds", [["patches"], ["cls"], ["all"], "sparse"])
def test_stream_vectored_reads_put_every_token_where_the_ranged_read_path_does(small_set, kinds, monkeypatch):
    """The local vectored-read path (one span per chunk, or per image for sparse selections,
    with unselected tokens sent to a scratch row) must give exactly what the generic ranged
    read (S3's path) gives, and both must hold the stored rows."""
    store, set_id = small_set
    aset = ActivationSet.open(open_store(store), set_id)
    tpi = aset.layout.tokens_per_image
    positions = np.array([0, 3, 4, tpi - 1]) if kinds == "sparse" else aset.layout.token_indices(kinds)

    def epoch() -> tuple[np.ndarray, dict[int, torch.Tensor]]:
        stream = TokenStream(aset, [0, 1], positions, batch_size=50, seed=7, buffer_tokens=300, chunk_tokens=40)
        batches = list(stream.epoch(0))
        return (np.concatenate([b.ids for b in batches]),
                {layer: torch.cat([b.xs[layer] for b in batches]) for layer in (0, 1)})

    ids, xs = epoch()
    monkeypatch.setattr("vitscope.trainer.stream._PREADV", None)
    ids_ranged, xs_ranged = epoch()
    np.testing.assert_array_equal(ids, ids_ranged)
    expected = (np.arange(len(aset))[:, None] * tpi + positions[None]).ravel()
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected))
    image, pos = np.divmod(ids, tpi)
    for layer in (0, 1):
        torch.testing.assert_close(xs[layer], xs_ranged[layer], rtol=0, atol=0)
        stored = torch.stack([aset.image_tokens(layer, i) for i in range(len(aset))])
        torch.testing.assert_close(xs[layer], stored[torch.from_numpy(image), torch.from_numpy(pos)], rtol=0, atol=0)


def test_stream_reads_ahead_from_creation_and_stops_when_dropped(small_set):
    store, set_id = small_set
    aset = ActivationSet.open(open_store(store), set_id)
    stream = TokenStream(aset, 1, aset.layout.token_indices(["patches"]), batch_size=16, prefetch_batches=3)

    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(("token-stream", "chunk-reader"))]

    endless = stream.batches(0)  # never ends by itself
    deadline = time.monotonic() + 10
    while endless._queue.qsize() < 3 and time.monotonic() < deadline:  # filled before any next()
        time.sleep(0.01)
    assert endless._queue.qsize() == 3
    assert len(next(endless)) == 16
    del endless  # an abandoned iterator halts its threads
    gc.collect()
    deadline = time.monotonic() + 10
    while readers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert readers() == []
    closed = stream.batches(0)
    closed.close()
    assert readers() == [] and list(closed) == []


def test_bdec_and_normalisation_come_from_a_large_sample_and_are_saved(small_set):
    store, set_id = small_set
    res = train(TrainConfig(activations=set_id, store=str(store), expansion=2, n_tokens=2048, batch_size=256,
                            init_sample=100_000, eval_tokens=512, progress=False))
    sae, record = load_sae_from(open_store(store), res.sae_id)
    aset = ActivationSet.open(open_store(store), set_id)
    every_patch = torch.cat([aset.image_tokens(1, i)[aset.layout.patch_start:] for i in range(len(aset))])
    mean, scale = fit_normalizer(every_patch)  # the sample covered all 1960 patch tokens
    torch.testing.assert_close(sae.norm_mean, mean, atol=1e-5, rtol=1e-5)
    assert float(sae.norm_scale) == pytest.approx(scale, rel=1e-5)
    assert record.extra["norm_scale"] == pytest.approx(scale, rel=1e-5)
    cfg = json.loads((store / "saes" / res.sae_id / "cfg.json").read_text())
    assert cfg["schema_version"] == SCHEMA_VERSION and cfg["config"]["variant"] == "relu"
    assert cfg["layer"] == 1 and cfg["activation_set_id"] == set_id
    assert {"mse", "nmse", "l0", "dead", "dense"} <= set(cfg["metrics"])


def test_l1_warmup_really_applies(small_set, monkeypatch):
    store, set_id = small_set
    seen: list[float] = []
    from vitscope.sae import ReluSae

    original = ReluSae.loss

    def spy(self, x, ctx):
        seen.append(self.hyper.l1_coeff * ctx.sparsity_scale)  # the weight the loss applies
        return original(self, x, ctx)

    monkeypatch.setattr(ReluSae, "loss", spy)
    train(TrainConfig(activations=set_id, store=str(store), expansion=2, n_tokens=256 * 20, batch_size=256,
                      sae=ReluHyper(l1_coeff=2.0, sparsity_warmup_frac=0.5), eval_tokens=256, progress=False))
    assert len(seen) == 20
    assert seen[0] == pytest.approx(0.2) and seen[9] == pytest.approx(2.0) and seen[-1] == 2.0
    assert all(a <= b for a, b in itertools.pairwise(seen))


def test_training_reduces_error_and_reruns_are_reused(small_set):
    store, set_id = small_set
    cfg = TrainConfig(activations=set_id, store=str(store), expansion=4, n_tokens=60_000, batch_size=256,
                      sae=ReluHyper(l1_coeff=1.0), lr=1e-3, progress=False)
    res = train(cfg)
    assert not res.reused
    assert res.metrics["nmse"] < 0.5 and res.metrics["l0"] > 0
    again = train(cfg)
    assert again.reused and again.sae_id == res.sae_id and again.metrics == res.metrics


def test_divergence_and_bad_input_fail_clearly(small_set):
    store, set_id = small_set
    published = LocalStore(store).list("saes/")
    with pytest.raises(TrainingError, match="loss became"):
        train(TrainConfig(activations=set_id, store=str(store), expansion=2, n_tokens=4096, batch_size=256,
                          lr=1e30, progress=False))
    assert LocalStore(store).list("saes/") == published  # a diverged SAE publishes nothing
    with pytest.raises(ValueError, match="register tokens were requested"):
        train(TrainConfig(activations=set_id, store=str(store), tokens=("registers",), progress=False))
    with pytest.raises(ValueError, match="layer 7 is not in this activation set"):
        train(TrainConfig(activations=set_id, store=str(store), layer=7, progress=False))
    with pytest.raises(KeyError, match="no published activation set"):
        train(TrainConfig(activations="0" * 20, store=str(store), progress=False))


@pytest.mark.parametrize(("variant", "sparse"), [("relu", "off"), ("jumprelu", "off"), ("topk", "off"),
                                               ("topk", "decode"), ("batchtopk", "off"), ("matryoshka", "off")])
def test_a_training_step_never_reads_a_device_value_on_the_host(variant, sparse):
    """On a GPU, a host read of a device value (.item(), bool(tensor), boolean indexing,
    bincount, ...) waits for every queued kernel; in a sweep it would stall the queue once per
    SAE and step. On the meta device (shapes without data) any such read raises, so the real
    step runs there, AuxK with its dead-latent mask included. (sparse="all" is left out: the
    meta device has no sparse matmul.)"""
    settings = {"k": 4, "aux_coeff": 0.1} if variant in ("topk", "batchtopk", "matryoshka") else {}
    if variant == "matryoshka":
        settings["prefixes"] = (8, 32)
    cfg = train_config({"activations": "x", "variant": variant, "sparse": sparse, "dead_window": 64, **settings})
    plan = SaePlan(cfg, "id", 0, SaeConfig(16, 32, cfg.sae), {})
    member = SaeTrainer(plan, 10, torch.device("meta"))
    for step in range(3):
        member.since_fired_bound = cfg.dead_window  # latents may be dead: the AuxK loss runs
        member.step(torch.empty(8, 16, device="meta"), step, contextlib.nullcontext())
    assert member.flags(weights=True).shape == (3,)


def test_checkpoint_loads_back_as_saved(tmp_path):
    store = LocalStore(tmp_path)
    sae = build_sae(SaeConfig.of("relu", 4, 8))
    with torch.no_grad():
        sae.norm_mean.copy_(torch.arange(4.0))
        sae.norm_scale.fill_(math.pi)
    save_sae(store, sae, SaeRecord(sae_id="abc", config=sae.cfg, activation_set_id="s", layer=3, tokens=["patches"]))
    back, record = load_sae_from(store, "abc")
    assert type(back) is type(sae) and record.layer == 3
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value)
    # A newer schema is refused with a clear message, not misread.
    cfg = json.loads((tmp_path / "saes/abc/cfg.json").read_text())
    cfg["schema_version"] = 99
    (tmp_path / "saes/abc/cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="upgrade vitscope"):
        load_sae_from(store, "abc")


def _heldout_set(store, model: str, folder, layers=(0, 1)) -> str:
    """Other planted images, extracted like ``small_set``."""
    make_planted_dataset(folder, n_images=12, size=TINY_IMAGE, square=TINY_SQUARE, seed=7)
    return extract(ExtractConfig(data=str(folder), store=str(store), model=model, pretrained=None, layers=layers,
                                 images_per_shard=6, workers=0, progress=False)).set_id


def test_final_metrics_are_measured_on_the_heldout_set(small_set, tiny_model_name, tmp_path):
    """With --heldout the published metrics are those of the held-out set's tokens, all of them
    when --eval-tokens allows, computed on the sparse path to what a dense pass over them gives."""
    store_root, set_id = small_set
    held = _heldout_set(store_root, tiny_model_name, tmp_path / "held")
    res = train(train_config({"activations": set_id, "store": str(store_root), "layer": 1, "variant": "topk", "k": 4,
                              "expansion": 2, "batch_size": 64, "n_tokens": 640, "seed": 11, "eval_tokens": 10**6,
                              "heldout": held, "progress": False}))
    store = LocalStore(store_root)
    sae, record = load_sae_from(store, res.sae_id)
    assert record.training["heldout"] == held
    aset = ActivationSet.open(store, held)
    x = torch.cat([aset.image_tokens(1, i)[aset.layout.patch_start:] for i in range(len(aset))]).float()
    with torch.no_grad():
        x_norm = sae.normalize(x)
        x_hat, z = sae.forward_normalized(x_norm)
    assert res.metrics["eval_tokens"] == len(x) == 12 * 49
    nmse = float((x_hat - x_norm).double().pow(2).sum() / (x_norm.double() - x_norm.double().mean(0)).pow(2).sum())
    assert res.metrics["nmse"] == pytest.approx(nmse, rel=1e-4)
    assert res.metrics["l0"] == pytest.approx(float((z > 0).sum(dim=1).double().mean()), rel=1e-6)
    assert res.metrics["never_fired"] == int(((z > 0).sum(dim=0) == 0).sum())
    assert 0 < res.metrics["eval_seconds"] and 0 < res.metrics["train_seconds"]


def test_a_heldout_set_that_does_not_match_is_refused_before_training(small_set, tiny_model_name, tmp_path,
                                                                      monkeypatch):
    store_root, set_id = small_set
    held = _heldout_set(store_root, tiny_model_name, tmp_path / "held", layers=(0,))

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(SaeTrainer, "step", no_training)
    with pytest.raises(TrainingError, match=rf"held-out set {held} stores layers \[0\], not \[1\]"):
        train(train_config({"activations": set_id, "store": str(store_root), "layer": 1, "heldout": held,
                            "progress": False}))


_STEP_FAULTS = """
import contextlib, resource, sys, torch
from vitscope.device import keep_freed_memory
from vitscope.sae import SaeConfig, TopKHyper
from vitscope.trainer.training import SaePlan, SaeTrainer, TrainConfig
if sys.argv[1] == "keep":
    assert keep_freed_memory()
sae_config = SaeConfig(64, 8192, TopKHyper(k=8).resolved(64, 8192))
cfg = TrainConfig(activations="-", sae=sae_config.hyper, d_sae=8192, device="cpu")
trainer = SaeTrainer(SaePlan(cfg, "-", 0, sae_config, {}), 100, torch.device("cpu"))
x = torch.randn(4096, 64)  # pre-activations [4096, 8192]: 128 MiB, above glibc's largest mmap threshold
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    trainer.step(x, step, contextlib.nullcontext())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    """After the first few steps, a step's large blocks come back from malloc's heap without a page
    fault; without keep_freed_memory every step faults in its pre-activations' pages anew (each
    4 KiB page of a fresh mmap faults once)."""
    pages = 4096 * 8192 * 4 // 4096

    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        return [int(f) for f in out.stdout.split()]

    default, keep = faults("default"), faults("keep")
    assert min(default[4:]) > pages, default  # the control: without it, the problem is there
    # malloc's bins settle within the first few steps (seen: 3); from then on nothing faults
    assert max(keep[5:]) < pages // 50, keep
