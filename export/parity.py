"""Export-time parity: the graph run by ONNX Runtime against the PyTorch module on the same random inputs.

The figures and tolerances are ``mvz.artifacts.compare``'s (shared with the engines' checks).

A figure above tolerance raises :class:`ParityError` (the export is then not written).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mvz.artifacts.compare import TOLERANCES, compare, within
from mvz.errors import MvzError

__all__ = ["TOLERANCES", "ParityError", "check_graph_parity", "compare", "ort_session", "run_onnx", "within"]


class ParityError(MvzError):
    """An exported graph does not reproduce its PyTorch module within tolerance."""


def ort_session(path: str | Path, providers: Sequence[str] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: fp16 graphs on the CPU EP warn about unfoldable nodes
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or ["CPUExecutionProvider"]))


def run_onnx(path: str | Path, feeds: dict[str, np.ndarray], providers: Sequence[str] | None = None) -> list[np.ndarray]:
    sess = ort_session(path, providers)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def check_graph_parity(
    path: str | Path,
    module,
    args: tuple,
    input_names: Sequence[str],
    precision: str,
    *,
    providers: Sequence[str] | None = None,
    raise_on_fail: bool = True,
    label: str = "graph",
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run ``module(*args)`` (unless its output is given as ``reference``, computed before the module left
    the GPU) and the graph on the same inputs; return the figures (``status``: pass, fail or skipped with a
    reason when ORT lacks kernels for this precision on these providers)."""
    if reference is None:
        import torch

        with torch.inference_mode():
            reference = module(*args).detach().float().cpu().numpy()
    ref_np = reference
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(input_names, args, strict=True)}
    try:
        out = run_onnx(path, feeds, providers)[0]
    except Exception as exc:  # ORT: NOT_IMPLEMENTED for fp16 kernels on CPU and friends
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if precision in ("fp16", "fp8"):
            return {"status": "skipped", "reason": f"ONNX Runtime could not run the {precision} graph here: {msg}"}
        raise
    stats = compare(ref_np, out)
    tol = TOLERANCES[precision]
    stats.update({"status": "pass" if within(stats, precision) else "fail", "precision": precision,
                  "tolerance": {"max_rel_err": tol[0], "median_rel_err": tol[1], "cosine": tol[2]},
                  "providers": list(providers or ["CPUExecutionProvider"])})
    if stats["status"] == "fail" and raise_on_fail:
        raise ParityError(
            f"{label} ONNX graph deviates from PyTorch: max rel err {stats['max_rel_err']:.3g} "
            f"(tol {tol[0]:g}), median {stats['median_rel_err']:.3g} (tol {tol[1]:g}), cosine {stats['cosine']:.6f} "
            f"(min {tol[2]}), finite={stats['finite']}.",
            "The export was not kept; try --precision fp32, or report this with the model and LoRA used.",
        )
    return stats
