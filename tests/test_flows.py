"""Prefect flows: parallel extraction parts on threads and on a real Dask cluster."""

from __future__ import annotations

import asyncio
import json

import pytest
from support import extract_config, set_bytes

from vitscope.composition.flows import extract_flow, task_runner
from vitscope.extractor.extraction import extract


@pytest.mark.parametrize("engine", ["threads", "dask"])
def test_parts_as_mapped_tasks_match_a_single_process(prefect_server, planted_data, tiny_model_name, tmp_path,
                                                      engine):
    data_root, _ = planted_data
    single = extract(extract_config(data_root, tmp_path / "single", tiny_model_name))
    if engine == "dask":
        runner = task_runner(3, dask_cluster_class="distributed.LocalCluster",
                             dask_cluster_kwargs=json.loads('{"n_workers": 2, "processes": false, "threads_per_worker": 1}'))
    else:
        runner = task_runner(3)
    store = tmp_path / engine
    cfg = extract_config(data_root, store, tiny_model_name)
    result = extract_flow.with_options(task_runner=runner)(cfg, parts=3)
    assert result.set_id == single.set_id and not result.reused
    assert set_bytes(tmp_path / "single", single.set_id) == set_bytes(store, result.set_id)
    again = extract_flow.with_options(task_runner=task_runner(3))(cfg, parts=3)
    assert again.reused


def test_sweep_flow_trains_each_sae_once_and_publishes_a_table(pipeline):
    from prefect.client.orchestration import get_client

    from vitscope.composition.flows import sweep_flow
    from vitscope.trainer.config import SweepConfig

    cfg = SweepConfig(activations=pipeline.set_id, store=pipeline.store_uri, grid=("k=4,8",),
                      set=("variant=topk", "expansion=2", "n_tokens=4096", "batch_size=512", "progress=false"))
    results = sweep_flow(cfg)
    assert len(results) == 2 and len({r.sae_id for r in results}) == 2 and not any(r.reused for r in results)
    again = sweep_flow(cfg)
    assert [r.sae_id for r in again] == [r.sae_id for r in results] and all(r.reused for r in again)

    async def latest_artifacts():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    tables = [a for a in asyncio.run(latest_artifacts()) if a.key == "sweep"]
    assert tables and all(r.sae_id in str(tables[0].data) for r in results)


@pytest.mark.parametrize("engine", ["threads", "dask"])
def test_analysis_parts_as_mapped_tasks_match_one_pass(pipeline, tmp_path, engine):
    import shutil

    from vitscope.analyzer import AnalyzeConfig, analyze
    from vitscope.analyzer.results import analysis_prefix
    from vitscope.composition.flows import analyze_flow

    stores = {name: tmp_path / name for name in ("one", engine)}
    for store in stores.values():
        shutil.copytree(pipeline.store_uri, store)
        shutil.rmtree(store / "analyses")
    one = analyze(AnalyzeConfig(sae=pipeline.sae_id, store=str(stores["one"]), top_images=8, progress=False))
    runner = (task_runner(3, dask_cluster_class="distributed.LocalCluster",
                          dask_cluster_kwargs={"n_workers": 2, "processes": False, "threads_per_worker": 1})
              if engine == "dask" else task_runner(3))
    cfg = AnalyzeConfig(sae=pipeline.sae_id, store=str(stores[engine]), top_images=8, progress=False)
    result = analyze_flow.with_options(task_runner=runner)(cfg, parts=3)
    assert result.analysis_id == one.analysis_id and result.published and not result.reused
    stats = f"{analysis_prefix(one.analysis_id)}/stats.safetensors"
    assert (stores[engine] / stats).read_bytes() == (stores["one"] / stats).read_bytes()
    assert analyze_flow(cfg, parts=3).reused


def _layered_set(root):
    """A small two-layer activation set (layers 4 and 7) in the real shard format."""
    from vitscope.groundtruth import GroundTruth, write_ground_truth_set
    from vitscope.store import LocalStore

    gt = GroundTruth(d_model=16, n_directions=32, active=3, n_images=96, grid=(3, 3), images_per_shard=24,
                     layers=(4, 7))
    return write_ground_truth_set(LocalStore(root), gt)


def test_sweep_groups_balance_width_and_keep_layers_together(tmp_path):
    from vitscope.composition.flows import sweep_groups
    from vitscope.trainer import train_config

    manifest = _layered_set(tmp_path)

    def cfgs(*saes):
        return [train_config({"activations": manifest.set_id, "variant": "topk", "k": 2, "expansion": 2, **s})
                for s in saes]

    # Two layers of two SAEs: a group per layer, whatever the order of the sweep.
    four = cfgs({"layer": 7}, {"layer": 4}, {"layer": 7, "k": 3}, {"layer": 4, "k": 3})
    assert sweep_groups(four, 2, manifest) == [[1, 3], [0, 2]]
    # Balanced by width first: one wide SAE against three narrow ones, the layer cut where needed.
    wide = cfgs({"layer": 4, "expansion": 6}, {"layer": 4}, {"layer": 7}, {"layer": 7, "k": 3})
    assert sweep_groups(wide, 2, manifest) == [[0], [1, 2, 3]]
    # No more groups than SAEs; one SAE spelt three ways (its layer as None or 7, its width as
    # expansion 2 or d_sae 32) is one.
    same = cfgs({}, {"layer": 7}, {"layer": 7, "d_sae": 32}, {"layer": 4})
    assert sweep_groups(same, 3, manifest) == [[3], [0, 1, 2]]
    assert sweep_groups(four, 9, manifest) == [[1], [3], [0], [2]]
    assert sweep_groups(four, 1, manifest) == [[0, 1, 2, 3]]


def test_a_sweep_in_groups_on_dask_publishes_the_same_saes_as_one_pass(prefect_server, tmp_path):
    """4 SAEs on two layers, 2 groups on a LocalCluster of 2 worker processes (1 thread each):
    the same ids and bit-identical weights as one pass; a second run skips every SAE."""
    import shutil

    import torch

    from vitscope.composition.flows import sweep_flow
    from vitscope.sae import load_sae_from
    from vitscope.store import open_store
    from vitscope.trainer import SweepConfig, sweep_configs, train_sweep

    manifest = _layered_set(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "groups")
    settings = ("variant=topk", "tokens=[\"all\"]", "expansion=2", "batch_size=64", "n_tokens=1280",
                "buffer_tokens=256", "chunk_tokens=48", "init_sample=512", "eval_tokens=256", "device=\"cpu\"",
                "progress=false")

    def sweep(store):
        return SweepConfig(activations=manifest.set_id, store=str(store), grid=("k=2,3", "layer=4,7"), set=settings)

    # The Dask workers run torch on one thread (the nanny's OMP_NUM_THREADS=1), so this pass does
    # too: a product's reduction may be split differently over another number of threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_sweep(sweep_configs(sweep(tmp_path / "one")))
    finally:
        torch.set_num_threads(threads)
    cluster = {"n_workers": 2, "processes": True, "threads_per_worker": 1}
    grouped = sweep_flow(sweep(tmp_path / "groups"), groups=2, dask_cluster_class="distributed.LocalCluster",
                         dask_cluster_kwargs=cluster)
    assert [r.sae_id for r in grouped] == [r.sae_id for r in one] and len({r.sae_id for r in one}) == 4
    assert not any(r.reused for r in grouped)
    for r in one:
        a = load_sae_from(open_store(str(tmp_path / "one")), r.sae_id)[0].state_dict()
        b = load_sae_from(open_store(str(tmp_path / "groups")), r.sae_id)[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r.sae_id
    again = sweep_flow(sweep(tmp_path / "groups"), groups=2)
    assert [r.sae_id for r in again] == [r.sae_id for r in one] and all(r.reused for r in again)
