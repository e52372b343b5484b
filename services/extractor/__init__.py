"""Extractor: run a ViT over an image dataset and publish activation shards.

Public API: :class:`ExtractConfig` (also ``vitscope extract``), :func:`extract`, :class:`ExtractResult`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    "ExtractConfig": ".config",
    "ExtractError": ".extraction",
    "ExtractResult": ".extraction",
    "extract": ".extraction",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
