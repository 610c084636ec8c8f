"""TensorRT 10/11 runtime half: serve the engines of an export folder behind the Denoiser/Decoder contract.

Written against TensorRT's documented Python API (``docs/architecture.md``, TensorRT); nothing here has run on real
TensorRT in this repository's CI (no GPU, no builder): the tests marked ``tensorrt`` run it where it exists.

Build: ``engines.tensorrt_build`` (Polygraphy loaders, numeric check, atomic plans). Manifest and integrity
checks: ``engines.tensorrt_manifest`` (pure). LoRA switch by refit: ``engines.tensorrt_refit``. What they
share (is TensorRT here, the check input): ``engines.tensorrt_common``.

Load: the export manifest must fit the model and the request; the engine manifest must belong to this very
export (its manifest's sha256), each plan must be the one built (full sha256) from this export's ONNX, for
this TensorRT and GPU. A model that carries another LoRA than the engines is served by refitting the UNet
engine, all or nothing; a refused refit raises :class:`RefitRefusedError` and the session (``engines.session``) decides
to rebuild: the runtime never calls the exporter.

Run: deserialize once, one execution context, preallocated torch tensors bound by address once,
``execute_async_v3`` on the current torch stream; optional CUDA-graph capture of that call (torch's CUDA
graph API captures TensorRT's kernels on the capturing stream) and replay.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.base import Backend, GraphDecoder, GraphDenoiser, load_checked_export
from engines.tensorrt_common import load_tensorrt, unavailable_reason  # noqa: F401  (the registry asks the runtime)
from engines.tensorrt_manifest import EngineManifest, check_engines, find_engine_folder
from mvz.artifacts.graphs import UNetIO, VAEDecoderIO
from mvz.artifacts.manifest import refuse_quantized_refit
from mvz.artifacts.refit_plan import RefitRefusedError, read_refit_map
from mvz.devices import gpu_identity, resolve_device
from mvz.errors import BackendUnavailableError, CheckpointError, DeviceError, ManifestMismatchError


def _trt():
    return load_tensorrt()


_TORCH_DTYPES = {}


def _torch_dtype(trt, dt):
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                              trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                              trt.DataType.BF16: torch.bfloat16, trt.DataType.BOOL: torch.bool})
    if dt not in _TORCH_DTYPES:
        raise CheckpointError(f"the engine has an input or output of type {dt}, which mvz cannot bind.",
                              "Re-export in fp16 or fp32 (mvz export --precision fp16 --force).")
    return _TORCH_DTYPES[dt]


def shared_context_bytes(engines) -> int:
    """Size of the one device buffer the contexts of ``engines`` share: the largest ``device_memory_size_v2``
    (they run one after another on one stream, so one scratch buffer serves them all)."""
    return max((int(e.device_memory_bytes) for e in engines), default=0)


def share_context_memory(engines, device: torch.device) -> torch.Tensor | None:
    """Allocate one buffer of :func:`shared_context_bytes` and give it to every engine's context. Returns the
    buffer (keep it alive as long as the engines run)."""
    size = shared_context_bytes(engines)
    if size == 0:
        return None
    buffer = torch.empty(size, dtype=torch.uint8, device=device)
    for e in engines:
        e.set_device_memory(buffer.data_ptr(), size)
    return buffer


class TrtEngine:
    """One deserialized engine with one user-managed context and preallocated, address-bound torch I/O.

    The context is created with ``ExecutionContextAllocationStrategy.USER_MANAGED``: it owns no scratch memory
    until :meth:`set_device_memory` gives it a buffer (shared by all engines of a backend, see
    :func:`share_context_memory`). Everything runs on ``stream`` (a ``torch.cuda.Stream``, never the legacy
    default stream, on which ``enqueueV3`` adds device synchronisations): the stream first waits for the
    caller's stream, and the caller's stream waits for the result. With ``cuda_graph`` the first call runs
    once, then captures ``execute_async_v3`` on that stream; later calls replay. The engine's shapes are
    static (checked on every call) and nothing else shapes its kernels, so one graph per engine is keyed
    fully; new weights (refit) or a new scratch buffer drop it."""

    def __init__(self, plan_path: Path, device: torch.device, cuda_graph: bool = False, stream=None):
        trt = _trt()
        self.trt = trt
        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise CheckpointError(f"{plan_path} is not a loadable TensorRT engine (corrupt, or another TensorRT).",
                                  "Rebuild the engines on this machine.")
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise BackendUnavailableError(f"TensorRT could not create an execution context for {plan_path.name}.",
                                          "Free GPU memory (close other processes) or rebuild the engines.")
        self.device_memory_bytes = int(self.engine.device_memory_size_v2)
        self.stream = stream if stream is not None else torch.cuda.Stream(device)
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.buffers: dict[str, torch.Tensor] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            if is_input:
                shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])  # max shape of profile 0
                self.context.set_input_shape(name, shape)
        for name in self.inputs + self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device=device)
            self.buffers[name] = buf
            self.context.set_tensor_address(name, buf.data_ptr())
        self.rows = self.buffers[self.inputs[0]].shape[0]
        self.use_cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._has_memory = self.device_memory_bytes == 0

    def set_device_memory(self, ptr: int, size: int) -> None:
        """Give the context its scratch memory (``size`` >= ``device_memory_bytes``) at ``ptr``."""
        if size < self.device_memory_bytes:
            raise ValueError(f"context memory of {size} bytes is smaller than the {self.device_memory_bytes} needed")
        self.context.set_device_memory(int(ptr), int(size))
        self._has_memory = True
        self._graph = None  # a captured graph holds the old addresses

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy ``{input name: tensor}`` into the bound buffers, run (or replay the CUDA graph) on the engine's
        stream, return a copy of the first output. Inputs are matched by name, never by position."""
        if not self._has_memory:
            raise RuntimeError("the TensorRT context has no device memory yet (call share_context_memory)")
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                buf, t = self.buffers[name], tensors[name]
                if tuple(t.shape) != tuple(buf.shape):
                    raise ManifestMismatchError(f"engine input {name} is {tuple(buf.shape)}, got {tuple(t.shape)}.",
                                                "Rebuild the engines for this shape (mvz export --batch/--views/--resolution).")
                buf.copy_(t)
            if not self.use_cuda_graph:
                self._enqueue()
            else:
                if self._graph is None:
                    self._enqueue()  # first run outside the capture (lazy initialisation inside TensorRT)
                    self.stream.synchronize()
                    self._graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self._graph, stream=self.stream):
                        self._enqueue()
                self._graph.replay()
            out = self.buffers[self.outputs[0]].clone()
        caller.wait_stream(self.stream)
        out.record_stream(caller)
        return out


def create_tensorrt_backend(model, engines_dir, *, num_views, height, width, batch, device, cuda_graph: bool = True,
                            release_torch: bool = True) -> Backend:
    """Engines of an export folder behind the Denoiser/Decoder contract. A model carrying another LoRA (or
    none) is served by refitting a refittable UNet engine; when that is impossible this raises
    :class:`RefitRefusedError`; the session decides (``engines.session`` catches it, leaves the ``except`` block
    and rebuilds with ``rebuild_tensorrt_engines``)."""
    from engines.base import model_lora_identity, same_lora

    trt = _trt()
    if engines_dir is None:
        raise BackendUnavailableError("the tensorrt backend needs an export folder with engines.", "Pass --engines DIR (made by mvz export).")
    export_dir, eng_dir = find_engine_folder(Path(engines_dir))
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise BackendUnavailableError("the tensorrt backend runs on a CUDA device.", "Pass --device cuda.")
    # everything but the LoRA must fit; the LoRA may be switched by refit below
    manifest = load_checked_export(export_dir, model, num_views=num_views, height=height, width=width, batch=batch,
                                   check_lora=False)
    lora_differs = model is not None and not same_lora(manifest.lora, model_lora_identity(model))
    em = EngineManifest.load(eng_dir)
    ident = gpu_identity(dev)
    check_engines(em, eng_dir, export_dir, manifest, environment=(trt.__version__, ident["gpu"], ident["compute_capability"]))
    info = {"provider": f"TensorRT {em.tensorrt}", "gpu": em.gpu, "precision": manifest.precision,
            "vae_precision": manifest.vae_precision, "cuda_graph": cuda_graph, "export": str(export_dir),
            "manifest": manifest.summary(), "checks": {g: e.check for g, e in em.engines.items()}}
    if lora_differs:  # int8/fp8: calibrated for the exported weights, never refit or rebuilt silently
        refuse_quantized_refit(manifest, model_lora_identity(model), export_dir)
    if lora_differs and not em.engines["unet"].refittable:
        raise RefitRefusedError(f"the UNet engine in {eng_dir} was built for another LoRA and is not refittable.",
                                "The engines are rebuilt for this LoRA (or build with mvz export --refittable).")
    stream = torch.cuda.Stream(dev)  # the backend's stream: both engines run on it, one after the other
    try:
        unet = TrtEngine(eng_dir / em.engines["unet"].plan, dev, cuda_graph=cuda_graph, stream=stream)
        vae = TrtEngine(eng_dir / em.engines["vae_decoder"].plan, dev, cuda_graph=cuda_graph, stream=stream)
        for spec, engine in ((UNetIO, unet), (VAEDecoderIO, vae)):  # fed by the specs' names
            spec.check_names(engine.inputs, f"the {spec.name} engine in {eng_dir}")
        context_memory = share_context_memory([unet, vae], dev)
        info["context_memory_bytes"] = shared_context_bytes([unet, vae])
        if lora_differs:  # before the first run: no CUDA graph holds the old weights
            from engines.tensorrt_refit import check_refit

            info["refit"] = _refit_for_model(unet, export_dir, manifest, model)
            info["refit"]["check"] = check_refit(unet.run, model, manifest)
    except torch.cuda.OutOfMemoryError:
        raise DeviceError(f"out of GPU memory loading the engines of {eng_dir}.",
                          "Close other GPU programs, or export with fewer --views/--batch or a lower --resolution.") from None
    if release_torch and model is not None:  # the engines serve the UNet and VAE now
        model.release_unet_and_vae()
        info["torch_unet_vae"] = "moved to the CPU"
    return Backend("tensorrt", GraphDenoiser(unet, num_views, "tensorrt"), GraphDecoder(vae, "tensorrt"), info,
                   stream=stream, keep_alive=[context_memory])


def _refit_for_model(unet: TrtEngine, export_dir: Path, manifest, model) -> dict:
    """All-or-nothing refit of the UNet engine to the model's current LoRA (or none)."""
    from engines.tensorrt_refit import refit_unet

    refit_map = read_refit_map(export_dir, manifest.refit_map)
    return refit_unet(unet.engine, unet.trt, unet.logger, refit_map, model, manifest.lora is not None,
                      export_dir / manifest.graphs["unet"].file)
