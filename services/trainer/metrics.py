"""Evaluation metrics of SAEs, accumulated in float64: MSE, normalised MSE (fraction of
variance unexplained), L0, L1, never-firing and dense latents, and the log10 firing-frequency
histogram (definitions in :mod:`vitscope.metrics`)."""

from __future__ import annotations

import torch

from vitscope.metrics import dense_latents, frequency_histogram, never_fired
from vitscope.sae import Sae


class Accumulator:
    """Running sums for one SAE over batches of normalised inputs."""

    def __init__(self, sae: Sae, device: torch.device):
        self.sae = sae
        self.d_in = sae.cfg.d_in
        self.fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
        self.sx = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
        self.sse = self.sxx = self.l0 = self.l1 = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x_norm: torch.Tensor) -> None:
        # Sparse codes and a gather decode, as in training: dense [n, d_sae] codes and a dense
        # decode made this pass cost more per token than a training step.
        n = len(x_norm)
        codes = self.sae.encode_sparse_normalized(x_norm)
        x_hat = self.sae.decode_sparse_normalized(codes, n)
        x64 = x_norm.double()
        self.sse = self.sse + (x_hat.double() - x64).pow(2).sum()
        self.sx += x64.sum(dim=0)
        self.sxx = self.sxx + x64.pow(2).sum()
        active = codes.vals > 0
        self.l0 = self.l0 + active.sum()
        self.l1 = self.l1 + codes.vals.double().sum()
        self.fires.index_add_(0, codes.cols, active.double())
        self.n += n

    def result(self) -> tuple[dict[str, float], dict]:
        """(scalar metrics, log10 firing-frequency histogram as the SAE record stores it)."""
        n = self.n
        total_var = self.sxx.item() - self.sx.pow(2).sum().item() / n  # squared deviations from the mean
        freq = (self.fires / n).cpu().numpy()
        metrics = {
            "mse": self.sse.item() / (n * self.d_in),
            "nmse": self.sse.item() / max(total_var, 1e-12),
            "l0": self.l0.item() / n,
            "l1": self.l1.item() / n,
            "never_fired": never_fired(freq),
            "dense": dense_latents(freq),
            "eval_tokens": n,
        }
        return metrics, frequency_histogram(freq).to_json()
