"""iscam.stats: percentile bootstrap of the mean and its paired difference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iscam import metrics, stats


def _sample(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=2.0, scale=1.0, size=n)


def test_bootstrap_ci_contains_mean_and_matches_loop():
    values = _sample(40)
    interval = stats.bootstrap_ci(values, n_boot=500, seed=7)
    assert interval.estimate == pytest.approx(values.mean(), abs=1e-15)
    assert interval.low < interval.estimate < interval.high
    # The same resamples drawn one at a time, percentile by numpy.quantile.
    rng = np.random.default_rng(7)
    indices = rng.integers(0, 40, size=(500, 40))
    means = np.array([values[row].mean() for row in indices])
    low, high = np.quantile(means, [0.025, 0.975])
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)


def test_bootstrap_ci_memory_blocks_do_not_change_result(monkeypatch):
    values = _sample(30)
    whole = stats.bootstrap_ci(values, n_boot=300, seed=3)
    monkeypatch.setattr(stats, "_MAX_RESAMPLE_ELEMENTS", 30 * 7)  # blocks of 7 resamples
    assert stats.bootstrap_ci(values, n_boot=300, seed=3) == whole


def test_bootstrap_ci_deterministic_under_seed_and_accepts_tensors():
    values = _sample(25)
    first = stats.bootstrap_ci(values, seed=11)
    assert stats.bootstrap_ci(torch.from_numpy(values), seed=11) == first
    assert stats.bootstrap_ci(list(values), seed=11) == first
    assert stats.bootstrap_ci(values, seed=12) != first


def test_bootstrap_ci_narrows_with_more_images():
    widths = []
    for n in (20, 200, 2000):
        interval = stats.bootstrap_ci(_sample(n, seed=n), n_boot=2000)
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    # The width of a 95% interval of a mean is about 2 * 1.96 * sigma / sqrt(n) (sigma = 1 here).
    assert widths[2] == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)


def test_bootstrap_ci_level():
    values = _sample(50)
    narrow = stats.bootstrap_ci(values, level=0.5)
    wide = stats.bootstrap_ci(values, level=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_bootstrap_ci_single_and_constant_values():
    assert stats.bootstrap_ci([0.42]) == stats.CI(0.42, 0.42, 0.42)
    constant = stats.bootstrap_ci(np.full(10, 3.5), n_boot=100)
    assert constant == stats.CI(3.5, 3.5, 3.5)


@pytest.mark.parametrize(
    ("values", "options", "message"),
    [
        ([], {}, "empty"),
        ([1.0, float("nan"), 2.0], {}, r"index\(es\) \[1\]"),
        ([1.0, float("inf")], {}, "non-finite"),
        ([[1.0, 2.0]], {}, "1-D"),
        ([1.0, 2.0], {"n_boot": 0}, "n_boot"),
        ([1.0, 2.0], {"level": 95}, "level"),
    ],
)
def test_bootstrap_ci_rejects_bad_input(values, options, message):
    with pytest.raises(ValueError, match=message):
        stats.bootstrap_ci(values, **options)


def test_paired_diff_identical_is_exactly_zero():
    values = _sample(60)
    assert stats.paired_bootstrap_diff(values, values.copy()) == stats.CI(0.0, 0.0, 0.0)


def test_paired_diff_is_bootstrap_of_differences_and_narrower_than_unpaired():
    shared = _sample(80, seed=1) * 5  # large image-to-image variation, common to both methods
    a = shared + 0.3 + _sample(80, seed=2) * 0.1
    b = shared + _sample(80, seed=3) * 0.1
    paired = stats.paired_bootstrap_diff(a, b, seed=4)
    assert paired == stats.bootstrap_ci(a - b, seed=4)
    assert paired.estimate == pytest.approx(np.mean(a - b))
    assert paired.low > 0  # the 0.3 lead is real once images are paired
    interval_a, interval_b = stats.bootstrap_ci(a, seed=4), stats.bootstrap_ci(b, seed=4)
    assert interval_a.low < interval_b.high  # ...but the unpaired intervals overlap
    with pytest.raises(ValueError, match="same images"):
        stats.paired_bootstrap_diff(a, b[:-1])


def test_metrics_reexports_statistics():
    assert metrics.bootstrap_ci is stats.bootstrap_ci
    assert metrics.paired_bootstrap_diff is stats.paired_bootstrap_diff
    assert metrics.CI is stats.CI
