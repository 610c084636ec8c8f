"""What the TensorRT build, runtime and refit halves share: whether TensorRT can run here, loading it, and
the fixed input of the numeric checks after a build or refit.

The halves: ``engines.tensorrt_build`` (export folder -> checked plans), ``engines.tensorrt_backend`` (the
runtime: plans behind the Denoiser/Decoder contract), ``engines.tensorrt_refit`` (a LoRA switch by refit),
``engines.tensorrt_manifest`` (which plans belong to which export; pure). Each imports this module and
none imports another half at module level, so there is no import circle.
"""

from __future__ import annotations

from typing import Any

from mvz.artifacts.manifest import ExportManifest
from mvz.errors import BackendUnavailableError

CHECK_SEED = 1234
CHECK_TIMESTEP = 499.0  # a mid-schedule timestep for the check input


def unavailable_reason(need_builder: bool = False) -> str | None:
    """Why TensorRT cannot run (or, with ``need_builder``, build) here; None when it can."""
    try:
        import tensorrt as trt
    except ImportError:
        return ("TensorRT is not installed: engines need TensorRT and an NVIDIA GPU "
                "(pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12).")
    if need_builder and not hasattr(trt, "Builder"):
        return "this TensorRT install is runtime-only (tensorrt-lean): it cannot build engines; install the full tensorrt package."
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU with CUDA, and none is visible here."
    return None


def load_tensorrt(need_builder: bool = False):
    """The ``tensorrt`` module, or :class:`BackendUnavailableError` saying why it cannot run here."""
    reason = unavailable_reason(need_builder)
    if reason:
        raise BackendUnavailableError(reason)
    import tensorrt as trt

    return trt


def check_inputs(manifest: ExportManifest, graph: str, seed: int = CHECK_SEED) -> dict[str, Any]:
    """The fixed input of the numeric check: seeded, shaped and typed as the graph's inputs recorded in the
    export manifest (a dynamic row axis at its smallest, one prompt; the timestep mid-schedule)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest.graphs[graph].inputs:
        shape = [d if isinstance(d, int) else manifest.num_views for d in spec.shape]
        if spec.name == "timestep":
            feeds[spec.name] = np.full(shape, CHECK_TIMESTEP, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds
