"""Summary statistics for latency samples and reward scores (pure Python, no numpy needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

# two-sided 95 % Student-t quantiles t_{0.975, df}; beyond the table the normal 1.96 is used
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
_NORMAL_975 = 1.959964


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default ``linear`` method); q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def t_quantile_975(df: int) -> float:
    if df < 1:
        return float("nan")
    if df in _T975:
        return _T975[df]
    keys = sorted(_T975)
    for a, b in zip(keys, keys[1:], strict=False):
        if a < df < b:  # interpolate in 1/df, which is close to linear for t quantiles
            wa, wb = 1 / a - 1 / df, 1 / df - 1 / b
            return (_T975[a] * wb + _T975[b] * wa) / (wa + wb)
    # beyond the table: interpolate in 1/df towards the normal quantile (df = inf, 1/df = 0)
    last = keys[-1]
    wa, wb = 1 / last - 1 / df, 1 / df
    return (_T975[last] * wb + _NORMAL_975 * wa) / (wa + wb)


def summarize_times(seconds: Sequence[float]) -> dict:
    """Latency summary in milliseconds: n, median, p90, p99, min, max, mean, std."""
    xs = [float(s) * 1000.0 for s in seconds]
    if not xs:
        return {"n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {
        "n": len(xs),
        "median_ms": percentile(xs, 50),
        "p90_ms": percentile(xs, 90),
        "p99_ms": percentile(xs, 99),
        "min_ms": min(xs),
        "max_ms": max(xs),
        "mean_ms": mean,
        "std_ms": std,
    }


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean with a Student-t confidence interval: {n, mean, std, ci_low, ci_high, half_width}."""
    if confidence != 0.95:
        raise ValueError("only 95 % intervals are tabulated")
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None, "half_width": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None, "half_width": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "half_width": half}


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline
