"""Numeric comparison of an output with its reference, and the tolerances per precision.

Figures (on float64 copies of the outputs): ``max_rel_err`` / ``median_rel_err``: ``|out - ref| / rms(ref)``
elementwise, max and median (the RMS normalisation keeps near-zero reference values from blowing the ratio
up); ``max_abs_err``; ``cosine``: cosine similarity of the flattened outputs; ``finite``. Export parity
(``export.parity``), the TensorRT build and refit checks (``engines``) all judge with these.
"""

from __future__ import annotations

import numpy as np

# per precision: (max_rel_err, median_rel_err, min cosine)
TOLERANCES: dict[str, tuple[float, float, float]] = {
    "fp32": (1e-3, 1e-4, 0.999999),
    "fp16": (5e-2, 5e-3, 0.9995),
    # Q/DQ graph vs ModelOpt's fake-quant module: the same scales, but a value on a rounding boundary may land
    # one quantization step apart (ORT rounds half to even) and that step propagates
    "int8": (2.5e-1, 5e-2, 0.998),  # seen on tiny, 6 views: max 0.149, median 0.0206, cosine 0.99943
    "fp8": (2.5e-1, 5e-2, 0.998),
}


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """The figures of ``candidate`` against ``reference`` (same number of elements)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    out = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {out.shape}")
    diff = np.abs(out - ref)
    rms = float(np.sqrt(np.mean(ref**2))) or 1.0
    rel = diff / rms
    denom = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(np.dot(ref, out) / denom) if denom > 0 else (1.0 if not diff.any() else 0.0)
    return {
        "max_abs_err": float(diff.max(initial=0.0)),
        "max_rel_err": float(rel.max(initial=0.0)),
        "median_rel_err": float(np.median(rel)) if rel.size else 0.0,
        "cosine": cosine,
        "finite": bool(np.isfinite(out).all()),
    }


def within(stats: dict[str, float], precision: str, tolerances: tuple[float, float, float] | None = None) -> bool:
    """Whether figures of :func:`compare` pass ``tolerances`` (default: those of ``precision``)."""
    max_rel, med_rel, cos = tolerances or TOLERANCES[precision]
    return bool(stats["finite"] and stats["max_rel_err"] <= max_rel and stats["median_rel_err"] <= med_rel and stats["cosine"] >= cos)
