"""Devices, dtypes and the machine, each decided in one place: which device and dtype a request means, how
GPU memory is given back, which GPU this is and which library versions run here."""

from __future__ import annotations

import gc
import platform
from importlib import metadata

import torch

from mvz.errors import DeviceError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# distributions recorded with every export manifest and benchmark report
LIBRARIES = ("mvz", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "onnx", "onnxscript",
             "onnxruntime", "onnxruntime-gpu", "onnx-graphsurgeon", "polygraphy", "tensorrt", "tensorrt-cu12",
             "tensorrt-cu13", "nvidia-modelopt")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: the GPU when there is one, else the CPU; otherwise the named device, refused in
    one line when it is not valid or not present here."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r} is not a valid torch device.", "Use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for but CUDA is not available here.", "Use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs).", "Pick another index.")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, auto: torch.dtype | None = None) -> torch.dtype:
    """A dtype name (fp16, bf16, fp32 and their long names) as a torch dtype. ``None``/``"auto"`` is ``auto``
    when given, else fp16 on a GPU and fp32 elsewhere. fp16 on the CPU is refused (many CPU kernels lack it)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        resolved = auto or (torch.float16 if device.type == "cuda" else torch.float32)
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise DeviceError(f"dtype {dtype!r} is not supported.", "Use fp16, bf16 or fp32.")
    if resolved == torch.float16 and device.type == "cpu":
        raise DeviceError("fp16 on the CPU is not supported (many CPU kernels lack half precision).",
                          "Use --dtype fp32 or bf16.")
    return resolved


def release_device_memory() -> None:
    """Collect garbage and return torch's cached GPU blocks to the driver (after moving or dropping a model,
    before ONNX Runtime parity and engine builds)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_identity(device: torch.device | None = None) -> dict[str, str]:
    """``{"gpu": name, "compute_capability": "8.9"}`` of a CUDA device (default: the current one): what an
    engine is built for."""
    idx = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return {"gpu": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}


def library_versions() -> dict[str, str]:
    """Python, CUDA/cuDNN as torch sees them, and the installed version of every library in
    :data:`LIBRARIES` (from package metadata: nothing is imported; absent ones are left out)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.version.cuda:
        out["cuda_runtime"] = str(torch.version.cuda)
    if torch.backends.cudnn.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    for dist in LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
