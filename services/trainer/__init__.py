"""Trainer: stream activation shards and train SAEs (one or a sweep per data pass).

Public API: :class:`TrainConfig` (``vitscope train``), :class:`SweepConfig` (``vitscope sweep``),
:func:`train`, :func:`train_sweep`, :func:`sweep_configs`, :class:`TrainResult`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    "SweepConfig": ".config",
    "TrainConfig": ".config",
    "TrainResult": ".training",
    "TrainingError": ".training",
    "sweep_configs": ".config",
    "train": ".training",
    "train_sweep": ".training",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
