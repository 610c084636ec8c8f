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


# two-sided 95 % Student-t quantiles t_{0.975, df} from a published table (NIST/SEMATECH e-Handbook of
# Statistical Methods, 1.3.6.7.2), including degrees of freedom between and beyond the code's own entries
PUBLISHED_T975 = {1: 12.706, 2: 4.303, 5: 2.571, 10: 2.228, 31: 2.040, 35: 2.030, 45: 2.014, 50: 2.009,
                  70: 1.994, 80: 1.990, 90: 1.987, 100: 1.984}
# larger df, from the same formula (scipy.stats.t.ppf(0.975, df), rounded): beyond the code's last entry (120)
LARGE_DF_T975 = {150: 1.976, 200: 1.972, 500: 1.965, 1000: 1.962, 10_000: 1.960}


@pytest.mark.parametrize("df,expected", sorted({**PUBLISHED_T975, **LARGE_DF_T975}.items()))
def test_t_quantiles_match_a_published_table(df, expected):
    assert t_quantile_975(df) == pytest.approx(expected, abs=1.5e-3)


def test_t_quantiles_match_scipy_for_every_df():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 400):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1.5e-3), df


def test_ratio():
    assert ratio(10.0, 5.0) == 2.0
    assert ratio(None, 5.0) is None and ratio(1.0, 0.0) is None


def test_per_view_interval_is_over_sets_not_views():
    from bench.quality import summarize_quality
    from bench.stats import mean_ci

    per_view = [[1.0, 1.1, 0.9], [2.0, 2.1, 1.9], [3.0, 3.2, 2.8]]
    scores = {"base": {"r": {"per_set": [sum(r) / 3 for r in per_view], "per_view": per_view}}}
    entry = summarize_quality(scores, ["base"])["variants"]["base"]["r"]
    assert entry["per_view"]["n"] == 3 and entry["per_view"]["views"] == 9  # correlated views: n = sets
    assert entry["per_view"]["half_width"] == pytest.approx(mean_ci(entry["values_per_set"])["half_width"])


def test_peak_table_prefers_the_most_specific_name():
    import torch

    from bench.env import lookup_peak

    assert lookup_peak("NVIDIA H100 80GB HBM3", torch.float16)[0] == 989.4
    assert lookup_peak("NVIDIA H100 PCIe", torch.float16)[0] == 756.0
    assert lookup_peak("NVIDIA L40", torch.float16)[0] == 181.0  # not the L4's 121
    assert lookup_peak("NVIDIA L40S", torch.float16)[0] == 362.1
