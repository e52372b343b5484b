"""What the SAE metrics mean, defined once for every stage: the trainer computes and publishes
them, the analyzer serves them, the explorer shows and filters by them.

Two counts of inactive latents are easily confused, so they have different names:

- ``dead``: latents that fired on none of the last ``dead_window`` *training* tokens, counted
  when training ended (the latents the AuxK loss trains). ``dead_window`` is published beside
  it: the configured window, or every training token when training saw fewer.
- ``never_fired``: latents with zero firings over a whole *pass* over data: the trainer's
  evaluation pass (``eval_tokens`` tokens), or the analyzer's pass over the whole activation set.

A latent can be dead without never firing (it fired early in training, then stopped), and
never fire in a pass without being dead (it still fires in training, just not on those tokens).

SAE records published before the two were told apart have one ``dead`` key that counted what
is now ``never_fired`` over the evaluation pass: :func:`scalar_metrics` reads them so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

DENSE_FREQUENCY = 1e-2
"""A latent firing on more than this fraction of tokens is dense."""
LOG10_LOW = -8.0
"""The low end of every log10 firing-frequency scale (histograms, the explorer's filter)."""
LOG10_BINS = 16


@dataclass(frozen=True)
class Metric:
    """How one scalar metric is shown: its label, what it means and its number format."""

    key: str
    label: str
    definition: str
    format: str


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("nmse", "NMSE", "Fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖² over the evaluation "
                           "tokens (lower is better)", ".4f"),
    Metric("l0", "L0", "Mean number of active latents per token over the evaluation tokens", ".2f"),
    Metric("dead", "Dead", "Latents that fired on none of the last dead_window training tokens, counted when "
                           "training ended", "d"),
    Metric("never_fired", "Never fired", "Latents with zero firings over a whole pass: the analysis pass over "
                                         "the activation set once analysed, else the evaluation tokens", "d"),
    Metric("dense", "Dense", f"Latents firing on more than {DENSE_FREQUENCY:.0%} of the evaluation tokens", "d"),
)}
"""The metrics every SAE is summarised by, in display order."""


def current_names(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """An SAE record's metrics in today's names: a record published before ``dead`` and
    ``never_fired`` were told apart (``dead`` without ``never_fired``) counted never-firing
    latents of its evaluation pass as ``dead``, so that count is read as ``never_fired`` and the
    record has no ``dead``."""
    out = dict(metrics)
    if "dead" in out and "never_fired" not in out:
        out["never_fired"] = out.pop("dead")
    return out


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of an SAE record's metrics, as floats, in today's names."""
    return {k: float(v) for k, v in current_names(metrics).items() if isinstance(v, (int, float))}


def dead_latents(since_fired: Any, window: int) -> int:
    """Latents that fired on none of the last ``window`` training tokens, given each latent's
    count of training tokens since it last fired (a tensor or array)."""
    return int((since_fired >= window).sum())


def dead_window(window: int, seen: int) -> int:
    """The window ``dead`` is counted over after ``seen`` training tokens: ``window``, or every
    training token when there were fewer (a latent that never fired in a short run is dead)."""
    return min(window, seen)


def never_fired(frequency: np.ndarray) -> int:
    """Latents with zero firings over the pass ``frequency`` (firings per token) was measured on."""
    return int((np.asarray(frequency) <= 0).sum())


def dense_latents(frequency: np.ndarray) -> int:
    """Latents firing on more than :data:`DENSE_FREQUENCY` of the pass's tokens."""
    return int((np.asarray(frequency) > DENSE_FREQUENCY).sum())


class FrequencyHistogram(NamedTuple):
    """Latents by log10 firing frequency: ``counts[i]`` latents have log10(frequency) in
    [edges[i], edges[i + 1]) (the last bin also holds frequency 1, the first everything below
    its edge); the ``never_fired`` latents have no logarithm and are in no bin."""

    log10_edges: np.ndarray
    counts: np.ndarray
    never_fired: int

    def to_json(self) -> dict[str, Any]:
        """As an SAE record stores it (``never`` is ``never_fired``)."""
        return {"log10_edges": self.log10_edges.tolist(), "counts": self.counts.tolist(), "never": self.never_fired}


def frequency_histogram(frequency: np.ndarray, bins: int = LOG10_BINS, low: float = LOG10_LOW) -> FrequencyHistogram:
    """The log10 firing-frequency histogram of latents whose firings per token are ``frequency``:
    ``bins`` equal bins from 10^low to 1, every latent that fired in one of them."""
    frequency = np.asarray(frequency, dtype=np.float64)
    edges = np.linspace(low, 0.0, bins + 1)
    fired = frequency[frequency > 0]
    counts, _ = np.histogram(np.clip(np.log10(fired), low, 0.0), bins=edges)
    return FrequencyHistogram(edges, counts, never_fired(frequency))


@dataclass(frozen=True)
class FrequencyRange:
    """The latents a frequency filter keeps: firing frequency in [low, high], both inclusive."""

    low: float = 0.0
    high: float = math.inf

    @classmethod
    def from_bounds(cls, min_frequency: float, max_frequency: float) -> FrequencyRange:
        """From the API's bounds, where 0 means unbounded on that side; ``ValueError`` for a
        negative (or NaN) bound or an empty range."""
        if not (min_frequency >= 0 and max_frequency >= 0):  # also rejects NaN
            raise ValueError(f"frequency bounds must be non-negative (got min {min_frequency}, max {max_frequency})")
        high = max_frequency or math.inf
        if min_frequency > high:
            raise ValueError(f"min_frequency {min_frequency} is above max_frequency {max_frequency}")
        return cls(min_frequency, high)

    @classmethod
    def from_log10(cls, lo: float, hi: float, low: float = LOG10_LOW) -> FrequencyRange:
        """From a log10 scale whose ends (``low`` and 0) mean unbounded on that side."""
        return cls(0.0 if lo <= low else 10.0**lo, math.inf if hi >= 0.0 else 10.0**hi)

    def bounds(self) -> tuple[float, float]:
        """(min_frequency, max_frequency) as the API takes them: 0 for an open side."""
        return self.low, 0.0 if math.isinf(self.high) else self.high

    def mask(self, frequency: np.ndarray) -> np.ndarray:
        """Which of the latents with these frequencies pass."""
        return (frequency >= self.low) & (frequency <= self.high)
