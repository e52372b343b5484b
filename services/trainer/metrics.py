"""Evaluation metrics of SAEs, accumulated in float64: MSE, normalised MSE (fraction of
variance unexplained), L0, L1, dead and dense latents, and the log10 firing-frequency histogram."""

from __future__ import annotations

import numpy as np
import torch

from vitscope.sae import Sae

DENSE_FREQUENCY = 1e-2
LOG10_EDGES = np.arange(-8.0, 0.01, 0.5)  # frequencies down to 1e-8; 1.0 falls in the last bin


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
        x_hat, z = self.sae.forward_normalized(x_norm)
        x64 = x_norm.double()
        self.sse = self.sse + (x_hat.double() - x64).pow(2).sum()
        self.sx += x64.sum(dim=0)
        self.sxx = self.sxx + x64.pow(2).sum()
        active = z > 0
        self.l0 = self.l0 + active.sum()
        self.l1 = self.l1 + z.double().sum()
        self.fires += active.sum(dim=0)
        self.n += len(x_norm)

    def result(self) -> tuple[dict[str, float], dict]:
        """(scalar metrics, log10 firing-frequency histogram)."""
        n = self.n
        total_var = self.sxx.item() - self.sx.pow(2).sum().item() / n  # squared deviations from the mean
        freq = (self.fires / n).cpu().numpy()
        fired = freq[freq > 0]
        counts, _ = np.histogram(np.log10(fired), bins=LOG10_EDGES)
        metrics = {
            "mse": self.sse.item() / (n * self.d_in),
            "nmse": self.sse.item() / max(total_var, 1e-12),
            "l0": self.l0.item() / n,
            "l1": self.l1.item() / n,
            "dead": int((freq == 0).sum()),
            "dense": int((freq > DENSE_FREQUENCY).sum()),
            "eval_tokens": n,
        }
        hist = {"log10_edges": LOG10_EDGES.tolist(), "counts": counts.tolist(), "never": metrics["dead"]}
        return metrics, hist
