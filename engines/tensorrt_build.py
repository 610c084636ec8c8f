"""TensorRT build half: export folder -> checked engines, through Polygraphy's loaders.

Per graph (``build_spec`` -> ``engine_loaders``, all lazy, so the chain is inspectable without TensorRT):

    network_from_onnx_path(onnx, strongly_typed=True)           # precision is the ONNX's (fp16 export)
    CreateConfig(profiles=[static Profile], refittable=..., memory_pool_limits={WORKSPACE: n},
                 builder_optimization_level=..., load_timing_cache=...)
      [+ PostprocessConfig: REFIT_INDIVIDUAL + network.mark_weights_refittable(LoRA targets)]
    EngineBytesFromNetwork(network, config, save_timing_cache=...)

Then every new plan is compared numerically with ONNX Runtime on one fixed input (Polygraphy ``Comparator``:
``compare_accuracy`` + ``validate(check_nan=True, check_inf=True)``); only a plan that passes is written
(atomically) and recorded, with the figures, in ``mvz_engines.json``. A failing plan is not kept.

Memory: the caller frees the torch model before building (``mvz.devices.release_device_memory``); the plan bytes live on
the host between the build and the check, so the engine (weights on the device) exists only while the check's
TensorRT runner is active, and the ONNX Runtime reference runs after it is released.

A timing cache that TensorRT rejects (another GPU or TensorRT, or corrupt) is set aside as ``*.rejected``
and the build starts from a fresh cache, saying so in one line.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.tensorrt_common import check_inputs, load_tensorrt
from engines.tensorrt_manifest import (
    ENGINES_SUBDIR,
    EngineEntry,
    EngineManifest,
    engine_problems,
    environment_problems,
    profile_shapes,
)
from mvz.artifacts.manifest import ExportManifest, manifest_sha256, now_iso, read_manifest, sha256_file
from mvz.artifacts.refit_plan import read_refit_map
from mvz.devices import gpu_identity, release_device_memory
from mvz.errors import DeviceError, MvzError

StageCallback = Callable[[str, str, dict], None]
GRAPHS = ("unet", "vae_decoder")


@dataclass(frozen=True)
class CheckBounds:
    """The numeric gate of an engine (after build or refit): every bound must hold. Elementwise errors are
    Polygraphy's (|engine - ref| <= atol + rtol * |ref|), checked on the median and on the 99th percentile:
    a corruption confined to a few channels or one view passes a median gate."""

    atol: float
    rtol: float
    p99_atol: float
    p99_rtol: float
    min_cosine: float = 0.999


# engine vs ONNX Runtime, keyed by the base dtype (the precision of everything not quantized); fp16 kernels
# differ from ONNX Runtime's in accumulation order
CHECK_TOLERANCE = {"fp16": CheckBounds(2e-2, 2e-2, 1e-1, 1e-1), "bf16": CheckBounds(4e-2, 4e-2, 2e-1, 2e-1),
                   "fp32": CheckBounds(1e-3, 1e-3, 1e-2, 1e-2, 0.99999)}
# Q/DQ graphs, their own stated bounds: engine and ONNX Runtime apply the same scales, but a value on a rounding
# boundary lands one quantization step apart and that step propagates (export parity saw, int8 tiny model:
# median rel 0.021, max rel 0.149, cosine 0.9994)
QUANTIZED_CHECK_TOLERANCE = {"int8": CheckBounds(5e-2, 5e-2, 2.5e-1, 2.5e-1, 0.998),
                             "fp8": CheckBounds(5e-2, 5e-2, 2.5e-1, 2.5e-1, 0.998)}


def check_bounds(precision: str, base_dtype: str | None = None) -> CheckBounds:
    """The gate of a graph of ``precision``: a quantized graph's own bounds, else its base dtype's."""
    if precision in QUANTIZED_CHECK_TOLERANCE:
        return QUANTIZED_CHECK_TOLERANCE[precision]
    return CHECK_TOLERANCE[base_dtype or precision]


class EngineBuildError(MvzError):
    """TensorRT could not build an engine, or the engine it built does not compute what the ONNX does."""


@dataclass
class BuildSpec:
    """Everything one engine build depends on (pure data: inspectable and testable without TensorRT)."""

    onnx: Path
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max]
    precision: str
    workspace_bytes: int = 8 << 30
    opt_level: int = 3
    refit: str = "none"  # none | all | individual
    refit_weights: list[str] = field(default_factory=list)  # initializer names (individual refit)
    timing_cache: Path | None = None
    base_dtype: str | None = None  # quantized graphs: the dtype outside the Q/DQ pairs


def refit_mode(requested: bool, trt) -> str:
    """``individual`` where TensorRT has REFIT_INDIVIDUAL + mark_weights_refittable (10.0+), else ``all``."""
    if not requested:
        return "none"
    has = hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(trt.INetworkDefinition, "mark_weights_refittable")
    return "individual" if has else "all"


def lora_refit_weights(export_dir: Path, manifest: ExportManifest) -> list[str]:
    """Initializer names of the UNet's LoRA targets (the weights a LoRA switch refits)."""
    refit_map = read_refit_map(export_dir, manifest.refit_map)
    return sorted({e["onnx"] for e in refit_map["weights"].values()})


def build_spec(export_dir: Path, manifest: ExportManifest, graph: str, *, refit: str, workspace_bytes: int,
               opt_level: int, timing_cache: Path | None) -> BuildSpec:
    refit = refit if graph == "unet" else "none"  # only the UNet switches LoRAs
    return BuildSpec(
        onnx=export_dir / manifest.graphs[graph].file, profile=profile_shapes(manifest, graph),
        precision=manifest.graphs[graph].precision, workspace_bytes=int(workspace_bytes), opt_level=int(opt_level),
        refit=refit, refit_weights=lora_refit_weights(export_dir, manifest) if refit == "individual" else [],
        timing_cache=timing_cache, base_dtype=(manifest.quantization or {}).get("base_dtype"),
    )


def _mark_refittable(names: list[str], flag) -> Callable:
    def apply(builder, network, config) -> None:
        config.set_flag(flag)
        missing = [n for n in names if not network.mark_weights_refittable(n)]
        if missing:
            raise EngineBuildError(f"TensorRT found no weights named {missing[0]} (+{len(missing) - 1} more) to mark "
                                   "refittable.", "Re-export the ONNX (mvz export --force) or build without --refittable.")
    return apply


def engine_loaders(spec: BuildSpec, *, workspace_pool=None, refit_individual_flag=None):
    """The Polygraphy loader chain for one build: (network, config, engine bytes) loaders, nothing run yet.
    ``workspace_pool`` is ``trt.MemoryPoolType.WORKSPACE`` and ``refit_individual_flag``
    ``trt.BuilderFlag.REFIT_INDIVIDUAL`` (passed in so the chain can be built without TensorRT)."""
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessConfig,
        Profile,
    )

    network = NetworkFromOnnxPath(str(spec.onnx), strongly_typed=True)
    profile = Profile()
    for name, (lo, opt, hi) in spec.profile.items():
        profile.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    cache = str(spec.timing_cache) if spec.timing_cache is not None and spec.timing_cache.is_file() else None
    config = CreateConfig(
        profiles=[profile], refittable=spec.refit == "all", memory_pool_limits={workspace_pool: spec.workspace_bytes},
        builder_optimization_level=spec.opt_level, load_timing_cache=cache,
        tf32=True,  # Polygraphy's default is off; NVIDIA's demo builds every precision with TF32
    )
    if spec.refit == "individual":
        config = PostprocessConfig(config, _mark_refittable(spec.refit_weights, refit_individual_flag))
    engine = EngineBytesFromNetwork(network, config=config,
                                    save_timing_cache=str(spec.timing_cache) if spec.timing_cache else None)
    return network, config, engine


def usable_timing_cache(path: Path | None, trt, say: Callable[[str], None]) -> Path | None:
    """``path`` if TensorRT accepts it as a timing cache here; a rejected one is set aside and a fresh cache
    used (``set_timing_cache`` refuses a cache from another device or TensorRT)."""
    if path is None or not path.is_file():
        return path
    logger = trt.Logger(trt.Logger.ERROR)
    config = trt.Builder(logger).create_builder_config()
    try:
        cache = config.create_timing_cache(path.read_bytes())
        ok = cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
    except Exception:  # TensorRT raises on bytes that are not a timing cache
        ok = False
    if not ok:
        aside = path.with_name(path.name + ".rejected")
        path.replace(aside)
        say(f"timing cache {path} was rejected by TensorRT {trt.__version__} on this GPU (another device or "
            f"version); moved to {aside.name}, building with a fresh cache.")
    return path


def compare_with_onnxruntime(runner, onnx_path: Path, feeds: dict[str, Any], precision: str,
                             providers: list[str] | None = None, base_dtype: str | None = None) -> dict[str, Any]:
    """One Polygraphy comparison of ``runner`` (a TensorRT runner after a build or refit) against ONNX
    Runtime on ``feeds``: NaN/inf validation, the median and 99th-percentile elementwise errors and the cosine
    within :func:`check_bounds`. Runners run one after the other, so the engine is released before ONNX
    Runtime loads the graph."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    from mvz.artifacts.compare import compare

    bounds = check_bounds(precision, base_dtype)
    atol, rtol = bounds.atol, bounds.rtol
    reference = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=providers or ["cpu"]), name="onnxruntime")
    results = Comparator.run([runner, reference], data_loader=[feeds])
    finite = bool(Comparator.validate(results, check_nan=True, check_inf=True))
    func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="median")
    p99 = SimpleCompareFunc(atol=bounds.p99_atol, rtol=bounds.p99_rtol, check_error_stat="quantile", error_quantile=0.99)
    accurate = bool(Comparator.compare_accuracy(results, compare_func=func))
    accurate_p99 = bool(Comparator.compare_accuracy(results, compare_func=p99))
    (_, engine_iters), (_, ref_iters) = results[0], results[1]
    name = next(iter(ref_iters[0].keys()))
    stats = compare(ref_iters[0][name], engine_iters[0][name])
    aligned = stats["cosine"] >= bounds.min_cosine
    return {"passed": finite and accurate and accurate_p99 and aligned, "finite": finite,
            "within_tolerance": accurate, "p99_within_tolerance": accurate_p99, "cosine_within": aligned,
            "reference": "onnxruntime", "providers": list(providers or ["cpu"]), "error_stat": "median+p99",
            "atol": atol, "rtol": rtol, "p99_atol": bounds.p99_atol, "p99_rtol": bounds.p99_rtol,
            "min_cosine": bounds.min_cosine, "max_abs_err": stats["max_abs_err"],
            "median_rel_err": stats["median_rel_err"], "cosine": stats["cosine"]}


def _reference_providers() -> list[str]:
    import onnxruntime as ort

    return ["cuda", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]


def build_one(spec: BuildSpec, plan_path: Path, manifest: ExportManifest, graph: str, trt,
              say: Callable[[str], None]) -> EngineEntry:
    """Build, check against ONNX Runtime, then (only if it passes) write the plan atomically."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from mvz.atomic import write_bytes

    _, _, engine_bytes = engine_loaders(spec, workspace_pool=trt.MemoryPoolType.WORKSPACE,
                                        refit_individual_flag=getattr(trt.BuilderFlag, "REFIT_INDIVIDUAL", None))
    release_device_memory()
    t = time.perf_counter()
    try:
        with _tensorrt_errors() as errors:
            plan = bytes(engine_bytes())
    except MvzError:
        raise
    except Exception as exc:  # Polygraphy raises PolygraphyException on a failed build
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if is_out_of_memory([msg, *errors]):  # TensorRT logs the OOM; Polygraphy only says "Invalid Engine"
            raise DeviceError(f"out of GPU memory building the {graph} engine ({msg}).",
                              "Lower --workspace or the batch (--batch-size), or close other GPU programs.") from None
        raise EngineBuildError(f"TensorRT failed to build the {graph} engine from {spec.onnx.name}: {msg}",
                               "Check the TensorRT errors above; re-export (--force) if the ONNX changed.") from None
    seconds = time.perf_counter() - t
    check = compare_with_onnxruntime(TrtRunner(EngineFromBytes(plan), name="tensorrt"), spec.onnx,
                                     check_inputs(manifest, graph), spec.precision, _reference_providers(),
                                     spec.base_dtype)
    release_device_memory()
    if not check["passed"]:
        raise EngineBuildError(
            f"the {graph} engine does not match ONNX Runtime (finite={check['finite']}, median rel err "
            f"{check['median_rel_err']:.3g}, cosine {check['cosine']:.5f}); it was not kept.",
            "Rebuild with --opt-level 2, or report this with the TensorRT version and GPU.")
    write_bytes(plan_path, plan)
    say(f"built {plan_path.name} in {seconds:.1f}s; check vs ONNX Runtime passed (median rel err "
        f"{check['median_rel_err']:.2e})")
    return record_plan(plan_path, spec, manifest, graph, seconds, check)


OOM_MARKERS = ("out of memory", "outofmemory", "cudaerrormemoryallocation", "could not be allocated",
               "insufficient memory", "failed to allocate")


def is_out_of_memory(messages) -> bool:
    """Whether a failed build's exception or TensorRT's logged errors say the GPU ran out of memory."""
    return any(marker in str(m).lower() for m in messages for marker in OOM_MARKERS)


@contextlib.contextmanager
def _tensorrt_errors():
    """Collect the errors TensorRT logs during a build (Polygraphy's TensorRT logger forwards them to
    ``G_LOGGER.error``, which still prints them)."""
    from polygraphy.logger import G_LOGGER

    seen: list[str] = []
    original, shadowed = G_LOGGER.error, "error" in vars(G_LOGGER)

    def error(message, *args, **kwargs):
        seen.append(str(message() if callable(message) else message))
        return original(message, *args, **kwargs)

    G_LOGGER.error = error
    try:
        yield seen
    finally:
        if shadowed:
            G_LOGGER.error = original
        else:
            del G_LOGGER.error


def record_plan(plan_path: Path, spec: BuildSpec, manifest: ExportManifest, graph: str, seconds: float,
                check: dict[str, Any]) -> EngineEntry:
    """The engine manifest entry of a written plan: its full sha256 and the ONNX hash it was built from."""
    return EngineEntry(plan=plan_path.name, plan_sha256=sha256_file(plan_path), source_onnx=spec.onnx.name,
                       source_sha256=manifest.graphs[graph].sha256, profile=spec.profile, refit=spec.refit,
                       build_seconds=seconds, bytes=plan_path.stat().st_size, check=check,
                       refittable_weights=len(spec.refit_weights))


def new_engine_manifest(export_dir: Path, tensorrt_version: str, gpu: str, compute_capability: str, *,
                        opt_level: int, workspace_bytes: int) -> EngineManifest:
    """An empty engine manifest bound to this export (the sha256 of its manifest file)."""
    return EngineManifest(tensorrt_version, gpu, compute_capability, manifest_sha256(export_dir),
                          builder_optimization_level=opt_level, workspace_bytes=int(workspace_bytes), created=now_iso())


def build_engines(
    export_dir: str | Path,
    *,
    graphs: tuple[str, ...] = GRAPHS,
    workspace_bytes: int = 8 << 30,
    opt_level: int = 3,
    refittable: bool = False,
    timing_cache: str | Path | None = None,
    force: bool = False,
    on_stage: StageCallback | None = None,
) -> EngineManifest:
    """Build (or reuse, when current for this GPU, TensorRT and export) the engines of an export folder."""
    trt = load_tensorrt(need_builder=True)
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if manifest.quantization:  # Q/DQ graphs: level 4 (NVIDIA's demo and ModelOpt's trtexec recipe for int8/fp8)
        opt_level = max(opt_level, 4)
    out = export_dir / ENGINES_SUBDIR
    out.mkdir(exist_ok=True)
    ident = gpu_identity()

    def say(msg: str) -> None:
        if on_stage:
            on_stage("engines", "note", {"message": msg})

    try:
        current = EngineManifest.load(out)
    except MvzError:
        current = None
    if current is None or force or environment_problems(current, trt.__version__, ident["gpu"], ident["compute_capability"]) \
            or engine_problems(current, out, export_dir, manifest, graphs=(), hash_plans=False):
        current = new_engine_manifest(export_dir, trt.__version__, ident["gpu"], ident["compute_capability"],
                                      opt_level=opt_level, workspace_bytes=workspace_bytes)
    tc = usable_timing_cache(Path(timing_cache) if timing_cache else out / "timing.cache", trt, say)
    mode = refit_mode(refittable, trt)
    for g in graphs:
        entry = current.engines.get(g)
        wanted = mode if g == "unet" else "none"
        if entry and not force and (entry.refit == wanted or wanted == "none") \
                and not engine_problems(current, out, export_dir, manifest, graphs=(g,)):
            if on_stage:
                on_stage(f"{g}: engine", "skip", {"reason": "up to date"})
            continue
        from mvz.artifacts.manifest import verify_graph_files

        verify_graph_files(export_dir, manifest, [g])  # the bytes built are the bytes the manifest records
        spec = build_spec(export_dir, manifest, g, refit=mode, workspace_bytes=workspace_bytes, opt_level=opt_level,
                          timing_cache=tc)
        plan = f"{g}{'' if spec.refit == 'none' else '.refit'}.trt{trt.__version__}.plan"
        if on_stage:
            on_stage(f"{g}: engine", "start", {"plan": plan, "refit": spec.refit})
        current.engines[g] = build_one(spec, out / plan, manifest, g, trt, say)
        current.save(out)
        if on_stage:
            on_stage(f"{g}: engine", "done", {"seconds": current.engines[g].build_seconds, "bytes": current.engines[g].bytes})
    current.save(out)
    return current

