"""Run the denoiser and the decoder fast: torch (eager / compiled / CUDA graph), ONNX Runtime, TensorRT.

Every backend implements the Denoiser/Decoder contract of ``mvz.pipeline``, so::

    backend = create_backend("onnxruntime", model, engines_dir="out/tiny", num_views=6, height=64, width=64,
                             batch=1, device="cpu")
    MultiviewPipeline(model, denoiser=backend.denoiser, decoder=backend.decoder).sample(...)

Exported backends (``onnxruntime``, ``tensorrt``) check the export manifest against the request and the
model (weights, LoRA and scale, views, resolution, batch) and refuse a mismatch with how to re-export.
Text encoders and the camera adapter keep running in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engines.base import Backend
from mvz.errors import BackendUnavailableError, InputError

BACKENDS = ("torch", "torch-compile", "torch-cudagraph", "onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Backend", "available_backends", "create_backend"]


def available_backends() -> dict[str, str | None]:
    """name -> None if usable here, else the reason it is not (one line, with the fix)."""
    from engines import onnxruntime_backend, tensorrt_backend

    cuda = torch.cuda.is_available()
    compile_ok = hasattr(torch, "compile")
    return {
        "torch": None,
        "torch-compile": None if compile_ok else "this torch has no torch.compile (needs torch >= 2.0).",
        "torch-cudagraph": None if cuda else "needs a CUDA GPU (none visible here).",
        "onnxruntime": onnxruntime_backend.unavailable_reason(),
        "tensorrt": tensorrt_backend.unavailable_reason(),
    }


def create_backend(
    name: str,
    model,
    *,
    engines_dir: str | Path | None = None,
    num_views: int = 6,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    device: str | torch.device = "cpu",
    **options: Any,
) -> Backend:
    """Build a backend. ``options``: ``providers`` (onnxruntime: 'auto' | 'tensorrt' | 'cuda' | 'cpu' | list),
    ``cuda_graph`` (tensorrt, default True), ``release_torch`` (tensorrt: move the model's torch UNet and VAE to the CPU and free their GPU
    memory once the engines serve, default True; the model's torch backends cannot run afterwards), ``compile_mode``, ``fused_qkv``, ``channels_last`` (torch
    variants). Raises BackendUnavailableError (one line, with the fix) when the backend cannot run here."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}.", f"Use one of: {', '.join(BACKENDS)}.")
    if height is None:
        height = model.info.default_resolution if model is not None else None
    width = width or height
    if name in ("onnxruntime", "tensorrt") and height is None:
        raise InputError("the resolution is needed to check the export.", "Pass height and width.")
    if name.startswith("torch"):
        from engines.torch_backend import create_torch_backend

        allowed = {k: options[k] for k in ("compile_mode", "fused_qkv", "channels_last") if k in options}
        return create_torch_backend(name, model, num_views=num_views, device=device, **allowed)
    if name == "onnxruntime":
        from engines.onnxruntime_backend import create_onnxruntime_backend

        return create_onnxruntime_backend(model, engines_dir, num_views=num_views, height=height, width=width,
                                          batch=batch, device=device, providers=options.get("providers"))
    from engines.tensorrt_backend import create_tensorrt_backend, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    return create_tensorrt_backend(model, engines_dir, num_views=num_views, height=height, width=width, batch=batch,
                                   device=device, cuda_graph=bool(options.get("cuda_graph", True)),
                                   release_torch=bool(options.get("release_torch", True)))
