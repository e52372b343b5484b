"""The evaluation metrics of an SAE, as the field defines them (design brief §13): reconstruction
(NMSE, explained variance, L0, shrinkage), duplicated features (decoder cosine), fraction of a
readout recovered under substitution, linear and sparse probes, probe1d label alignment with its
PCA and k-means baselines (saev, OSU-NLP-Group), and stability across seeds. Sums that a result
depends on are float64; every function works on tensors on any device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from vitscope.metrics import dense_latents, never_fired

CHUNK_BYTES = 512 * 2**20
"""The size the chunked computations here keep each of their large temporaries under."""


def _rows_per_chunk(row_bytes: int, max_bytes: int = CHUNK_BYTES) -> int:
    return max(1, max_bytes // max(row_bytes, 1))


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """A float type at least as wide as float32 (half types would overflow sums)."""
    return torch.promote_types(dtype, torch.float32)


class ReconstructionStats:
    """Reconstruction metrics of an SAE over held-out tokens, accumulated as float64 sums: any
    split of the tokens into batches, or into accumulators merged afterwards, gives the same
    result up to float64 rounding. The sums live on the device of the first batch."""

    def __init__(self) -> None:
        self.n = 0
        self._sums: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        """Add a batch: inputs ``x`` and reconstructions ``x_hat`` [n, d] in the SAE's training
        space (normalised), and the codes ``z`` [n, d_sae]."""
        if x.ndim != 2 or x_hat.shape != x.shape or z.ndim != 2 or len(z) != len(x):
            raise ValueError(f"need x, x_hat [n, d] and z [n, d_sae] (got {tuple(x.shape)}, "
                             f"{tuple(x_hat.shape)}, {tuple(z.shape)})")
        x64, x_hat64 = x.double(), x_hat.double()
        r = x64 - x_hat64
        self._add({
            "x": x64.sum(dim=0),
            "r": r.sum(dim=0),
            "xx": x64.pow(2).sum(),
            "rr": r.pow(2).sum(),
            "norm_x": x64.norm(dim=1).sum(),
            "norm_x_hat": x_hat64.norm(dim=1).sum(),
            "fires": (z > 0).sum(dim=0, dtype=torch.float64),
        }, len(x))

    def merge(self, other: ReconstructionStats) -> ReconstructionStats:
        """Add the tokens another accumulator has seen (exactly: the sums add). Returns self."""
        if other.n:
            self._add(other._sums, other.n)
        return self

    def _add(self, sums: dict[str, torch.Tensor], n: int) -> None:
        if not self._sums:
            self._sums = {k: v.clone() for k, v in sums.items()}
        else:
            for k, v in sums.items():
                if v.shape != self._sums[k].shape:
                    raise ValueError(f"shape of {k!r} changed: {tuple(self._sums[k].shape)} then {tuple(v.shape)}")
                self._sums[k] += v.to(self._sums[k].device)
        self.n += n

    def frequency(self) -> np.ndarray:
        """Each latent's firing frequency (share of the tokens with a positive code), float64."""
        if not self.n:
            raise ValueError("no tokens seen")
        return (self._sums["fires"] / self.n).cpu().numpy()

    def result(self) -> dict[str, float | int]:
        """The metrics over every token seen:

        - ``nmse``: Σ‖x − x̂‖² / Σ‖x − x̄‖² (fraction of variance unexplained), x̄ the mean token;
        - ``explained_variance``: 1 − Σ‖r − r̄‖² / Σ‖x − x̄‖² with r = x − x̂: the residual's
          variance, so a constant offset of the reconstruction costs nothing (unlike nmse);
        - ``l0``: mean number of active latents per token;
        - ``shrinkage``: Σ‖x̂‖ / Σ‖x‖ over tokens (below 1: the SAE shrinks its inputs);
        - ``never_fired``, ``dense``: as defined in :mod:`vitscope.metrics`;
        - ``n_tokens``.

        NaN for a ratio whose denominator is zero (inputs all equal, or all zero)."""
        freq = self.frequency()
        s = {k: v.cpu() for k, v in self._sums.items()}
        n = self.n
        # Sums of squared deviations from the mean, Σ‖x‖² − n‖x̄‖², so that they stream.
        total = (s["xx"] - s["x"].pow(2).sum() / n).item()
        resid = (s["rr"] - s["r"].pow(2).sum() / n).item()
        norm_x = s["norm_x"].item()
        return {
            "nmse": s["rr"].item() / total if total > 0 else math.nan,
            "explained_variance": 1 - resid / total if total > 0 else math.nan,
            "l0": s["fires"].sum().item() / n,
            "shrinkage": s["norm_x_hat"].item() / norm_x if norm_x > 0 else math.nan,
            "never_fired": never_fired(freq),
            "dense": dense_latents(freq),
            "n_tokens": n,
        }


@torch.no_grad()
def max_decoder_cosine(W_dec: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per latent, the largest cosine between its decoder row and any other latent's [d_sae]
    (near 1: a duplicated feature); a zero row has cosine 0 with every row. ``W_dec`` is
    [d_sae, d_in]; the similarities are computed ``chunk`` rows at a time, so the memory is
    O(chunk × d_sae), never d_sae²."""
    d_sae = len(W_dec)
    if d_sae < 2:
        raise ValueError(f"need at least two latents (got {d_sae})")
    unit = F.normalize(W_dec.to(_float_dtype(W_dec.dtype)), dim=1)  # a zero row stays zero
    out = torch.empty(d_sae, dtype=unit.dtype, device=unit.device)
    for lo in range(0, d_sae, chunk):
        cos = unit[lo:lo + chunk] @ unit.T
        own = torch.arange(len(cos), device=cos.device)
        cos[own, own + lo] = -torch.inf  # a latent against itself
        out[lo:lo + chunk] = cos.max(dim=1).values
    return out


def fraction_recovered(with_sae: float, ablated: float, clean: float) -> float:
    """The share of a readout's score that substituting the SAE's reconstruction for the layer
    keeps: (with_sae − ablated) / (clean − ablated), 1 as good as the clean model, 0 as bad as
    the ablated layer. NaN when clean and ablated score the same (nothing to recover)."""
    span = clean - ablated
    return (with_sae - ablated) / span if span != 0 else math.nan


class LogisticProbe:
    """Multinomial logistic regression, fitted full-batch with L-BFGS (strong Wolfe line search)
    from zeros, so a fit is deterministic. Features are standardised with the training set's
    mean and standard deviation (``mean``, ``std``; a constant feature keeps std 1).

    The objective is the mean cross entropy over samples plus ``l2 / 2 · ‖W‖²`` (the weights,
    not the biases), on the standardised features: the penalty is per sample, so the same
    ``l2`` regularises as strongly whatever the number of samples. scikit-learn's
    ``LogisticRegression(C=...)`` on standardised features is the same objective with
    ``C = 1 / (l2 · n)``."""

    def __init__(self, l2: float = 1e-4, max_iter: int = 500, dtype: torch.dtype = torch.float64):
        self.l2, self.max_iter, self.dtype = l2, max_iter, dtype
        self.mean = self.std = self.weight = self.bias = None

    def fit(self, X: torch.Tensor, y: torch.Tensor, n_classes: int) -> LogisticProbe:
        """Fit on features ``X`` [n, f] and class ids ``y`` [n] (int64, 0 ≤ y < n_classes; two
        classes for a binary probe). Returns self."""
        X = X.to(self.dtype)
        y = y.to(device=X.device, dtype=torch.int64)
        std = X.std(dim=0, correction=0)
        self.mean, self.std = X.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std))
        xs = (X - self.mean) / self.std
        f = X.shape[1]
        params = torch.zeros(f + 1, n_classes, dtype=self.dtype, device=X.device, requires_grad=True)
        opt = torch.optim.LBFGS([params], lr=1, max_iter=self.max_iter, tolerance_grad=1e-10,
                                tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            w, b = params[:f], params[f]
            loss = F.cross_entropy(xs @ w + b, y) + self.l2 / 2 * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = params[:f].detach(), params[f].detach()
        return self

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise ValueError("the probe is not fitted")
        return (X.to(self.dtype) - self.mean) / self.std @ self.weight + self.bias

    @torch.no_grad()
    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        """Class probabilities [n, n_classes] of features ``X`` [n, f]."""
        return torch.softmax(self._logits(X), dim=1)

    @torch.no_grad()
    def accuracy(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Share of samples whose most probable class is ``y``."""
        return (self._logits(X).argmax(dim=1) == y.to(self.weight.device)).double().mean().item()

    @torch.no_grad()
    def log_likelihood(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Mean log-probability of the true class ``y`` (nats; 0 is perfect)."""
        return -F.cross_entropy(self._logits(X), y.to(device=self.weight.device, dtype=torch.int64)).item()


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of ``scores`` ranking the ``positive`` samples first: Σ (R_i − R_{i−1}) P_i
    over the distinct thresholds from the highest score down (tied scores are one threshold), as
    ``sklearn.metrics.average_precision_score`` computes it. NaN when nothing is positive."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores for {len(positive)} labels")
    n_pos = int(positive.sum())
    if not n_pos:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    # The last sample of each run of tied scores: where a threshold at that score cuts.
    cut = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp = np.cumsum(positive[order])[cut]
    return float(np.sum(np.diff(tp, prepend=0) / n_pos * (tp / (cut + 1))))


def _class_sums(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Σ of the rows of ``z`` of each class, float64 [n_classes, d], in row chunks."""
    sums = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, device=z.device)
    rows = _rows_per_chunk(8 * z.shape[1])
    for lo in range(0, len(z), rows):
        sums.index_add_(0, y[lo:lo + rows], z[lo:lo + rows].double())
    return sums


def sparse_probe(z: torch.Tensor, y: torch.Tensor, n_classes: int, ks: Sequence[int] = (1, 5), *,
                 test: tuple[torch.Tensor, torch.Tensor], l2: float = 1e-4) -> dict[str, Any]:
    """k-sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack"): per class, one
    against the rest, keep the k latents whose mean activation on the class exceeds their mean
    on the rest by the most (the mean-difference selection, on the training split ``z`` [n,
    d_sae], ``y`` [n]), fit a binary :class:`LogisticProbe` on those k, and score it on the
    ``test`` split (codes, class ids).

    Returns ``accuracy_k{k}`` and ``ap_k{k}`` for each k in ``ks``: the mean over classes of the
    test accuracy and of the test average precision of the probe's probability; ``latents``:
    per class, the chosen latents, best first (the probe with k latents uses the first k; empty
    for a class without both positives and negatives in training); ``n_classes_scored``: the
    classes the means are over (those with positives and negatives in training and positives
    in test)."""
    z_test, y_test = test
    ks = sorted(set(ks))
    if ks[0] < 1 or ks[-1] > z.shape[1]:
        raise ValueError(f"k must be in [1, {z.shape[1]}] (got {ks})")
    y = y.to(device=z.device, dtype=torch.int64)
    y_test = y_test.to(device=z_test.device, dtype=torch.int64)
    sums = _class_sums(z, y, n_classes)
    counts = torch.bincount(y, minlength=n_classes).tolist()
    total, n = sums.sum(dim=0), len(z)
    latents: list[list[int]] = []
    accuracy: dict[int, list[float]] = {k: [] for k in ks}
    ap: dict[int, list[float]] = {k: [] for k in ks}
    for c in range(n_classes):
        if not 0 < counts[c] < n:
            latents.append([])
            continue
        diff = sums[c] / counts[c] - (total - sums[c]) / (n - counts[c])
        best = diff.argsort(descending=True, stable=True)[:ks[-1]]
        latents.append(best.tolist())
        positive = y_test == c
        if not positive.any():
            continue
        for k in ks:
            cols = best[:k]
            probe = LogisticProbe(l2).fit(z[:, cols], (y == c).long(), 2)
            test_cols = z_test[:, cols.to(z_test.device)].to(z.device)
            accuracy[k].append(probe.accuracy(test_cols, positive.long()))
            score = probe.predict_proba(test_cols)[:, 1]
            ap[k].append(average_precision(score.cpu().numpy(), positive.cpu().numpy()))
    out: dict[str, Any] = {}
    for k in ks:
        out[f"accuracy_k{k}"] = float(np.mean(accuracy[k])) if accuracy[k] else math.nan
        out[f"ap_k{k}"] = float(np.mean(ap[k])) if ap[k] else math.nan
    out["latents"] = latents
    out["n_classes_scored"] = len(accuracy[ks[0]])
    return out


@dataclass
class Probe1dResult:
    """How well single latents predict patch labels (saev's probe1d), on CPU:

    - ``r`` [m, c]: Probe R of each (latent, class), 1 − loss / loss of the class prior (the
      bias-only probe), the loss the mean binary cross entropy; NaN for a class not present;
    - ``weight``, ``bias`` [m, c]: each probe's parameters (the weight in activation units);
    - ``best_latent`` [c]: each class's latent of highest R, −1 for a class not present;
    - ``ap`` [c]: average precision of the best latent's activation (negated where its weight
      is negative) as a score for the class over patches;
    - ``top_labels`` [c, K]: the labels of the best latent's K patches of highest such score,
      the highest first (ties: the lower patch index).

    A class is present when some patches are of it and some are not."""

    r: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    best_latent: torch.Tensor
    ap: torch.Tensor
    top_labels: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        """Which classes are present [c] (bool)."""
        return self.best_latent >= 0

    @property
    def map(self) -> float:
        """Mean AP over the classes present."""
        return self.ap[self.present].mean().item()

    def purity_at(self, k: int = 16) -> torch.Tensor:
        """Per class [c], the share of its best latent's top-k patches labelled with it; NaN for
        a class not present."""
        if not 0 < k <= self.top_labels.shape[1]:
            raise ValueError(f"k must be in [1, {self.top_labels.shape[1]}] (got {k})")
        own = torch.arange(len(self.top_labels))[:, None]
        purity = (self.top_labels[:, :k] == own).double().mean(dim=1)
        return purity.masked_fill(~self.present, math.nan)

    def coverage(self, tau: float = 0.3) -> float:
        """Share of the classes present whose best latent reaches an AP of ``tau``."""
        return (self.ap[self.present] >= tau).double().mean().item()


# Live float64 [nnz, classes] temporaries of one Newton pass (logits, probabilities, products).
_PASS_TEMPORARIES = 10


def _newton_stats(v, cols, y, n0, pos0, w, b, n):
    """Mean loss, gradient and Hessian (b, w) of every (latent, class) 1-D logistic probe in a
    cell [mc, cs]: the nonzero activations ``v`` [nnz] of the chunk's latents ``cols`` [nnz]
    with labels ``y`` [nnz, cs] directly, and each latent's ``n0`` zero activations (``pos0``
    of them positive) in closed form, since their logit is the bias alone."""

    def per_latent(vals: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(w).index_add_(0, cols, vals)

    t = v[:, None] * w[cols] + b[cols]
    p = torch.sigmoid(t)
    # σ(t)σ(−t), not p(1 − p), which is 0 once p rounds to 1; softplus's threshold is raised
    # from 20 (an error of e^-20 per sample) to where log(1 + e^t) and t agree in float64.
    s = p * torch.sigmoid(-t)
    resid = p - y
    p0 = torch.sigmoid(b)
    s0 = p0 * torch.sigmoid(-b)
    n0 = n0[:, None]
    loss = per_latent(F.softplus(t, threshold=40) - y * t) + n0 * F.softplus(b, threshold=40) - pos0 * b
    g_b = per_latent(resid) + n0 * p0 - pos0
    g_w = per_latent(resid * v[:, None])
    h_bb = per_latent(s) + n0 * s0
    sv = s * v[:, None]
    h_bw = per_latent(sv)
    h_ww = per_latent(sv * v[:, None])
    return loss / n, g_b / n, g_w / n, h_bb / n, h_bw / n, h_ww / n


def _fit_cell(v, cols, y, n0, pos0, prior, present, n, ridge, n_iter, tol):
    """(w, b, loss) [mc, cs] of the 1-D probes of one cell (see :func:`_newton_stats`): damped
    Newton (Levenberg–Marquardt) on the mean loss + ``ridge`` / 2 · w², from the class prior
    (w 0, b its logit: the bias-only probe), a step kept only where it lowers the objective.
    A pair iterates until its Newton decrement is below ``tol`` or for ``n_iter`` steps, on its
    own whatever the other pairs of the cell do, so the chunking never changes a result; the
    classes not ``present`` [cs] are not fitted."""
    mc, cs = pos0.shape
    w = torch.zeros(mc, cs, dtype=torch.float64, device=v.device)
    b = torch.logit(prior).expand(mc, cs).clone()
    damping = torch.full_like(w, 1e-3)
    stats = _newton_stats(v, cols, y, n0, pos0, w, b, n)
    active = present.expand(mc, cs).clone()
    for _ in range(n_iter):
        loss, g_b, g_w, h_bb, h_bw, h_ww = stats
        g_w = g_w + ridge * w
        h_ww = h_ww + ridge
        # gᵀH⁻¹g, twice what a full Newton step would gain: near 0 at the optimum whatever the
        # damping. NaN (a singular Hessian) keeps the pair going.
        decrement = (h_ww * g_b * g_b - 2 * h_bw * g_b * g_w + h_bb * g_w * g_w) / (h_bb * h_ww - h_bw * h_bw)
        active &= ~(decrement <= tol)
        if not active.any():
            break
        # Marquardt's scaling (the damping is relative to the curvature), floored by the ridge.
        a_bb = h_bb + damping * h_bb.clamp_min(ridge)
        a_ww = h_ww + damping * h_ww.clamp_min(ridge)
        det = a_bb * a_ww - h_bw * h_bw
        step_b = -(a_ww * g_b - h_bw * g_w) / det
        step_w = -(a_bb * g_w - h_bw * g_b) / det
        move = active & torch.isfinite(step_b) & torch.isfinite(step_w)
        new_w = torch.where(move, w + step_w, w)
        new_b = torch.where(move, b + step_b, b)
        new = _newton_stats(v, cols, y, n0, pos0, new_w, new_b, n)
        better = move & (new[0] + ridge / 2 * new_w.pow(2) < loss + ridge / 2 * w.pow(2))
        w, b = torch.where(better, new_w, w), torch.where(better, new_b, b)
        stats = tuple(torch.where(better, a, c) for a, c in zip(new, stats, strict=True))
        damping = torch.where(better, (damping / 10).clamp_min(1e-12), torch.where(active, damping * 10, damping))
    return w, b, stats[0]


@torch.no_grad()
def probe1d(acts: torch.Tensor, labels: torch.Tensor, n_classes: int, *, ridge: float = 1e-6,
            n_iter: int = 50, tol: float = 1e-12, max_bytes: int = CHUNK_BYTES,
            top_k: int = 1024) -> Probe1dResult:
    """For every (latent, class), a 1-D logistic regression of (label == class) on the latent's
    activation, ``acts`` [n, m] over patches whose class ids are ``labels`` [n] (saev's probe1d;
    design brief §13). Each probe has a weight and a bias; all are fitted at once, vectorised
    over (latent, class), with damped Newton steps on a 2×2 Hessian per pair, in float64.
    Activations are scaled per latent to unit root mean square while fitting (the ``ridge``
    on the weight is then the same for every latent), and returned in activation units.

    Zero activations are folded in closed form (their logit is the bias alone), so the work is
    over the nonzeros: sparse SAE codes cost their density, dense scores (:func:`pca_scores`,
    :func:`kmeans_scores`) all of n × m. Latents go in chunks and classes in slabs sized so
    that the pass's float64 [nonzeros, classes] temporaries stay under about ``max_bytes`` in
    all (peak memory beyond ``acts``, measured on the CPU at n 100,000, m 1,024, 20 classes:
    511 MB at the default 512 MiB, 151 MB at 64 MiB), unless one latent's nonzeros exceed
    that. Smaller cells run faster on a CPU (15 s against 35 s on one core there); the default
    suits a GPU. ``top_k`` patches are kept per class for :meth:`Probe1dResult.purity_at`."""
    n, m = acts.shape
    if not n or len(labels) != n:
        raise ValueError(f"need labels for each of n > 0 patches (got {len(labels)} for {n})")
    device = acts.device
    labels = labels.to(device=device, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=n_classes).double()
    if len(counts) > n_classes:
        raise ValueError(f"labels go up to {len(counts) - 1}, above n_classes - 1 = {n_classes - 1}")
    present = (counts > 0) & (counts < n)
    prior = counts / n
    base_loss = -(torch.xlogy(prior, prior) + torch.xlogy(1 - prior, 1 - prior))
    fit_prior = torch.where(present, prior, 0.5)  # an absent class has no logit (and no fit)

    # Nonzeros per latent, counted over row blocks: a sum of bools makes an int64 copy first.
    block = _rows_per_chunk(9 * m, max_bytes)
    nnz = sum((acts[r:r + block] != 0).sum(dim=0) for r in range(0, n, block)).tolist()
    cell = max(1, max_bytes // (8 * _PASS_TEMPORARIES))  # float64 entries of one [nnz, cs] temporary
    weight = torch.zeros(m, n_classes, dtype=torch.float64)
    bias, loss = torch.zeros_like(weight), torch.zeros_like(weight)
    lo = 0
    while lo < m:
        hi, chunk_nnz = lo + 1, nnz[lo]
        while hi < m and chunk_nnz + nnz[hi] <= cell:
            chunk_nnz += nnz[hi]
            hi += 1
        x = acts[:, lo:hi]
        rows, cols = x.nonzero(as_tuple=True)
        v = x[rows, cols].double()
        scale = torch.zeros(hi - lo, dtype=torch.float64, device=device).index_add_(0, cols, v * v).div_(n).sqrt_()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        v = v / scale[cols]
        lab = labels[rows]
        n0 = (n - torch.bincount(cols, minlength=hi - lo)).double()
        slab = max(1, min(n_classes, cell // max(len(v), 1)))
        for c0 in range(0, n_classes, slab):
            c1 = min(c0 + slab, n_classes)
            y = (lab[:, None] == torch.arange(c0, c1, device=device)).double()
            pos0 = counts[c0:c1] - torch.zeros(hi - lo, c1 - c0, dtype=torch.float64, device=device).index_add_(0, cols, y)
            w, b, l_cell = _fit_cell(v, cols, y, n0, pos0, fit_prior[c0:c1], present[c0:c1], n, ridge, n_iter, tol)
            weight[lo:hi, c0:c1] = (w / scale[:, None]).cpu()
            bias[lo:hi, c0:c1], loss[lo:hi, c0:c1] = b.cpu(), l_cell.cpu()
        lo = hi

    present, base_loss = present.cpu(), base_loss.cpu()
    r = (1 - loss / base_loss).masked_fill(~present, math.nan)
    best = r.nan_to_num(nan=-math.inf).argmax(dim=0).masked_fill(~present, -1)
    ap = torch.full((n_classes,), math.nan, dtype=torch.float64)
    top = min(top_k, n)
    top_labels = torch.full((n_classes, top), -1, dtype=torch.int64)
    labels_cpu = labels.cpu()
    for c in present.nonzero().flatten().tolist():
        latent = best[c].item()
        sign = -1.0 if weight[latent, c] < 0 else 1.0
        score = (sign * acts[:, latent].double()).cpu()
        ap[c] = average_precision(score.numpy(), (labels_cpu == c).numpy())
        top_labels[c] = labels_cpu[score.argsort(descending=True, stable=True)[:top]]
    return Probe1dResult(r=r, weight=weight, bias=bias, best_latent=best, ap=ap, top_labels=top_labels)


@torch.no_grad()
def pca_scores(x: torch.Tensor, n_components: int) -> torch.Tensor:
    """The projections [n, n_components] of the centred rows of ``x`` [n, d] on its top principal
    components, the most variance first (a probe1d baseline). Each component's sign makes its
    largest-magnitude loading positive, as scikit-learn's PCA does. Covariance and projections
    are float64, in row chunks."""
    n, d = x.shape
    if not 0 < n_components <= d:
        raise ValueError(f"n_components must be in [1, {d}] (got {n_components})")
    rows = _rows_per_chunk(8 * d)
    mean = sum(x[lo:lo + rows].double().sum(dim=0) for lo in range(0, n, rows)) / n
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for lo in range(0, n, rows):
        xc = x[lo:lo + rows].double() - mean
        cov.addmm_(xc.T, xc)
    # eigh sorts eigenvalues ascending; the top components are its last columns.
    components = torch.linalg.eigh(cov / n).eigenvectors[:, -n_components:].flip(1)
    peak = components.abs().argmax(dim=0)
    components = components * components[peak, torch.arange(n_components, device=x.device)].sign()
    dtype = _float_dtype(x.dtype)
    return torch.cat([((x[lo:lo + rows].double() - mean) @ components).to(dtype) for lo in range(0, n, rows)])


@torch.no_grad()
def kmeans_scores(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Closeness [n, k] of each row of ``x`` [n, d] to each of ``k`` k-means centroids: the
    negative squared distance, higher is closer (a probe1d baseline). k-means++ seeding
    (Arthur & Vassilvitskii 2007) from a CPU generator seeded with ``seed``, so a seed picks
    the same points on any device, then at most ``iters`` Lloyd steps (an empty cluster keeps
    its centroid); float64 throughout, on one float64 copy of ``x``."""
    n, dtype = len(x), _float_dtype(x.dtype)
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}] (got {k})")
    x = x.double()
    sq = x.pow(2).sum(dim=1)

    def sq_distances(centroids: torch.Tensor) -> torch.Tensor:  # [n, len(centroids)]
        return (sq[:, None] - 2 * x @ centroids.T + centroids.pow(2).sum(dim=1)).clamp_min_(0)

    gen = torch.Generator().manual_seed(seed)
    picks = [int(torch.randint(n, (1,), generator=gen))]
    d2 = sq_distances(x[picks])[:, 0]
    for _ in range(1, k):
        weights = d2.cpu()
        if weights.sum() > 0:
            pick = int(torch.multinomial(weights, 1, generator=gen))
        else:  # every point sits on a centroid already
            pick = int(torch.randint(n, (1,), generator=gen))
        picks.append(pick)
        d2 = torch.minimum(d2, sq_distances(x[[pick]])[:, 0])
    centroids = x[picks]
    assign = None
    for _ in range(iters):
        nearest = sq_distances(centroids).argmin(dim=1)
        if assign is not None and torch.equal(nearest, assign):
            break
        assign = nearest
        size = torch.bincount(assign, minlength=k)[:, None]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(size > 0, sums / size.clamp_min(1), centroids)
    return -sq_distances(centroids).to(dtype)


@torch.no_grad()
def stability(W_a: torch.Tensor, W_b: torch.Tensor) -> dict[str, float | int]:
    """How far two SAEs (say, two seeds) learned the same features: the one-to-one matching of
    their unit decoder rows ``W_a`` [d_sae, d_in] and ``W_b`` [d_sae', d_in] of highest total
    cosine (Hungarian algorithm), and of the min(d_sae, d_sae') matched pairs the
    ``mean_cosine``, the ``share_above_0_9`` with cosine above 0.9 and ``n_matched``.

    The matching is O(d_sae³) on the CPU: at d_sae 4096 (d_in 768) it took 1.4 s for two
    random decoders and 0.16 s for a decoder against a noisy permutation of itself, scipy
    1.17 on one core; the cosine matrix is d_sae × d_sae' float64 in memory."""
    a = F.normalize(W_a.double(), dim=1)
    b = F.normalize(W_b.double().to(a.device), dim=1)
    cos = (a @ b.T).cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    matched = cos[rows, cols]
    return {"mean_cosine": float(matched.mean()), "share_above_0_9": float((matched > 0.9).mean()),
            "n_matched": len(rows)}
