"""Tests for training.evaluation.stats: the mean and spread over seeds, and paired differences."""

from __future__ import annotations

import pytest

from training.evaluation.stats import mean_sd, paired_difference


def test_mean_sd_uses_the_sample_sd_and_gives_one_value_no_spread():
    assert mean_sd([0.98, 0.99, 0.97]) == {"mean": pytest.approx(0.98), "sd": pytest.approx(0.01)}
    assert mean_sd([0.5]) == {"mean": 0.5, "sd": 0.0}
    with pytest.raises(ValueError, match="no values"):
        mean_sd([])


def test_paired_difference_gives_the_interval_of_the_per_seed_gap():
    d = paired_difference([0.986, 0.984, 0.990], [0.984, 0.983, 0.985])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.0026667, abs=1e-7)
    assert d["sd"] == pytest.approx(0.0020817, abs=1e-7)
    assert d["t"] == pytest.approx(d["mean"] / (d["sd"] / 3**0.5))
    # Student's t with 2 degrees of freedom: 4.303 standard errors each side.
    half = 4.302653 * d["sd"] / 3**0.5
    assert (d["low"], d["high"]) == (
        pytest.approx(d["mean"] - half, abs=1e-7),
        pytest.approx(d["mean"] + half, abs=1e-7),
    )
    assert d["low"] < 0 < d["high"]  # three seeds this noisy cannot call it
    assert paired_difference([0.9], [0.8]) is None  # one seed has no spread
    same = paired_difference([0.99, 0.98], [0.98, 0.97])
    assert same["t"] is None and same["low"] == pytest.approx(same["high"])


def test_paired_difference_refuses_arms_of_different_lengths():
    with pytest.raises(ValueError, match="3 vs 2 values"):
        paired_difference([0.9, 0.8, 0.7], [0.9, 0.8])
