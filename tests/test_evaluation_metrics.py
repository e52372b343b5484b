"""The evaluator's metrics: hand computations on small tensors, and scikit-learn as the reference
for the probes, average precision and PCA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris, make_classification
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, log_loss
from sklearn.preprocessing import StandardScaler

from vitscope.evaluator.metrics import (
    LogisticProbe,
    ReconstructionStats,
    average_precision,
    fraction_recovered,
    kmeans_scores,
    max_decoder_cosine,
    pca_scores,
    probe1d,
    sparse_probe,
    stability,
)


def _stats(*batches: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> ReconstructionStats:
    stats = ReconstructionStats()
    for batch in batches:
        stats.update(*batch)
    return stats


def test_reconstruction_stats_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    got = _stats((x, x_hat, z)).result()
    # x̄ = (1, 1): Σ‖x − x̄‖² = 1 + 1 + 2 = 4; Σ‖x − x̂‖² = 1 + 1 + 0 = 2; the residuals
    # (0, −1), (0, 1), (0, 0) have mean 0, so explained variance is 1 − nmse.
    assert got["nmse"] == pytest.approx(0.5, abs=1e-15)
    assert got["explained_variance"] == pytest.approx(0.5, abs=1e-15)
    assert got["l0"] == pytest.approx(2 / 3, abs=1e-15)
    assert got["shrinkage"] == pytest.approx((math.sqrt(2) + math.sqrt(8)) / (2 + math.sqrt(8)), abs=1e-15)
    assert (got["never_fired"], got["dense"], got["n_tokens"]) == (1, 2, 3)


def test_explained_variance_ignores_a_constant_offset_that_nmse_counts():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(50, 4)))
    z = torch.ones(50, 3)
    identity = _stats((x, x, z)).result()
    assert (identity["nmse"], identity["explained_variance"], identity["shrinkage"]) == pytest.approx((0, 1, 1), abs=1e-12)
    noisy = x + 0.1 * torch.as_tensor(rng.normal(size=(50, 4)))
    noisy = noisy - noisy.mean(0) + x.mean(0)  # a residual of zero mean
    plain = _stats((x, noisy, z)).result()
    assert plain["explained_variance"] == pytest.approx(1 - plain["nmse"], abs=1e-12)
    shifted = _stats((x, noisy + torch.tensor([0.5, -0.2, 0.0, 0.3]), z)).result()
    assert shifted["explained_variance"] == pytest.approx(plain["explained_variance"], abs=1e-12)
    assert shifted["nmse"] > plain["nmse"] + 0.1
    assert shifted["explained_variance"] != pytest.approx(1 - shifted["nmse"], abs=0.1)


def test_reconstruction_stats_stream_and_merge_as_one_pass():
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.normal(3.0, 2.0, size=(90, 6)), dtype=torch.float32)
    x_hat = x * 0.9 + 0.2 * torch.randn(90, 6, generator=torch.Generator().manual_seed(0))
    z = torch.relu(torch.as_tensor(rng.normal(size=(90, 20)), dtype=torch.float32) - 1.5)
    z[:, 15:] = 0  # latents that never fire
    one = _stats((x, x_hat, z))
    parts = [(x[a:b], x_hat[a:b], z[a:b]) for a, b in ((0, 17), (17, 60), (60, 90))]
    streamed = _stats(*parts)
    merged = _stats(parts[0]).merge(_stats(parts[1], parts[2])).merge(ReconstructionStats())
    want = one.result()
    assert want["never_fired"] > 0 and want["shrinkage"] < 1
    for got in (streamed, merged, ReconstructionStats().merge(one)):
        result = got.result()
        assert result.keys() == want.keys()
        for key, value in want.items():
            assert result[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        np.testing.assert_array_equal(got.frequency(), one.frequency())
    np.testing.assert_allclose(one.frequency(), (z > 0).double().mean(0).numpy())
    with pytest.raises(ValueError, match="no tokens"):
        ReconstructionStats().result()
    with pytest.raises(ValueError, match="shape"):
        _stats(parts[0]).update(x[:, :3], x_hat[:, :3], z)


def test_max_decoder_cosine_finds_duplicates_and_known_angles():
    w = torch.tensor([
        [1.0, 0.0, 0.0],
        [3.0, 0.0, 0.0],  # the same direction, longer
        [0.5, math.sqrt(3) / 2, 0.0],  # 60° from the first two
        [0.0, 0.0, 0.0],
        [-1.0, 0.0, 0.0],  # opposite the first two: cosine −1 with them, 0 with the zero row
    ], dtype=torch.float64)
    got = max_decoder_cosine(w)
    np.testing.assert_allclose(got.numpy(), [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-15)
    rand = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    full = max_decoder_cosine(rand)
    torch.testing.assert_close(max_decoder_cosine(rand, chunk=7), full, rtol=0, atol=1e-6)
    unit = torch.nn.functional.normalize(rand, dim=1)
    cos = (unit @ unit.T).fill_diagonal_(-2)
    torch.testing.assert_close(full, cos.max(1).values, rtol=0, atol=1e-6)


def test_fraction_recovered():
    assert fraction_recovered(0.8, 0.2, 0.8) == 1.0
    assert fraction_recovered(0.2, 0.2, 0.8) == 0.0
    assert fraction_recovered(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert math.isnan(fraction_recovered(0.5, 0.3, 0.3))


def _sklearn_probe(X: np.ndarray, y: np.ndarray, l2: float) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(X)
    # The probe's mean loss + l2/2·‖W‖² is scikit-learn's C·Σ loss + ½‖W‖² with C = 1 / (l2·n).
    lr = LogisticRegression(C=1 / (l2 * len(X)), tol=1e-12, max_iter=10_000).fit(scaler.transform(X), y)
    return scaler, lr


def test_logistic_probe_matches_sklearn_on_iris():
    X, y = load_iris(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:100], order[100:]
    l2 = 1e-2
    probe = LogisticProbe(l2=l2).fit(torch.as_tensor(X[train]), torch.as_tensor(y[train]), 3)
    scaler, lr = _sklearn_probe(X[train], y[train], l2)
    for rows in (train, test):
        Xt, yt = torch.as_tensor(X[rows]), torch.as_tensor(y[rows])
        want = lr.predict_proba(scaler.transform(X[rows]))
        np.testing.assert_allclose(probe.predict_proba(Xt).numpy(), want, atol=1e-5)
        # Same objective, both solved to tight tolerances: log-likelihoods agree to 1e-6.
        assert probe.log_likelihood(Xt, yt) == pytest.approx(-log_loss(y[rows], want, labels=[0, 1, 2]), abs=1e-6)
        assert probe.accuracy(Xt, yt) == pytest.approx((want.argmax(1) == y[rows]).mean(), abs=1e-12)
    assert probe.accuracy(torch.as_tensor(X[test]), torch.as_tensor(y[test])) > 0.9
    np.testing.assert_allclose(probe.mean.numpy(), X[train].mean(0))
    np.testing.assert_allclose(probe.std.numpy(), X[train].std(0))


def test_logistic_probe_binary_and_deterministic():
    X, y = make_classification(n_samples=400, n_features=10, n_informative=4, random_state=0)
    Xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    probe = LogisticProbe().fit(Xt[:300], yt[:300], 2)
    scaler, lr = _sklearn_probe(X[:300], y[:300], 1e-4)
    want = lr.predict_proba(scaler.transform(X[300:]))
    assert probe.accuracy(Xt[300:], yt[300:]) == pytest.approx((want.argmax(1) == y[300:]).mean(), abs=1e-12)
    assert probe.log_likelihood(Xt[300:], yt[300:]) == pytest.approx(-log_loss(y[300:], want), abs=1e-4)
    again = LogisticProbe().fit(Xt[:300], yt[:300], 2)
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)
    with pytest.raises(ValueError, match="not fitted"):
        LogisticProbe().predict_proba(Xt)


def test_average_precision_by_hand_and_against_sklearn_with_ties():
    # Thresholds 0.9 (precision 1, recall 1/2) and 0.8, one threshold for the tie (2/3, 1).
    assert average_precision(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0], bool)) == pytest.approx(
        0.5 + 0.5 * 2 / 3, abs=1e-15)
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 400))
        scores = rng.integers(0, [3, 10, 1000][trial % 3], n).astype(np.float64)  # few distinct values: ties
        positive = rng.random(n) < rng.uniform(0.05, 0.6)
        if not positive.any():
            positive[0] = True
        assert abs(average_precision(scores, positive) - average_precision_score(positive, scores)) < 1e-12
    assert math.isnan(average_precision(np.arange(4.0), np.zeros(4, bool)))


def _planted(n: int = 2000, noise: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels in 0..2 (class 3 absent) and latents: 0 is class 0's indicator, 1 fires on class 1
    only (varying strength), 2 is off exactly on class 2, then sparse noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    planted = torch.stack([2.5 * (y == 0), (y == 1) * (1 + torch.rand(n, generator=gen)), (y != 2).float()], 1)
    noisy = torch.relu(torch.randn(n, noise, generator=gen) - 1)
    return torch.cat([planted.float(), noisy], 1), y


def test_probe1d_finds_planted_latents():
    acts, y = _planted()
    res = probe1d(acts, y, 4)
    assert res.best_latent.tolist() == [0, 1, 2, -1]
    assert (res.r[[0, 1, 2], [0, 1, 2]] > 0.999).all()
    assert res.weight[2, 2] < 0  # class 2 is where latent 2 is off: AP and purity negate it
    assert res.ap[:3].tolist() == [1.0, 1.0, 1.0] and math.isnan(res.ap[3])
    assert res.map == 1.0 and res.coverage(0.3) == 1.0
    purity = res.purity_at(16)
    assert purity[:3].tolist() == [1.0, 1.0, 1.0] and math.isnan(purity[3])
    assert res.r[:, 3].isnan().all()
    noise = res.r[3:, :3]
    assert (noise >= 0).all() and (noise < 0.01).all()
    assert res.top_labels.shape == (4, 1024)
    with pytest.raises(ValueError, match="k must be"):
        res.purity_at(1025)


def test_probe1d_matches_an_unpenalised_sklearn_fit():
    gen = torch.Generator().manual_seed(3)
    n = 3000
    y = torch.randint(0, 3, (n,), generator=gen)
    # Overlapping classes (a finite optimum), one sparse latent and one dense signed score.
    sparse = torch.relu(torch.randn(n, generator=gen) + 0.8 * (y == 1) - 0.5) * 40
    dense = torch.randn(n, generator=gen) - 0.7 * (y == 2)
    res = probe1d(torch.stack([sparse, dense], 1), y, 3)
    for latent, cls, x in ((0, 1, sparse), (1, 2, dense), (1, 0, dense)):
        xs, ys = x.double().numpy()[:, None], (y == cls).numpy()
        lr = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(xs, ys)
        loss = log_loss(ys, lr.predict_proba(xs)[:, 1])
        prior = ys.mean()
        r = 1 - loss / -(prior * math.log(prior) + (1 - prior) * math.log(1 - prior))
        assert abs(res.r[latent, cls].item() - r) < 1e-6, (latent, cls)
        assert res.weight[latent, cls].item() == pytest.approx(lr.coef_[0, 0], rel=1e-4)
        assert res.bias[latent, cls].item() == pytest.approx(lr.intercept_[0], rel=1e-4, abs=1e-6)
    assert res.r[0, 1] > 0.05 and res.r[1, 2] > 0.05


def test_probe1d_chunking_does_not_change_results():
    acts, y = _planted(n=600, noise=10, seed=1)
    acts[:, 5] = torch.randn(600)  # a dense latent among the sparse ones
    one = probe1d(acts, y, 4)
    tiny = probe1d(acts, y, 4, max_bytes=8 * 600)  # one latent per chunk, one class per slab
    for name in ("r", "weight", "bias"):
        torch.testing.assert_close(getattr(tiny, name), getattr(one, name), rtol=0, atol=1e-12, equal_nan=True)
    assert torch.equal(tiny.best_latent, one.best_latent)
    torch.testing.assert_close(tiny.ap, one.ap, equal_nan=True)


def test_pca_scores_match_sklearn_up_to_sign():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 5.0
    got = pca_scores(torch.as_tensor(x, dtype=torch.float32), 3)
    assert got.shape == (300, 3) and got.dtype == torch.float32
    want = PCA(3).fit_transform(x)
    for j in range(3):
        sign = np.sign(got[:, j].double().numpy() @ want[:, j])
        np.testing.assert_allclose(sign * got[:, j].numpy(), want[:, j], atol=1e-4)
    np.testing.assert_allclose(got.double().mean(0).numpy(), 0, atol=1e-5)
    assert (got.var(0)[:-1] >= got.var(0)[1:]).all()


def test_kmeans_scores_find_separated_clusters_deterministically():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    truth = torch.arange(3).repeat_interleave(100)
    x = centres[truth] + 0.1 * torch.randn(300, 3, generator=gen)
    scores = kmeans_scores(x, 3, seed=0)
    assert scores.shape == (300, 3) and (scores <= 0).all()
    found = scores.argmax(1)
    pairs = set(zip(truth.tolist(), found.tolist(), strict=True))
    assert len(pairs) == 3 and len({f for _, f in pairs}) == 3  # one cluster found per true cluster
    # Each centroid is its cluster's mean: the closeness to it is minus the squared distance.
    for t, f in pairs:
        mean = x[truth == t].double().mean(0)
        torch.testing.assert_close(scores[0 if t == 0 else 100 * t, f].double(),
                                   -(x[100 * t].double() - mean).pow(2).sum(), atol=1e-5, rtol=0)
    assert torch.equal(kmeans_scores(x, 3, seed=0), scores)


def test_stability_of_a_decoder_against_copies_and_a_random_one():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    perm = torch.randperm(64, generator=gen)
    rescaled = w[perm] * (0.5 + torch.rand(64, 1, generator=gen))  # positive scales keep directions
    for other in (w, w[perm], rescaled):
        got = stability(w, other)
        assert got["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert got["share_above_0_9"] == 1.0 and got["n_matched"] == 64
    rand = stability(w, torch.randn(48, 128, generator=gen))
    assert rand["mean_cosine"] < 0.5 and rand["share_above_0_9"] == 0.0 and rand["n_matched"] == 48
    flipped = stability(w, -w)
    assert flipped["mean_cosine"] < 0.5  # opposite directions are different features


def test_sparse_probe_selects_by_mean_difference():
    gen = torch.Generator().manual_seed(0)
    n, d = 1200, 30
    y = torch.randint(0, 3, (n,), generator=gen)
    z = torch.relu(torch.randn(n, d, generator=gen) - 1.0)
    for c, latent in enumerate((4, 11, 20)):
        z[:, latent] += 3.0 * (y == c)
    train, test = slice(0, 800), slice(800, n)
    got = sparse_probe(z[train], y[train], 4, ks=(1, 5), test=(z[test], y[test]))
    zt, yt = z[train].double().numpy(), y[train].numpy()
    for c in range(3):
        diff = zt[yt == c].mean(0) - zt[yt != c].mean(0)
        assert got["latents"][c] == np.argsort(-diff, kind="stable")[:5].tolist()
    assert [ids[0] for ids in got["latents"][:3]] == [4, 11, 20] and got["latents"][3] == []
    assert got["n_classes_scored"] == 3
    assert got["accuracy_k1"] > 0.95 and got["ap_k1"] > 0.95
    assert got["accuracy_k5"] >= got["accuracy_k1"] - 0.02
    with pytest.raises(ValueError, match="k must be"):
        sparse_probe(z[train], y[train], 4, ks=(31,), test=(z[test], y[test]))
