"""Train SAEs on an activation set and publish each checkpoint with its metrics.

:func:`train_sweep` trains any number of SAEs (families, sparsities, widths, learning rates,
seeds, layers) from one pass over the data: each batch is read once and given to every SAE of
its layer. :func:`train` is a sweep of one. A sweep may spread its SAEs over several devices
(``--device cuda:all``), and under torchrun the ranks train the same SAEs data-parallel (see
:mod:`vitscope.trainer.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from vitscope.device import keep_freed_memory
from vitscope.hashing import content_id
from vitscope.metrics import dead_latents, dead_window, scalar_metrics
from vitscope.sae import (
    BatchTopKSae,
    LossContext,
    LossResult,
    Sae,
    SaeConfig,
    SaeHyper,
    SaeRecord,
    build_sae,
    fit_normalizer,
    geometric_median,
    load_record,
    sae_class,
    sae_prefix,
    save_sae,
)
from vitscope.shards import ActivationSet
from vitscope.store import Store, open_store

from . import checkpoint, distributed
from .config import (
    SHARED_FIELDS,
    TrainConfig,
    check_shared,
    hyper_parameters,
    sae_id,
)
from .distributed import ReportedElsewhere, World
from .metrics import Accumulator
from .stream import StreamError, TokenStream

log = logging.getLogger(__name__)
T = TypeVar("T")

EVAL_EPOCH = 10_000  # the evaluation pass reads in an order no training epoch uses
CHECK_EVERY = 20
"""Steps between host reads of the SAEs' device-side flags (a non-finite loss, the dead-latent
bound): each read waits for the GPU to finish the queued steps, so not every step."""
_LIVE = ("loss", "recon", "l0")
"""The live figures of a step (what :meth:`SaeTrainer.update` returns besides the learning rate)."""


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, empty data, mismatched shapes, unreadable data)."""


@dataclass
class TrainResult:
    """A trained (or reused, already published) SAE: its id and published metrics."""

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



@dataclass(frozen=True)
class SaePlan:
    """One SAE of a sweep, resolved against the activation set."""

    cfg: TrainConfig
    sae_id: str
    layer: int
    sae_config: SaeConfig
    """Architecture, with the family's settings resolved for this size."""
    hyper: dict
    """Everything the id hashes (also the checkpoint's ``training`` record)."""


class SaeTrainer:
    """One SAE in training: its model, optimiser, schedule and dead-latent counters. A sweep
    runs one per SAE on the same batches.

    :meth:`step` never reads a device value on the host, so a GPU's queue never drains between
    steps (with a sweep of N SAEs, a per-step read would stall it N times a step). Whatever the
    host needs is kept on the device and read every few steps through :meth:`flags`: the first
    step whose loss was not finite (the run then stops, see :meth:`_Run._check`) and the
    largest dead-latent counter, from which the host bounds when a latent can first be dead
    (until then the AuxK loss is skipped without looking).

    Under torchrun (``world``) every rank holds the same SAE and steps on its own slice of each
    batch; :meth:`update` sums what the ranks contributed to the step (:meth:`_reduce`) before
    the step uses it, so every rank takes the same step."""

    def __init__(self, plan: SaePlan, total_steps: int, device: torch.device, world: World | None = None):
        self.plan = plan
        cfg = self.cfg = plan.cfg
        self.total_steps = total_steps
        self.device, self.world = device, world
        self.sae = build_sae(plan.sae_config)
        self.sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        if self.sae.sparse_paths:
            mode = ("all" if device.type == "cpu" else "off") if cfg.sparse == "auto" else cfg.sparse
            self.sae.sparse_decode = mode in ("decode", "all")
            self.sae.sparse_encode = mode == "all"
        self.sae.to(device).train()
        sparse = getattr(self.sae, "sparse_decode", False) or getattr(self.sae, "sparse_encode", False)
        # Not under torchrun: a captured step would have to capture its all_reduce too, and the
        # steps of SAEs large enough to train data-parallel are bound by the GPU, not by launches.
        self.graph = (_GraphedStep(self) if device.type == "cuda" and cfg.cuda_graphs and not sparse and world is None
                      else None)
        # Fused Adam: one pass over each parameter instead of one per elementwise operation
        # (on a CPU the foreach version took 5x as long at d_sae 16,384, a third of a step; on CUDA
        # one kernel instead of several). A captured step reads the learning rate from a tensor,
        # set before each replay.
        self.lr = torch.tensor(cfg.lr, device=device) if self.graph else None
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr if self.lr is None else self.lr,
                                    betas=(0.9, 0.999), fused=True if device.type in ("cpu", "cuda") else None,
                                    capturable=self.graph is not None)
        self.since_fired = torch.zeros(plan.sae_config.d_sae, dtype=torch.long, device=device)
        self.since_fired_bound = 0
        """Host-side upper bound of ``since_fired.max()``: no latent can be dead while it is
        below ``dead_window``."""
        self.aux_on = False
        """Whether the AuxK loss is computed: from the first time a latent can be dead on (the
        loss is the same as skipping it while none is, and staying on keeps a captured step's
        shape fixed)."""
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        """First step whose loss was not finite (-1: none yet), and that loss, on the device."""
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.sparsity_warmup = max(1, int(total_steps * plan.sae_config.hyper.warmup_fraction()))
        self.live: dict[str, torch.Tensor] = {}
        self.batch_state = type(self.sae).update_stats is not Sae.update_stats
        """Whether the family keeps state from its training batches (BatchTopK's threshold),
        which the ranks must then agree on."""

    def init_from_sample(self, mean: torch.Tensor, scale: float, b_dec: torch.Tensor) -> None:
        """Set the normalisation constants and the initial decoder bias (normalised space)."""
        with torch.no_grad():
            self.sae.norm_mean.copy_(mean)
            self.sae.norm_scale.fill_(scale)
            self.sae.b_dec.copy_(b_dec)

    def loss_context(self, step: int | torch.Tensor) -> LossContext:
        """The schedule's state at ``step`` for the family's loss: the sparsity ramp (1 from
        the end of the family's warmup on; a captured step is past it) and the dead latents,
        None until a latent can first be dead (see :attr:`aux_on`)."""
        ramp = 1.0 if isinstance(step, torch.Tensor) else min(1.0, (step + 1) / self.sparsity_warmup)
        return LossContext(ramp, self.since_fired >= self.cfg.dead_window if self.aux_on else None)

    def step(self, x: torch.Tensor, step: int, autocast: contextlib.AbstractContextManager,
             tokens: int | None = None) -> None:
        """One optimiser step on normalised inputs, without reading anything on the host.
        ``tokens``: the tokens of the whole step, of which ``x`` is this rank's slice under
        torchrun (default: ``len(x)``).

        A non-finite loss does not raise here: its step (the first such) and value are kept on
        the device, and the steps go on (with non-finite weights) until the run reads them, every
        few steps and always before saving or publishing anything (:meth:`_Run._check`); it then
        stops naming the step where the loss first went non-finite.

        On CUDA the step is captured as a CUDA graph once its shape and settings are fixed
        (see :class:`_GraphedStep`) and replayed from then on."""
        lr = self.cfg.lr * _schedule(step, self.total_steps, self.cfg.lr_warmup_frac, self.cfg.lr_decay_frac)
        if self.lr is None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        else:
            self.lr.fill_(lr)
        self.aux_on = self.aux_on or self.since_fired_bound >= self.cfg.dead_window
        if self.graph is None or not self.graph.run(x, step, autocast):
            self.live = self.update(x, step, autocast, tokens)
        self.since_fired_bound += len(x) if tokens is None else tokens
        self.live["lr"] = torch.tensor(lr)

    def update(self, x: torch.Tensor, step: int | torch.Tensor, autocast: contextlib.AbstractContextManager,
               tokens: int | None = None) -> dict[str, torch.Tensor]:
        """The device work of a step (what a CUDA graph captures): loss, backward, under
        torchrun the ranks' sums (:meth:`_reduce`), non-finite bookkeeping, decoder-gradient
        projection, clipping, Adam, decoder renormalisation and dead-latent counters. Returns
        the live figures (loss, recon, l0) as device tensors."""
        with autocast:
            result = self.sae.loss(x, self.loss_context(step))
        self.opt.zero_grad(set_to_none=True)
        result.loss.backward()
        live = {"loss": result.loss.detach(), "recon": result.recon.detach(), "l0": result.l0.detach()}
        if self.world is not None:
            live, result = self._reduce(len(x) / tokens, live, result)
        first = torch.isfinite(live["loss"]).logical_not_() & (self.bad_step < 0)
        self.bad_step.copy_(torch.where(first, step, self.bad_step))
        self.bad_loss.copy_(torch.where(first, live["loss"].float(), self.bad_loss))
        self.sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.sae.set_decoder_unit_norm()
        self.sae.update_stats(result)
        self.since_fired += len(x) if tokens is None else tokens
        self.since_fired.masked_fill_(result.fires > 0, 0)
        return live

    def _reduce(self, share: float, live: dict[str, torch.Tensor], result: LossResult
                ) -> tuple[dict[str, torch.Tensor], LossResult]:
        """The whole batch's step from the ranks' slices (``share``: this rank's fraction of
        the batch's tokens): each rank's loss is a mean over its own tokens, so the batch's
        gradients and live figures are the ranks' weighted by their shares and summed; the
        latents' firing counts are summed, and a family's batch threshold statistic (the
        smallest kept activation) is the smallest over the ranks.

        Gradients, figures and counts travel in one buffer, one all_reduce a step (the counts
        as float32, exact up to 2**24 tokens a batch); the gradients become views of it."""
        params = list(self.sae.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        weighted = sum(g.numel() for g in grads) + len(_LIVE)
        flat = torch.cat([*(g.reshape(-1) for g in grads), torch.stack([live[k].float() for k in _LIVE]),
                          result.fires.float()])
        flat[:weighted].mul_(share)
        self.world.sum_(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        min_active = result.min_active
        if self.batch_state and min_active is not None:
            min_active = self.world.min_(min_active.detach().clone())
        return (dict(zip(_LIVE, flat[offset:weighted], strict=True)),
                result._replace(fires=flat[weighted:].long(), min_active=min_active))

    def dead(self, seen: int) -> int:
        """Latents dead after ``seen`` training tokens (:func:`vitscope.metrics.dead_latents`
        over :func:`vitscope.metrics.dead_window`); reads the device."""
        return dead_latents(self.since_fired, dead_window(self.cfg.dead_window, seen))

    def flags(self, weights: bool = False) -> torch.Tensor:
        """On the device, for the host to read in one go with the other SAEs': [first non-finite
        step or -1, largest dead-latent counter, and with ``weights`` 1 if every parameter is
        finite else 0]."""
        out = [self.bad_step, self.since_fired.max()]
        if weights:
            out.append(torch.stack([torch.isfinite(p).all() for p in self.sae.parameters()]).all().long())
        return torch.stack(out)

    def read_flags(self, values: list[int]) -> None:
        """Take in what the host read of :meth:`flags`."""
        self.since_fired_bound = values[1]

    def state(self) -> dict:
        """What a resumed run needs besides the step: weights, Adam state, dead-latent counters."""
        return {"model": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
                "optim": self.opt.state_dict(), "since_fired": self.since_fired.cpu()}

    def load(self, state: dict) -> None:
        """Restore :meth:`state`."""
        self.sae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        if self.lr is not None:  # the saved state brought its own learning rate: read ours again
            for group in self.opt.param_groups:
                group["lr"] = self.lr
        self.since_fired.copy_(state["since_fired"])
        self.since_fired_bound = int(self.since_fired.max())


class _GraphedStep:
    """A trainer's step captured as a CUDA graph and replayed: on a GPU a step of a small or
    mid-sized SAE is bound by the ~130 kernel launches Python issues for it, not by the GPU
    (and a sweep issues them for every SAE), while a replay launches them all at once.

    A step is captured once it is fixed: full batches, the sparsity ramp done (its coefficients
    are constants in the graph); it is captured again when the AuxK loss switches on.
    The step number and the learning rate are device tensors written before each replay.
    Following PyTorch's recipe, a few eager steps run on a side stream before the capture;
    until then, and for any other step (a short last batch), the step runs eagerly. Capture
    runs in thread-local error mode, since the token stream's thread pins memory meanwhile."""

    WARMUP = 2

    def __init__(self, trainer: SaeTrainer):
        self.trainer = trainer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None  # what the captured graph was captured for
        self.eligible = 0  # eager steps run so far under the current key
        self.x: torch.Tensor | None = None
        self.step_t: torch.Tensor | None = None
        self.live: dict[str, torch.Tensor] = {}

    def run(self, x: torch.Tensor, step: int, autocast: contextlib.AbstractContextManager) -> bool:
        """Run the step through the graph (capturing it first if due); False: run it eagerly."""
        # On the SAE's own GPU: capture and replay use the current device's streams, and a sweep's
        # SAEs may be on several GPUs.
        with torch.cuda.device(x.device):
            return self._run(x, step, autocast)

    def _run(self, x: torch.Tensor, step: int, autocast: contextlib.AbstractContextManager) -> bool:
        tr = self.trainer
        if len(x) != tr.cfg.batch_size or step + 1 < tr.sparsity_warmup:
            return False
        key = (tuple(x.shape), x.dtype, tr.aux_on)
        if key != self.key:
            self.key, self.graph, self.eligible = key, None, 0
        if self.graph is None:
            if self.eligible < self.WARMUP:
                self.eligible += 1
                side = torch.cuda.Stream(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    tr.live = tr.update(x, step, autocast)
                torch.cuda.current_stream(x.device).wait_stream(side)
                return True
            try:
                self._capture(x, autocast)
            except RuntimeError as e:  # a kernel or library that cannot be captured: stay eager
                log.warning("SAE %s: the training step could not be captured as a CUDA graph (%s); it runs "
                            "eagerly", tr.plan.sae_id, e)
                tr.graph = None
                return False
        self.x.copy_(x)
        self.step_t.fill_(step)
        self.graph.replay()
        tr.live = dict(self.live)
        return True

    def _capture(self, x: torch.Tensor, autocast: contextlib.AbstractContextManager) -> None:
        self.x = torch.empty_like(x)
        self.step_t = torch.zeros((), dtype=torch.long, device=x.device)
        graph = torch.cuda.CUDAGraph()
        # A capture stream of the SAE's GPU: graph()'s own default is made once, on the GPU that
        # was current at the first capture.
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(x.device), capture_error_mode="thread_local"):
            self.live = self.trainer.update(self.x, self.step_t, autocast)
        self.graph = graph


class _Diverged(Exception):
    def __init__(self, member: SaeTrainer, what: str, step: int, seen: int):
        self.member, self.what, self.step, self.seen = member, what, step, seen


def plan_saes(cfgs: Sequence[TrainConfig], aset: ActivationSet, n_tokens: int) -> list[SaePlan]:
    """Resolve each config against the set (layer, width, defaults) into its architecture,
    hyper-parameters and id; refuses invalid architectures before any data is read."""
    m = aset.manifest
    plans = []
    for cfg in cfgs:
        layer = m.layers[-1] if cfg.layer is None else m.layer_position(cfg.layer)
        d_sae = cfg.d_sae or cfg.expansion * m.d_model
        sae_config = SaeConfig(m.d_model, d_sae, cfg.sae.resolved(m.d_model, d_sae))
        sae_class(cfg.variant).check_config(sae_config)  # refuse bad settings before reading any data
        hyper = hyper_parameters(cfg, m.set_id, layer, d_sae, n_tokens, sae_config.hyper)
        plans.append(SaePlan(cfg, sae_id(hyper), layer, sae_config, hyper))
    return plans


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or find, if already published) the SAE that ``cfg`` describes."""
    return train_sweep([cfg])[0]


def train_sweep(cfgs: Sequence[TrainConfig]) -> list[TrainResult]:
    """Train (or find, if already published) every SAE in ``cfgs`` from one pass over the
    data; results come back in the order of ``cfgs``.

    Under torchrun (WORLD_SIZE above 1) every process calls this with the same configs, and
    the processes train the SAEs data-parallel: each on its slice of every batch, rank 0
    publishing; every process returns the results."""
    with distributed.joined() as world:
        with distributed.together(world):
            plans, results, run = _prepare(cfgs, world)
        if run is not None:
            for r in run.execute():
                results[r.sae_id] = r
        return [results[p.sae_id] for p in plans]


def _prepare(cfgs: Sequence[TrainConfig], world: World | None
             ) -> tuple[list[SaePlan], dict[str, TrainResult], _Run | None]:
    """The sweep's plans, the results of its SAEs already published, and the run that trains
    the others (None if there are none)."""
    shared = check_shared(list(cfgs))
    store = open_store(shared.store)
    aset = ActivationSet.open(store, shared.activations)
    m = aset.manifest
    positions = m.layout.token_indices(shared.tokens)
    if len(aset) == 0 or len(positions) == 0:
        raise TrainingError(f"activation set {m.set_id} has no {'/'.join(shared.tokens)} tokens to train on")
    tokens_per_epoch = len(aset) * len(positions)
    n_tokens = shared.n_tokens or tokens_per_epoch
    if n_tokens <= 0:
        raise TrainingError(f"n_tokens must be positive, got {n_tokens}")
    plans = plan_saes(cfgs, aset, n_tokens)
    heldout = _heldout(store, shared, aset, plans)
    results: dict[str, TrainResult] = {}
    todo: dict[str, SaePlan] = {}
    for p in plans:
        if p.sae_id in results or p.sae_id in todo:
            continue
        if store.exists(f"{sae_prefix(p.sae_id)}/cfg.json"):
            log.info("SAE %s already published in %s: reusing it", p.sae_id, store.uri)
            record = load_record(store, p.sae_id)
            results[p.sae_id] = TrainResult(p.sae_id, scalar_metrics(record.metrics), reused=True)
        else:
            todo[p.sae_id] = p
    if not todo:
        return plans, results, None
    run = _Run(shared, store, aset, positions, list(todo.values()), n_tokens,
               run_id=content_id({"sweep": sorted(p.sae_id for p in plans)}), heldout=heldout, world=world)
    return plans, results, run


def _heldout(store: Store, shared: TrainConfig, aset: ActivationSet, plans: list[SaePlan]) -> ActivationSet | None:
    """The held-out set of the final metrics pass, checked against the training set before any
    training (a mismatch found after an hour of training would lose it)."""
    if not shared.heldout:
        return None
    heldout = ActivationSet.open(store, shared.heldout)
    try:
        aset.manifest.check_heldout(heldout.manifest, sorted({p.layer for p in plans}))
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if not len(heldout) or not len(heldout.manifest.layout.token_indices(shared.tokens)):
        raise TrainingError(f"held-out set {shared.heldout} has no {'/'.join(shared.tokens)} tokens")
    return heldout


class _Run:
    """The data pass that trains the unpublished SAEs of a sweep, then evaluates and publishes them.

    The SAEs may be spread over several devices (:func:`distributed.sweep_devices`); under
    torchrun (``world``) every rank runs the pass on its own device and its slice of each
    batch, and rank 0 alone writes checkpoints, publishes, logs and shows progress."""

    def __init__(self, shared: TrainConfig, store: Store, aset: ActivationSet, positions, plans: list[SaePlan],
                 n_tokens: int, run_id: str, heldout: ActivationSet | None = None, world: World | None = None):
        self.shared, self.store, self.aset, self.plans, self.heldout = shared, store, aset, plans, heldout
        self.n_tokens, self.run_id, self.world = n_tokens, run_id, world
        self.root = world is None or world.rank == 0
        self.devices = [world.device(shared.device)] if world else distributed.sweep_devices(shared.device)
        slots = distributed.place([p.sae_config.d_in * p.sae_config.d_sae for p in plans], len(self.devices))
        self.placement = [self.devices[i] for i in slots]
        cuda = self.devices[0].type == "cuda"
        if not cuda:
            keep_freed_memory()  # a CPU step's large blocks are reused, not page-faulted anew each step
        self.layers = sorted({p.layer for p in plans})
        self.batch_size = shared.batch_size
        self.total_steps = max(1, math.ceil(n_tokens / self.batch_size))
        if world is not None:
            self._check_world(world)
        elif len(self.devices) > 1:
            log.info("sweep of %d SAEs over %d devices: %s", len(plans), len(self.devices),
                     ", ".join(f"{d}: {slots.count(i)}" for i, d in enumerate(self.devices)))
        try:
            self.stream = TokenStream(aset, self.layers, positions, self.batch_size, seed=shared.resolved_data_seed,
                                      buffer_tokens=shared.buffer_tokens, chunk_tokens=shared.chunk_tokens,
                                      pin_memory=cuda,
                                      # half-size transfers; the GPU converts (normalize casts to float32)
                                      out_dtype=None if cuda else torch.float32)
        except StreamError as e:
            raise TrainingError(str(e)) from e
        log.info("token stream: shuffle windows of %d tokens, %d layer(s): about %.1f GiB of read buffers "
                 "(lower --buffer-tokens to use less)", self.stream.buffer_tokens, len(self.layers),
                 self.stream.buffer_bytes / 2**30)
        # No cast cache: a CUDA graph must recast the weights it captured on every replay.
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
                         if shared.autocast and cuda else contextlib.nullcontext())

    def _check_world(self, world: World) -> None:
        """Refuse what data-parallel training cannot do: a batch (or the short last one) with
        fewer tokens than there are ranks, which would leave a rank without a slice."""
        last = self.n_tokens % self.batch_size
        if self.batch_size < world.size or 0 < last < world.size:
            short = self.batch_size if self.batch_size < world.size else last
            raise TrainingError(f"a batch of {short} tokens cannot be split over {world.size} processes: raise "
                                f"--batch-size (now {self.batch_size}) or change --n-tokens (now {self.n_tokens}) "
                                f"so that every batch has at least one token per process")
        per = self.batch_size // world.size
        log.info("rank %d of %d on %s: data-parallel, %s tokens of each batch of %d per process", world.rank,
                 world.size, self.devices[0], per if self.batch_size % world.size == 0 else f"{per}-{per + 1}",
                 self.batch_size)
        if self.devices[0].type == "cuda" and self.shared.cuda_graphs:
            log.info("training steps are not captured as CUDA graphs under torchrun (their all_reduce would be)")
        batch_families = sorted({p.cfg.variant for p in self.plans if issubclass(sae_class(p.cfg.variant), BatchTopKSae)})
        if batch_families:
            log.warning("%s SAEs select their k x n latents over each process's n tokens, not over the whole batch "
                        "of %d as one process would; their inference threshold comes from all processes' batches",
                        "/".join(batch_families), self.batch_size)

    # --- set-up ------------------------------------------------------------------------------
    def _members(self) -> list[SaeTrainer]:
        members = [SaeTrainer(p, self.total_steps, device, self.world)
                   for p, device in zip(self.plans, self.placement, strict=True)]
        sample = self.stream.sample(self.shared.init_sample, seed=self.shared.resolved_data_seed)
        b_dec_cache: dict[tuple[int, str], torch.Tensor] = {}
        for layer in self.layers:
            mean, scale = fit_normalizer(sample[layer])
            x = (sample[layer] - mean) * scale
            log.info("layer %d: normalisation fitted on %d tokens (scale %.4g)", layer, len(x), scale)
            for mb in members:
                if mb.plan.layer != layer:
                    continue
                how = mb.cfg.b_dec_init
                if (layer, how) not in b_dec_cache:
                    b_dec_cache[layer, how] = geometric_median(x) if how == "geometric_median" else x.mean(dim=0)
                mb.init_from_sample(mean, scale, b_dec_cache[layer, how])
        return members

    def _progress(self) -> checkpoint.Progress | None:
        """The saved progress of this run, if it trained these very SAEs."""
        progress = checkpoint.load_progress(self.store, self.run_id)
        if progress is None:
            return None
        if set(progress.sae_ids) != {p.sae_id for p in self.plans}:
            log.warning("ignoring run state %s: it trains other SAEs", self.run_id)
            return None
        return progress

    def _resume(self, members: list[SaeTrainer], progress: checkpoint.Progress) -> None:
        for mb in members:
            state = checkpoint.load_state(self.store, self.run_id, progress.step, mb.plan.sae_id)
            d = state["model"]["W_dec"].shape
            if tuple(d) != (mb.plan.sae_config.d_sae, mb.plan.sae_config.d_in):
                raise TrainingError(f"run state {self.run_id} holds an SAE of shape {tuple(d)}, but SAE "
                                    f"{mb.plan.sae_id} is {mb.plan.sae_config.d_sae} x {mb.plan.sae_config.d_in}")
            mb.load(state)
        log.info("resuming run %s at step %d (%d tokens)", self.run_id, progress.step, progress.tokens)

    # --- the pass ------------------------------------------------------------------------------
    def execute(self) -> list[TrainResult]:
        """Train every SAE of the run (resuming from its saved state, if any), evaluate and publish."""
        batches = None
        try:
            with distributed.together(self.world):
                progress = self._progress()
                step = progress.step if progress else 0
                seen = progress.tokens if progress else 0
                batches = self.stream.batches(seen, self.n_tokens)  # reads the first window during the set-up
                members = self._members()
                if progress:
                    self._resume(members, progress)
            return self._train(batches, members, progress, step, seen)
        finally:
            if batches is not None:
                batches.close()

    def _train(self, batches, members: list[SaeTrainer], progress: checkpoint.Progress | None, step: int,
               seen: int) -> list[TrainResult]:
        if self.world is not None:  # the ranks computed the same start; rank 0's makes sure of it
            for mb in members:
                self.world.broadcast_(list(mb.sae.state_dict().values()))
        train_seconds = progress.train_seconds if progress else 0.0
        every = self.shared.checkpoint_every
        next_ckpt = (seen // every + 1) * every if every > 0 else None
        logger = _wandb(self.shared, members) if self.root else None
        bar = tqdm(total=self.n_tokens, initial=seen, unit="tok", unit_scale=True,
                   disable=not (self.shared.progress and self.root),
                   desc=f"train {len(members)} SAE{'s' if len(members) > 1 else ''}")
        # layer -> device -> its SAEs: each batch goes to each device once per layer
        by_layer: dict[int, dict[torch.device, list[SaeTrainer]]] = {layer: {} for layer in self.layers}
        for mb in members:
            by_layer[mb.plan.layer].setdefault(mb.device, []).append(mb)
        last_ckpt = progress.step if progress else None
        unchecked: dict[int, int] = {}  # step -> tokens before it, for the steps not yet checked
        self._synchronize()
        t0 = time.perf_counter()
        try:
            for batch in batches:
                lo, hi = self.world.bounds(len(batch)) if self.world is not None else (0, len(batch))
                for layer, groups in by_layer.items():
                    mine = batch.xs[layer][lo:hi]
                    for device, group in groups.items():
                        x = group[0].sae.normalize(mine.to(device, non_blocking=True))
                        for mb in group:
                            if self.world is None:
                                mb.step(x, step, self.autocast)
                            else:  # x is this rank's slice of the batch
                                mb.step(x, step, self.autocast, tokens=len(batch))
                unchecked[step] = seen
                step += 1
                seen += len(batch)
                bar.update(len(batch))
                save = next_ckpt is not None and seen >= next_ckpt and seen < self.n_tokens
                if step % CHECK_EVERY == 0 or save:
                    self._check(members, unchecked, weights=save)
                if step % CHECK_EVERY == 0 or seen >= self.n_tokens:  # they read the device too
                    if not bar.disable:
                        self._show(bar, members, batch, seen)
                    if logger:
                        logger.log(members, step, seen)
                if save:  # _check has waited for the queued steps
                    saved = checkpoint.Progress(step, seen, train_seconds + time.perf_counter() - t0,
                                                [mb.plan.sae_id for mb in members])
                    self._by_root(functools.partial(self._save, saved, members))
                    last_ckpt = step
                    next_ckpt += every
            self._check(members, unchecked, weights=True)  # nothing non-finite is published
        except _Diverged as e:
            if not self.root:  # every rank found it at the same check; rank 0 says so
                raise ReportedElsewhere from None
            raise TrainingError(self._diverged_message(e, last_ckpt)) from None
        except StreamError as e:
            where = (f"; the last checkpoint (step {last_ckpt}) is kept under {self.store.uri}/"
                     f"{checkpoint.run_prefix(self.run_id)}" if last_ckpt is not None else "")
            # under torchrun a read may fail on one rank alone, which torchrun then stops the others for
            who = f"process {self.world.rank} of {self.world.size}: " if self.world is not None else ""
            raise TrainingError(f"{who}{e}{where}") from e
        finally:
            bar.close()
        self._synchronize()  # queued GPU work belongs to the loop's time
        train_seconds += time.perf_counter() - t0

        def finish() -> list[TrainResult]:
            results = self._publish(members, step, seen, train_seconds)
            if logger:
                logger.finish(members, results)
            checkpoint.clear(self.store, self.run_id)
            return results

        return self._by_root(finish)

    def _save(self, progress: checkpoint.Progress, members: list[SaeTrainer]) -> None:
        checkpoint.save(self.store, self.run_id, progress, {mb.plan.sae_id: mb.state() for mb in members})

    def _by_root(self, fn: Callable[[], T]) -> T:
        """``fn()``; under torchrun run by rank 0 alone while the others wait (:meth:`World.from_root`)."""
        return fn() if self.world is None else self.world.from_root(fn)

    def _synchronize(self) -> None:
        """Wait for the work queued on the run's devices (a GPU runs asynchronously: a clock
        read while kernels are still queued would flatter the loop's speed)."""
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def _check(self, members: list[SaeTrainer], unchecked: dict[int, int], weights: bool = False) -> None:
        """Read every SAE's device-side flags in one transfer per device (this waits for the
        queued steps); raise :class:`_Diverged` for the earliest step whose loss was not finite,
        or, with ``weights`` (before anything is saved or published), for weights that are not
        finite (after the last step, whose update no loss has seen yet). Under torchrun the
        ranks agree on the flags first (:meth:`_agree`), so that they all stop or go on together.

        ``unchecked`` maps the steps since the last check to the tokens before each; only the
        latest step is left in it."""
        if not unchecked:
            return  # no step ran
        flags = [mb.flags(weights) for mb in members]
        values = _host_values(flags) if self.world is None else self._agree(torch.stack(flags))
        bad = [(v[0], i) for i, v in enumerate(values) if v[0] >= 0]
        if bad:
            bad_step, i = min(bad)
            mb = members[i]
            raise _Diverged(mb, f"loss became {mb.bad_loss.item()}", bad_step, unchecked[bad_step])
        last = max(unchecked)
        for mb, v in zip(members, values, strict=True):
            if weights and not v[2]:
                raise _Diverged(mb, "weights became non-finite", last, unchecked[last])
            mb.read_flags(v)
        last_seen = unchecked[last]
        unchecked.clear()
        unchecked[last] = last_seen

    def _agree(self, flags: torch.Tensor) -> list[list[int]]:
        """The ranks' flags (:meth:`SaeTrainer.flags`, one row per SAE) made one: the earliest
        non-finite step of any rank, and the smallest of the other columns (the dead-latent
        counters are the same on every rank; weights count as finite only where they are on
        all). One all_reduce: "no bad step" (-1) becomes the largest integer before it."""
        none = torch.iinfo(flags.dtype).max
        agreed = self.world.min_(torch.where(flags < 0, none, flags))
        return torch.where(agreed == none, -1, agreed).tolist()

    def _show(self, bar, members: list[SaeTrainer], batch, seen: int) -> None:
        """Live figures: per SAE, the batch's normalised MSE and L0 (and dead latents)."""
        figures = {}
        for mb in members[:4]:
            x = batch.xs[mb.plan.layer]
            var = (x.float() * mb.sae.norm_scale.cpu()).var(dim=0).sum().clamp_min(1e-12)
            nmse = (mb.live["recon"].cpu() / var).item()
            dead = mb.dead(seen)
            name = mb.plan.sae_id[:6] if len(members) > 1 else "nmse"
            figures[name] = f"{nmse:.3f}" + (f"/L0 {mb.live['l0'].item():.1f}/dead {dead}" if len(members) > 1 else "")
            if len(members) == 1:
                figures.update(l0=f"{mb.live['l0'].item():.1f}", dead=dead, lr=f"{mb.live['lr'].item():.2g}")
        if len(members) > 4:
            figures["+"] = f"{len(members) - 4} more"
        bar.set_postfix(figures, refresh=False)

    def _diverged_message(self, e: _Diverged, last_ckpt: int | None) -> str:
        cfg = e.member.cfg
        hyper: SaeHyper = e.member.plan.sae_config.hyper
        knob = f"{hyper.knob} (now {getattr(hyper, hyper.knob)})"
        kept = (f"the last good checkpoint (step {last_ckpt}) is kept under {self.store.uri}/"
                f"{checkpoint.run_prefix(self.run_id)}" if last_ckpt is not None else "no checkpoint was written yet")
        return (f"SAE {e.member.plan.sae_id} ({cfg.variant}, layer {e.member.plan.layer}): {e.what} at "
                f"step {e.step} ({e.seen} tokens): lower lr (now {cfg.lr}) or {knob}; nothing was published; {kept}")

    # --- evaluation and publishing -----------------------------------------------------------
    def _eval_stream(self) -> TokenStream:
        """The tokens of the final metrics pass: ``eval_tokens`` of them (fewer if the source
        has fewer), from the held-out set if there is one, else from the training set in an
        order of an epoch no training run reaches. The shuffle window is the pass itself, so only
        the chunks it uses are read."""
        source = self.heldout or self.aset
        positions = source.manifest.layout.token_indices(self.shared.tokens)
        n = min(self.shared.eval_tokens, len(source) * len(positions))
        try:
            return TokenStream(source, self.layers, positions, self.batch_size, seed=self.shared.resolved_data_seed,
                               buffer_tokens=max(n, 1), chunk_tokens=self.shared.chunk_tokens,
                               pin_memory=self.devices[0].type == "cuda",
                               out_dtype=None if self.devices[0].type == "cuda" else torch.float32)
        except StreamError as e:
            raise TrainingError(str(e)) from e

    @torch.no_grad()
    def _publish(self, members: list[SaeTrainer], steps: int, seen: int, train_seconds: float) -> list[TrainResult]:
        for mb in members:
            mb.sae.eval()
        accs = [Accumulator(mb.sae, mb.device) for mb in members]
        stream = self._eval_stream()
        start = EVAL_EPOCH * stream.tokens_per_epoch
        n_eval = min(self.shared.eval_tokens, stream.tokens_per_epoch)
        self._synchronize()
        t0 = time.perf_counter()
        try:
            for batch in stream.batches(start, start + n_eval):
                for layer in self.layers:
                    xs: dict[torch.device, torch.Tensor] = {}  # the batch on each device, once
                    for mb, acc in zip(members, accs, strict=True):
                        if mb.plan.layer == layer:
                            if mb.device not in xs:
                                xs[mb.device] = mb.sae.normalize(batch.xs[layer].to(mb.device, non_blocking=True))
                            acc.add(xs[mb.device])
        except StreamError as e:
            raise TrainingError(str(e)) from e
        self._synchronize()
        eval_seconds = time.perf_counter() - t0
        split = f"held-out set {self.heldout.manifest.set_id}" if self.heldout else "the training set"
        log.info("trained %d steps in %.1f s; final metrics on %d tokens of %s in %.1f s (%.0f%% of training)",
                 steps, train_seconds, n_eval, split, eval_seconds, 100 * eval_seconds / max(train_seconds, 1e-9))
        m = self.aset.manifest
        results = []
        for mb, acc in zip(members, accs, strict=True):
            metrics, hist = acc.result()
            metrics.update(dead=mb.dead(seen), dead_window=dead_window(mb.cfg.dead_window, seen))
            metrics.update(tokens=seen, steps=steps, tokens_per_s=seen / max(train_seconds, 1e-9),
                           train_seconds=train_seconds, eval_seconds=eval_seconds, sweep_size=len(members))
            if self.world is not None:
                metrics.update(world_size=self.world.size)
            p = mb.plan
            log.info("SAE %s (%s, layer %d): nmse %.4f, L0 %.1f, dead %d (no firing in the last %d training tokens), "
                     "never fired %d (evaluation), dense %d (%.0f tok/s)", p.sae_id, p.cfg.variant, p.layer,
                     metrics["nmse"], metrics["l0"], metrics["dead"], metrics["dead_window"], metrics["never_fired"],
                     metrics["dense"], metrics["tokens_per_s"])
            execution = {k: v for k, v in asdict(p.cfg).items()
                         if k in ("device", "autocast", "sparse", "cuda_graphs", "eval_tokens", "heldout",
                                  "checkpoint_every")}
            record = SaeRecord(
                sae_id=p.sae_id, config=p.sae_config, activation_set_id=m.set_id, layer=p.layer,
                tokens=list(p.cfg.tokens), model=m.model.get("spec", ""),
                model_record={k: m.model[k] for k in ("name", "pretrained", "options", "init_seed") if k in m.model},
                training={**p.hyper, **execution}, metrics=scalar_metrics(metrics), histogram=hist,
            )
            save_sae(self.store, mb.sae.cpu(), record)
            results.append(TrainResult(p.sae_id, record.metrics, reused=False))
        return results


def _host_values(flags: list[torch.Tensor]) -> list[list[int]]:
    """The SAEs' flags (:meth:`SaeTrainer.flags`) read on the host, one transfer per device."""
    rows: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        rows.setdefault(f.device, []).append(i)
    values: list[list[int]] = [[] for _ in flags]
    for device_rows in rows.values():
        for i, v in zip(device_rows, torch.stack([flags[i] for i in device_rows]).tolist(), strict=True):
            values[i] = v
    return values


def _wandb(shared: TrainConfig, members: list[SaeTrainer]):
    if not shared.wandb_project:
        return None
    from .wandb_log import WandbLogger

    return WandbLogger(shared.wandb_project, members)


__all__ = ["SHARED_FIELDS", "SaePlan", "SaeTrainer", "TrainConfig", "TrainResult", "TrainingError", "plan_saes",
           "train", "train_sweep"]
