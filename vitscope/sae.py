"""Sparse autoencoders and their checkpoint format.

A checkpoint is a folder ``saes/<sae_id>/`` in a store::

    sae.safetensors   weights and the normalisation constants (norm_mean, norm_scale)
    cfg.json          written last: schema version, variant, sizes, provenance and metrics

The normalisation (centre by the training mean, scale so the average norm is sqrt(d_in)) is
part of the model: :meth:`Sae.encode` applies it to raw ViT activations, so whoever loads a
checkpoint encodes exactly as training did.

Load one in a line::

    sae = vitscope.load_sae("s3://bucket/prefix/saes/0123abcd")
    latents = sae.encode(activations)        # raw activations in, sparse codes out
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vitscope.store import NotFound, Store, open_store

FORMAT = "vitscope.sae"
SCHEMA_VERSION = 1
PREFIX = "saes"


@dataclass
class SaeConfig:
    """Architecture of an SAE (what is needed to rebuild it, nothing about training)."""

    variant: str
    d_in: int
    d_sae: int


class Sae(nn.Module):
    """Base class: a linear encoder with a variant-specific activation, a linear decoder, and
    input normalisation stored as buffers. Subclasses register themselves by ``variant``."""

    variant: ClassVar[str]
    registry: ClassVar[dict[str, type[Sae]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        Sae.registry[cls.variant] = cls

    def __init__(self, cfg: SaeConfig):
        super().__init__()
        if cfg.variant != self.variant:
            raise ValueError(f"config is for variant {cfg.variant!r}, not {self.variant!r}")
        self.cfg = cfg
        d, m = cfg.d_in, cfg.d_sae
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.register_buffer("norm_mean", torch.zeros(d))
        self.register_buffer("norm_scale", torch.ones(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; encoder = decoder transpose (a known-good start)."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()

    # --- the model -------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations -> the space the SAE was trained in."""
        return (x.to(self.norm_mean.dtype) - self.norm_mean) * self.norm_scale

    def pre_acts(self, x_norm: torch.Tensor) -> torch.Tensor:
        return (x_norm - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_normalized(self, x_norm: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x_norm))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ViT activations [..., d_in] -> latent activations [..., d_sae]."""
        return self.encode_normalized(self.normalize(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> reconstruction in the normalised space."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode_normalized(x_norm)
        return self.decode(z), z

    # --- training helpers ------------------------------------------------------------------
    def loss(self, x_norm: torch.Tensor, **kw: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for one batch of normalised inputs and its parts."""
        raise NotImplementedError

    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row, so the optimiser step
        changes directions rather than fighting the unit-norm constraint."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec
        self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    def extra_config(self) -> dict[str, Any]:
        """Variant-specific architecture settings saved in cfg.json."""
        return {}


class ReluSae(Sae):
    """The classic: ReLU encoder, trained with an L1 penalty on latents weighted by decoder
    norms (so the penalty cannot be dodged by shrinking codes and growing decoder rows)."""

    variant = "relu"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x_norm: torch.Tensor, l1_coeff: float = 0.0, **_: float):
        x_hat, z = self(x_norm)
        recon = (x_hat - x_norm).pow(2).sum(dim=-1).mean()
        sparsity = (z * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return recon + l1_coeff * sparsity, {"recon": recon, "l1": sparsity, "z": z, "x_hat": x_hat}


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
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SaeRecord:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an SAE checkpoint (format={d.get('format')!r})")
        if int(d.get("schema_version", 0)) > SCHEMA_VERSION:
            raise ValueError(
                f"checkpoint schema {d['schema_version']} is newer than this vitscope reads ({SCHEMA_VERSION}): upgrade vitscope"
            )
        fields = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in fields}
        kw["config"] = SaeConfig(**d["config"])
        return cls(**kw)


def build_sae(cfg: SaeConfig) -> Sae:
    try:
        cls = Sae.registry[cfg.variant]
    except KeyError:
        raise ValueError(f"unknown SAE variant {cfg.variant!r}; known: {sorted(Sae.registry)}") from None
    return cls(cfg)


def sae_prefix(sae_id: str) -> str:
    return f"{PREFIX}/{sae_id}"


def save_sae(store: Store, sae: Sae, record: SaeRecord) -> None:
    """Publish a checkpoint: weights first, cfg.json last (readers trust only cfg.json)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    prefix = sae_prefix(record.sae_id)
    store.put_bytes(f"{prefix}/sae.safetensors", save(state))
    record.config = sae.cfg
    record.extra = {**record.extra, **sae.extra_config(), "norm_scale": float(sae.norm_scale)}
    store.put_bytes(f"{prefix}/cfg.json", json.dumps(record.to_json(), indent=1).encode())


def load_record(store: Store, sae_id: str) -> SaeRecord:
    try:
        return SaeRecord.from_json(json.loads(store.get_bytes(f"{sae_prefix(sae_id)}/cfg.json")))
    except NotFound:
        raise NotFound(f"no published SAE {sae_id!r} in {store.uri}") from None


def load_sae_from(store: Store, sae_id: str, device: str | torch.device = "cpu") -> tuple[Sae, SaeRecord]:
    """Load a published SAE as the variant it was saved as, with its normalisation."""
    from safetensors.torch import load

    record = load_record(store, sae_id)
    sae = build_sae(record.config)
    state = load(store.get_bytes(f"{sae_prefix(sae_id)}/sae.safetensors"))
    sae.load_state_dict(state, strict=True)
    return sae.requires_grad_(False).to(device).eval(), record


def load_sae(uri: str | os.PathLike, device: str | torch.device = "cpu") -> Sae:
    """Load an SAE from its URI, e.g. ``s3://bucket/prefix/saes/<id>`` or ``/path/store/saes/<id>``."""
    uri = os.fspath(uri).rstrip("/")
    root, sep, sae_id = uri.rpartition(f"/{PREFIX}/")
    if not sep or "/" in sae_id:
        raise ValueError(f"{uri!r} is not an SAE URI: expected <store>/{PREFIX}/<sae_id>")
    sae, _ = load_sae_from(open_store(root or "/"), sae_id, device)
    return sae


def list_saes(store: Store) -> list[str]:
    """Ids of every published SAE in the store."""
    return [k.split("/")[1] for k in store.list(f"{PREFIX}/") if k.endswith("/cfg.json") and k.count("/") == 2]


@torch.no_grad()
def fit_normalizer(sample: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean and scale so that (x - mean) * scale has average norm sqrt(d)."""
    sample = sample.double()
    mean = sample.mean(dim=0)
    avg_norm = (sample - mean).norm(dim=1).mean().item()
    scale = math.sqrt(sample.shape[1]) / max(avg_norm, 1e-12)
    return mean.float(), scale


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: robust to outlier tokens, unlike the mean."""
    x = x.double()
    y = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (y_new - y).norm() < eps * max(1.0, y.norm().item()):
            y = y_new
            break
        y = y_new
    return y.float()
