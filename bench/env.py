"""Where a benchmark ran: CPU/GPU name, clocks, driver, library versions; dense peak FLOP/s table."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch

from mvz.devices import library_versions

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from the vendors' data sheets (docs/architecture.md,
# *GPU peaks*). fp16/bf16 assume fp32 accumulation,
# as torch, cuBLAS and TensorRT use by default. Override with --peak-tflops.
_H100_SXM = {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9}  # H200: same compute, more bandwidth
_H100_PCIE = {"fp16": 756.0, "bf16": 756.0, "tf32": 378.0, "fp32": 51.2}
# matched as substrings of the device name, the longest entry first ("H100 80GB HBM3" is the SXM part's
# name; "L40S" before "L40" before "L4")
GPU_PEAKS_TFLOPS: dict[str, dict[str, float]] = {
    "H200": _H100_SXM,
    "H100 SXM": _H100_SXM,
    "H100 80GB HBM3": _H100_SXM,
    "H100 PCIe": _H100_PCIE,
    "H100": _H100_PCIE,
    "A100": {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"fp16": 362.1, "bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L40": {"fp16": 181.0, "bf16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "RTX 4090": {"fp16": 165.2, "bf16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX 6000 Ada": {"fp16": 364.2, "bf16": 364.2, "tf32": 182.1, "fp32": 91.1},
    "A10G": {"fp16": 70.0, "bf16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "L4": {"fp16": 121.0, "bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "T4": {"fp16": 65.0, "bf16": 0.0, "tf32": 0.0, "fp32": 8.1},
}


def dtype_key(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "tf32"}.get(dtype, "fp32")


def lookup_peak(device_name: str | None, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for a GPU name; fp32 compute assumes TF32 is allowed on GPU."""
    if not device_name:
        return None, "no GPU: pass --peak-tflops to compute a floor"
    key = dtype_key(dtype)
    if key == "tf32" and not torch.backends.cuda.matmul.allow_tf32:
        key = "fp32"
    name = device_name.upper()
    for entry in sorted(GPU_PEAKS_TFLOPS, key=len, reverse=True):  # the most specific name first
        if entry.upper() in name:
            return GPU_PEAKS_TFLOPS[entry][key] or None, f"table: {entry} {key}"
    return None, f"{device_name} is not in the peak table: pass --peak-tflops"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(index: int) -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    fields = ["name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "temperature.gpu", "pstate"]
    try:
        res = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", f"-i={index}"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    vals = [v.strip() for v in res.stdout.strip().splitlines()[0].split(",")] if res.stdout.strip() else []
    return {k: v for k, v in zip(fields, vals, strict=False) if v and v not in ("[N/A]", "N/A")}


def environment(device: torch.device) -> dict:
    """Everything needed to reproduce or compare a figure."""
    info: dict = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "libraries": library_versions(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        smi = _nvidia_smi(idx)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 1e9, 1),
            "multiprocessors": props.multi_processor_count,
            "driver": smi.get("driver_version"),
            "clocks_mhz": {k: smi[k] for k in ("clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem") if k in smi},
            "power_limit_w": smi.get("power.limit"),
            "pstate": smi.get("pstate"),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        }
    return info
