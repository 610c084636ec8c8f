"""Run the denoiser and the decoder fast: torch (eager / compiled / CUDA graph), ONNX Runtime, TensorRT.

Every backend implements the Denoiser/Decoder contract of ``mvz.pipeline``. Entry points open a deployment
session (``engines.session.open_session``), which owns the model's pipeline over one backend and the rebuild
policy; the backends themselves are described once in ``engines.registry``. The lower-level call::

    backend = create_backend("onnxruntime", model, engines_dir="out/tiny", num_views=6, height=64, width=64,
                             batch=1, device="cpu")
    MultiviewPipeline(model, denoiser=backend.denoiser, decoder=backend.decoder).sample(...)

Exported backends (``onnxruntime``, ``tensorrt``) check the export manifest against the request and the
model (weights, LoRA and scale, views, resolution, batch) and refuse a mismatch with how to re-export.
Text encoders and the camera adapter keep running in torch. Importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines import registry
from mvz.errors import InputError

__all__ = ["BACKENDS", "Backend", "available_backends", "create_backend"]


def __getattr__(name: str):
    if name == "BACKENDS":  # the registry's names (a backend registered later is listed too)
        return registry.backend_names()
    if name == "Backend":
        from engines.base import Backend

        return Backend
    raise AttributeError(name)


def available_backends() -> dict[str, str | None]:
    """name -> None if usable here, else the reason it is not (one line, with the fix)."""
    return registry.available()


def create_backend(name: str, model, *, engines_dir: str | Path | None = None, num_views: int = 6,
                   height: int | None = None, width: int | None = None, batch: int = 1, device="cpu",
                   **options: Any):
    """Build a backend of the registry. ``options``: ``providers`` (onnxruntime: 'auto' | 'tensorrt' | 'cuda' |
    'cpu' | list), ``cuda_graph`` (tensorrt, default True), ``release_torch`` (tensorrt: move the model's torch
    UNet and VAE to the CPU and free their GPU memory once the engines serve, default True; the model's torch
    backends cannot run afterwards), ``compile_mode``, ``fused_qkv``, ``channels_last`` (torch variants); options
    a backend does not take are ignored. Raises BackendUnavailableError (one line, with the fix) when the backend
    cannot run here."""
    entry = registry.get(name)
    if height is None:
        height = model.info.default_resolution if model is not None else None
    width = width or height
    if entry.needs_export and height is None:
        raise InputError("the resolution is needed to check the export.", "Pass height and width.")
    allowed = {k: v for k, v in options.items() if k in entry.options}
    return entry.create(model, engines_dir=engines_dir, num_views=num_views, height=height, width=width,
                        batch=batch, device=device, **allowed)
