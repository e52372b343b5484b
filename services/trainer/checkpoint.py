"""Resumable training state under ``runs/<run_id>/`` in the store (scratch, never a published SAE)::

    runs/<run_id>/step-000001200/<sae_id>.pt   model, optimiser and dead-latent counters of each SAE
    runs/<run_id>/progress.json                written last: the step every state file belongs to

The data order is a pure function of the seed and the token position (see
:mod:`vitscope.trainer.stream`), so the step alone says where the stream resumes; the
learning-rate and sparsity schedules are functions of the step too. A state folder is only
trusted once progress.json names it, so a run killed while saving resumes from the previous one.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vitscope.store import NotFound, Store

PREFIX = "runs"


@dataclass(frozen=True)
class Progress:
    step: int
    tokens: int
    train_seconds: float
    sae_ids: list[str]


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}/{run_id}"


def _step_prefix(run_id: str, step: int) -> str:
    return f"{run_prefix(run_id)}/step-{step:09d}"


def save(store: Store, run_id: str, progress: Progress, states: dict[str, dict[str, Any]]) -> None:
    """Write every SAE's state, then progress.json, then drop older states."""
    prefix = _step_prefix(run_id, progress.step)
    for sae_id, state in states.items():
        buf = io.BytesIO()
        torch.save(state, buf)
        store.put_bytes(f"{prefix}/{sae_id}.pt", buf.getvalue())
    store.put_bytes(f"{run_prefix(run_id)}/progress.json", json.dumps(asdict(progress)).encode())
    for key in store.list(f"{run_prefix(run_id)}/step-"):
        if not key.startswith(prefix + "/"):
            store.delete(key)


def load_progress(store: Store, run_id: str) -> Progress | None:
    try:
        return Progress(**json.loads(store.get_bytes(f"{run_prefix(run_id)}/progress.json")))
    except NotFound:
        return None


def load_state(store: Store, run_id: str, step: int, sae_id: str) -> dict[str, Any]:
    raw = store.get_bytes(f"{_step_prefix(run_id, step)}/{sae_id}.pt")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def clear(store: Store, run_id: str) -> None:
    """Remove a finished run's scratch state."""
    store.delete_prefix(f"{run_prefix(run_id)}/")
