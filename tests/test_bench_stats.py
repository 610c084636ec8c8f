"""Statistics of the benchmark against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from bench.stats import mean_ci, percentile, ratio, summarize_times, t_quantile_975


def test_percentile_matches_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)  # pos = 4 * 0.9 = 3.6 -> 4 + 0.6
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_times_in_ms():
    s = summarize_times([0.010, 0.020, 0.030, 0.040])
    assert s["n"] == 4
    assert s["median_ms"] == pytest.approx(25.0)
    assert s["min_ms"] == pytest.approx(10.0) and s["max_ms"] == pytest.approx(40.0)
    assert s["p90_ms"] == pytest.approx(37.0)
    assert s["p99_ms"] == pytest.approx(39.7)
    assert s["mean_ms"] == pytest.approx(25.0)
    assert s["std_ms"] == pytest.approx(math.sqrt(500 / 3))
    assert summarize_times([]) == {"n": 0}


def test_mean_ci_student_t():
    c = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # sd = sqrt(2.5); t(0.975, 4) = 2.776
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert c["mean"] == 3.0 and c["n"] == 5
    assert c["half_width"] == pytest.approx(half)
    assert c["ci_low"] == pytest.approx(3 - half) and c["ci_high"] == pytest.approx(3 + half)
    assert mean_ci([7.0])["ci_low"] is None
    assert mean_ci([])["mean"] is None
    assert mean_ci([1.0, float("nan"), 3.0])["n"] == 2


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706
    assert 2.042 > t_quantile_975(35) > 2.021
    assert t_quantile_975(10_000) == 1.96


def test_ratio():
    assert ratio(10.0, 5.0) == 2.0
    assert ratio(None, 5.0) is None and ratio(1.0, 0.0) is None
