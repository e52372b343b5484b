"""The analysis pass: statistics and top-k that do not depend on how the work is split."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vitscope.analyzer import AnalyzeConfig, analyze
from vitscope.analyzer.analysis import (
    BandSamples,
    CoFiring,
    TopK,
    _first_peak,
    _nonzero,
    cofiring_images,
    sample_priority,
)
from vitscope.analyzer.results import COFIRE_PER_TOKEN, load_analysis
from vitscope.metrics import frequency_histogram
from vitscope.sae import load_sae_from
from vitscope.shards import ActivationSet
from vitscope.store import open_store


def _run(topk: TopK, score: np.ndarray, parts: list[np.ndarray], patch: np.ndarray | None = None) -> TopK:
    for images in parts:
        s = torch.as_tensor(score[:, images])
        p = torch.zeros_like(s, dtype=torch.int32) if patch is None else torch.as_tensor(patch[:, images])
        topk.merge(s, torch.as_tensor(images)[None].expand(len(score), -1), p)
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
        assert torch.equal(split.key, one_pass.key)
    expected = np.argsort(-score, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(one_pass.result().image, expected)


def test_topk_is_the_plain_ranking_with_ties_to_the_lower_image_and_silent_images_left_out():
    rng = np.random.default_rng(4)
    # Few distinct scores (many ties) and many zeros: some latents fire on fewer than k images.
    score = (rng.integers(0, 4, (9, 70)) * (rng.random((9, 70)) < np.linspace(0.05, 0.9, 9)[:, None])).astype(np.float32)
    patch = rng.integers(0, 50, (9, 70)).astype(np.int32)
    k = 8
    want_image = np.full((9, k), -1)
    for latent in range(9):
        fired = np.flatnonzero(score[latent] > 0)
        ranked = fired[np.lexsort((fired, -score[latent, fired]))][:k]  # score descending, then image
        want_image[latent, :len(ranked)] = ranked
    filled = want_image >= 0
    perm = rng.permutation(70)
    for parts in ([np.arange(70)], [np.arange(i, i + 10) for i in range(60, -1, -10)], [perm[i::4] for i in range(4)],
                  [perm[:1], perm[1:3], perm[3:]]):
        got = _run(TopK(9, k, torch.device("cpu")), score, parts, patch).result()
        np.testing.assert_array_equal(got.image, want_image)
        np.testing.assert_array_equal(got.score, np.where(filled, np.take_along_axis(score, np.maximum(want_image, 0), 1), 0))
        np.testing.assert_array_equal(got.patch, np.where(filled, np.take_along_axis(patch, np.maximum(want_image, 0), 1), -1))


def _band_samples(score: np.ndarray, parts, per_band: int = 3) -> BandSamples:
    samples = BandSamples(score.shape[0], per_band, torch.device("cpu"))
    for images in parts:
        s = torch.as_tensor(score[:, images], dtype=torch.float32)
        samples.merge(s, torch.as_tensor(images)[None].expand_as(s), torch.zeros_like(s, dtype=torch.int32))
    return samples


def test_band_samples_are_a_reproducible_uniform_draw_per_band_in_any_order():
    from vitscope.analyzer.results import SAMPLE_LOG10_EDGES

    rng = np.random.default_rng(2)
    score = np.where(rng.random((7, 60)) < 0.7, 10 ** rng.uniform(-3.5, 3.5, (7, 60)), 0.0).astype(np.float32)
    one = _band_samples(score, [np.arange(60)])
    perm = rng.permutation(60)
    for parts in ([np.arange(30), np.arange(30, 60)], [perm[i::4] for i in range(4)], [perm]):
        split = _band_samples(score, parts)
        for name in ("key", "image", "score"):
            torch.testing.assert_close(getattr(split, name), getattr(one, name))
    got = one.result()
    band = np.digitize(np.log10(np.where(score > 0, score, 1e-30)), SAMPLE_LOG10_EDGES[1:-1], right=False)
    for latent in range(7):
        prio = sample_priority(torch.arange(60), torch.full((60,), latent)).numpy()
        for b in range(len(SAMPLE_LOG10_EDGES) - 1):
            members = np.flatnonzero((band[latent] == b) & (score[latent] > 0))
            want = members[np.argsort(prio[members], kind="stable")][:3]
            kept = got.image[latent, b][got.image[latent, b] >= 0]
            np.testing.assert_array_equal(kept, want)
            np.testing.assert_array_equal(got.score[latent, b, :len(want)], score[latent, want])


def test_band_samples_break_a_priority_collision_by_the_lower_image_in_any_order():
    prio = sample_priority(torch.arange(1 << 18), torch.zeros(1 << 18, dtype=torch.int64))
    values, counts = torch.unique(prio, return_counts=True)
    first, second = torch.nonzero(prio == values[counts > 1][0]).squeeze(1).tolist()[:2]
    higher = torch.nonzero(prio > prio[first]).squeeze(1)[:5].tolist()  # further images, all of them out of the draw
    images = np.array([second, *higher, first])
    score = np.full((1, images.max() + 1), 0.5, dtype=np.float32)  # one band
    for parts in ([images], [images[::-1].copy()], [images[:1], images[1:]], [images[-1:], images[:-1]]):
        kept = _band_samples(score, parts, per_band=1).result().image[0]
        assert kept[kept >= 0].tolist() == [first]


def test_first_peak_is_the_index_max_returns_ties_included():
    rng = np.random.default_rng(5)
    codes = torch.as_tensor(rng.integers(-3, 3, (6, 11, 40)).clip(0), dtype=torch.float32)  # ties and silent columns
    codes[2, :, 7] = 0
    token, latent, value = _nonzero(codes.contiguous())
    best, index = codes.max(dim=1)
    torch.testing.assert_close(_first_peak(token, latent, value, codes.amax(dim=1), 11), index, rtol=0, atol=0)
    assert torch.equal(codes.amax(dim=1), best)


def test_cofiring_ranks_partners_like_the_dense_jaccard_matrix_ties_to_the_lower_index():
    rng = np.random.default_rng(6)
    fired = rng.random((300, 12)) < np.linspace(0.05, 0.6, 12)  # 0/1 codes: many equal Jaccard indices
    c = CoFiring(12)
    for chunk in np.array_split(np.arange(300), 7):
        c.add(torch.as_tensor(fired[chunk], dtype=torch.float32))
    latent, jaccard, count = c.result(top=5)
    f = fired.astype(np.float64)
    both = f.T @ f
    union = f.sum(0)[:, None] + f.sum(0)[None] - both
    for i in range(12):
        j = np.array([j for j in range(12) if j != i and both[i, j] > 0], dtype=int)
        jac = both[i, j] / union[i, j]
        ranked = j[np.lexsort((j, -jac))][:5]
        assert latent[i][latent[i] >= 0].tolist() == ranked.tolist()
        np.testing.assert_array_equal(jaccard[i, :len(ranked)], (both[i, ranked] / union[i, ranked]).astype(np.float32))
        np.testing.assert_array_equal(count[i, :len(ranked)], both[i, ranked])


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
        assert int(table.top["best_patch"].image[0, 0]) == int(per_image.argmax())
    # The other views rank images by the patch mean and by the CLS token; every view keeps the
    # image's best patch.
    assert manifest.version == 2 and manifest.views == ["best_patch", "cls", "mean"]
    assert manifest.default_view == "best_patch"  # the SAE trained on patches
    cls_z = torch.stack([sae.encode(aset.image_tokens(record.layer, i)[0]) for i in range(len(aset))])
    by_view = {"mean": z.reshape(len(aset), -1, z.shape[1]).mean(dim=1), "cls": cls_z}
    best_patch = z.reshape(len(aset), -1, z.shape[1]).argmax(dim=1)
    for view, scores in by_view.items():
        top = table.top[view]
        for latent in range(0, z.shape[1], 37):
            want = scores[:, latent]
            fired = int((want > 0).sum())
            n = min(fired, top.image.shape[1])
            got = top.image[latent, :n]
            np.testing.assert_allclose(top.score[latent, :n], want[got].numpy(), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(np.sort(top.score[latent, :n])[::-1],
                                       np.sort(want.numpy())[::-1][:n], rtol=1e-3, atol=1e-4)
            assert (top.image[latent, n:] == -1).all()
            np.testing.assert_array_equal(top.patch[latent, :n], best_patch[got, latent].numpy())
    # Band samples: images of each band of best-patch activation, each really in its band.
    per_image_best = z.reshape(len(aset), -1, z.shape[1]).max(dim=1).values  # [images, d_sae]
    samples, sample_edges = table.samples, np.asarray(manifest.sample_log10_edges)
    assert samples.image.shape[:2] == (z.shape[1], len(sample_edges) - 1)
    for latent in range(0, z.shape[1], 41):
        for band in range(len(sample_edges) - 1):
            kept = samples.image[latent, band]
            kept = kept[kept >= 0]
            if not len(kept):
                continue
            values = np.log10(per_image_best[kept, latent].double().numpy())
            lo = -np.inf if band == 0 else sample_edges[band]
            hi = np.inf if band == len(sample_edges) - 2 else sample_edges[band + 1]
            assert ((values >= lo - 1e-6) & (values < hi + 1e-6)).all()
            in_band = ((np.log10(per_image_best[:, latent].double().clamp_min(1e-30).numpy()) >= lo)
                       & (np.log10(per_image_best[:, latent].double().clamp_min(1e-30).numpy()) < hi)
                       & (per_image_best[:, latent] > 0).numpy())
            assert len(kept) == min(int(in_band.sum()), samples.image.shape[2])
    # Co-firing: Jaccard of the firing sets over the sampled images' tokens, partners ranked.
    chosen = cofiring_images(len(aset), aset.layout.n_patches)
    assert manifest.cofiring_tokens == int(chosen.sum()) * aset.layout.n_patches
    sampled = z.reshape(len(aset), -1, z.shape[1])[chosen].reshape(-1, z.shape[1])
    # Each token counts its COFIRE_PER_TOKEN strongest latents (here some tokens have more).
    vals, idx = sampled.topk(COFIRE_PER_TOKEN, dim=1)
    fired = torch.zeros_like(sampled, dtype=torch.float64).scatter_(1, idx, (vals > 0).double())
    assert (fired.sum(1) < (sampled > 0).sum(1)).any() and fired.sum() > 0  # the bound was exercised
    both = fired.T @ fired
    either = fired.sum(0)[:, None] + fired.sum(0)[None] - both
    jaccard = torch.where(either > 0, both / either.clamp_min(1), torch.zeros_like(both))
    c = table.cofiring
    for latent in range(0, z.shape[1], 29):
        row = jaccard[latent].clone()
        row[latent] = 0
        partners = [j for j in np.lexsort((np.arange(len(row)), -row.numpy())) if both[latent, j] > 0][:c.latent.shape[1]]
        got = c.latent[latent][c.latent[latent] >= 0].tolist()
        assert got == partners
        np.testing.assert_allclose(c.jaccard[latent, :len(got)], row[got].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(c.count[latent, :len(got)], both[latent, got].numpy())
    # The activation histogram counts every firing token once, in its log10 bin.
    edges = np.asarray(manifest.histogram_log10_edges)
    assert table.histogram.shape == (z.shape[1], len(edges) - 1)
    np.testing.assert_array_equal(table.histogram.sum(axis=1), (z > 0).sum(0).numpy())
    for latent in range(0, z.shape[1], 53):
        values = z[:, latent][z[:, latent] > 0].double().log10().numpy()
        want, _ = np.histogram(np.clip(values, edges[0], edges[-1] - 1e-9), bins=edges)
        np.testing.assert_array_equal(table.histogram[latent], want)


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


def test_a_split_pass_in_any_order_publishes_the_same_bytes_and_resumes_its_parts(pipeline, tmp_path):
    import shutil

    from vitscope.analyzer.results import analysis_prefix

    stores = {}
    for name in ("whole", "split"):
        stores[name] = tmp_path / name
        shutil.copytree(pipeline.store_uri, stores[name])
        shutil.rmtree(stores[name] / "analyses")
    whole = analyze(AnalyzeConfig(sae=pipeline.sae_id, store=str(stores["whole"]), top_images=8, progress=False))
    cfg = AnalyzeConfig(sae=pipeline.sae_id, store=str(stores["split"]), top_images=8, parts=3, progress=False)
    for part in (2, 0):  # out of order; part 1 is left for the finish step to run
        res = analyze(dataclasses.replace(cfg, part=part))
        assert not res.published and res.analysis_id == whole.analysis_id
    split_store = open_store(stores["split"])
    prefix = analysis_prefix(whole.analysis_id)
    assert split_store.exists(f"{prefix}/parts/3/2.safetensors") and not split_store.exists(f"{prefix}/manifest.json")
    done = analyze(dataclasses.replace(cfg, finish=True))
    assert done.published and done.analysis_id == whole.analysis_id
    assert (stores["split"] / prefix / "stats.safetensors").read_bytes() == \
        (stores["whole"] / prefix / "stats.safetensors").read_bytes()
    a, b = (json.loads((stores[n] / prefix / "manifest.json").read_text()) for n in ("whole", "split"))
    a.pop("created_at"), b.pop("created_at")
    assert a == b
    assert not split_store.list(f"{prefix}/parts/")  # the scratch state is gone once published
