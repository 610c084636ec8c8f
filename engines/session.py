"""The deployment session: one loaded model served by one backend, and the one rebuild policy.

``open_session(model, BackendSpec(...))`` gives what ``mvz generate``, ``mvz serve`` and ``mvz bench`` all need:
the pipeline over the backend's denoiser and decoder, the :class:`~mvz.spec.Limits` the engines were built for,
the batch they take, the memory held and an ``info()`` for sidecars and reports. Every entry point samples
through :meth:`Session.sample` with a :class:`~mvz.spec.SampleSpec`.

The policy lives here once: a backend that serves a LoRA by refit (TensorRT) and refuses the refit raises
``RefitRefusedError``; the session then releases what the failed attempt held (outside the ``except`` block, so
the engine and refitter are gone), says so in one line, rebuilds through the backend's ``rebuild`` and opens it
again. This is the only module of ``engines`` that may import the exporter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines import registry
from mvz.devices import release_device_memory
from mvz.errors import InputError
from mvz.spec import HOUSE_LIMITS, Limits, SampleSpec

Say = Callable[[str], None]


@dataclass(frozen=True)
class BackendSpec:
    """Which backend and what for. ``num_views``/``height``/``width`` None: the export's (exported backends) or
    6 views at the model's resolution. ``options`` go to the backend's ``create`` (those it takes)."""

    name: str = "torch"
    engines: Path | None = None
    num_views: int | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 1
    device: Any = None  # default: the model's device
    max_views: int = HOUSE_LIMITS.max_views  # what non-exported backends accept per request
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Session:
    model: Any
    entry: registry.BackendEntry
    backend: Any  # engines.base.Backend
    pipeline: Any  # mvz.pipeline.MultiviewPipeline
    limits: Limits
    max_batch: int
    engines: Path | None
    open_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the session said while opening (e.g. a rebuild)
    lora_scale_now: float | None = None  # the LoRA scale the UNet runs at now (set per call where settable)

    def __post_init__(self) -> None:
        self.lora_scale_now = self.limits.lora_scale

    def info(self) -> dict[str, Any]:
        """The backend as sidecars and reports describe it."""
        return {"name": self.backend.name, **dict(self.backend.info or {})}

    def memory(self) -> dict[str, float]:
        """What this process holds now: device memory on CUDA, else the peak resident set."""
        import torch

        dev = self.model.device
        if getattr(dev, "type", "cpu") == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            return {"device_used_mb": (total - free) / 2**20, "torch_allocated_mb": torch.cuda.memory_allocated(dev) / 2**20}
        import resource

        return {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], spec: SampleSpec, **options):
        """Sample ``spec`` (checked against this session's limits) for ``prompts``; ``options`` go to the
        pipeline (``on_step``, ``record``, ``conditioning`` ...)."""
        spec = spec.sized(self.limits.default_resolution).check(self.limits)
        self._use_lora_scale(spec.lora_scale)
        return self.pipeline.run(prompts, seeds, spec, **options)

    def _use_lora_scale(self, scale: float | None) -> None:
        if scale is None or not self.limits.lora_scale_settable or scale == self.lora_scale_now:
            return
        from mvz.models.lora import set_lora_scale

        set_lora_scale(self.model.unet, scale)
        self.lora_scale_now = scale


def open_session(model, spec: BackendSpec, *, say: Say | None = None) -> Session:
    """The model served by ``spec``'s backend (made, or rebuilt once when a refit is refused)."""
    from mvz.pipeline import MultiviewPipeline

    t0 = time.perf_counter()
    entry = registry.get(spec.name)
    notes: list[str] = []

    def tell(line: str) -> None:
        notes.append(line)
        if say is not None:
            say(line)

    limits, shapes = _limits_and_shapes(model, entry, spec)
    backend, engines = _create_or_rebuild(model, entry, spec, shapes, tell)
    pipeline = MultiviewPipeline(model, denoiser=backend.denoiser, decoder=backend.decoder,
                                 num_views=shapes["num_views"])
    return Session(model, entry, backend, pipeline, limits, shapes["batch"], engines,
                   time.perf_counter() - t0, notes)


def session_limits(model, spec: BackendSpec) -> Limits:
    """What a session of ``spec`` over ``model`` will accept, before anything is made (export manifests read)."""
    return _limits_and_shapes(model, registry.get(spec.name), spec)[0]


def _limits_and_shapes(model, entry: registry.BackendEntry, spec: BackendSpec) -> tuple[Limits, dict[str, Any]]:
    """What requests the backend takes, and the shapes it is made for."""
    info = model.info
    res = info.default_resolution
    limits = HOUSE_LIMITS.narrowed(
        default_resolution=res, resolution_multiple=model.resolution_multiple, max_views=spec.max_views,
        lora_scale=info.lora_scale if info.lora else None,
        lora_scale_settable=entry.lora_scale_per_call and info.lora is not None)
    shapes = {"num_views": spec.num_views or 6, "height": spec.height or res, "width": spec.width or spec.height or res,
              "batch": spec.batch, "device": spec.device if spec.device is not None else model.device}
    if not entry.needs_export:
        return limits, shapes
    if spec.engines is None:
        raise InputError(f"--backend {entry.name} needs --engines DIR (an mvz export folder).")
    if spec.num_views is None or spec.height is None:  # serve: whatever the export was made for
        from mvz.artifacts.manifest import read_manifest

        m = read_manifest(Path(spec.engines))
        shapes.update(num_views=m.num_views, height=m.height, width=m.width)
        if not m.dynamic_batch:
            shapes["batch"] = m.batch  # a static graph: smaller batches are padded to it, never exceed it
    limits = limits.narrowed(fixed_views=shapes["num_views"], fixed_resolution=shapes["height"],
                             max_views=shapes["num_views"])
    return limits, shapes


def _create_or_rebuild(model, entry: registry.BackendEntry, spec: BackendSpec, shapes: dict[str, Any], say: Say):
    """The backend and the engines folder it runs from: refit if the engine allows it, else release the old
    engine and rebuild, saying so in one line."""
    from mvz.artifacts.refit_plan import RefitRefusedError

    options = {k: v for k, v in spec.options.items() if k in entry.options}
    kwargs = dict(num_views=shapes["num_views"], height=shapes["height"], width=shapes["width"],
                  batch=shapes["batch"], device=shapes["device"], **options)
    engines = Path(spec.engines) if spec.engines is not None else None
    try:
        return entry.create(model, engines_dir=engines, **kwargs), engines
    except RefitRefusedError as err:
        if entry.rebuild is None:
            raise
        why = err.what
    release_device_memory()  # after the except block: the refused engine and its refitter are released
    say(f"rebuilding {entry.name} engines: {why}")
    folder = Path(entry.rebuild(model, engines, why, say))
    return entry.create(model, engines_dir=folder, **kwargs), folder


def rebuild_tensorrt_engines(model, engines_dir: Path, why: str, say: Say | None = None) -> Path:
    """Export the model with its LoRA fused and build engines for it under
    ``<export>/lora_rebuilds/<lora sha256[:12]>-x<scale>/`` (reused next time), with the options of the original
    export and engines. Returns the new export folder."""
    from engines.base import model_lora_identity
    from engines.tensorrt_build import build_engines
    from engines.tensorrt_manifest import ENGINES_SUBDIR, EngineManifest, find_engine_folder
    from export.exporter import export_model
    from mvz.artifacts.manifest import read_manifest

    export_dir = find_engine_folder(Path(engines_dir))[0]
    manifest = read_manifest(export_dir)
    em = EngineManifest.load(export_dir / ENGINES_SUBDIR)
    lid = model_lora_identity(model)
    tag = f"{lid['sha256'][:12]}-x{lid['scale']:g}" if lid else "no-lora"
    out = export_dir / "lora_rebuilds" / tag
    res = export_model(model, out, num_views=manifest.num_views, height=manifest.height, width=manifest.width,
                       batch=manifest.batch, precision=manifest.precision, vae_precision=manifest.vae_precision,
                       opset=manifest.opset, exporter=manifest.exporter, dynamic_batch=manifest.dynamic_batch,
                       offload=True)  # each traced module leaves the GPU: no second UNet there during parity and build
    release_device_memory()
    build_engines(res.folder, workspace_bytes=em.workspace_bytes or (8 << 30), opt_level=em.builder_optimization_level,
                  refittable=em.engines["unet"].refittable, timing_cache=export_dir / ENGINES_SUBDIR / "timing.cache")
    return res.folder


def _register_rebuilds() -> None:
    """The session supplies the rebuild recipe of the backends that refit (the registry cannot import us)."""
    from dataclasses import replace

    entry = registry.get("tensorrt")
    if entry.rebuild is None:
        registry.register(replace(entry, rebuild=rebuild_tensorrt_engines))


_register_rebuilds()
