"""On a CUDA GPU (marker ``gpu``, from the ``cuda`` fixture; skipped elsewhere, also in CI)."""

from __future__ import annotations

import torch

from vitscope.groundtruth import GroundTruth, write_ground_truth_set
from vitscope.sae import load_sae_from
from vitscope.store import LocalStore
from vitscope.trainer import TrainConfig, train

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
