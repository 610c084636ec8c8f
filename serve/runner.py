"""The model side of the service: load once, warm up, run one batch of compatible requests.

Everything here is synchronous and runs on ONE worker thread (torch releases the GIL while it computes,
so the event loop keeps accepting requests). A batch of B prompts x V views goes through the pipeline's
``sample`` in one call, i.e. one UNet call per step; each prompt has its own seeded generator in the
pipeline, so a prompt's images do not depend on the other prompts of its batch (batch == single).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvz.errors import InputError


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for requests to share one UNet call per step (the pipeline takes one value of
    each per ``sample`` call)."""

    steps: int
    azimuths: tuple[float, ...]
    elevation: float
    resolution: int
    zmv: bool
    zmv_steps: int
    guidance: float
    lora_scale: float | None


@dataclass(frozen=True)
class Work:
    prompt: str
    seed: int


@dataclass
class Output:
    """One request's result: its views [V,3,H,W] in [0,1] (CPU float32) and the sidecar metadata."""

    images: Any
    metadata: dict[str, Any]


@dataclass
class Limits:
    """What this server accepts (fixed by an exported engine, or the defaults of the torch backends)."""

    default_resolution: int
    resolution_multiple: int
    max_views: int
    fixed_views: int | None = None  # exported graphs: the views they were exported for
    fixed_resolution: int | None = None  # exported graphs: the resolution they were exported for
    lora_scale_settable: bool = False
    lora_scale: float | None = None
    max_resolution: int = 2048


@dataclass
class RunnerConfig:
    model: str = "tiny"
    lora: Path | None = None
    lora_scale: float = 1.0
    backend: str = "torch"
    engines: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 4
    max_views: int = 16
    random_weights: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # load_model keyword overrides (base_model, ...)


class ModelRunner:
    """A loaded model + pipeline; :meth:`run` does one batch (call it from one thread only)."""

    def __init__(self, model, pipe, backend_info: dict[str, Any], limits: Limits, max_batch: int, device, dtype,
                 load_s: float):
        self.model = model
        self.pipe = pipe
        self.backend_info = backend_info
        self.limits = limits
        self.max_batch = max_batch
        self.device = device
        self.dtype = dtype
        self.load_s = load_s
        self._lora_scale = limits.lora_scale

    def _set_lora_scale(self, scale: float | None) -> None:
        if scale is None or not self.limits.lora_scale_settable or scale == self._lora_scale:
            return
        from mvz.models.lora import set_lora_scale

        set_lora_scale(self.model.unet, scale)
        self._lora_scale = scale

    def run(self, key: BatchKey, works: list[Work], on_step=None) -> list[Output]:
        """``on_step(done, total)`` is called after every denoising step (progress bars)."""
        from mvz.models.cameras import CameraSet

        if len(works) > self.max_batch:
            raise ValueError(f"batch of {len(works)} exceeds max_batch {self.max_batch}")
        self._set_lora_scale(key.lora_scale)
        cameras = CameraSet(azimuths=key.azimuths, elevation=key.elevation)
        result = self.pipe.sample(
            [w.prompt for w in works], [w.seed for w in works], steps=key.steps, guidance=key.guidance,
            cameras=cameras, height=key.resolution, width=key.resolution, zmv=key.zmv, zmv_steps=key.zmv_steps,
            on_step=on_step,
        )
        return [Output(result.images[i], self.metadata(key, w, result, len(works))) for i, w in enumerate(works)]

    def metadata(self, key: BatchKey, work: Work, result, batch: int) -> dict[str, Any]:
        """The fields of ``mvz generate``'s JSON sidecar (no file paths: nothing is written)."""
        from mvz.sidecar import generation_record

        info = self.model.info
        return generation_record(
            prompt=work.prompt, seed=work.seed, steps=key.steps, guidance=key.guidance, zmv=key.zmv,
            zmv_steps=key.zmv_steps, result=result, azimuths=key.azimuths, elevation=key.elevation,
            resolution=key.resolution, model_info=info, lora=info.lora,
            lora_scale=key.lora_scale if key.lora_scale is not None else info.lora_scale, backend=self.backend_info,
            device=self.device, dtype=self.dtype, load_s=self.load_s, prompts_in_call=batch,
        )

    def warmup(self) -> float:
        """Run one full-size batch once (allocations, autotuning, compiled graphs); returns seconds."""
        from mvz.models.cameras import CameraSet

        t0 = time.perf_counter()
        lim = self.limits
        views = lim.fixed_views or 6
        res = lim.fixed_resolution or lim.default_resolution
        key = BatchKey(1, CameraSet.default(views).azimuths, 0.0, res, False, 1, 7.0, None)
        self.run(key, [Work("warm-up", i) for i in range(self.max_batch)])
        return time.perf_counter() - t0


def check_config(cfg: RunnerConfig) -> None:
    """What can be checked before loading anything (so a typo fails in a second, not after the load)."""
    from engines import BACKENDS

    if cfg.max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {cfg.max_batch}.")
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend {cfg.backend!r}.", f"Use one of: {', '.join(BACKENDS)}.")
    if cfg.backend in ("onnxruntime", "tensorrt") and cfg.engines is None:
        raise InputError(f"--backend {cfg.backend} needs --engines DIR (an mvz export folder).")
    if cfg.lora is not None and not Path(cfg.lora).exists():
        raise InputError(f"LoRA {cfg.lora} does not exist.", "Pass the path of a mvczigal_lcm_sdxl_lora.safetensors file.")


def load_runner(cfg: RunnerConfig) -> ModelRunner:
    """Load the model (and the engines) once. Raises MvzError subclasses for what the user can fix."""
    from mvz.models.loading import load_model, resolve_device, resolve_dtype

    check_config(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=device, dtype=dtype, random_weights=cfg.random_weights,
                       lora=str(cfg.lora) if cfg.lora else None, lora_scale=cfg.lora_scale, **cfg.extra)
    return make_runner(model, cfg, time.perf_counter() - t0)


def make_runner(model, cfg: RunnerConfig, load_s: float = 0.0) -> ModelRunner:
    """A runner over a loaded model: the backend of ``cfg`` (engines checked against their manifest)."""
    from engines import create_backend
    from mvz.pipeline import MultiviewPipeline

    t0 = time.perf_counter()
    limits = Limits(model.info.default_resolution, model.resolution_multiple, cfg.max_views,
                    lora_scale=model.info.lora_scale if model.info.lora else None)
    max_batch = cfg.max_batch
    if cfg.backend in ("onnxruntime", "tensorrt"):
        from export.manifest import read_manifest

        manifest = read_manifest(Path(cfg.engines))
        limits.fixed_views, limits.fixed_resolution = manifest.num_views, manifest.height
        limits.max_views = manifest.num_views
        if not manifest.dynamic_batch:
            max_batch = manifest.batch  # a static graph: smaller batches are padded to it, never exceed it
        backend = create_backend(cfg.backend, model, engines_dir=cfg.engines, num_views=manifest.num_views,
                                 height=manifest.height, width=manifest.width, batch=max_batch, device=model.device)
    else:
        backend = create_backend(cfg.backend, model, num_views=6, device=model.device)
        limits.lora_scale_settable = model.info.lora is not None
    pipe = MultiviewPipeline(model, denoiser=backend.denoiser, decoder=backend.decoder)
    # the same backend description as mvz generate's sidecar
    info = {"name": "torch"} if cfg.backend == "torch" else {"name": backend.name, **dict(backend.info)}
    return ModelRunner(model, pipe, info, limits, max_batch, model.device, model.dtype,
                       load_s + time.perf_counter() - t0)
