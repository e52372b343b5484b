"""Training configuration: one SAE (:class:`TrainConfig`, also the ``vitscope train`` CLI) and
sweeps of many SAEs trained from one pass over the data (:class:`SweepConfig`, a TOML or YAML
file and/or ``--grid`` axes)."""

from __future__ import annotations

import itertools
import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from vitscope.hashing import content_id
from vitscope.sae import SCHEMA_VERSION

TokenKind = Literal["cls", "registers", "patches", "all"]
Variant = Literal["relu", "topk", "batchtopk", "matryoshka", "jumprelu"]
SPARSE_CODE_VARIANTS = ("topk", "batchtopk", "matryoshka")


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
    variant: Variant = "relu"
    """SAE family: relu (L1 penalty), topk, batchtopk (threshold at inference), matryoshka
    (nested prefixes on BatchTopK), jumprelu (learned thresholds, L0 penalty)."""
    expansion: int = 16
    """d_sae = expansion * d_in (ignored when d_sae is given)."""
    d_sae: int | None = None
    """Number of latents (overrides expansion)."""
    k: int = 32
    """topk/batchtopk/matryoshka: active latents per token (on average for the batch variants)."""
    l1_coeff: float = 5.0
    """relu: weight of the L1 penalty (on inputs scaled to norm sqrt(d_in)); larger = sparser."""
    l0_coeff: float = 0.5
    """jumprelu: weight of the L0 penalty; larger = sparser."""
    sparsity_warmup_frac: float = 0.05
    """relu/jumprelu: ramp the sparsity penalty up from 0 over this fraction of training (avoids early dead latents)."""
    aux_coeff: float = 1 / 32
    """topk/batchtopk/matryoshka: weight of the AuxK loss that trains dead latents on the residual."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; default d_in / 2."""
    dead_window: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead (AuxK, live figures)."""
    prefixes: tuple[int, ...] = ()
    """matryoshka: nested prefix sizes, ascending, the last = d_sae; default d_sae/16, /8, /4, /2, 1."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the straight-through kernel around each threshold."""
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
    eval_tokens: int = 1 << 18
    """Tokens in the final evaluation pass that produces the published metrics."""
    checkpoint_every: int = 100_000_000
    """Save a resumable state every this many tokens under runs/<run_id>/ (0: never)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    autocast: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    sparse: Literal["auto", "off", "decode", "all"] = "auto"
    """topk/batchtopk/matryoshka: decode by gathering the selected decoder rows instead of a dense
    matmul (decode; not for matryoshka), and also backpropagate into the encoder through the
    selected latents only (all); auto = all on CPU, off on CUDA."""
    cuda_graphs: bool = True
    """On CUDA, capture each SAE's training step as a CUDA graph once its shape is fixed and
    replay it (a step of a small SAE is bound by kernel launches, not the GPU). Each graph keeps
    its step's memory to itself: turn off if a large sweep runs out of GPU memory."""
    wandb_project: str | None = None
    """Log live metrics to this Weights & Biases project (one W&B run per SAE; needs `pip install wandb`)."""
    progress: bool = True

    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


# Settings of the data pass, which every SAE of a sweep must share; the others are per SAE.
SHARED_FIELDS = ("activations", "store", "tokens", "batch_size", "n_tokens", "data_seed", "buffer_tokens",
                 "chunk_tokens", "init_sample", "eval_tokens", "checkpoint_every", "device", "autocast",
                 "cuda_graphs", "wandb_project", "progress")

# Hyper-parameters that shape each family's model (and so its id); the rest are ignored by it.
_VARIANT_FIELDS: dict[str, tuple[str, ...]] = {
    "relu": ("l1_coeff", "sparsity_warmup_frac"),
    "topk": ("k", "aux_coeff", "aux_k", "dead_window"),
    "batchtopk": ("k", "aux_coeff", "aux_k", "dead_window"),
    "matryoshka": ("k", "aux_coeff", "aux_k", "dead_window", "prefixes"),
    "jumprelu": ("l0_coeff", "sparsity_warmup_frac", "jumprelu_bandwidth"),
}
_COMMON_FIELDS = ("variant", "lr", "lr_warmup_frac", "lr_decay_frac", "b_dec_init", "seed", "tokens", "batch_size",
                  "buffer_tokens", "chunk_tokens", "init_sample")


def default_prefixes(d_sae: int) -> tuple[int, ...]:
    """Matryoshka prefixes that double: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae."""
    return tuple(sorted({max(1, d_sae >> s) for s in (4, 3, 2, 1, 0)}))


def hyper_parameters(cfg: TrainConfig, set_id: str, layer: int, d_in: int, d_sae: int,
                     n_tokens: int) -> dict[str, Any]:
    """Everything that determines the trained model, defaults resolved: what its id hashes.

    Execution choices (device, autocast, sparse kernels, checkpointing, logging) change rounding,
    not the model asked for, and stay out."""
    d = asdict(cfg)
    hyper = {k: d[k] for k in _COMMON_FIELDS + _VARIANT_FIELDS[cfg.variant]}
    hyper.update(set=set_id, layer=layer, d_sae=d_sae, n_tokens=n_tokens, data_seed=cfg.resolved_data_seed,
                 tokens=list(cfg.tokens))
    if "aux_k" in hyper:
        hyper["aux_k"] = cfg.aux_k or d_in // 2
    if "prefixes" in hyper:
        hyper["prefixes"] = list(cfg.prefixes or default_prefixes(d_sae))
    return hyper


def sae_id(hyper: dict[str, Any]) -> str:
    return content_id({"schema": SCHEMA_VERSION, **hyper})


# --- sweeps ------------------------------------------------------------------------------------

@dataclass
class SweepConfig:
    """Train many SAEs from one pass over an activation set: each batch is read once and
    given to every SAE. Each SAE keeps its own seed, optimiser and schedule, and is published
    as its own checkpoint (skipped if already published).

    The SAEs are those of --file (TOML or YAML: shared settings at the top level, a [grid]
    table of axes to cross, and/or a list [[sae]] of per-SAE settings), crossed with --grid."""

    file: str | None = None
    """Sweep file (.toml, .yaml or .yml)."""
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
    raise ValueError(f"sweep file {path}: use .toml, .yaml or .yml")


_HINTS = typing.get_type_hints(TrainConfig)
_NAMES = {f.name for f in fields(TrainConfig)}


def _coerce(key: str, value: Any) -> Any:
    """File values -> TrainConfig types (lists -> tuples, 1e8 -> int where an int is wanted)."""
    if key not in _NAMES:
        raise ValueError(f"unknown setting {key!r}; settings are TrainConfig's fields: {sorted(_NAMES)}")
    hint = str(_HINTS[key])
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, float) and "int" in hint and "float" not in hint and value.is_integer():
        return int(value)
    return value


def sweep_configs(cfg: SweepConfig) -> list[TrainConfig]:
    """The sweep's SAEs as one TrainConfig each (shared settings identical in all)."""
    spec = _read_file(cfg.file) if cfg.file else {}
    grid = dict(spec.pop("grid", None) or {})
    entries = list(spec.pop("sae", None) or [{}])
    grid.update(_parse_assignments(cfg.grid, many=True))
    named = {k: v for k, v in (("activations", cfg.activations), ("store", cfg.store)) if v is not None}
    base = {**spec, **named, **_parse_assignments(cfg.set, many=False)}
    for key in [*grid, *(k for e in entries for k in e)]:
        if key in SHARED_FIELDS:
            raise ValueError(f"{key!r} is shared by the whole sweep (one data pass): set it once, not per SAE")
    if "activations" not in base:
        raise ValueError("the sweep names no activation set: add activations = \"<set id>\" or --set activations=<id>")
    # One data order for the sweep, whatever each SAE's own seed.
    base.setdefault("data_seed", base.get("seed", 0))
    axes = [[(key, v) for v in (values if isinstance(values, list) else [values])] for key, values in grid.items()]
    out = []
    for entry in entries:
        for combo in itertools.product(*axes):
            settings = {**base, **entry, **dict(combo)}
            out.append(TrainConfig(**{k: _coerce(k, v) for k, v in settings.items()}))
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
