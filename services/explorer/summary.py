"""What the explorer says about a whole SAE, on any page: its metric values and how they are
written, its firing-frequency histogram as fractions of its latents, and where it stands among
the SAEs of a sweep (the NMSE-vs-L0 Pareto front)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitscope.metrics import METRICS
from vitscope.proto import pb


def never_fired(s: pb.Sae) -> int | None:
    """Latents that never fired over the analysis pass; None until the SAE is analysed."""
    return s.never_fired if s.HasField("never_fired") else None


def metric_values(s: pb.Sae) -> dict[str, float | None]:
    """The SAE's value of each of :data:`vitscope.metrics.METRICS` (None: not recorded), with
    ``never_fired`` over the analysis pass once analysed, else over the trainer's evaluation."""
    values: dict[str, float | None] = {key: s.metrics.get(key) for key in METRICS}
    if never_fired(s) is not None:
        values["never_fired"] = never_fired(s)
    return values


def fmt(value: float | int | None, spec: str) -> str:
    """A metric's value in its format (``Metric.format``, perhaps signed: "+d"), or "–" when it
    was not recorded."""
    if value is None:
        return "–"
    return format(int(value) if spec.endswith("d") else value, spec)


def frequency_fractions(s: pb.Sae) -> list[float]:
    """Each bin of the SAE's firing-frequency histogram as a fraction of all its latents, so
    SAEs of different widths compare (the never-fired ones are in no bin; empty until analysed)."""
    return [c / s.d_sae for c in s.log_frequency_counts]


def pareto_front(l0: Sequence[float], nmse: Sequence[float]) -> np.ndarray:
    """Which points of a sweep no other point beats: none has both an L0 and an NMSE at most
    theirs, one of them strictly lower (both are better lower). Ties are all on the front."""
    x, y = np.asarray(l0, dtype=float)[:, None], np.asarray(nmse, dtype=float)[:, None]
    # beats[i, j]: point j beats point i
    beats = (x.T <= x) & (y.T <= y) & ((x.T < x) | (y.T < y))
    return ~beats.any(axis=1)
