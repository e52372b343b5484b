"""Explorer: the Streamlit dashboard, talking to an analyzer over gRPC only.

Public API: :func:`run_explorer` (``vitscope explore``) and :func:`explorer_command`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    "explorer_command": ".launch",
    "run_explorer": ".launch",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
