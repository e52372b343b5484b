"""End to end: images with a planted concept go through the Prefect pipeline, and an SAE
latent finds the concept, in the right images and at the right place."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from support import TINY_IMAGE, pipeline_config

from vitscope.analyzer.results import load_analysis
from vitscope.sae import load_sae, load_sae_from
from vitscope.shards import ActivationSet
from vitscope.store import open_store

PATCH = 16


def _patch_on_square(patch: int, grid_cols: int, box: tuple[int, int, int, int]) -> bool:
    """Whether the patch's pixel cell overlaps the planted square."""
    row, col = divmod(patch, grid_cols)
    x0, y0, x1, y1 = box
    return col * PATCH < x1 and (col + 1) * PATCH > x0 and row * PATCH < y1 and (row + 1) * PATCH > y0


def _assert_a_latent_finds_the_planted_square(store_uri: str, set_id: str, sae_id: str, analysis_id: str,
                                              items) -> None:
    """Some latent's top images are all planted images, its heatmap peaks on the square in every
    one of them, and the stored best patch is that peak."""
    store = open_store(store_uri)
    manifest, table = load_analysis(store, analysis_id)
    aset = ActivationSet.open(store, set_id)
    sae, record = load_sae_from(store, sae_id)
    assert manifest.sae_id == sae_id and record.activation_set_id == set_id
    boxes = {item.id: item.box for item in items}
    image_ids = [r["id"] for s in aset.manifest.shards for r in aset.shard_records(s)]
    grid_rows, grid_cols = aset.layout.grid
    assert grid_cols * PATCH == TINY_IMAGE

    found = []
    for latent in range(table.d_sae):
        images = table.top["best_patch"].image[latent]
        if (images < 0).any() or not all(boxes[image_ids[i]] for i in images):
            continue  # top-k not entirely made of planted images
        hits = 0
        for i in images:
            tokens = aset.image_tokens(record.layer, int(i))[aset.layout.patch_start:]
            heat = sae.encode(tokens)[:, latent]
            hits += _patch_on_square(int(heat.argmax()), grid_cols, boxes[image_ids[i]])
        found.append((hits, latent))
    assert found, "no latent's top-k images are all planted images"
    best_hits, best = max(found)
    assert best_hits == manifest.top_images, f"latent {best}: heatmap peak on the square in {best_hits}/{manifest.top_images} images"
    # The stored best patch agrees with the recomputed heatmap peak.
    first = int(table.top["best_patch"].image[best, 0])
    heat = sae.encode(aset.image_tokens(record.layer, first)[aset.layout.patch_start:])[:, best]
    assert int(heat.argmax()) == int(table.top["best_patch"].patch[best, 0])
    np.testing.assert_allclose(float(heat.max()), float(table.top["best_patch"].score[best, 0]), rtol=1e-4)


def test_a_latent_finds_the_planted_square(pipeline):
    _assert_a_latent_finds_the_planted_square(pipeline.store_uri, pipeline.set_id, pipeline.sae_id,
                                              pipeline.analysis_id, pipeline.items)


def test_the_demo_s_sae_family_finds_the_planted_square(pipeline, tmp_path):
    """`make demo` trains a TopK SAE (PipelineConfig.demo) for its speed on a CPU: trained like the
    test pipeline's SAE, a latent of that family finds the planted square too (on the pipeline's
    set, in a copy of its store). k is scaled to the tiny model, 12x narrower than the demo's
    ViT-B-32: 8 of 512 latents a token instead of 32 of 6144."""
    from vitscope.analyzer import AnalyzeConfig, analyze
    from vitscope.composition.pipeline import PipelineConfig
    from vitscope.trainer import train

    shutil.copytree(pipeline.store_uri, tmp_path / "store")
    store = str(tmp_path / "store")
    demo = PipelineConfig.demo().train.sae
    assert demo.variant == "topk"
    cfg = pipeline_config(store, pipeline.data_root, pipeline.model_name).train
    trained = train(replace(cfg, sae=replace(demo, k=8), activations=pipeline.set_id, store=store))
    assert not trained.reused and trained.metrics["l0"] == pytest.approx(8)
    analysis = analyze(AnalyzeConfig(sae=trained.sae_id, store=store, top_images=8, progress=False))
    _assert_a_latent_finds_the_planted_square(store, pipeline.set_id, trained.sae_id, analysis.analysis_id,
                                              pipeline.items)


def test_topk_images_are_unique_and_sorted(pipeline):
    _, table = load_analysis(open_store(pipeline.store_uri), pipeline.analysis_id)
    for latent in range(table.d_sae):
        used = table.top["best_patch"].image[latent][table.top["best_patch"].image[latent] >= 0]
        assert len(np.unique(used)) == len(used)
        scores = table.top["best_patch"].score[latent][: len(used)]
        assert (np.diff(scores) <= 0).all()
    # Batch-local indices would put every latent's examples in the first batch.
    assert table.top["best_patch"].image.max() > 16


def test_sae_metrics_are_published_and_sane(pipeline):
    store = open_store(pipeline.store_uri)
    sae, record = load_sae_from(store, pipeline.sae_id)
    m = record.metrics
    assert 0 < m["nmse"] < 1 and 0 < m["l0"] < sae.cfg.d_sae
    assert m["dead"] + m["dense"] <= sae.cfg.d_sae
    # Loading by URI gives the same SAE, normalisation included.
    by_uri = load_sae(f"{pipeline.store_uri}/saes/{pipeline.sae_id}")
    assert float(by_uri.norm_scale) == float(sae.norm_scale) != 1.0
    x = torch.randn(4, sae.cfg.d_in)
    torch.testing.assert_close(by_uri.encode(x), sae.encode(x))


def test_rerun_skips_every_finished_stage(pipeline, caplog, tmp_path):
    from vitscope.composition.flows import pipeline_flow

    assert pipeline.skipped == []
    caplog.set_level(logging.INFO, logger="prefect")
    prefect_log = logging.getLogger("prefect")
    prefect_log.addHandler(caplog.handler)  # prefect's loggers do not propagate to the root
    try:
        again = pipeline_flow(pipeline_config(pipeline.store_uri, pipeline.data_root, pipeline.model_name))
    finally:
        prefect_log.removeHandler(caplog.handler)
    assert again.skipped == ["extract", "train", "analyze", "evaluate"]
    said = caplog.text
    for line in (f"skipping extract: activation set {pipeline.set_id} is already published",
                 f"skipping train: SAE {pipeline.sae_id} is already published",
                 f"skipping analyze: analysis {pipeline.analysis_id} is already published",
                 f"skipping evaluate: report {pipeline.report_id} is already published",
                 "nothing to do: every stage's output is already published"):
        assert line in said
    assert (again.set_id, again.sae_id, again.analysis_id, again.report_id) == \
        (pipeline.set_id, pipeline.sae_id, pipeline.analysis_id, pipeline.report_id)
    # A changed training setting retrains and re-analyses but reuses the extracted set (in a copy
    # of the store: other tests count the shared store's SAEs).
    shutil.copytree(pipeline.store_uri, tmp_path / "store")
    changed = pipeline_flow(pipeline_config(str(tmp_path / "store"), pipeline.data_root, pipeline.model_name,
                                            train={"l1_coeff": 4.0, "n_tokens": 20_000}))
    assert changed.skipped == ["extract"]
    assert changed.set_id == pipeline.set_id and changed.sae_id != pipeline.sae_id


def test_heldout_images_serve_training_s_final_metrics_and_the_evaluation(pipeline, tmp_path):
    """With --heldout-data the pipeline extracts those images before training: the SAE's
    published metrics and its evaluation report both come from that set (in a copy of the store,
    with a changed training setting so that the SAE is trained again)."""
    from support import TINY_SQUARE

    from vitscope.composition.flows import pipeline_flow
    from vitscope.reports import load_report
    from vitscope.synthetic import make_planted_dataset

    make_planted_dataset(tmp_path / "held", n_images=12, size=TINY_IMAGE, square=TINY_SQUARE, seed=7)
    shutil.copytree(pipeline.store_uri, tmp_path / "store")
    cfg = pipeline_config(str(tmp_path / "store"), pipeline.data_root, pipeline.model_name, train={"n_tokens": 20_000})
    result = pipeline_flow(replace(cfg, heldout_data=str(tmp_path / "held")))
    assert result.skipped == ["extract"]
    store = open_store(str(tmp_path / "store"))
    _, record = load_sae_from(store, result.sae_id)
    report = load_report(store, result.report_id)
    held = record.training["heldout"]
    assert held not in (None, pipeline.set_id) and report["activation_set_id"] == held and report["split"] == "held-out"
    assert record.metrics["eval_tokens"] == 12 * ActivationSet.open(store, held).layout.n_patches


def test_the_pipeline_runs_on_s3(pipeline, s3_store):
    """The same flow against radosgw: shards, checkpoint and analysis go to S3, reads are ranged
    GETs, and the stored tokens equal the local run's."""
    from vitscope.composition.flows import pipeline_flow

    uri = s3_store.uri
    result = pipeline_flow(pipeline_config(uri, pipeline.data_root, pipeline.model_name, train={"n_tokens": 20_000}))
    assert result.set_id == pipeline.set_id  # content ids do not depend on where things are stored
    assert s3_store.exists(f"saes/{result.sae_id}/cfg.json")
    assert s3_store.exists(f"analyses/{result.analysis_id}/manifest.json")
    remote = ActivationSet.open(s3_store, result.set_id)
    assert s3_store.local_path("x") is None and remote.verify() == []
    local = ActivationSet.open(open_store(pipeline.store_uri), pipeline.set_id)
    for i in (0, len(local) - 1):
        torch.testing.assert_close(remote.image_tokens(-1, i), local.image_tokens(-1, i))
    sae = load_sae(f"{uri}/saes/{result.sae_id}")
    assert sae.cfg.d_in == local.manifest.d_model
