"""Trainer: stream activation shards and train SAEs (one or a sweep per data pass).

Public API: :class:`TrainConfig` (``vitscope train``), :class:`SweepConfig` (``vitscope sweep``),
:func:`train`, :func:`train_sweep`, :func:`sweep_configs`, :class:`TrainResult`; the flat form of
a TrainConfig that the command line and sweep files use: :func:`train_config`,
:func:`train_settings`, :func:`family_settings`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    "ConfigError": ".config",
    "FamilySetting": ".config",
    "SweepConfig": ".config",
    "TrainConfig": ".config",
    "TrainResult": ".training",
    "TrainingError": ".training",
    "family_settings": ".config",
    "sweep_configs": ".config",
    "train": ".training",
    "train_config": ".config",
    "train_settings": ".config",
    "train_sweep": ".training",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
