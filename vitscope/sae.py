"""Sparse autoencoders and their checkpoint format.

A checkpoint is a folder ``saes/<sae_id>/`` in a store::

    sae.safetensors   weights, variant buffers (e.g. a BatchTopK threshold) and the
                      normalisation constants (norm_mean, norm_scale)
    cfg.json          written last: schema version, variant, sizes, provenance and metrics

The normalisation (centre by the training mean, scale so the average norm is sqrt(d_in)) is
part of the model: :meth:`Sae.encode` applies it to raw ViT activations, so whoever loads a
checkpoint encodes exactly as training did.

Families, one registry (:data:`Sae.registry`), each loading back as what it was saved as, each
with its own frozen hyper-parameter dataclass (``<Family>Sae.Hyper``):

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
    sae.record.layer, sae.record.metrics     # what it was trained on, how well it does
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The record, the config and the families' settings need no torch: they live in sae_format, for
# what reads checkpoints' cfg.json without running a model (the analyzer's listings); they are
# this module's names too.
from vitscope.sae_format import (  # noqa: F401
    FORMAT,
    PREFIX,
    SCHEMA_VERSION,
    BatchTopKHyper,
    JumpReluHyper,
    MatryoshkaHyper,
    ReluHyper,
    SaeConfig,
    SaeHyper,
    SaeRecord,
    TopKHyper,
    hyper_class,
    list_saes,
    load_record,
    sae_prefix,
    unknown_variant,
)
from vitscope.store import Store, open_store


class LossContext(NamedTuple):
    """What a loss needs from the trainer besides the batch: the state of the schedule."""

    sparsity_scale: float | torch.Tensor = 1.0
    """Multiplier of the sparsity penalty, ramping from 0 to 1 over the family's warmup."""
    dead_mask: torch.Tensor | None = None
    """[d_sae] latents dead over the training window (AuxK trains them); None: none can be yet."""


class LossResult(NamedTuple):
    """One training batch's loss and the figures the trainer tracks, whatever the family."""

    loss: torch.Tensor
    """What the optimiser minimises."""
    recon: torch.Tensor
    """Mean over tokens of the squared error summed over dimensions (normalised space)."""
    fires: torch.Tensor
    """[d_sae] number of tokens each latent fired on."""
    l0: torch.Tensor
    """Mean number of active latents per token."""
    terms: dict[str, torch.Tensor]
    """The family's other loss terms by name, before their coefficients (for logs only)."""
    min_active: torch.Tensor | None = None
    """Smallest positive code value of the batch, for families that select codes (0 if none)."""


class Sae(nn.Module):
    """Base class of the SAE families: a linear encoder with a family-specific activation, a
    linear decoder, and the input normalisation stored as buffers.

    A family is one subclass naming its ``Hyper`` (a frozen :class:`SaeHyper` dataclass) and
    its ``variant``, here or on the ``Hyper`` (the built-in families name it on their settings,
    which :mod:`vitscope.sae_format` reads without torch); defining it registers it, and
    everything else (the CLI's choices and options, sweep keys, checkpoints) is derived from
    the registry.

    The public methods work in the raw activation space of the ViT: :meth:`encode`,
    :meth:`decode`, :meth:`reconstruct` and :meth:`forward` apply the normalisation the SAE was
    trained with and undo it. The trainer works in the normalised space, through the methods
    named ``*_normalized`` and :meth:`loss`.
    """

    variant: ClassVar[str]
    Hyper: ClassVar[type[SaeHyper]]
    registry: ClassVar[dict[str, type[Sae]]] = {}
    summary: ClassVar[str] = ""
    """What the family is, in a few words (the CLI's list of families shows it)."""
    elementwise: ClassVar[bool] = False
    """Whether a latent's activation (at inference) depends on its own pre-activation only, not
    on the other latents' (TopK's does): :meth:`encode_latent` then computes one latent alone."""
    sparse_paths: ClassVar[bool] = False
    """Whether the family can train through the sparse decode/encode paths (``sparse_decode``,
    ``sparse_encode``)."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        hyper = cls.__dict__.get("Hyper")
        if "variant" not in cls.__dict__ and hyper is None:  # abstract intermediate classes name neither
            return
        if hyper is None or not (isinstance(hyper, type) and issubclass(hyper, SaeHyper)):
            raise TypeError(f"SAE family {cls.__dict__.get('variant', cls.__name__)!r} must define its own Hyper, "
                            "a frozen SaeHyper dataclass")
        if "variant" not in cls.__dict__:
            if not hyper.__dict__.get("variant"):
                raise TypeError(f"SAE family {cls.__name__} names no variant, nor does its Hyper")
            cls.variant = hyper.variant
        hyper.belong_to(cls.variant)
        Sae.registry[cls.variant] = cls

    def __init__(self, cfg: SaeConfig):
        super().__init__()
        if not isinstance(cfg.hyper, self.Hyper):
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
        self.record: SaeRecord | None = None
        """What the checkpoint says about this SAE (layer, tokens, model, activation set,
        metrics), when it was loaded from one."""

    @property
    def hyper(self) -> SaeHyper:
        return self.cfg.hyper

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; encoder = decoder transpose (a known-good start)."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()

    @classmethod
    def check_config(cls, cfg: SaeConfig) -> None:
        """Raise ValueError when ``cfg`` is not a valid architecture of this family."""
        if cfg.d_in <= 0 or cfg.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {cfg.d_in} and {cfg.d_sae}")

    # --- the model, in the ViT's raw activation space -------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ViT activations [..., d_in] -> latent activations [..., d_sae]."""
        return self.encode_normalized(self.normalize(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae] -> reconstructed raw activations [..., d_in]."""
        return self.denormalize(self.decode_normalized(z))

    def encode_latent(self, x: torch.Tensor, latent: int) -> torch.Tensor:
        """One latent's activations on raw activations [..., d_in] -> [...]: ``encode(x)[...,
        latent]``, computed from that latent's encoder column alone when the family's activation
        is elementwise (a heatmap of one latent then costs 1/d_sae of a full encode)."""
        if not self.elementwise or self.training:
            return self.encode(x)[..., latent]
        pre = (self.normalize(x) - self.b_dec) @ self.W_enc[:, latent] + self.b_enc[latent]
        return self.activate_one(pre, latent)

    def activate_one(self, pre: torch.Tensor, latent: int) -> torch.Tensor:
        """The activation of latent ``latent`` from its pre-activations alone (elementwise families)."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations -> their reconstruction through the SAE, in the raw space."""
        return self.forward(x).reconstruction

    def forward(self, x: torch.Tensor) -> SaeOutput:
        """Raw activations -> (reconstruction in the raw space, latents)."""
        x_hat, z = self.forward_normalized(self.normalize(x))
        return SaeOutput(self.denormalize(x_hat), z)

    # --- the space the SAE was trained in ----------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations -> the training space (centred by the training mean, scaled so the
        average norm is sqrt(d_in))."""
        return (x.to(self.norm_mean.dtype) - self.norm_mean) * self.norm_scale

    def denormalize(self, x_norm: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`."""
        return x_norm / self.norm_scale + self.norm_mean

    def pre_acts(self, x_norm: torch.Tensor) -> torch.Tensor:
        # addmm: the bias is added in the product's own pass, not in a second one over [n, d_sae]
        x_c = x_norm - self.b_dec
        return torch.addmm(self.b_enc, x_c.reshape(-1, x_c.shape[-1]), self.W_enc).reshape(*x_c.shape[:-1], -1)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_normalized(self, x_norm: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x_norm))

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward_normalized(self, x_norm: torch.Tensor) -> SaeOutput:
        z = self.encode_normalized(x_norm)
        return SaeOutput(self.decode_normalized(z), z)

    def encode_sparse_normalized(self, x_norm: torch.Tensor) -> SparseCodes:
        """The codes of normalised inputs [n, d_in] as (token, latent, value) triples, tokens
        ascending: the values :meth:`encode_normalized` gives, for a pass over many tokens that
        should not decode [n, d_sae] dense codes. Triples may include zero values (a family that
        selects k latents a token keeps its k even where some are 0)."""
        z = self.encode_normalized(x_norm)
        rows, cols = z.nonzero(as_tuple=True)
        return SparseCodes(rows, cols, z[rows, cols])

    def decode_sparse_normalized(self, codes: SparseCodes, n: int) -> torch.Tensor:
        """:meth:`decode_normalized` of ``n`` tokens' codes given as triples: a gather of the
        decoder rows they name (``embedding_bag``) instead of a dense [n, d_sae] product."""
        return _bag(codes.rows, codes.cols, codes.vals, self.W_dec, n) + self.b_dec

    # --- training ----------------------------------------------------------------------------
    def loss(self, x_norm: torch.Tensor, ctx: LossContext = LossContext()) -> LossResult:
        """Training loss of one batch of normalised inputs [n, d_in], with this family's
        settings (:attr:`hyper`) and the schedule's state (``ctx``)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_stats(self, result: LossResult) -> None:
        """Update inference-time state from a training step (most families have none)."""

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
        """Family-specific values worth reading in cfg.json without loading the weights."""
        return {}


class SaeOutput(NamedTuple):
    reconstruction: torch.Tensor
    latents: torch.Tensor


class SparseCodes(NamedTuple):
    """Latent activations of n tokens as triples: token row (ascending), latent, value."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor


def _recon(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat.float() - x.float()).pow(2).sum(dim=-1).mean()


def _dense_counts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-latent firing counts, mean active latents per token) of dense codes."""
    active = z > 0
    return active.sum(dim=0), active.sum(dim=-1).float().mean()


class ReluSae(Sae):
    """The classic: ReLU encoder, trained with an L1 penalty on latents weighted by decoder
    norms (so the penalty cannot be dodged by shrinking codes and growing decoder rows)."""

    Hyper = ReluHyper
    summary = "ReLU, L1 penalty weighted by decoder norms"
    elementwise = True

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def activate_one(self, pre: torch.Tensor, latent: int) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x_norm: torch.Tensor, ctx: LossContext = LossContext()) -> LossResult:
        x_hat, z = self.forward_normalized(x_norm)
        recon = _recon(x_hat, x_norm)
        sparsity = (z * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return LossResult(recon + self.hyper.l1_coeff * ctx.sparsity_scale * sparsity, recon,
                          *_dense_counts(z), {"l1": sparsity})


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
    (nnz x d) instead of a dense [n, d] x [d, d_sae] product.

    The centred input ``x_c = x - b_dec`` comes in without autograd (a training input takes no
    gradient): b_dec's gradient, which is minus the sum over tokens of x_c's, is then
    ``-W_enc @ grad(b_enc)``, a matrix-vector product instead of a gather of n x k encoder
    columns into an [n, d] gradient."""

    @staticmethod
    def forward(ctx, x_c, b_dec, w_enc, b_enc, pre, rows, cols):
        ctx.save_for_backward(x_c, w_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g):
        x_c, w_enc, rows, cols = ctx.saved_tensors
        g = g.to(x_c.dtype)
        n, m = len(x_c), w_enc.shape[1]
        grad_b_dec = grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            coo = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (m, n), check_invariants=False)
            grad_w = torch.sparse.mm(coo, x_c).T
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
            if ctx.needs_input_grad[1]:
                grad_b_dec = -(w_enc @ grad_b)
        return None, grad_b_dec, grad_w, grad_b if ctx.needs_input_grad[3] else None, None, None, None


class _SparseCodes(Sae):
    """Families whose codes are a few selected latents. They train dead latents with the AuxK
    loss (Gao et al. 2024: the top ``aux_k`` dead latents reconstruct the residual error), and
    can train sparsely: decode with a gather of the selected decoder rows (``embedding_bag``)
    instead of a dense [n, d_sae] @ [d_sae, d] product, and backpropagate into the encoder
    through the selected latents only."""

    sparse_paths = True

    sparse_decode: bool = False
    """Decode with embedding_bag over the selected decoder rows (a training-time choice; values
    and gradients agree with the dense path up to rounding)."""
    sparse_encode: bool = False
    """Backpropagate into the encoder through the selected latents only (ditto)."""

    @classmethod
    def check_config(cls, cfg: SaeConfig) -> None:
        super().check_config(cfg)
        k = cfg.hyper.k
        if not k or k <= 0 or k > cfg.d_sae:
            raise ValueError(f"{cfg.variant} needs 0 < k <= d_sae, got k={k} with d_sae={cfg.d_sae}")

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time selection from pre-activations [n, d_sae]: (rows ascending, cols)."""
        raise NotImplementedError

    def _encode_for_training(self, x_norm: torch.Tensor):
        """(pre-activations without gradient, a function giving the differentiable
        pre-activations at chosen (rows, cols))."""
        if self.sparse_encode and not x_norm.requires_grad:
            with torch.no_grad():
                x_c = x_norm - self.b_dec
                pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            return pre, lambda r, c: _SelectedPreActs.apply(x_c, self.b_dec, self.W_enc, self.b_enc, pre, r, c)
        pre = torch.addmm(self.b_enc, x_norm - self.b_dec, self.W_enc)
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
                 dead_mask: torch.Tensor | None) -> torch.Tensor:
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
        aux_k = self.hyper.aux_k or self.cfg.d_in // 2
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

    def loss(self, x_norm: torch.Tensor, ctx: LossContext = LossContext()) -> LossResult:
        pre, pick = self._encode_for_training(x_norm)
        rows, cols = self.select(pre)
        vals = torch.relu(pick(rows, cols))
        n = len(x_norm)
        x_hat = self.decode_selected(rows, cols, vals, n)
        recon = _recon(x_hat, x_norm)
        aux_coeff = self.hyper.aux_coeff
        aux = self.aux_loss(pre, pick, x_norm, x_hat, ctx.dead_mask) if aux_coeff else recon.new_zeros(())
        return LossResult(recon + aux_coeff * aux, recon, *self._selection_counts(cols, vals, n), {"aux": aux},
                          _smallest_active(vals))

    def _selection_counts(self, cols: torch.Tensor, vals: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-latent firing counts, mean active latents per token) of selected codes."""
        # Counted with index_add_: boolean indexing (cols[on]) and bincount read a size on the
        # host, a GPU sync every step.
        on = vals > 0
        fires = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=cols.device).index_add_(0, cols, on.long())
        return fires, on.sum() / n


def _smallest_active(vals: torch.Tensor) -> torch.Tensor:
    """The smallest positive value (0 if none is), without a host read."""
    on = vals > 0
    smallest = torch.where(on, vals.detach(), torch.full_like(vals, torch.inf)).amin()
    return torch.where(on.any(), smallest, torch.zeros_like(smallest))


class TopKSae(_SparseCodes):
    """Keep the k largest pre-activations of each token (ReLU'd), zero the rest."""

    Hyper = TopKHyper
    summary = "the k largest latents of each token, AuxK loss for dead latents"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.hyper.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def select(self, pre: torch.Tensor):
        k = self.hyper.k
        cols = pre.topk(k, dim=-1)[1]
        return _repeat_rows(len(pre), k, pre.device), cols.reshape(-1)

    def encode_sparse_normalized(self, x_norm: torch.Tensor) -> SparseCodes:
        vals, cols = self.pre_acts(x_norm).topk(self.hyper.k, dim=-1)
        return SparseCodes(_repeat_rows(len(x_norm), self.hyper.k, x_norm.device), cols.reshape(-1),
                           torch.relu(vals).reshape(-1))


class BatchTopKSae(_SparseCodes):
    """BatchTopK (Bussmann et al. 2024): training keeps the k * n largest ReLU'd
    pre-activations of a batch of n tokens, so busy tokens get more latents than quiet ones.
    Inference cannot depend on the batch, so it keeps latents above ``threshold``: an
    exponential moving average of the smallest kept activation of each training batch."""

    Hyper = BatchTopKHyper
    elementwise = True  # at inference: a stored threshold, whatever the other latents do
    summary = "k latents per token on average over a batch; a learned threshold at inference"
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

    def activate_one(self, pre: torch.Tensor, latent: int) -> torch.Tensor:
        return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))

    def select(self, pre: torch.Tensor):
        n, m = pre.shape
        flat = torch.relu(pre).flatten().topk(min(self.hyper.k * n, n * m), sorted=False)[1].sort()[0]
        return flat // m, flat % m  # rows ascending, as the sparse paths need

    @torch.no_grad()
    def update_stats(self, result: LossResult) -> None:
        m = result.min_active.to(self.threshold.dtype)
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

    Hyper = MatryoshkaHyper
    summary = "BatchTopK whose nested latent prefixes each reconstruct the input"

    @classmethod
    def check_config(cls, cfg: SaeConfig) -> None:
        super().check_config(cfg)
        p = cfg.hyper.prefixes
        if not p or list(p) != sorted(set(p)) or p[0] <= 0 or p[-1] != cfg.d_sae:
            raise ValueError(f"matryoshka prefixes must ascend from > 0 to d_sae={cfg.d_sae}, got {p}")

    def loss(self, x_norm: torch.Tensor, ctx: LossContext = LossContext()) -> LossResult:
        pre, pick = self._encode_for_training(x_norm)
        rows, cols = self.select(pre)
        vals = torch.relu(pick(rows, cols))
        n = len(x_norm)
        z = torch.zeros(pre.shape, dtype=vals.dtype, device=vals.device).index_put((rows, cols), vals)
        x_hat = self.b_dec.expand_as(x_norm)
        losses = []
        lo = 0
        for hi in self.hyper.prefixes:  # each prefix's reconstruction extends the previous one
            x_hat = x_hat + z[:, lo:hi] @ self.W_dec[lo:hi]
            losses.append(_recon(x_hat, x_norm))
            lo = hi
        prefix_loss = torch.stack(losses).mean()
        aux_coeff = self.hyper.aux_coeff
        aux = self.aux_loss(pre, pick, x_norm, x_hat, ctx.dead_mask) if aux_coeff else prefix_loss.new_zeros(())
        return LossResult(prefix_loss + aux_coeff * aux, losses[-1], *self._selection_counts(cols, vals, n),
                          {"prefix_recon": prefix_loss, "aux": aux}, _smallest_active(vals))


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

    Hyper = JumpReluHyper
    summary = "learned per-latent thresholds, L0 penalty"
    elementwise = True
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

    def activate_one(self, pre: torch.Tensor, latent: int) -> torch.Tensor:
        return pre * (pre > self.threshold[latent])

    def loss(self, x_norm: torch.Tensor, ctx: LossContext = LossContext()) -> LossResult:
        hp = self.hyper
        pre = self.pre_acts(x_norm)
        t = self.threshold.to(pre.dtype)
        z = _JumpReluFn.apply(pre, t, hp.bandwidth)
        recon = _recon(self.decode_normalized(z), x_norm)
        l0 = _StepFn.apply(pre, t, hp.bandwidth).sum(dim=-1).mean()
        return LossResult(recon + hp.l0_coeff * ctx.sparsity_scale * l0, recon, *_dense_counts(z), {"l0": l0})


def sae_class(variant: str) -> type[Sae]:
    """The family registered as ``variant``."""
    try:
        return Sae.registry[variant]
    except KeyError:
        raise unknown_variant(variant, Sae.registry) from None


def build_sae(cfg: SaeConfig) -> Sae:
    """The SAE class registered for ``cfg.variant``, freshly initialised."""
    return sae_class(cfg.variant)(cfg)


def save_sae(store: Store, sae: Sae, record: SaeRecord) -> None:
    """Publish a checkpoint: weights first, cfg.json last (readers trust only cfg.json)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    prefix = sae_prefix(record.sae_id)
    store.put_bytes(f"{prefix}/sae.safetensors", save(state))
    record.config = sae.cfg
    record.extra = {**record.extra, **sae.extra_config(), "norm_scale": float(sae.norm_scale)}
    store.put_bytes(f"{prefix}/cfg.json", json.dumps(record.to_json(), indent=1).encode())


def load_sae_from(store: Store, sae_id: str, device: str | torch.device = "cpu") -> tuple[Sae, SaeRecord]:
    """Load a published SAE as the family it was saved as, with its normalisation and its
    record (also ``sae.record``), ready for inference."""
    from safetensors.torch import load

    record = load_record(store, sae_id)
    sae = build_sae(record.config)
    state = load(store.get_bytes(f"{sae_prefix(sae_id)}/sae.safetensors"))
    sae.load_state_dict(state, strict=True)
    sae.record = record
    return sae.requires_grad_(False).to(device).eval(), record


def load_sae(uri: str | os.PathLike, device: str | torch.device = "cpu") -> Sae:
    """Load a published SAE from its URI: ``<store>/saes/<sae_id>``, e.g.
    ``s3://bucket/prefix/saes/0123abcd`` or ``/path/to/store/saes/0123abcd``.

    The SAE comes back as the family it was trained as, in eval mode, on ``device``; its
    :meth:`Sae.encode`, :meth:`Sae.decode`, :meth:`Sae.reconstruct` and :meth:`Sae.forward`
    take and give raw ViT activations, and ``sae.record`` says what it was trained on (layer,
    token kinds, model, activation set, metrics)."""
    uri = os.fspath(uri).rstrip("/")
    root, sep, sae_id = uri.rpartition(f"/{PREFIX}/")
    if not sep or "/" in sae_id:
        raise ValueError(f"{uri!r} is not an SAE URI: expected <store>/{PREFIX}/<sae_id>")
    sae, _ = load_sae_from(open_store(root or "/"), sae_id, device)
    return sae


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
