"""Analyzer: per-latent statistics and top-k examples of an SAE, served over gRPC.

Public API: :class:`AnalyzeConfig` (``vitscope analyze``), :func:`analyze`, :class:`AnalyzeResult`;
:func:`list_analyses`; :class:`ServeConfig` (``vitscope serve``), :func:`serve` (a running server) and :func:`serve_forever`,
which raise :class:`InsecureBindError` rather than listen beyond loopback unauthenticated."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    ".analysis": ("AnalyzeResult", "analyze"),
    ".config": ("AnalyzeConfig", "ServeConfig"),
    ".results": ("list_analyses",),
    ".server": ("InsecureBindError", "serve", "serve_forever"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
