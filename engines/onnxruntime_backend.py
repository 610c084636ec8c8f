"""ONNX Runtime backend: sessions from an export folder, provider selection, I/O binding on the GPU.

Providers (:func:`select_providers`): ``auto`` = the CUDA EP on a GPU (CPU EP elsewhere); ``tensorrt`` (TensorRT
EP, only on request: fp16, a workspace limit, engine and timing caches under ``<export>/ort_trt_cache``),
``cuda``, ``cpu``. On a CUDA device the backend owns a torch stream that ORT computes on
(``user_compute_stream``) and the inputs and outputs are torch tensors bound by address (``IOBinding``); on the
CPU plain numpy feeds are used. The GPU paths are written against ORT's documented options and have not run in
this repository's CI (no GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.base import Backend, GraphDecoder, GraphDenoiser, load_checked_export
from mvz.artifacts.graphs import UNetIO, VAEDecoderIO
from mvz.devices import resolve_device
from mvz.errors import BackendUnavailableError, CheckpointError

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_NP_TO_TORCH = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32, np.dtype("int64"): torch.int64,
                np.dtype("int32"): torch.int32}


def unavailable_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed: pip install 'mvz[export]' (CPU) or 'mvz[gpu]' (CUDA)."
    return None


DEFAULT_TRT_EP_WORKSPACE = 8 << 30


def select_providers(requested: str | Sequence[str] | None, device: torch.device, cache_dir: Path | None = None, *,
                     available: Sequence[str] | None = None, stream: int | None = None,
                     trt_workspace_bytes: int = DEFAULT_TRT_EP_WORKSPACE) -> list:
    """ORT provider list (with options) for a request: 'auto', 'tensorrt', 'cuda', 'cpu', or a list of them.

    ``auto`` is the CUDA EP on a CUDA device (the CPU EP elsewhere): the TensorRT EP builds its own engines on
    first use and has open failures on graphs over 2 GB, so it runs only when asked for, then with fp16, a
    workspace limit and an engine/timing cache under ``cache_dir``. ``stream`` (a CUDA stream pointer, not 0:
    ORT ignores the legacy default stream) becomes the GPU EPs' ``user_compute_stream``, so ORT runs on torch's
    stream without host syncs. Pure: ``available`` defaults to what this onnxruntime reports."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if requested in (None, "auto"):
        if device.type != "cuda":
            wanted = ["CPUExecutionProvider"]
        elif "CUDAExecutionProvider" in available:
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise BackendUnavailableError(
                "onnxruntime here has no CUDA provider (the CPU-only wheel is installed).",
                "pip uninstall onnxruntime && pip install onnxruntime-gpu, or use --device cpu.",
            )
    else:
        names = [requested] if isinstance(requested, str) else list(requested)
        wanted = [PROVIDER_NAMES.get(n.lower(), n) for n in names]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime provider(s) {', '.join(missing)} not available here (have {', '.join(available)}).",
                "Install onnxruntime-gpu (CUDA/TensorRT EPs; the TensorRT EP also needs the TensorRT libraries) or pick another provider.",
            )
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
    gpu: dict[str, Any] = {"device_id": device.index or 0}
    if stream:
        gpu["user_compute_stream"] = str(int(stream))
    out: list[Any] = []
    for p in wanted:
        if p == "TensorrtExecutionProvider":
            opts = {**gpu, "trt_fp16_enable": True, "trt_max_workspace_size": int(trt_workspace_bytes)}
            if cache_dir is not None:
                opts.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                             "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)})
            out.append((p, opts))
        elif p == "CUDAExecutionProvider":
            out.append((p, dict(gpu)))
        else:
            out.append(p)
    return out


class OrtGraph:
    """One ONNX graph in one session; ``run(tensors) -> torch tensor`` on ``device``.

    On a GPU EP the session computes on ``stream`` (a ``torch.cuda.Stream`` given to ORT as its
    ``user_compute_stream``): inputs are copied and bound on that stream, which first waits for the caller's
    stream; the caller's stream then waits for it."""

    def __init__(self, path: str | Path, providers: list, device: torch.device, stream=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own types for unreadable, truncated or invalid graphs
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CheckpointError(f"ONNX Runtime cannot load {path}: {first}",
                                  "Re-export it (mvz export ... --force).") from None
        self.device = device
        self.inputs = [(i.name, _np_dtype(i.type), i.shape) for i in self.session.get_inputs()]
        out = self.session.get_outputs()[0]
        self.output = (out.name, _np_dtype(out.type), out.shape)
        self.providers = self.session.get_providers()
        self.rows = self.inputs[0][2][0] if isinstance(self.inputs[0][2][0], int) else None
        self.io_binding = device.type == "cuda" and self.providers[0] != "CPUExecutionProvider"
        self.stream = stream

    def run(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run on ``{input name: tensor}`` (names the graph does not take are ignored)."""
        if not self.io_binding:
            feeds = {name: tensors[name].detach().to("cpu", _NP_TO_TORCH[dt]).contiguous().numpy()
                     for name, dt, _ in self.inputs}
            out = self.session.run([self.output[0]], feeds)[0]
            return torch.from_numpy(out).to(self.device)
        caller = torch.cuda.current_stream(self.device)
        stream = self.stream or caller
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            binding = self.session.io_binding()
            keep = []
            idx = self.device.index or 0
            for name, dt, _ in self.inputs:
                t = tensors[name].detach().to(self.device, _NP_TO_TORCH[dt]).contiguous()
                keep.append(t)
                binding.bind_input(name, "cuda", idx, dt, tuple(t.shape), t.data_ptr())
            rows = keep[0].shape[0]
            oname, odt, oshape = self.output
            shape = tuple(d if isinstance(d, int) else rows for d in oshape)  # only the batch axis is symbolic
            out = torch.empty(shape, dtype=_NP_TO_TORCH[odt], device=self.device)
            binding.bind_output(oname, "cuda", idx, odt, tuple(out.shape), out.data_ptr())
            if self.stream is None:  # ORT runs on its own stream: what torch wrote must be finished
                stream.synchronize()
            self.session.run_with_iobinding(binding)
        caller.wait_stream(stream)
        out.record_stream(caller)
        return out


def _np_dtype(ort_type: str) -> np.dtype:
    table = {"tensor(float16)": "float16", "tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32"}
    return np.dtype(table[ort_type])


def create_onnxruntime_backend(model, engines_dir, *, num_views, height, width, batch, device, providers=None) -> Backend:
    reason = unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    if engines_dir is None:
        raise BackendUnavailableError("the onnxruntime backend needs an export folder.", "Pass --engines DIR (made by mvz export).")
    folder = Path(engines_dir)
    manifest = load_checked_export(folder, model, num_views=num_views, height=height, width=width, batch=batch)
    dev = resolve_device(device)
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None  # never the legacy default stream (0)
    provider_list = select_providers(providers, dev, cache_dir=folder / "ort_trt_cache",
                                     stream=stream.cuda_stream if stream is not None else None)
    unet = OrtGraph(folder / manifest.graphs["unet"].file, provider_list, dev, stream)
    vae = OrtGraph(folder / manifest.graphs["vae_decoder"].file, provider_list, dev, stream)
    for spec, graph in ((UNetIO, unet), (VAEDecoderIO, vae)):  # inputs are fed by the specs' names
        spec.check_names([name for name, _, _ in graph.inputs], f"the {spec.name} graph in {folder}")
    info = {"provider": unet.providers[0], "providers": unet.providers, "precision": manifest.precision,
            "vae_precision": manifest.vae_precision, "io_binding": unet.io_binding, "export": str(folder),
            "manifest": manifest.summary()}
    return Backend("onnxruntime", GraphDenoiser(unet, num_views, "onnxruntime"), GraphDecoder(vae, "onnxruntime"), info,
                   stream=stream)
