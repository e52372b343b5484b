"""Sparse autoencoders and their checkpoint format.

A checkpoint is a folder ``saes/<sae_id>/`` in a store::

    sae.safetensors   weights, variant buffers (e.g. a BatchTopK threshold) and the
                      normalisation constants (norm_mean, norm_scale)
    cfg.json          written last: schema version, variant, sizes, provenance and metrics

The normalisation (centre by the training mean, scale so the average norm is sqrt(d_in)) is
part of the model: :meth:`Sae.encode` applies it to raw ViT activations, so whoever loads a
checkpoint encodes exactly as training did.

Families, one registry (:data:`Sae.registry`), each loading back as what it was saved as:

- ``relu``: ReLU encoder, L1 penalty weighted by decoder norms.
- ``topk``: keep the k largest pre-activations per token; AuxK loss revives dead latents.
- ``batchtopk``: keep the k * batch largest over the whole batch while training; at inference
  a stored threshold replaces the batch (so a token's code never depends on its neighbours).
- ``matryoshka``: BatchTopK whose nested latent prefixes must each reconstruct on their own.
- ``jumprelu``: a learned per-latent threshold, trained with an L0 penalty through
  straight-through estimators.

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
import torch.nn.functional as F
from torch import nn

from vitscope.store import NotFound, Store, open_store

FORMAT = "vitscope.sae"
SCHEMA_VERSION = 1
PREFIX = "saes"


@dataclass(frozen=True)
class SaeConfig:
    """Architecture of an SAE (what is needed to rebuild it, nothing about training)."""

    variant: str
    d_in: int
    d_sae: int
    k: int | None = None
    """Latents kept per token (topk), or on average per token (batchtopk, matryoshka)."""
    prefixes: tuple[int, ...] | None = None
    """Matryoshka: sizes of the nested latent prefixes, ascending, the last equal to d_sae."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SaeConfig:
        prefixes = d.get("prefixes")
        return cls(d["variant"], int(d["d_in"]), int(d["d_sae"]), d.get("k"),
                   None if prefixes is None else tuple(int(p) for p in prefixes))


class Sae(nn.Module):
    """Base class: a linear encoder with a variant-specific activation, a linear decoder, and
    input normalisation stored as buffers. Subclasses register themselves by ``variant``.

    Every ``loss`` returns ``(loss, parts)`` where ``parts`` always holds ``recon`` (mean over
    tokens of the squared error summed over dimensions), ``fires`` (per-latent count of
    tokens it fired on, [d_sae]) and ``l0`` (mean active latents per token): what the trainer
    needs for live figures and dead-latent tracking, whatever the variant.
    """

    variant: ClassVar[str]
    registry: ClassVar[dict[str, type[Sae]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "variant" in cls.__dict__:  # abstract intermediate classes name no variant
            Sae.registry[cls.variant] = cls

    def __init__(self, cfg: SaeConfig):
        super().__init__()
        if cfg.variant != self.variant:
            raise ValueError(f"config is for variant {cfg.variant!r}, not {self.variant!r}")
        self.check_config(cfg)
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

    @classmethod
    def check_config(cls, cfg: SaeConfig) -> None:
        """Raise ValueError when ``cfg`` is not a valid architecture of this variant."""
        if cfg.d_in <= 0 or cfg.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {cfg.d_in} and {cfg.d_sae}")

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
    def loss(self, x_norm: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for one batch of normalised inputs [n, d_in] and its parts."""
        raise NotImplementedError

    @torch.no_grad()
    def update_stats(self, parts: dict[str, torch.Tensor]) -> None:
        """Update inference-time state from a training step's parts (most variants have none)."""

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
        """Variant-specific values worth reading in cfg.json without loading the weights."""
        return {}


def _recon(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat.float() - x.float()).pow(2).sum(dim=-1).mean()


def _dense_parts(z: torch.Tensor) -> dict[str, torch.Tensor]:
    active = z > 0
    return {"fires": active.sum(dim=0), "l0": active.sum(dim=-1).float().mean()}


class ReluSae(Sae):
    """The classic: ReLU encoder, trained with an L1 penalty on latents weighted by decoder
    norms (so the penalty cannot be dodged by shrinking codes and growing decoder rows)."""

    variant = "relu"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x_norm: torch.Tensor, l1_coeff: float = 0.0, **_: Any):
        x_hat, z = self(x_norm)
        recon = _recon(x_hat, x_norm)
        sparsity = (z * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return recon + l1_coeff * sparsity, {"recon": recon, "l1": sparsity, **_dense_parts(z)}


def _bag(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """out[r] = sum of vals * weight[col] over the (row, col) pairs of row r (rows ascending)."""
    # Row r's pairs start where the rows < r end (searchsorted, unlike bincount, needs no
    # host-side read of the largest row on a GPU).
    offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device, dtype=rows.dtype))
    return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=vals.to(weight.dtype))


def _repeat_rows(n: int, k: int, device: torch.device) -> torch.Tensor:
    """0, 0, ..., 1, 1, ...: each of n row indices k times."""
    return torch.arange(n, device=device)[:, None].expand(n, k).reshape(-1)


class _SelectedPreActs(torch.autograd.Function):
    """Pre-activations at selected (row, col) entries, taken from the dense forward product,
    whose backward touches only those entries: the encoder's weight gradient is a sparse matmul
    (nnz x d) and the input's a gather of encoder columns, instead of two dense
    [n, d] x [d, d_sae] products."""

    @staticmethod
    def forward(ctx, x_c, w_enc, b_enc, pre, rows, cols):
        ctx.save_for_backward(x_c, w_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g):
        x_c, w_enc, rows, cols = ctx.saved_tensors
        g = g.to(x_c.dtype)
        n, m = len(x_c), w_enc.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _bag(rows, cols, g, w_enc.T.contiguous(), n)
        if ctx.needs_input_grad[1]:
            coo = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (m, n), check_invariants=False)
            grad_w = torch.sparse.mm(coo, x_c).T
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_x, grad_w, grad_b, None, None, None


class _SparseCodes(Sae):
    """Variants whose codes are a few selected latents. They train dead latents with the AuxK
    loss (Gao et al. 2024: the top ``aux_k`` dead latents reconstruct the residual error), and
    can train sparsely: decode with a gather of the selected decoder rows (``embedding_bag``)
    instead of a dense [n, d_sae] @ [d_sae, d] product, and backpropagate into the encoder
    through the selected latents only."""

    sparse_decode: bool = False
    """Decode with embedding_bag over the selected decoder rows (a training-time choice; values
    and gradients agree with the dense path up to rounding)."""
    sparse_encode: bool = False
    """Backpropagate into the encoder through the selected latents only (ditto)."""

    @classmethod
    def check_config(cls, cfg: SaeConfig) -> None:
        super().check_config(cfg)
        if not cfg.k or cfg.k <= 0 or cfg.k > cfg.d_sae:
            raise ValueError(f"{cfg.variant} needs 0 < k <= d_sae, got k={cfg.k} with d_sae={cfg.d_sae}")

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time selection from pre-activations [n, d_sae]: (rows ascending, cols)."""
        raise NotImplementedError

    def _encode_for_training(self, x_norm: torch.Tensor):
        """(pre-activations without gradient, a function giving the differentiable
        pre-activations at chosen (rows, cols))."""
        x_c = x_norm - self.b_dec
        if self.sparse_encode:
            with torch.no_grad():
                pre = x_c @ self.W_enc + self.b_enc
            return pre, lambda r, c: _SelectedPreActs.apply(x_c, self.W_enc, self.b_enc, pre, r, c)
        pre = x_c @ self.W_enc + self.b_enc
        return pre.detach(), lambda r, c: pre[r, c]

    def decode_selected(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int,
                        bias: bool = True) -> torch.Tensor:
        """Reconstruction of ``n`` tokens from selected (token row, latent col, value) triples,
        rows ascending."""
        if self.sparse_decode:
            out = _bag(rows, cols, vals, self.W_dec, n)
        else:
            z = torch.zeros(n, self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
            out = z.index_put((rows, cols), vals) @ self.W_dec
        return out + self.b_dec if bias else out

    def aux_loss(self, pre: torch.Tensor, pick, x_norm: torch.Tensor, x_hat: torch.Tensor,
                 dead_mask: torch.Tensor | None, aux_k: int | None) -> torch.Tensor:
        """||e - e_hat||^2 (mean over tokens) with e = x - x_hat (no gradient into the main
        latents) and e_hat decoded, without bias, from the ``aux_k`` largest dead pre-activations;
        scaled down by n_dead / aux_k when fewer latents are dead than aux_k.

        ``dead_mask`` None means no latent is dead (nothing computed). With a mask, the number
        of dead latents is never read on the host (that would stall a GPU every step): the top
        ``aux_k`` of the masked pre-activations are always taken, the live latents among them
        (when fewer than aux_k are dead) decode with value 0, and the scale is a tensor, 0 when
        none is dead."""
        if dead_mask is None:
            return pre.new_zeros((), dtype=torch.float32)
        aux_k = aux_k or self.cfg.d_in // 2
        k = min(aux_k, self.cfg.d_sae)
        n_dead = dead_mask.sum()
        scale = (n_dead.float() / aux_k).clamp(max=1.0)
        cols = torch.where(dead_mask[None], pre, torch.full_like(pre, -torch.inf)).topk(k, dim=-1, sorted=False)[1]
        n = len(pre)
        rows = _repeat_rows(n, k, pre.device)
        cols = cols.reshape(-1)
        vals = torch.relu(pick(rows, cols))
        vals = torch.where(dead_mask[cols], vals, torch.zeros_like(vals))
        e_hat = self.decode_selected(rows, cols, vals, n, bias=False)
        return scale * _recon(e_hat, (x_norm - x_hat).detach())

    def loss(self, x_norm: torch.Tensor, aux_coeff: float = 0.0, dead_mask: torch.Tensor | None = None,
             aux_k: int | None = None, **_: Any):
        pre, pick = self._encode_for_training(x_norm)
        rows, cols = self.select(pre)
        vals = torch.relu(pick(rows, cols))
        n = len(x_norm)
        x_hat = self.decode_selected(rows, cols, vals, n)
        recon = _recon(x_hat, x_norm)
        aux = self.aux_loss(pre, pick, x_norm, x_hat, dead_mask, aux_k) if aux_coeff else recon.new_zeros(())
        return recon + aux_coeff * aux, {"recon": recon, "aux": aux, **self._selection_parts(cols, vals, n)}

    def _selection_parts(self, cols: torch.Tensor, vals: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        # Counted with index_add_: boolean indexing (cols[on]) and bincount read a size on the
        # host, a GPU sync every step.
        on = vals > 0
        fires = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=cols.device).index_add_(0, cols, on.long())
        return {"fires": fires, "l0": on.sum() / n}


class TopKSae(_SparseCodes):
    """Keep the k largest pre-activations of each token (ReLU'd), zero the rest."""

    variant = "topk"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def select(self, pre: torch.Tensor):
        cols = pre.topk(self.cfg.k, dim=-1)[1]
        return _repeat_rows(len(pre), self.cfg.k, pre.device), cols.reshape(-1)


class BatchTopKSae(_SparseCodes):
    """BatchTopK (Bussmann et al. 2024): training keeps the k * n largest ReLU'd
    pre-activations of a batch of n tokens, so busy tokens get more latents than quiet ones.
    Inference cannot depend on the batch, so it keeps latents above ``threshold``: an
    exponential moving average of the smallest kept activation of each training batch."""

    variant = "batchtopk"
    threshold_decay: ClassVar[float] = 0.99

    def __init__(self, cfg: SaeConfig):
        super().__init__(cfg)
        # Negative until the first training batch sets it.
        self.register_buffer("threshold", torch.full((), -1.0))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            flat = pre.reshape(-1, pre.shape[-1])
            rows, cols = self.select(flat)
            z = torch.zeros_like(flat).index_put((rows, cols), torch.relu(flat[rows, cols]))
            return z.reshape(pre.shape)
        return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))

    def select(self, pre: torch.Tensor):
        n, m = pre.shape
        flat = torch.relu(pre).flatten().topk(min(self.cfg.k * n, n * m), sorted=False)[1].sort()[0]
        return flat // m, flat % m  # rows ascending, as the sparse paths need

    def _selection_parts(self, cols, vals, n):
        parts = super()._selection_parts(cols, vals, n)
        on = vals > 0  # the smallest kept activation (0 if none is positive), without a host read
        smallest = torch.where(on, vals.detach(), torch.full_like(vals, torch.inf)).amin()
        parts["min_act"] = torch.where(on.any(), smallest, torch.zeros_like(smallest))
        return parts

    @torch.no_grad()
    def update_stats(self, parts: dict[str, torch.Tensor]) -> None:
        m = parts["min_act"].to(self.threshold.dtype)
        t = self.threshold
        # The first batch sets it (it is negative until then); chosen on the device, no host read.
        t.copy_(torch.where(t < 0, m, t * self.threshold_decay + (1 - self.threshold_decay) * m))

    def extra_config(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold)}


class MatryoshkaSae(BatchTopKSae):
    """Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024) on BatchTopK codes: each nested
    prefix of the latents (``prefixes``, e.g. the first d_sae/16, d_sae/8, ... latents) must
    reconstruct the input on its own, so early latents learn general concepts and later ones
    refine them instead of absorbing them. The loss is the mean of the prefix losses."""

    variant = "matryoshka"

    @classmethod
    def check_config(cls, cfg: SaeConfig) -> None:
        super().check_config(cfg)
        p = cfg.prefixes
        if not p or list(p) != sorted(set(p)) or p[0] <= 0 or p[-1] != cfg.d_sae:
            raise ValueError(f"matryoshka prefixes must ascend from > 0 to d_sae={cfg.d_sae}, got {p}")

    def loss(self, x_norm: torch.Tensor, aux_coeff: float = 0.0, dead_mask: torch.Tensor | None = None,
             aux_k: int | None = None, **_: Any):
        pre, pick = self._encode_for_training(x_norm)
        rows, cols = self.select(pre)
        vals = torch.relu(pick(rows, cols))
        n = len(x_norm)
        z = torch.zeros(pre.shape, dtype=vals.dtype, device=vals.device).index_put((rows, cols), vals)
        x_hat = self.b_dec.expand_as(x_norm)
        losses = []
        lo = 0
        for hi in self.cfg.prefixes:  # each prefix's reconstruction extends the previous one
            x_hat = x_hat + z[:, lo:hi] @ self.W_dec[lo:hi]
            losses.append(_recon(x_hat, x_norm))
            lo = hi
        prefix_loss = torch.stack(losses).mean()
        aux = self.aux_loss(pre, pick, x_norm, x_hat, dead_mask, aux_k) if aux_coeff else prefix_loss.new_zeros(())
        return prefix_loss + aux_coeff * aux, {"recon": losses[-1], "prefix_recon": prefix_loss, "aux": aux,
                                               **self._selection_parts(cols, vals, n)}

    def extra_config(self) -> dict[str, Any]:
        return {**super().extra_config(), "prefixes": list(self.cfg.prefixes)}


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReluFn(torch.autograd.Function):
    """z = pre * H(pre - t); d/dt through the rectangle-kernel straight-through estimator."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -(t / eps) * _rectangle((pre - t) / eps) * g
        return g * (pre > t), grad_t.reshape(-1, t.shape[-1]).sum(0), None


class _StepFn(torch.autograd.Function):
    """H(pre - t); no gradient to pre, d/dt through the rectangle-kernel estimator."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -(1.0 / eps) * _rectangle((pre - t) / eps) * g
        return None, grad_t.reshape(-1, t.shape[-1]).sum(0), None


class JumpReluSae(Sae):
    """JumpReLU (Rajamanoharan et al. 2024): a latent passes when its pre-activation exceeds
    its own learned threshold (stored as ``log_threshold``, so it stays positive), trained with
    an L0 penalty; the step's zero gradient is replaced by a rectangle kernel of width
    ``bandwidth`` around the threshold."""

    variant = "jumprelu"
    init_threshold: ClassVar[float] = 1.0
    """In the normalised space (token norm sqrt(d_in)) an untrained latent's pre-activation is
    roughly N(0, 1), so it starts firing on ~16% of tokens; the log-parametrised threshold then
    moves by about lr per step, so a start far below the useful range (e.g. 0.001) never gets
    there in a short run."""

    def __init__(self, cfg: SaeConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(self.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def loss(self, x_norm: torch.Tensor, l0_coeff: float = 0.0, bandwidth: float = 0.05, **_: Any):
        pre = self.pre_acts(x_norm)
        t = self.threshold.to(pre.dtype)
        z = _JumpReluFn.apply(pre, t, bandwidth)
        recon = _recon(self.decode(z), x_norm)
        l0 = _StepFn.apply(pre, t, bandwidth).sum(dim=-1).mean()
        return recon + l0_coeff * l0, {"recon": recon, "l0_loss": l0, **_dense_parts(z)}


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
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

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
        fields = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in fields}
        kw["config"] = SaeConfig.from_json(d["config"])
        return cls(**kw)


def sae_class(variant: str) -> type[Sae]:
    """The class registered for ``variant``."""
    try:
        return Sae.registry[variant]
    except KeyError:
        raise ValueError(f"unknown SAE variant {variant!r}; known: {sorted(Sae.registry)}") from None


def build_sae(cfg: SaeConfig) -> Sae:
    """The SAE class registered for ``cfg.variant``, freshly initialised."""
    return sae_class(cfg.variant)(cfg)


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
