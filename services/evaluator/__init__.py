"""Evaluator: is this SAE any good? Reconstruction and sparsity on held-out images, the SAE
spliced into its ViT (fraction of a readout recovered), probing, patch-level label alignment
against PCA and k-means, stability across seeds, ground truth on synthetic sets, and
and interventions through :mod:`vitscope.splice` (shared with the analyzer, which serves them).

Public API: :class:`EvaluateConfig` (``vitscope evaluate``), :func:`evaluate`, :class:`EvaluateResult`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    ".config": ("EvaluateConfig",),
    ".evaluation": ("EvaluateResult", "evaluate"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
