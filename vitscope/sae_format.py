"""What an SAE checkpoint's ``cfg.json`` says, readable without torch: the record (provenance,
metrics, histogram), the architecture (:class:`SaeConfig`) and each family's hyper-parameters.

The analyzer lists SAEs and the explorer shows their health from these alone, so neither waits
for torch to import before answering. The models and the weights are :mod:`vitscope.sae`'s,
which re-exports every name here (``from vitscope.sae import SaeRecord`` is the usual spelling).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from vitscope.metrics import current_names
from vitscope.store import NotFound, Store

FORMAT = "vitscope.sae"
SCHEMA_VERSION = 2
"""2: a family's settings are one ``hyper`` object in cfg.json's ``config`` (1 had ``k`` and
``prefixes`` beside ``d_sae``; still read)."""
PREFIX = "saes"


@dataclass(frozen=True)
class SaeHyper:
    """Base of every family's hyper-parameters: what that family's loss and architecture need,
    typed, and nothing of any other family's. Each family declares its own subclass as ``Hyper``
    and registration ties the two (``Hyper.variant``): a subclass that names its ``variant`` is
    registered when defined (the built-in families' are, so that a checkpoint's config reads
    without importing their models), any other when its family's model class is."""

    variant: ClassVar[str] = ""
    knob: ClassVar[str] = ""
    """The setting that trades reconstruction for sparsity (named when training diverges)."""
    registry: ClassVar[dict[str, type[SaeHyper]]] = {}
    """Every family's hyper-parameter class by variant (their models: ``vitscope.sae.Sae.registry``)."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("variant"):
            cls.belong_to(cls.variant)

    @classmethod
    def belong_to(cls, variant: str) -> None:
        """Register this class as the settings of family ``variant``; a class belongs to one family."""
        if cls.__dict__.get("variant") not in (None, "", variant):
            raise TypeError(f"{cls.__name__} already belongs to family {cls.variant!r}")
        cls.variant = variant
        SaeHyper.registry[variant] = cls

    def resolved(self, d_in: int, d_sae: int) -> SaeHyper:
        """This with its size-dependent defaults filled in (what a checkpoint records)."""
        return self

    def warmup_fraction(self) -> float:
        """Fraction of training over which the trainer ramps the sparsity penalty up from 0."""
        return 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SaeHyper:
        """The settings in ``d`` that this family has (others are ignored: older checkpoints
        recorded every family's training settings side by side)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def unknown_variant(variant: str, known: Iterable[str]) -> ValueError:
    """The error for a family name that is not registered, listing the ``known`` ones."""
    return ValueError(f"unknown SAE variant {variant!r}; known: {', '.join(sorted(known))}")


def hyper_class(variant: str) -> type[SaeHyper]:
    """The hyper-parameter class of the family registered as ``variant``."""
    try:
        return SaeHyper.registry[variant]
    except KeyError:
        raise unknown_variant(variant, SaeHyper.registry) from None


@dataclass(frozen=True)
class SaeConfig:
    """Architecture of an SAE: its size and its family's settings (``hyper``; the family is
    ``hyper.variant``)."""

    d_in: int
    d_sae: int
    hyper: SaeHyper

    @property
    def variant(self) -> str:
        return self.hyper.variant

    @classmethod
    def of(cls, variant: str, d_in: int, d_sae: int, **settings: Any) -> SaeConfig:
        """The config of a ``variant`` SAE with that family's ``settings``, e.g.
        ``SaeConfig.of("topk", 768, 16384, k=64)``."""
        return cls(d_in, d_sae, hyper_class(variant)(**settings))

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "d_in": self.d_in, "d_sae": self.d_sae, "hyper": self.hyper.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any], training: dict[str, Any] | None = None) -> SaeConfig:
        """Read a config of any schema; for schema 1 (``k``/``prefixes`` beside the sizes) the
        family's settings come from those and the record's ``training`` settings."""
        hyper = d.get("hyper")
        if hyper is None:
            hyper = {**(training or {}), **{k: v for k, v in d.items() if k in ("k", "prefixes")}}
        return cls(int(d["d_in"]), int(d["d_sae"]), hyper_class(d["variant"]).from_json(hyper))


# --- the built-in families' settings (their models are in vitscope.sae) ------------------------
@dataclass(frozen=True)
class _PenaltyHyper(SaeHyper):
    sparsity_warmup_frac: float = 0.05
    """Ramp the sparsity penalty up from 0 over this fraction of training (avoids early dead latents)."""

    def warmup_fraction(self) -> float:
        return self.sparsity_warmup_frac


@dataclass(frozen=True)
class ReluHyper(_PenaltyHyper):
    variant: ClassVar[str] = "relu"
    knob: ClassVar[str] = "l1_coeff"
    l1_coeff: float = 5.0
    """Weight of the L1 penalty (on inputs scaled to norm sqrt(d_in)); larger = sparser."""


@dataclass(frozen=True)
class _SelectionHyper(SaeHyper):
    knob: ClassVar[str] = "k"
    k: int = 32
    """Active latents per token (on average over a batch for the batch families)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss that trains dead latents on the residual."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; default d_in / 2."""

    def resolved(self, d_in: int, d_sae: int) -> SaeHyper:
        return replace(self, aux_k=self.aux_k or d_in // 2)


@dataclass(frozen=True)
class TopKHyper(_SelectionHyper):
    variant: ClassVar[str] = "topk"


@dataclass(frozen=True)
class BatchTopKHyper(_SelectionHyper):
    variant: ClassVar[str] = "batchtopk"


@dataclass(frozen=True)
class MatryoshkaHyper(_SelectionHyper):
    variant: ClassVar[str] = "matryoshka"
    prefixes: tuple[int, ...] = ()
    """Nested prefix sizes, ascending, the last = d_sae; default d_sae/16, /8, /4, /2, 1."""

    def resolved(self, d_in: int, d_sae: int) -> SaeHyper:
        prefixes = self.prefixes or tuple(sorted({max(1, d_sae >> s) for s in (4, 3, 2, 1, 0)}))
        return replace(super().resolved(d_in, d_sae), prefixes=tuple(prefixes))


@dataclass(frozen=True)
class JumpReluHyper(_PenaltyHyper):
    variant: ClassVar[str] = "jumprelu"
    knob: ClassVar[str] = "l0_coeff"
    l0_coeff: float = 0.5
    """Weight of the L0 penalty; larger = sparser."""
    bandwidth: float = 0.05
    """Width of the straight-through kernel around each threshold."""


# --- the record ----------------------------------------------------------------------------------
@dataclass
class SaeRecord:
    """Everything in cfg.json besides the weights."""

    sae_id: str
    config: SaeConfig
    activation_set_id: str
    layer: int
    tokens: list[str]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    """Scalars only (mse, nmse, l0, ...), so that every consumer can tabulate them."""
    histogram: dict[str, Any] = field(default_factory=dict)
    """log10 firing-frequency histogram of the evaluation pass: ``log10_edges`` (bin edges),
    ``counts`` (latents per bin) and ``never`` (latents that never fired, off the log scale)."""
    model: str = ""
    """The ViT the activations came from, in words (e.g. ``ViT-B-16/openai``)."""
    model_record: dict[str, Any] = field(default_factory=dict)
    """The same ViT as its activation set's manifest records it (name, pretrained, options,
    init_seed): what :meth:`model_spec` rebuilds."""
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    def model_spec(self):
        """The :class:`vitscope.models.ModelSpec` of the ViT this SAE reads, for
        ``vitscope.load_vit(record.model_spec())``."""
        from vitscope.models import ModelSpec

        if not self.model_record:
            raise ValueError(f"SAE {self.sae_id} was published before checkpoints recorded their ViT; its activation "
                             f"set {self.activation_set_id} does: ModelSpec.from_record(set.manifest.model)")
        return ModelSpec.from_record(self.model_record)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SaeRecord:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an SAE checkpoint (format={d.get('format')!r})")
        if int(d.get("schema_version", 0)) > SCHEMA_VERSION:
            raise ValueError(
                f"checkpoint schema {d['schema_version']} is newer than this vitscope reads ({SCHEMA_VERSION}): upgrade vitscope"
            )
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["config"] = SaeConfig.from_json(d["config"], d.get("training"))
        kw["metrics"] = current_names(kw.get("metrics", {}))
        return cls(**kw)


def sae_prefix(sae_id: str) -> str:
    return f"{PREFIX}/{sae_id}"


def load_record(store: Store, sae_id: str) -> SaeRecord:
    try:
        return SaeRecord.from_json(json.loads(store.get_bytes(f"{sae_prefix(sae_id)}/cfg.json")))
    except NotFound:
        raise NotFound(f"no published SAE {sae_id!r} in {store.uri}") from None


def list_saes(store: Store) -> list[str]:
    """Ids of every published SAE in the store."""
    return [k.split("/")[1] for k in store.list(f"{PREFIX}/") if k.endswith("/cfg.json") and k.count("/") == 2]
