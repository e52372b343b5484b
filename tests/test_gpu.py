"""On a CUDA GPU (marker ``gpu``, from the ``cuda`` fixture; skipped elsewhere, also in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitscope.groundtruth import GroundTruth, write_ground_truth_set
from vitscope.sae import TopKHyper, load_sae_from
from vitscope.store import LocalStore
from vitscope.trainer import TrainConfig, train, train_sweep
from vitscope.trainer.training import SaeTrainer

BATCH = 256


def test_cuda_graph_steps_give_the_same_weights_as_eager_steps(cuda, tmp_path, monkeypatch):
    """The trainer captures each SAE's step as a CUDA graph and replays it (``cuda_graphs``):
    a replay must do the eager step's arithmetic exactly, so that turning graphs on or off
    gives bit-identical weights. The replays are counted so that a silent fall-back to eager
    steps (a failed capture) cannot pass for agreement."""
    replays = 0
    replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        nonlocal replays
        replays += 1
        return replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    gt = GroundTruth(d_model=32, n_directions=64, n_images=256, grid=(4, 4), images_per_shard=64)
    weights, ran = {}, {}
    for graphs in (True, False):
        store = LocalStore(tmp_path / f"cuda-graphs-{graphs}")
        set_id = write_ground_truth_set(store, gt).set_id
        before = replays
        res = train(TrainConfig(activations=set_id, store=store.uri, tokens=("all",), batch_size=BATCH,
                                n_tokens=40 * BATCH, eval_tokens=4 * BATCH, device=str(cuda), cuda_graphs=graphs,
                                progress=False))
        ran[graphs] = replays - before
        weights[graphs] = load_sae_from(store, res.sae_id)[0].state_dict()
    assert ran[True] >= 30 and ran[False] == 0, ran  # 40 steps: a few eager ones before the capture
    assert weights[True].keys() == weights[False].keys()
    for name, w in weights[True].items():
        assert torch.equal(w, weights[False][name]), name


def _two_gpus(cuda) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, torch sees {torch.cuda.device_count()}")


def test_a_sweep_over_every_gpu_trains_each_sae_as_one_gpu_does(cuda, tmp_path, monkeypatch):
    """``--device cuda:all`` places a sweep's SAEs over the GPUs (balanced by size) and copies
    each batch to each GPU; every SAE, its CUDA graph captured and replayed on its own GPU,
    must train what it trains on one GPU (bit for bit on GPUs of one model)."""
    _two_gpus(cuda)
    placed: list[torch.device] = []
    init = SaeTrainer.__init__

    def spy(self, plan, total_steps, device, world=None):
        placed.append(device)
        init(self, plan, total_steps, device, world)

    monkeypatch.setattr(SaeTrainer, "__init__", spy)
    gt = GroundTruth(d_model=32, n_directions=64, n_images=256, grid=(4, 4), images_per_shard=64)
    weights = {}
    for device in ("cuda:all", "cuda:0"):
        store = LocalStore(tmp_path / device.replace(":", "-"))
        set_id = write_ground_truth_set(store, gt).set_id
        cfgs = [TrainConfig(activations=set_id, store=store.uri, tokens=("all",), sae=TopKHyper(k=k), expansion=e,
                            batch_size=BATCH, n_tokens=40 * BATCH, eval_tokens=4 * BATCH, device=device,
                            progress=False) for k, e in ((4, 2), (8, 2), (4, 4), (8, 4))]
        weights[device] = [load_sae_from(store, r.sae_id)[0].state_dict() for r in train_sweep(cfgs)]
    assert len({d.index for d in placed[:4]}) == min(4, torch.cuda.device_count())  # the first run's SAEs
    same_model = len({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}) == 1
    for a, b in zip(weights["cuda:all"], weights["cuda:0"], strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], **({"rtol": 0, "atol": 0} if same_model else {}), msg=name)


def test_two_gpus_under_torchrun_train_the_sae_one_gpu_trains(cuda, tmp_path):
    """`vitscope train` under torchrun with 2 processes (NCCL) against 1 process, float32 (no
    autocast): the same SAE id and weights within 1e-4 (GPU reductions add in other orders than
    the CPU's; see tests/test_distributed.py for the CPU's tolerance)."""
    _two_gpus(cuda)
    gt = GroundTruth(d_model=32, n_directions=64, n_images=256, grid=(4, 4), images_per_shard=64)
    bin_dir = Path(sys.executable).parent
    published = {}
    for n in (1, 2):
        store = LocalStore(tmp_path / f"{n}-gpus")
        set_id = write_ground_truth_set(store, gt).set_id
        launcher = [] if n == 1 else [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
        out = subprocess.run([*launcher, str(bin_dir / "vitscope"), "train", "--activations", set_id, "--store",
                              store.uri, "--tokens", "all", "--variant", "topk", "--k", "4", "--expansion", "4",
                              "--batch-size", str(BATCH), "--n-tokens", str(40 * BATCH), "--lr", "1e-3",
                              "--eval-tokens", str(4 * BATCH), "--device", "cuda", "--no-autocast", "--no-progress"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr[-4000:]
        published[n] = load_sae_from(store, out.stdout.split()[-1])
    (one, one_record), (two, two_record) = published[1], published[2]
    assert one_record.sae_id == two_record.sae_id and two_record.metrics["world_size"] == 2
    for name, w in one.state_dict().items():
        assert float((w - two.state_dict()[name]).abs().max()) < 1e-4, name
