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
from mvz.spec import Limits, SampleSpec, default_azimuths

__all__ = ["BatchKey", "Limits", "ModelRunner", "Output", "RunnerConfig", "Work", "load_runner", "make_runner"]

# What must be equal for requests to share one UNet call per step: the sampling spec itself.
BatchKey = SampleSpec
SERVE_MAX_RESOLUTION = 2048  # a served request is at most this side (a bound on one request's memory)


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
    """A deployment session and what this server accepts; :meth:`run` does one batch (from one thread only)."""

    def __init__(self, session, limits: Limits, max_batch: int, load_s: float):
        self.session = session
        self.limits = limits
        self.max_batch = max_batch
        self.load_s = load_s

    @property
    def model(self):
        return self.session.model

    @property
    def pipe(self):
        return self.session.pipeline

    @property
    def backend_info(self) -> dict[str, Any]:
        return self.session.info()

    def run(self, key: BatchKey, works: list[Work], on_step=None) -> list[Output]:
        """``on_step(done, total)`` is called after every denoising step (progress bars)."""
        if len(works) > self.max_batch:
            raise ValueError(f"batch of {len(works)} exceeds max_batch {self.max_batch}")
        result = self.session.sample([w.prompt for w in works], [w.seed for w in works], key, on_step=on_step)
        return [Output(result.images[i], self.metadata(key, w, result, len(works))) for i, w in enumerate(works)]

    def metadata(self, key: BatchKey, work: Work, result, batch: int) -> dict[str, Any]:
        """The fields of ``mvz generate``'s JSON sidecar (no file paths: nothing is written)."""
        from mvz.sidecar import generation_record

        info = self.model.info
        return generation_record(
            prompt=work.prompt, seed=work.seed, steps=key.steps, guidance=key.guidance, zmv=key.zmv,
            zmv_steps=key.zmv_steps, result=result, azimuths=key.azimuths, elevation=key.elevation,
            resolution=key.height, model_info=info, lora=info.lora,
            lora_scale=key.lora_scale if key.lora_scale is not None else info.lora_scale, backend=self.backend_info,
            device=self.model.device, dtype=self.model.dtype, load_s=self.load_s, prompts_in_call=batch,
        )

    def warmup(self) -> float:
        """Run one full-size batch once (allocations, autotuning, compiled graphs); returns seconds."""
        t0 = time.perf_counter()
        lim = self.limits
        res = lim.fixed_resolution or lim.default_resolution
        key = SampleSpec(steps=1, azimuths=default_azimuths(lim.fixed_views), height=res, width=res)
        self.run(key, [Work("warm-up", i) for i in range(self.max_batch)])
        return time.perf_counter() - t0


def check_config(cfg: RunnerConfig) -> None:
    """What can be checked before loading anything (so a typo fails in a second, not after the load)."""
    from engines import registry

    if cfg.max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {cfg.max_batch}.")
    if registry.get(cfg.backend).needs_export and cfg.engines is None:
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


def make_runner(model, cfg: RunnerConfig, load_s: float = 0.0, say=None) -> ModelRunner:
    """A runner over a loaded model: a session of ``cfg``'s backend (engines checked against their manifest,
    rebuilt when a refit is refused); the batch is the engines' when they are static."""
    from engines.session import BackendSpec, open_session

    check_config(cfg)
    spec = BackendSpec(cfg.backend, cfg.engines, batch=cfg.max_batch, device=model.device, max_views=cfg.max_views)
    session = open_session(model, spec, say=say or _log_line)
    limits = session.limits.narrowed(max_resolution=SERVE_MAX_RESOLUTION)
    return ModelRunner(session, limits, session.max_batch, load_s + session.open_s)


def _log_line(line: str) -> None:
    import logging

    logging.getLogger("mvz.serve").warning(line)
