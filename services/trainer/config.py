"""Training configuration: one SAE (:class:`TrainConfig`, also the ``vitscope train`` CLI) and
sweeps of many SAEs trained from one pass over the data (:class:`SweepConfig`, a TOML, YAML or JSON
file and/or ``--grid`` axes)."""

from __future__ import annotations

import itertools
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from vitscope.hashing import content_id
from vitscope.sae import SCHEMA_VERSION, ReluHyper, ReluSae, Sae, SaeHyper, sae_class

TokenKind = Literal["cls", "registers", "patches", "all"]


class ConfigError(ValueError):
    """A training or sweep setting that does not exist, or does not belong to the chosen family."""


@dataclass
class TrainConfig:
    """Train a sparse autoencoder on activations from `vitscope extract`."""

    activations: str
    """Activation set id (printed by `vitscope extract`)."""
    store: str = ".vitscope/store"
    """Store holding the activations; the SAE is published there too."""
    layer: int | None = None
    """Layer to train on (absolute or as requested at extraction, e.g. -2); default: the set's deepest."""
    tokens: tuple[TokenKind, ...] = ("patches",)
    """Which tokens train the SAE. Patches are what heatmaps and top-k patches show."""
    sae: SaeHyper = field(default_factory=ReluHyper)
    """The SAE family and its settings, e.g. TopKHyper(k=64) (on the command line: --variant and
    that family's options)."""
    expansion: int = 16
    """d_sae = expansion * d_in (ignored when d_sae is given)."""
    d_sae: int | None = None
    """Number of latents (overrides expansion)."""
    dead_window: int = 10_000_000
    """A latent that has not fired for this many training tokens is dead (the AuxK loss trains
    it, and the published `dead` figure counts them at the end of training)."""
    lr: float = 4e-4
    """Adam learning rate (peak of the schedule)."""
    lr_warmup_frac: float = 0.02
    """Linear learning-rate warmup over this fraction of training."""
    lr_decay_frac: float = 0.2
    """Linear learning-rate decay to 0 over the last fraction of training."""
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    """Initial decoder bias, from the normalisation sample."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    n_tokens: int | None = None
    """Training tokens (more than one epoch is fine); default: one epoch."""
    seed: int = 0
    """Seeds the SAE's initialisation (and the data order, unless data_seed is given)."""
    data_seed: int | None = None
    """Seeds the data order; default: seed. SAEs of one sweep share it."""
    buffer_tokens: int = 1 << 18
    """Shuffle window in tokens (bounds memory: up to three windows per layer are held: one
    being read, one being emitted, one still referenced by queued batches)."""
    chunk_tokens: int = 8192
    """Tokens per read (whole images): the unit that is shuffled before the token-level shuffle."""
    init_sample: int = 1 << 16
    """Tokens sampled to fit the normalisation and initialise b_dec (tens of thousands, not tens)."""
    eval_tokens: int = 1 << 14
    """Tokens in the final pass that measures the published metrics (NMSE, L0, never-firing and
    dense latents), read in chunks spread over the set (fewer if the set has fewer); on the
    training set unless --heldout is given. Each token costs about half a training token (the
    encoder's product, no backward or optimiser), so the default costs about two steps of 4096.
    `vitscope evaluate` measures on every held-out token."""
    heldout: str | None = None
    """Activation set of images the SAE does not train on (extracted with the same model and
    settings) for the final metrics pass; default: the training set. `vitscope pipeline` passes
    its held-out set."""
    checkpoint_every: int = 100_000_000
    """Save a resumable state every this many tokens under runs/<run_id>/ (0: never)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...; 'cuda:all' (or a list such as
    'cuda:0,cuda:2') spreads a sweep's SAEs over those GPUs, balanced by size. Under torchrun each
    process trains on its own GPU (cuda:LOCAL_RANK) for auto or cuda (docs/distributed.md)."""
    autocast: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    sparse: Literal["auto", "off", "decode", "all"] = "auto"
    """Families that select a few latents per token (topk, batchtopk, matryoshka): decode by
    gathering the selected decoder rows instead of a dense matmul (decode; not for matryoshka),
    and also backpropagate into the encoder through the selected latents only (all); auto = all
    on CPU, off on CUDA."""
    cuda_graphs: bool = True
    """On CUDA, capture each SAE's training step as a CUDA graph once its shape is fixed and
    replay it (a step of a small SAE is bound by kernel launches, not the GPU). Each graph keeps
    its step's memory to itself: turn off if a large sweep runs out of GPU memory."""
    wandb_project: str | None = None
    """Log live metrics to this Weights & Biases project (one W&B run per SAE; needs `pip install wandb`)."""
    progress: bool = True
    """Show a progress bar with live NMSE, L0 and dead latents."""

    @property
    def variant(self) -> str:
        """The SAE family's name (``relu``, ``topk``, ...)."""
        return self.sae.variant

    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


# Settings of the data pass, which every SAE of a sweep must share; the others are per SAE.
SHARED_FIELDS = ("activations", "store", "tokens", "batch_size", "n_tokens", "data_seed", "buffer_tokens",
                 "chunk_tokens", "init_sample", "eval_tokens", "heldout", "checkpoint_every", "device", "autocast",
                 "cuda_graphs", "wandb_project", "progress")

# What shapes the trained model besides the family's own settings, and so goes into its id;
# the other fields are execution choices (device, kernels, checkpointing, logging), which
# change rounding, not the model asked for.
_MODEL_FIELDS = ("lr", "lr_warmup_frac", "lr_decay_frac", "b_dec_init", "seed", "batch_size", "buffer_tokens",
                 "chunk_tokens", "init_sample", "dead_window")


def hyper_parameters(cfg: TrainConfig, set_id: str, layer: int, d_sae: int, n_tokens: int,
                     hyper: SaeHyper) -> dict[str, Any]:
    """Everything that determines the trained model, defaults resolved (``hyper`` is the
    family's settings resolved for this size): what its id hashes."""
    return {**{k: getattr(cfg, k) for k in _MODEL_FIELDS}, "variant": cfg.variant, **hyper.to_json(),
            "set": set_id, "layer": layer, "d_sae": d_sae, "n_tokens": n_tokens, "data_seed": cfg.resolved_data_seed,
            "tokens": list(cfg.tokens)}


def sae_id(hyper: dict[str, Any]) -> str:
    return content_id({"schema": SCHEMA_VERSION, **hyper})


# --- one SAE's settings, as the command line and sweep files spell them -------------------------

@dataclass(frozen=True)
class FamilySetting:
    """A setting of one or more SAE families, as a flat option (``--k``, ``k = 32``)."""

    name: str
    type: Any
    defaults: dict[str, Any]
    """Default per family that has it."""


def family_settings() -> dict[str, FamilySetting]:
    """Every registered family's settings by name. Families may share a setting (topk,
    batchtopk and matryoshka all have ``k``) if they agree on its type."""
    out: dict[str, FamilySetting] = {}
    for variant, cls in Sae.registry.items():
        hints = typing.get_type_hints(cls.Hyper)
        for f in fields(cls.Hyper):
            s = out.setdefault(f.name, FamilySetting(f.name, hints[f.name], {}))
            if s.type != hints[f.name]:
                raise TypeError(f"SAE families disagree on the type of {f.name!r}: {s.type} and {hints[f.name]}")
            s.defaults[variant] = f.default
    return out


def train_fields() -> list[str]:
    """TrainConfig's settings other than the family (the flat form spells that as ``variant``
    plus the family's own settings)."""
    return [f.name for f in fields(TrainConfig) if f.name != "sae"]


def train_config(settings: dict[str, Any], cls: type[TrainConfig] | None = None) -> TrainConfig:
    """A TrainConfig (or ``cls``, a subclass) from flat settings: TrainConfig's fields,
    ``variant`` (default relu) and that family's settings. Raises :class:`ConfigError` for a
    setting no one has, or one of another family (``k`` for relu)."""
    settings = dict(settings)
    variant = settings.pop("variant", ReluSae.variant)
    try:
        family_cls = sae_class(variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    known = family_settings()
    own = [f.name for f in fields(family_cls.Hyper)]
    family = {k: settings.pop(k) for k in list(settings) if k in known}
    foreign = sorted(set(family) - set(own))
    if foreign:
        raise ConfigError(f"{', '.join(foreign)} {'is not a setting' if len(foreign) == 1 else 'are not settings'} "
                          f"of {variant} SAEs (a setting of {', '.join(sorted({v for k in foreign for v in known[k].defaults}))}); "
                          f"{variant}'s own settings: {', '.join(own) or 'none'}")
    unknown = sorted(set(settings) - set(train_fields()))
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"settings are variant ({', '.join(sorted(Sae.registry))}), "
                          f"{', '.join(sorted(train_fields()))} and the families' {', '.join(sorted(known))}")
    try:
        hyper = family_cls.Hyper(**family)
    except TypeError as e:
        raise ConfigError(f"{variant}: {e}") from None
    return (cls or TrainConfig)(**settings, sae=hyper)


def train_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The inverse of :func:`train_config`: flat settings (``variant`` and the family's own)."""
    flat = {k: getattr(cfg, k) for k in train_fields()}
    return {**flat, "variant": cfg.variant, **{f.name: getattr(cfg.sae, f.name) for f in fields(cfg.sae)}}


# --- sweeps ------------------------------------------------------------------------------------

@dataclass
class SweepConfig:
    """Train many SAEs from one pass over an activation set: each batch is read once and
    given to every SAE. Each SAE keeps its own seed, optimiser and schedule, and is published
    as its own checkpoint (skipped if already published).

    The SAEs are those of --file (TOML, YAML or JSON: shared settings at the top level, a [grid]
    table of axes to cross, and/or a list [[sae]] of per-SAE settings), crossed with --grid."""

    file: str | None = None
    """Sweep file (.toml, .yaml, .yml or .json)."""
    activations: str | None = None
    """Activation set id, if the file does not name it (same as --set activations=<id>)."""
    store: str | None = None
    """Store holding the activations, where the SAEs are published (default: the file's, else .vitscope/store)."""
    grid: tuple[str, ...] = ()
    """Axes to cross, e.g. --grid k=32,64 lr=1e-4,4e-4 layer=9,11."""
    set: tuple[str, ...] = ()
    """Settings for every SAE, overriding the file, e.g. --set activations=<id> n_tokens=100000000."""


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _parse_value(text: str) -> Any:
    tomllib = _toml()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as patches or topk


def _parse_assignments(items: tuple[str, ...], many: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE{',VALUE...' if many else ''}, got {item!r}")
        out[key.strip().replace("-", "_")] = ([_parse_value(v) for v in value.split(",")] if many
                                              else _parse_value(value))
    return out


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    text = p.read_text()
    if p.suffix == ".toml":
        return _toml().loads(text)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    if p.suffix == ".json":
        return json.loads(text)
    raise ConfigError(f"sweep file {path}: use a .toml, .yaml, .yml or .json file")


def _coerce(key: str, value: Any, types: dict[str, Any]) -> Any:
    """File values -> the setting's type (lists -> tuples, 1e8 -> int where an int is wanted)."""
    hint = str(types[key])
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, float) and "int" in hint and "float" not in hint and value.is_integer():
        return int(value)
    return value


def sweep_configs(cfg: SweepConfig) -> list[TrainConfig]:
    """The sweep's SAEs as one TrainConfig each (shared settings identical in all), duplicates
    dropped.

    A family's setting given for the whole sweep (top level, --set, or a --grid axis) applies to
    the SAEs of the families that have it (``--grid variant=relu,topk k=32,64`` crosses k with
    topk only) and must belong to at least one of them; a per-SAE ([[sae]]) setting must belong
    to that SAE's family."""
    spec = _read_file(cfg.file) if cfg.file else {}
    grid = dict(spec.pop("grid", None) or {})
    entries = list(spec.pop("sae", None) or [{}])
    grid.update(_parse_assignments(cfg.grid, many=True))
    named = {k: v for k, v in (("activations", cfg.activations), ("store", cfg.store)) if v is not None}
    base = {**spec, **named, **_parse_assignments(cfg.set, many=False)}
    known = family_settings()
    types = {**typing.get_type_hints(TrainConfig), "variant": str, **{k: s.type for k, s in known.items()}}
    for key in [*base, *grid, *(k for e in entries for k in e)]:
        if key not in types or key == "sae":
            raise ConfigError(f"unknown setting {key!r}; settings are variant ({', '.join(sorted(Sae.registry))}), "
                              f"{', '.join(sorted(train_fields()))} and the families' {', '.join(sorted(known))}")
    for key in [*grid, *(k for e in entries for k in e)]:
        if key in SHARED_FIELDS:
            raise ConfigError(f"{key!r} is shared by the whole sweep (one data pass): set it once, not per SAE")
    if "activations" not in base:
        raise ConfigError("the sweep names no activation set: add activations = \"<set id>\" or --set activations=<id>")
    # One data order for the sweep, whatever each SAE's own seed.
    base.setdefault("data_seed", base.get("seed", 0))
    axes = [[(key, v) for v in (values if isinstance(values, list) else [values])] for key, values in grid.items()]
    sweep_wide = {k for k in [*base, *grid] if k in known}
    used: set[str] = set()
    out: list[TrainConfig] = []
    for entry in entries:
        for combo in itertools.product(*axes):
            settings = {**base, **entry, **dict(combo)}
            variant = settings.get("variant", ReluSae.variant)
            own = {f.name for f in fields(sae_class(variant).Hyper)} if variant in Sae.registry else set()
            settings = {k: v for k, v in settings.items() if not (k in sweep_wide and k not in entry and k not in own)}
            used |= own & sweep_wide
            c = train_config({k: _coerce(k, v, types) for k, v in settings.items()})
            if c not in out:
                out.append(c)
    unused = sorted(sweep_wide - used)
    if unused:
        owners = "; ".join(f"{k} is a setting of " + ", ".join(sorted(known[k].defaults)) for k in unused)
        raise ConfigError(f"no SAE of this sweep is of a family with {', '.join(unused)} ({owners})")
    return out


def check_shared(cfgs: list[TrainConfig]) -> TrainConfig:
    """The first config, once every config agrees on the shared data-pass settings."""
    if not cfgs:
        raise ValueError("a sweep needs at least one SAE")
    first = cfgs[0]
    for c in cfgs[1:]:
        for name in SHARED_FIELDS:
            a, b = getattr(first, name), getattr(c, name)
            if name == "data_seed":
                a, b = first.resolved_data_seed, c.resolved_data_seed
            if a != b:
                raise ValueError(f"SAEs of one sweep must share {name!r} (one data pass), got {a!r} and {b!r}")
    return first
