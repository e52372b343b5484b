"""The shared metric definitions (vitscope.metrics) that the trainer, analyzer and explorer use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitscope.metrics import (
    METRICS,
    FrequencyRange,
    dead_latents,
    dead_window,
    dense_latents,
    frequency_histogram,
    never_fired,
    scalar_metrics,
)


def test_dead_counts_the_training_window_and_never_fired_a_whole_pass():
    # tokens since each latent last fired in training
    since_fired = torch.tensor([0, 50, 99, 100, 5000])
    assert dead_latents(since_fired, dead_window(100, seen=10_000)) == 2
    # A run shorter than the window: latents that did not fire in any of its tokens are dead.
    assert dead_window(100, seen=60) == 60 and dead_latents(torch.tensor([0, 59, 60]), dead_window(100, 60)) == 1
    # Whether a latent fired at all over a pass is another question, with its own name.
    frequency = np.array([0.0, 0.0, 1e-6, 0.02, 0.5])
    assert never_fired(frequency) == 2 and dense_latents(frequency) == 2


def test_histogram_bins_every_latent_that_fired_and_counts_the_others_apart():
    freq = np.array([0.0, 1e-12, 1e-8, 3e-5, 0.01, 1.0, 0.0])
    hist = frequency_histogram(freq)
    assert hist.log10_edges[0] == -8 and hist.log10_edges[-1] == 0 and len(hist.counts) == 16
    assert hist.counts.sum() == 5 and hist.never_fired == 2
    assert hist.counts[0] == 2 and hist.counts[-1] == 1  # below 1e-8 in the first bin, 1.0 in the last
    assert hist.to_json() == {"log10_edges": hist.log10_edges.tolist(), "counts": hist.counts.tolist(), "never": 2}


def test_scalar_metrics_keep_numbers_and_read_old_records_in_todays_names():
    new = {"nmse": 0.1, "dead": 4, "dead_window": 10_000_000, "never_fired": 2, "hist": [1, 2], "note": "x"}
    assert scalar_metrics(new) == {"nmse": 0.1, "dead": 4.0, "dead_window": 1e7, "never_fired": 2.0}
    # Before the split, "dead" was the evaluation pass's never-firing count.
    assert scalar_metrics({"nmse": 0.1, "dead": 4}) == {"nmse": 0.1, "never_fired": 4.0}


def test_frequency_range_is_the_one_latent_filter():
    freq = np.array([0.0, 1e-6, 1e-3, 0.01, 0.5])
    assert FrequencyRange.from_bounds(0, 0).mask(freq).all()  # 0: unbounded
    assert FrequencyRange.from_bounds(1e-3, 0.01).mask(freq).tolist() == [False, False, True, True, False]
    assert FrequencyRange.from_bounds(1e-3, 0).bounds() == (1e-3, 0.0)
    for low, high, message in [(-1, 0, "non-negative"), (math.nan, 0, "non-negative"), (0.5, 0.1, "above")]:
        with pytest.raises(ValueError, match=message):
            FrequencyRange.from_bounds(low, high)
    # The explorer's log10 slider: its ends mean no bound, so never-firing latents stay in.
    assert FrequencyRange.from_log10(-8.0, 0.0) == FrequencyRange()
    assert FrequencyRange.from_log10(-2.0, 0.0).bounds() == (0.01, 0.0)
    assert FrequencyRange.from_log10(-8.0, -1.0).mask(freq).tolist() == [True, True, True, True, False]


def test_every_shown_metric_has_a_label_a_definition_and_a_format():
    assert list(METRICS) == ["nmse", "l0", "dead", "never_fired", "dense"]
    for m in METRICS.values():
        assert m.label and m.definition and format(1, m.format)
    assert "training tokens" in METRICS["dead"].definition and "pass" in METRICS["never_fired"].definition
