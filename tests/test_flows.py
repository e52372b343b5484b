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
