"""Analyzer: per-latent statistics and top-k examples of an SAE, served over gRPC.

Public API: :class:`AnalyzeConfig` (``vitscope analyze``), :func:`analyze`, :class:`AnalyzeResult`;
:class:`ServeConfig` (``vitscope serve``), :func:`serve` (a running server) and :func:`serve_forever`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    "AnalyzeConfig": ".config",
    "AnalyzeResult": ".analysis",
    "ServeConfig": ".config",
    "analyze": ".analysis",
    "serve": ".server",
    "serve_forever": ".server",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
