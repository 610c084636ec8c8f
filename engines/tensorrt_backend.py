"""TensorRT 10/11: build engines from an export folder, run them, refit them for another LoRA.

Written against the documented Python API (reference ``deployment.md`` §1); nothing here has run on real
TensorRT in this repository's CI (no GPU, no builder): the tests marked ``tensorrt`` run it where it exists.

Build (per graph): ``Builder.create_network(flags)`` -- strongly typed (TensorRT 10 needs the
``STRONGLY_TYPED`` flag; 11 is always strongly typed and ignores it), so the precision is the ONNX's (fp16
export) -> ``OnnxParser.parse_from_file`` (finds external data beside the file) -> one static optimisation
profile (min = opt = max, so CUDA graphs apply) -> workspace pool limit, builder optimisation level,
optional ``REFIT`` flag, a timing cache file read before and written after -> ``build_serialized_network``.
Plans go to ``<export>/engines/`` with ``mvz_engines.json`` (TensorRT version, GPU name and compute
capability, profiles, source ONNX hashes).

Run: deserialize once, one execution context, preallocated torch tensors bound by address once,
``execute_async_v3`` on the current torch stream; optional CUDA-graph capture of that call (torch's CUDA
graph API captures TensorRT's kernels on the capturing stream) and replay.

Refit (LoRA switch without a rebuild): a refittable engine gets the LoRA-fused weights by ONNX initializer
name (``export.refit_map``) through ``Refitter.set_named_weights``, or from a re-exported ONNX through
``OnnxParserRefitter.refit_from_file``; if TensorRT refuses, the caller rebuilds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.base import Backend, GraphDecoder, GraphDenoiser, load_checked_export, to_device
from export.manifest import ExportManifest, now_iso, read_manifest, refuse_quantized_refit, sha256_file
from mvz.errors import BackendUnavailableError, CheckpointError, ManifestMismatchError, ModelNotFoundError

ENGINE_MANIFEST = "mvz_engines.json"
ENGINES_SUBDIR = "engines"


def unavailable_reason(need_builder: bool = False) -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return ("TensorRT is not installed: engines need TensorRT and an NVIDIA GPU "
                "(pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12).")
    if need_builder and not hasattr(trt, "Builder"):
        return "this TensorRT install is runtime-only (tensorrt-lean): it cannot build engines; install the full tensorrt package."
    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU with CUDA, and none is visible here."
    return None


def _trt():
    reason = unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    import tensorrt as trt

    return trt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def gpu_identity(device: torch.device | None = None) -> dict[str, Any]:
    idx = (device.index if device is not None and device.index is not None else torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(idx)
    return {"gpu": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}


@dataclass
class EngineEntry:
    plan: str
    source_onnx: str
    source_sha256: str
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max]
    refittable: bool
    build_seconds: float
    bytes: int
    lora: dict | None = None  # the LoRA the weights currently correspond to (after a refit)


@dataclass
class EngineManifest:
    tensorrt: str
    gpu: str
    compute_capability: str
    export_manifest_sha256: str
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    builder_optimization_level: int = 3
    workspace_bytes: int = 0
    created: str = ""

    def save(self, folder: Path) -> Path:
        from mvz.atomic import write_json

        return write_json(folder / ENGINE_MANIFEST, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> EngineManifest:
        import json

        path = folder / ENGINE_MANIFEST
        if not path.is_file():
            raise ModelNotFoundError(f"no TensorRT engines in {folder} ({ENGINE_MANIFEST} missing).",
                                     "Build them with: mvz export --model MODEL --out DIR (on the GPU that runs them).")
        try:
            d = json.loads(path.read_text())
            d["engines"] = {k: EngineEntry(**v) for k, v in d["engines"].items()}
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"engine manifest {path} is corrupt ({exc}).", "Rebuild the engines with --force.") from None


def profile_shapes(manifest: ExportManifest, graph: str) -> dict[str, list[list[int]]]:
    """Static profile (min = opt = max) from the export's I/O specs; a dynamic batch spans 1..batch prompts."""
    out = {}
    rows = manifest.batch * manifest.num_views
    for spec in manifest.graphs[graph].inputs:
        dims = list(spec.shape)
        if all(isinstance(d, int) for d in dims):
            out[spec.name] = [dims, dims, dims]
        else:
            lo = [manifest.num_views if not isinstance(d, int) else d for d in dims]
            hi = [rows if not isinstance(d, int) else d for d in dims]
            out[spec.name] = [lo, hi, hi]
    return out


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profile: dict[str, list[list[int]]],
    *,
    workspace_bytes: int = 8 << 30,
    opt_level: int = 3,
    refittable: bool = False,
    timing_cache: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> float:
    """Build one strongly typed engine; returns the build seconds. The plan is written atomically."""
    from mvz.atomic import write_bytes

    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if trt_major(trt) < 11:  # TensorRT 10: strong typing is opt-in; 11: always on, the flag is ignored
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT cannot parse {onnx_path}: {errors[:500]}", "Re-export the ONNX (mvz export --force).")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(opt_level)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        prof.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(prof)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t
    if plan is None:
        raise BackendUnavailableError(f"TensorRT failed to build an engine from {onnx_path} (see the log above).",
                                      "Try a larger --workspace, or check GPU memory.")
    write_bytes(plan_path, bytes(plan))
    if timing_cache is not None:
        write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    if log:
        log(f"built {plan_path.name} in {seconds:.1f}s")
    return seconds


def build_engines(
    export_dir: str | Path,
    *,
    graphs: tuple[str, ...] = ("unet", "vae_decoder"),
    workspace_bytes: int = 8 << 30,
    opt_level: int = 3,
    refittable: bool = False,
    timing_cache: str | Path | None = None,
    force: bool = False,
    on_stage: Callable[[str, str, dict], None] | None = None,
) -> EngineManifest:
    """Build (or reuse, when current for this GPU/TensorRT/export) the engines of an export folder."""
    trt = _trt()
    if unavailable_reason(need_builder=True):
        raise BackendUnavailableError(unavailable_reason(need_builder=True))
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if manifest.quantization:  # Q/DQ graphs: level 4 (NVIDIA's demo and ModelOpt's trtexec recipe for int8/fp8)
        opt_level = max(opt_level, 4)
    out = export_dir / ENGINES_SUBDIR
    out.mkdir(exist_ok=True)
    ident = gpu_identity()
    msha = sha256_file(export_dir / "mvz_export.json")
    try:
        current = EngineManifest.load(out)
    except (ModelNotFoundError, CheckpointError):
        current = None
    if current is None or force or current.tensorrt != trt.__version__ or current.gpu != ident["gpu"] \
            or current.export_manifest_sha256 != msha:
        current = EngineManifest(trt.__version__, ident["gpu"], ident["compute_capability"], msha,
                                 builder_optimization_level=opt_level, workspace_bytes=int(workspace_bytes), created=now_iso())
    tc = Path(timing_cache) if timing_cache else out / "timing.cache"
    for g in graphs:
        src = export_dir / manifest.graphs[g].file
        entry = current.engines.get(g)
        if entry and not force and entry.source_sha256 == manifest.graphs[g].sha256 and entry.refittable >= refittable \
                and (out / entry.plan).is_file():
            if on_stage:
                on_stage(f"{g}: engine", "skip", {"reason": "up to date"})
            continue
        plan = f"{g}{'.refit' if refittable else ''}.trt{trt.__version__}.plan"
        if on_stage:
            on_stage(f"{g}: engine", "start", {"plan": plan})
        prof = profile_shapes(manifest, g)
        secs = build_engine(src, out / plan, prof, workspace_bytes=workspace_bytes, opt_level=opt_level,
                            refittable=refittable, timing_cache=tc)
        current.engines[g] = EngineEntry(plan, manifest.graphs[g].file, manifest.graphs[g].sha256, prof, refittable,
                                         secs, (out / plan).stat().st_size, manifest.lora)
        current.save(out)
        if on_stage:
            on_stage(f"{g}: engine", "done", {"seconds": secs, "bytes": current.engines[g].bytes})
    current.save(out)
    return current


def check_engines(em: EngineManifest, folder: Path, device: torch.device, manifest: ExportManifest | None = None) -> None:
    """Refuse engines built with another TensorRT, for another GPU, or from other ONNX graphs (another
    export: other shapes, precision or weights); missing plan files too. Each message says how to rebuild."""
    import tensorrt as trt

    ident = gpu_identity(device)
    rebuild = "Rebuild them on this machine: mvz export --model MODEL --out EXPORT_DIR (engines are rebuilt, the ONNX kept)."
    problems = []
    if em.tensorrt != trt.__version__:
        problems.append(f"built with TensorRT {em.tensorrt}, this is {trt.__version__}")
    if em.gpu != ident["gpu"] or em.compute_capability != ident["compute_capability"]:
        problems.append(f"built for {em.gpu} (sm {em.compute_capability}), this is {ident['gpu']} (sm {ident['compute_capability']})")
    for g in ("unet", "vae_decoder"):
        e = em.engines.get(g)
        if e is None or not (folder / e.plan).is_file():
            problems.append(f"no {g} engine")
        elif manifest is not None and (g not in manifest.graphs or e.source_sha256 != manifest.graphs[g].sha256):
            problems.append(f"the {g} engine was built from another ONNX export (other shapes, precision or weights)")
    if problems:
        raise ManifestMismatchError(f"the engines in {folder} do not fit here: {'; '.join(problems)}.", rebuild)


_TORCH_DTYPES = {}


def _torch_dtype(trt, dt):
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                              trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                              trt.DataType.BF16: torch.bfloat16, trt.DataType.BOOL: torch.bool})
    return _TORCH_DTYPES[dt]


class TrtEngine:
    """One deserialized engine with one context and preallocated, address-bound torch I/O."""

    def __init__(self, plan_path: Path, device: torch.device, cuda_graph: bool = False):
        trt = _trt()
        self.trt = trt
        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise CheckpointError(f"{plan_path} is not a loadable TensorRT engine (corrupt, or another TensorRT).",
                                  "Rebuild the engines on this machine.")
        self.context = self.engine.create_execution_context()
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

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy ``{input name: tensor}`` into the bound buffers, run (or replay the CUDA graph), return a
        copy of the first output. Inputs are matched by name, never by position."""
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
                torch.cuda.current_stream(self.device).synchronize()
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._enqueue()
            self._graph.replay()
        return self.buffers[self.outputs[0]].clone()

    # ---- refit ------------------------------------------------------------------------------------
    def refit_named(self, weights: dict[str, Any], base_onnx: Path | None = None) -> bool:
        """Set weights by name (numpy arrays, kept alive until the refit is done); missing ones are taken
        from ``base_onnx`` initializers. Returns False when TensorRT refuses (then rebuild)."""
        trt = self.trt
        refitter = trt.Refitter(self.engine, self.logger)
        keep = []
        for name, arr in weights.items():
            w = trt.Weights(arr)
            keep.append((arr, w))
            if not refitter.set_named_weights(name, w):
                return False
        missing = list(refitter.get_missing_weights())
        if missing and base_onnx is not None:
            import onnx
            from onnx import numpy_helper

            inits = {i.name: i for i in onnx.load(str(base_onnx)).graph.initializer}
            for name in missing:
                if name in inits:
                    arr = numpy_helper.to_array(inits[name])
                    w = trt.Weights(arr)
                    keep.append((arr, w))
                    refitter.set_named_weights(name, w)
        if refitter.get_missing_weights():
            return False
        ok = bool(refitter.refit_cuda_engine())
        self._graph = None  # recapture after new weights
        return ok

    def refit_from_onnx(self, onnx_path: Path) -> bool:
        """Refit from a re-exported ONNX of identical structure (``OnnxParserRefitter``)."""
        trt = self.trt
        refitter = trt.Refitter(self.engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            return False
        ok = bool(refitter.refit_cuda_engine())
        self._graph = None
        return ok


def find_engine_folder(engines_dir: Path) -> tuple[Path, Path]:
    """(export folder, engines folder) from either of them."""
    if (engines_dir / ENGINE_MANIFEST).is_file():
        return engines_dir.parent, engines_dir
    return engines_dir, engines_dir / ENGINES_SUBDIR


def create_tensorrt_backend(model, engines_dir, *, num_views, height, width, batch, device, cuda_graph: bool = True,
                            rebuild: bool = True) -> Backend:
    """Engines of an export folder behind the Denoiser/Decoder contract. A model carrying another LoRA (or
    none) is served by refitting a refittable UNet engine by weight name; when the engine is not refittable
    or TensorRT refuses the refit, ``rebuild`` re-exports the model with its LoRA fused into
    ``<export>/lora_rebuilds/<lora sha256[:12]>-x<scale>/`` and builds engines there (reused next time)."""
    from engines.base import model_lora_identity, same_lora

    _trt()
    if engines_dir is None:
        raise BackendUnavailableError("the tensorrt backend needs an export folder with engines.", "Pass --engines DIR (made by mvz export).")
    export_dir, eng_dir = find_engine_folder(Path(engines_dir))
    dev = to_device(device)
    if dev.type != "cuda":
        raise BackendUnavailableError("the tensorrt backend runs on a CUDA device.", "Pass --device cuda.")
    # everything but the LoRA must fit; the LoRA may be switched by refit (or a rebuild) below
    manifest = load_checked_export(export_dir, model, num_views=num_views, height=height, width=width, batch=batch,
                                   check_lora=False)
    lora_differs = model is not None and not same_lora(manifest.lora, model_lora_identity(model))
    em = EngineManifest.load(eng_dir)
    check_engines(em, eng_dir, dev, manifest)
    info = {"provider": f"TensorRT {em.tensorrt}", "gpu": em.gpu, "precision": manifest.precision,
            "vae_precision": manifest.vae_precision, "cuda_graph": cuda_graph, "export": str(export_dir),
            "manifest": manifest.summary()}
    if lora_differs:  # int8/fp8: calibrated for the exported weights, never refit or rebuilt silently
        refuse_quantized_refit(manifest, model_lora_identity(model), export_dir)
    if lora_differs and not em.engines["unet"].refittable:
        return _rebuilt_backend(model, export_dir, manifest, em, "the UNet engine was built for another LoRA and is "
                                "not refittable", rebuild, num_views=num_views, height=height, width=width, batch=batch,
                                device=device, cuda_graph=cuda_graph)
    unet = TrtEngine(eng_dir / em.engines["unet"].plan, dev, cuda_graph=cuda_graph)
    vae = TrtEngine(eng_dir / em.engines["vae_decoder"].plan, dev, cuda_graph=cuda_graph)
    if lora_differs:
        try:
            info["refit"] = refit_unet_for_model(unet, export_dir, manifest, model)
        except ManifestMismatchError as err:
            del unet, vae
            return _rebuilt_backend(model, export_dir, manifest, em, err.what.rstrip("."), rebuild, num_views=num_views,
                                    height=height, width=width, batch=batch, device=device, cuda_graph=cuda_graph)
    return Backend("tensorrt", GraphDenoiser(unet, num_views, "tensorrt"), GraphDecoder(vae, "tensorrt"), info)


def _rebuilt_backend(model, export_dir: Path, manifest: ExportManifest, em: EngineManifest, why: str, rebuild: bool,
                     **request) -> Backend:
    """Fall-back for a LoRA that cannot be switched by refit: export + build for it (cached by LoRA hash and
    scale under the export folder), or, without ``rebuild`` or a builder, say how to do it."""
    from engines.base import model_lora_identity

    hint = "Re-export with this LoRA: mvz export --lora FILE --lora-scale S --out DIR (or build with --refittable)."
    if not rebuild:
        raise ManifestMismatchError(f"cannot serve this LoRA from {export_dir}: {why}.", hint)
    reason = unavailable_reason(need_builder=True)
    if reason:
        raise ManifestMismatchError(f"cannot serve this LoRA from {export_dir}: {why}, and no rebuild here ({reason})", hint)
    from export.exporter import export_model

    lid = model_lora_identity(model)
    tag = f"{lid['sha256'][:12]}-x{lid['scale']:g}" if lid else "no-lora"
    out = export_dir / "lora_rebuilds" / tag
    res = export_model(model, out, num_views=manifest.num_views, height=manifest.height, width=manifest.width,
                       batch=manifest.batch, precision=manifest.precision, vae_precision=manifest.vae_precision,
                       opset=manifest.opset, exporter=manifest.exporter, dynamic_batch=manifest.dynamic_batch)
    build_engines(res.folder, workspace_bytes=em.workspace_bytes or (8 << 30), opt_level=em.builder_optimization_level,
                  timing_cache=export_dir / ENGINES_SUBDIR / "timing.cache")
    backend = create_tensorrt_backend(model, res.folder, rebuild=False, **request)
    backend.info["rebuilt"] = {"reason": why, "folder": str(res.folder), "reused": res.reused}
    return backend


def refit_unet_for_model(unet: TrtEngine, export_dir: Path, manifest: ExportManifest, model) -> dict:
    """Refit the UNet engine to the model's current LoRA (or none) by weight name; falls back to an error
    that says to rebuild when TensorRT refuses."""
    import json

    from engines.base import model_lora_identity

    refuse_quantized_refit(manifest, model_lora_identity(model), export_dir)

    from export.fuse import fused_unet
    from export.refit_map import mapped_weights

    refit_map = json.loads((export_dir / (manifest.refit_map or "refit_map.json")).read_text())
    dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
    fused = fused_unet(model.unet, dtype=dtype)
    t = time.perf_counter()
    try:
        weights = mapped_weights(refit_map, fused)
    except KeyError as exc:
        raise ManifestMismatchError(f"cannot refit the UNet engine by name ({exc}).",
                                    "Re-export with this LoRA (mvz export --lora FILE --force).") from None
    if not unet.refit_named(weights, base_onnx=export_dir / manifest.graphs["unet"].file):
        raise ManifestMismatchError("TensorRT refused the refit for this LoRA.",
                                    "Re-export with this LoRA and rebuild (mvz export --lora FILE --force).")
    return {"weights": len(weights), "seconds": time.perf_counter() - t}
