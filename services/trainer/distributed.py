"""Training beyond one device: data-parallel processes under torchrun, and a sweep spread over
the devices of one process.

Data parallelism (:func:`joined`, :class:`World`): ``torchrun --nproc-per-node N --no-python
vitscope train ...`` starts N processes (ranks) that read the same token stream (same seed, same
order) and each train on their own slice of every batch; the trainer sums their gradients,
weighted by their share of the batch, before anything else touches them, so every rank takes
the same step that one process would take on the whole batch. The collectives run over gloo
on CPUs and NCCL between GPUs; object collectives and barriers (the set-up's verdict, the
published results) always go over gloo, so a rank waiting for rank 0 to publish holds no GPU
collective open.

A sweep on several devices of one process (:func:`sweep_devices`, :func:`place`):
``--device cuda:all`` (or a list such as ``cuda:0,cuda:2``) places the sweep's SAEs on those
devices, balanced by size; each batch is read once and copied once per device and layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from vitscope.device import resolve_device

T = TypeVar("T")


class ReportedElsewhere(SystemExit):
    """This rank stops for an error that another rank reports: the first rank that failed (rank
    0 for an error every rank hit alike, such as a bad activation set id) raises the error
    itself, so that the job's log holds its one line once, and the others leave quietly (a
    SystemExit with status 1, which the CLI's error handler does not print)."""

    def __init__(self) -> None:
        super().__init__(1)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a data-parallel run (torchrun's RANK,
    WORLD_SIZE and LOCAL_RANK)."""

    rank: int
    size: int
    local_rank: int

    def device(self, name: str) -> torch.device:
        """The device this rank trains on for a ``--device`` of ``name``: its own GPU
        (``cuda:LOCAL_RANK``) for ``auto`` with GPUs or ``cuda``, else the CPU."""
        if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if name not in ("auto", "cuda"):
            raise ValueError(f"--device {name}: under torchrun every process trains on its own GPU (cuda:LOCAL_RANK); "
                             "use --device cuda, auto or cpu")
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {self.rank} has LOCAL_RANK {self.local_rank}, but torch sees "
                             f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node")
        device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)  # NCCL uses the current device
        return device

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's slice [lo, hi) of a batch of ``n`` tokens (the ranks' slices tile it in
        rank order and differ in length by at most one token)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum of ``t`` over the ranks, in place; returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's."""
        for t in tensors:
            dist.broadcast(t, src=0)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block every rank runs alike (the set-up: reading the config, the store, the first
        data) that fails on every rank when it fails on any: the first rank that failed raises
        its own error, the others :class:`ReportedElsewhere`. Without it a rank whose set-up
        failed would leave the others waiting in their first collective."""
        error: Exception | None = None
        try:
            yield
        except Exception as e:  # raised again below, on the first rank that failed
            error = e
        failed: list[bool | None] = [None] * self.size
        dist.all_gather_object(failed, error is not None)
        if error is not None and not any(failed[:self.rank]):
            raise error
        if any(failed):
            raise ReportedElsewhere

    def from_root(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone (writing checkpoints, publishing) while the others wait;
        every rank returns its result. When it raises, rank 0 raises the error and the others
        :class:`ReportedElsewhere`."""
        box: list[tuple[bool, T | None]] = [(False, None)]
        if self.rank == 0:
            try:
                box = [(True, fn())]
            except BaseException:
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        done, value = box[0]
        if not done:
            raise ReportedElsewhere
        return value


@contextlib.contextmanager
def joined() -> Iterator[World | None]:
    """This process's :class:`World` under torchrun (WORLD_SIZE above 1), its process group set
    up for the block and taken down after it; None otherwise (one process, nothing set up)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # a caller's own group: use it, leave it to them
        yield World(dist.get_rank(), dist.get_world_size(), local_rank)
        return
    # gloo for CPU tensors and objects, NCCL for GPU tensors; NCCL starts on first use, so a run
    # on the CPUs of a GPU machine never starts it.
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), local_rank)
        # No rank closes its connections while another may still read from them (rank 0 returns
        # from broadcasting the results before the others have them): that aborted a rank now and
        # then ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def together(world: World | None) -> contextlib.AbstractContextManager:
    """:meth:`World.together` under torchrun, else nothing."""
    return world.together() if world is not None else contextlib.nullcontext()


def sweep_devices(name: str) -> list[torch.device]:
    """The devices a sweep in one process trains on, for a ``--device`` of ``name``: every
    visible GPU for ``cuda:all``, the listed ones for a comma-separated list (``cuda:0,cuda:1``;
    ``cpu,cpu`` exercises the placement on a CPU), else the one device ``name`` resolves to."""
    if name == "cuda:all":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda:all: torch sees no CUDA device")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = [resolve_device(part.strip()) for part in name.split(",")]
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"--device {name}: the devices of a sweep must be of one kind (all GPUs or all CPU)")
    return devices


def place(sizes: Sequence[int], n_devices: int) -> list[int]:
    """Which of ``n_devices`` each SAE of a sweep trains on, given each SAE's size (its
    parameters, which its step's work and memory scale with): the largest first, each onto the
    device with the least placed so far (ties: the lowest index). Equal sizes go round-robin."""
    load = [0] * n_devices
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        device = min(range(n_devices), key=load.__getitem__)
        out[i] = device
        load[device] += sizes[i]
    return out
