"""The report's plots, as PNG bytes by name: where a reader would rather look than read."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from vitscope.metrics import LOG10_BINS, LOG10_LOW


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def report_plots(report: dict[str, Any], frequency: np.ndarray, max_cosine: np.ndarray) -> dict[str, bytes]:
    """``frequency``: the latents' firing frequency on the evaluated tokens; ``max_cosine``: each
    latent's largest decoder cosine to another latent."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in threads

    plots: dict[str, bytes] = {}
    fig = Figure(figsize=(8, 3))
    left, right = fig.subplots(1, 2)
    fired = frequency[frequency > 0]
    left.hist(np.log10(fired), bins=np.linspace(LOG10_LOW, 0, LOG10_BINS + 1), color="#4c72b0")
    left.set(xlabel="log10 firing frequency", ylabel="latents",
             title=f"held-out firing ({int((frequency == 0).sum())} never fired)")
    right.hist(max_cosine, bins=np.linspace(-0.2, 1, 25), color="#dd8452")
    right.axvline(0.9, color="k", lw=0.8, ls="--")
    right.set(xlabel="max decoder cosine to another latent", ylabel="latents", title="duplicated features")
    plots["sparsity"] = _png(fig)

    sub = report.get("substitution", {})
    bars = {f"{name} {metric}": sub[name][metric]["recovered"]
            for name in ("linear_probe", "zero_shot") if "skipped" not in sub.get(name, {"skipped": ""})
            for metric in ("accuracy", "log_likelihood")}
    if bars:
        fig = Figure(figsize=(6, 2.6))
        ax = fig.subplots()
        ax.barh(list(bars), [0 if np.isnan(v) else v for v in bars.values()], color="#55a868")
        ax.axvline(1, color="k", lw=0.8, ls="--")
        ax.set(xlabel=f"fraction recovered (0: layer {sub.get('ablation', 'zero')}-ablated, 1: clean)",
               title="SAE spliced into the ViT")
        plots["substitution"] = _png(fig)

    align = report.get("label_alignment", {})
    if "skipped" not in align:
        fig = Figure(figsize=(6, 2.8))
        ax = fig.subplots()
        methods = ("sae", "pca", "kmeans")
        width = 0.8 / len(methods)
        x = np.arange(len(align["classes"]))
        for k, method in enumerate(methods):
            ax.bar(x + k * width, align[method]["ap"], width, label=f"{method} (mAP {align[method]['map']:.2f})")
        ax.set_xticks(x + width, align["classes"])
        ax.set(ylabel="AP of the best latent", ylim=(0, 1), title="patch label alignment")
        ax.legend(fontsize=8)
        plots["label_alignment"] = _png(fig)
    return plots
