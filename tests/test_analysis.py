"""The analysis pass: statistics and top-k that do not depend on how the work is split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitscope.analyzer import AnalyzeConfig, analyze
from vitscope.analyzer.analysis import TopK
from vitscope.analyzer.results import load_analysis
from vitscope.metrics import frequency_histogram
from vitscope.sae import load_sae_from
from vitscope.shards import ActivationSet
from vitscope.store import open_store


def _run(topk: TopK, score: np.ndarray, parts: list[np.ndarray]) -> TopK:
    for images in parts:
        s = torch.as_tensor(score[:, images])
        topk.merge(s, torch.as_tensor(images)[None].expand(len(score), -1), torch.zeros_like(s, dtype=torch.int32))
    return topk


def test_topk_merge_is_order_and_split_independent():
    rng = np.random.default_rng(0)
    score = rng.random((5, 40)).astype(np.float32)
    score[:, 7] = score[:, 8]  # a tie, broken the same way every time
    one_pass = _run(TopK(5, 6, torch.device("cpu")), score, [np.arange(40)])
    perm = rng.permutation(40)
    for parts in ([np.arange(20), np.arange(20, 40)], [np.arange(30, 40), np.arange(0, 30)],
                  [perm[i::3] for i in range(3)]):
        split = _run(TopK(5, 6, torch.device("cpu")), score, parts)
        torch.testing.assert_close(split.score, one_pass.score)
        torch.testing.assert_close(split.image, one_pass.image)
    expected = np.argsort(-score, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(one_pass.image.numpy(), expected)


def test_statistics_match_a_direct_computation(pipeline):
    store = open_store(pipeline.store_uri)
    manifest, table = load_analysis(store, pipeline.analysis_id)
    sae, record = load_sae_from(store, pipeline.sae_id)
    aset = ActivationSet.open(store, pipeline.set_id)
    z = torch.cat([sae.encode(aset.image_tokens(record.layer, i)[aset.layout.patch_start:])
                   for i in range(len(aset))])
    assert manifest.n_tokens == len(z) == len(aset) * aset.layout.n_patches
    fires = (z > 0).double()
    np.testing.assert_allclose(table.frequency, fires.mean(0).numpy(), rtol=1e-6)
    mean_firing = (z.double() * fires).sum(0) / fires.sum(0).clamp_min(1)
    np.testing.assert_allclose(table.mean_activation, mean_firing.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(table.max_activation, z.max(0).values.numpy(), rtol=1e-3, atol=1e-4)
    # Latent 0's top image really is its best image by best patch.
    per_image = z[:, 0].reshape(len(aset), -1).max(dim=1).values
    if per_image.max() > 0:
        assert int(table.topk_image[0, 0]) == int(per_image.argmax())


def test_histogram_counts_every_latent():
    freq = np.array([0.0, 1e-9, 1e-3, 0.5, 1.0, 0.0])
    edges, counts, dead = frequency_histogram(freq, bins=8)
    assert dead == 2 and counts.sum() == 4 and edges[0] == -8 and edges[-1] == 0


def test_rerun_is_reused_and_bad_k_is_refused(pipeline):
    res = analyze(AnalyzeConfig(sae=pipeline.sae_id, store=pipeline.store_uri, top_images=8, progress=False))
    assert res.reused and res.analysis_id == pipeline.analysis_id
    with pytest.raises(ValueError, match="top_images must be positive"):
        analyze(AnalyzeConfig(sae=pipeline.sae_id, store=pipeline.store_uri, top_images=0, progress=False))
    with pytest.raises(KeyError, match="no published SAE"):
        analyze(AnalyzeConfig(sae="nope", store=pipeline.store_uri, progress=False))
