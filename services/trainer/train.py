"""Train an SAE on one layer of an activation set and publish the checkpoint with its metrics."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from vitscope.hashing import content_id
from vitscope.sae import (
    SCHEMA_VERSION,
    Sae,
    SaeConfig,
    SaeRecord,
    build_sae,
    fit_normalizer,
    geometric_median,
    load_record,
    sae_prefix,
    save_sae,
)
from vitscope.shards import ActivationSet
from vitscope.store import open_store

from .stream import TokenStream

log = logging.getLogger(__name__)

TokenKind = Literal["cls", "registers", "patches", "all"]


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, empty data, mismatched shapes)."""


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
    variant: Literal["relu"] = "relu"
    """SAE family: relu = ReLU encoder with an L1 penalty."""
    expansion: int = 16
    """d_sae = expansion * d_in (ignored when d_sae is given)."""
    d_sae: int | None = None
    l1_coeff: float = 5.0
    """Weight of the L1 penalty (on inputs scaled to norm sqrt(d_in)); larger = sparser."""
    l1_warmup_frac: float = 0.05
    """Ramp the L1 weight up from 0 over this fraction of training (avoids early dead latents)."""
    lr: float = 4e-4
    lr_warmup_frac: float = 0.02
    """Linear learning-rate warmup over this fraction of training."""
    lr_decay_frac: float = 0.2
    """Linear learning-rate decay to 0 over the last fraction of training."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    n_tokens: int | None = None
    """Training tokens (more than one epoch is fine); default: one epoch."""
    seed: int = 0
    """Seeds the initialisation and the data order."""
    buffer_tokens: int = 1 << 18
    """Shuffle-buffer size in tokens (bounds memory)."""
    init_sample: int = 1 << 16
    """Tokens sampled to fit the normalisation and initialise b_dec (tens of thousands, not tens)."""
    eval_tokens: int = 1 << 18
    """Tokens in the final evaluation pass that produces the published metrics."""
    device: str = "auto"
    progress: bool = True


@dataclass
class TrainResult:
    sae_id: str
    metrics: dict[str, float]
    reused: bool


def _schedule(step: int, total: int, warmup: float, decay: float) -> float:
    """LR multiplier: linear warmup, constant, linear decay to 0."""
    w, d = max(1, int(total * warmup)), int(total * decay)
    if step < w:
        return (step + 1) / w
    if d and step >= total - d:
        return max(0.0, (total - step) / d)
    return 1.0


def _sae_id(cfg: TrainConfig, set_id: str, layer: int, d_sae: int) -> str:
    hyper = {k: v for k, v in asdict(cfg).items() if k not in ("store", "device", "progress", "activations", "layer")}
    return content_id({"schema": SCHEMA_VERSION, "set": set_id, "layer": layer, "d_sae": d_sae, **hyper})


@torch.no_grad()
def evaluate(sae: Sae, stream: TokenStream, max_tokens: int, device: torch.device) -> dict[str, float]:
    """Reconstruction and sparsity metrics over up to ``max_tokens`` tokens, accumulated in float64."""
    d_sae = sae.cfg.d_sae
    fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
    sse = sx = sxx = l0 = l1 = 0.0
    n = 0
    for batch in stream.epoch(epoch=10_000):  # an order no training epoch uses
        x = sae.normalize(batch.x.to(device))
        x_hat, z = sae(x)
        sse += (x_hat - x).double().pow(2).sum().item()
        sx_b = x.double().sum(dim=0)
        sx = sx + sx_b
        sxx += x.double().pow(2).sum().item()
        active = z > 0
        l0 += active.sum().item()
        l1 += z.double().sum().item()
        fires += active.sum(dim=0).double()
        n += len(x)
        if n >= max_tokens:
            break
    if n == 0:
        raise TrainingError("no tokens to evaluate on")
    total_var = sxx - (sx.pow(2).sum().item() / n)  # sum of squared deviations from the mean
    freq = (fires / n).cpu().numpy()
    return {
        "mse": sse / (n * sae.cfg.d_in),
        "nmse": sse / max(total_var, 1e-12),
        "l0": l0 / n,
        "l1": l1 / n,
        "dead": int((freq == 0).sum()),
        "dense": int((freq > 1e-2).sum()),
        "eval_tokens": n,
    }


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or find, if already published) the SAE that ``cfg`` describes."""
    store = open_store(cfg.store)
    aset = ActivationSet.open(store, cfg.activations)
    m = aset.manifest
    layer = m.layers[-1] if cfg.layer is None else m.layer_position(cfg.layer)
    positions = m.layout.token_indices(cfg.tokens)
    if len(aset) == 0 or len(positions) == 0:
        raise TrainingError(f"activation set {m.set_id} has no {'/'.join(cfg.tokens)} tokens to train on")
    d_in = m.d_model
    d_sae = cfg.d_sae or cfg.expansion * d_in
    sae_id = _sae_id(cfg, m.set_id, layer, d_sae)
    if store.exists(f"{sae_prefix(sae_id)}/cfg.json"):
        log.info("SAE %s already published in %s: reusing it", sae_id, store.uri)
        return TrainResult(sae_id, load_record(store, sae_id).metrics, reused=True)

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    stream = TokenStream(aset, layer, positions, cfg.batch_size, seed=cfg.seed, buffer_tokens=cfg.buffer_tokens)
    n_tokens = cfg.n_tokens or stream.tokens_per_epoch
    total_steps = max(1, math.ceil(n_tokens / cfg.batch_size))

    sae = build_sae(SaeConfig(cfg.variant, d_in, d_sae))
    sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    sample = stream.sample(cfg.init_sample, seed=cfg.seed)
    mean, scale = fit_normalizer(sample)
    with torch.no_grad():
        sae.norm_mean.copy_(mean)
        sae.norm_scale.fill_(scale)
        sae.b_dec.copy_(geometric_median(sae.normalize(sample)))
    log.info("normalisation and b_dec fitted on %d tokens (scale %.4g)", len(sample), scale)
    sae.to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, total_steps, cfg.lr_warmup_frac, cfg.lr_decay_frac))
    l1_warmup = max(1, int(total_steps * cfg.l1_warmup_frac))

    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"train {sae_id[:8]}", disable=not cfg.progress)
    step = 0
    for batch in stream:
        x = sae.normalize(batch.x[: n_tokens - seen].to(device, non_blocking=True))
        l1_coeff = cfg.l1_coeff * min(1.0, (step + 1) / l1_warmup)
        loss, parts = sae.loss(x, l1_coeff=l1_coeff)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {step} ({seen} tokens): lower lr (now {cfg.lr}) "
                f"or l1_coeff (now {cfg.l1_coeff}); nothing was published")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sched.step()
        sae.set_decoder_unit_norm()
        seen += len(x)
        step += 1
        bar.update(len(x))
        if step % 20 == 0 or seen >= n_tokens:
            with torch.no_grad():
                nmse = (parts["recon"] / x.var(dim=0).sum().clamp_min(1e-12)).item()
                l0 = (parts["z"] > 0).float().sum(dim=-1).mean().item()
            bar.set_postfix(loss=f"{loss.item():.3g}", nmse=f"{nmse:.3f}", l0=f"{l0:.1f}", l1w=f"{l1_coeff:.3g}")
        if seen >= n_tokens:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    sae.eval()
    metrics = evaluate(sae, stream, cfg.eval_tokens, device)
    metrics.update(tokens=seen, steps=step, tokens_per_s=seen / max(elapsed, 1e-9), train_seconds=elapsed)
    log.info("SAE %s: nmse %.4f, L0 %.1f, dead %d, dense %d (%.0f tok/s)", sae_id, metrics["nmse"],
             metrics["l0"], metrics["dead"], metrics["dense"], metrics["tokens_per_s"])
    record = SaeRecord(
        sae_id=sae_id, config=sae.cfg, activation_set_id=m.set_id, layer=layer,
        tokens=list(cfg.tokens), model=m.model.get("spec", ""),
        training={k: v for k, v in asdict(cfg).items() if k not in ("store", "progress")},
        metrics={k: float(v) for k, v in metrics.items()},
    )
    save_sae(store, sae.cpu(), record)
    return TrainResult(sae_id, record.metrics, reused=False)

