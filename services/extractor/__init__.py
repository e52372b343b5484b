"""Extractor: run a ViT over an image dataset and publish activation shards.

Public API: :class:`ExtractConfig` (also ``vitscope extract``), :func:`extract`, :class:`ExtractResult`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    ".config": ("ExtractConfig",),
    ".extraction": ("ExtractError", "ExtractResult", "extract"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
