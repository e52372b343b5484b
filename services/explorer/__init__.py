"""Explorer: the Streamlit dashboard, talking to an analyzer over gRPC only.

Public API: :func:`run_explorer` and :func:`start_explorer` (``vitscope explore``) and
:func:`explorer_command`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    ".launch": ("explorer_command", "run_explorer", "start_explorer"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
