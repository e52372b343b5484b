"""Trainer: stream activation shards and train SAEs (one or a sweep per data pass).

Public API: :class:`TrainConfig` (``vitscope train``), :class:`SweepConfig` (``vitscope sweep``),
:func:`train`, :func:`train_sweep`, :func:`sweep_configs`, :class:`TrainResult`; the flat form of
a TrainConfig that the command line and sweep files use: :func:`train_config`,
:func:`train_settings`, :func:`family_settings`."""

from vitscope.lazy import lazy_exports

_EXPORTS = {
    ".config": ("ConfigError", "FamilySetting", "SweepConfig", "TrainConfig", "family_settings", "sweep_configs", "train_config", "train_settings"),
    ".training": ("TrainResult", "TrainingError", "train", "train_sweep"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
