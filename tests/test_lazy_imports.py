"""What the explorer's first page needs is served without torch: the analyzer answers ListSaes,
GetSae, GetEvaluation and ListLatents from JSON and numpy, in a process that has not imported
torch (1.4 s or more on a small machine, while the browser and Streamlit start beside it), and
imports torch for the calls that run an SAE, or in the background once its first calls are
answered and it is idle. The records those calls read live in torch-free modules, and are the
same objects under their usual names."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import vitscope.sae
import vitscope.sae_format
import vitscope.shard_format
import vitscope.shards
from vitscope.analyzer import AnalyzeConfig, analyze
from vitscope.groundtruth import GroundTruth, write_ground_truth_set
from vitscope.sae import SaeConfig, SaeRecord, build_sae, save_sae
from vitscope.store import LocalStore

HEAVY = ("torch", "torchvision", "vitscope.sae", "vitscope.shards", "vitscope.models", "vitscope.datasets")
"""Modules the SAE page's calls must not import (each imports torch, or is torch)."""


@pytest.mark.parametrize(("light", "heavy"), [(vitscope.sae_format, vitscope.sae),
                                              (vitscope.shard_format, vitscope.shards)])
def test_the_torch_free_records_are_the_usual_names(light, heavy):
    public = [n for n, v in vars(light).items() if not n.startswith("_") and getattr(v, "__module__", None) == light.__name__]
    assert public
    for name in public:
        assert getattr(heavy, name) is getattr(light, name), name


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with one analysed SAE over a ground-truth activation set (no images: none is asked for)."""
    root = tmp_path_factory.mktemp("lazy") / "store"
    store = LocalStore(root)
    m = write_ground_truth_set(store, GroundTruth(n_images=32, grid=(2, 2), d_model=16, n_directions=32))
    sae = build_sae(SaeConfig.of("relu", 16, 64))
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # every latent fires somewhere: the analysis has top images
    save_sae(store, sae, SaeRecord(sae_id="lazy-relu", config=sae.cfg, activation_set_id=m.set_id,
                                   layer=m.layers[0], tokens=["patches"], metrics={"nmse": 0.5, "l0": 3.0}))
    analyze(AnalyzeConfig(sae="lazy-relu", store=str(root), top_images=4, device="cpu", progress=False))
    return str(root)


CLIENT = """
import json, sys
import grpc
from vitscope.analyzer import ServeConfig, serve, server as module
from vitscope.proto import names, pb, rpc

HEAVY = {heavy!r}
module.WARM_UP_IDLE_S = float("inf")  # this process tells what the calls import, not the warm-up
server = serve(ServeConfig(store={store!r}, port=0))
with grpc.insecure_channel(server.address) as channel:
    stub = rpc.AnalyzerStub(channel)
    listed = stub.ListSaes(pb.ListSaesRequest(), timeout=60).saes
    sae = stub.GetSae(pb.GetSaeRequest(name=listed[0].name), timeout=60)
    try:
        stub.GetEvaluation(pb.GetEvaluationRequest(name=names.evaluation(names.parse_sae(sae.name))), timeout=60)
        evaluation = "OK"
    except grpc.RpcError as e:
        evaluation = e.code().name
    latents = stub.ListLatents(pb.ListLatentsRequest(parent=sae.name, page_size=5), timeout=60).latents
    first = {{"saes": len(listed), "analysed": bool(sae.analysis), "bins": len(sae.log_frequency_counts),
              "image_count": sae.image_count, "evaluation": evaluation, "latents": len(latents),
              "imported": sorted(m for m in HEAVY if m in sys.modules)}}
    latent = stub.GetLatent(pb.GetLatentRequest(name=latents[0].name, heatmaps=True), timeout=120)
    then = {{"examples": len(latent.examples), "heatmaps": all(len(e.heatmap) == 4 for e in latent.examples),
             "torch": "torch" in sys.modules}}
server.stop(grace=None)
print(json.dumps([first, then]))
"""


def test_the_first_pages_calls_import_no_torch_and_a_latents_heatmaps_do(store_uri: str):
    script = textwrap.dedent(CLIENT.format(heavy=HEAVY, store=store_uri))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, then = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first == {"saes": 1, "analysed": True, "bins": first["bins"], "image_count": 32,
                     "evaluation": "NOT_FOUND", "latents": 5, "imported": []}
    assert first["bins"] > 0  # the histogram came from the analysis, read without torch
    assert then == {"examples": 4, "heatmaps": True, "torch": True}


WARM_UP = """
import json, sys, time
import grpc
from vitscope.analyzer import ServeConfig, serve, server as module
from vitscope.proto import pb, rpc

module.WARM_UP_IDLE_S = 0.2
server = serve(ServeConfig(store={store!r}, port=0))
time.sleep(1.0)
before = "torch" in sys.modules  # no call answered yet: nothing to wait for
with grpc.insecure_channel(server.address) as channel:
    rpc.AnalyzerStub(channel).ListSaes(pb.ListSaesRequest(), timeout=60)
deadline = time.monotonic() + 120
while not all(m in sys.modules for m in module.WARM_MODULES) and time.monotonic() < deadline:
    time.sleep(0.1)
server.stop(grace=None)
print(json.dumps([before, sorted(m for m in module.WARM_MODULES if m not in sys.modules)]))
"""


def test_an_idle_server_imports_what_the_latent_calls_need_after_its_first_calls(store_uri: str):
    script = textwrap.dedent(WARM_UP.format(store=store_uri))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, []]
