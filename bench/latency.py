"""Latency per stage and end to end for one backend (warm-up runs excluded)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from bench.stats import summarize_times
from bench.timing import (
    StageTimer,
    TimedDecoder,
    TimedDenoiser,
    peak_memory_mb,
    peak_memory_reset,
    timed_model_stages,
)

STAGES = ("text_encode", "camera_residuals", "unet_step", "unet_total", "vae_decode", "scheduler_and_other",
          "end_to_end", "image_encode")


def image_encoder(reward) -> Callable[[torch.Tensor, Sequence[str]], object]:
    """The reward's image tower on [B, V, 3, H, W]: ``embed_images`` where it exists, else ``score``."""
    if hasattr(reward, "embed_images"):
        return lambda images, prompts: reward.embed_images(images.reshape(-1, *images.shape[2:]))
    return lambda images, prompts: reward.score(images, prompts)


def measure_latency(
    model,
    backend,
    *,
    prompts: Sequence[str],
    seeds: Sequence[int],
    spec,
    warmup: int,
    runs: int,
    reward=None,
    on_run: Callable[[int, int], None] | None = None,
) -> dict:
    """Time ``warmup + runs`` complete generations of ``spec`` (a sized ``mvz.spec.SampleSpec``); return
    summaries of the timed ones (ms)."""
    from mvz.pipeline import MultiviewPipeline

    device = model.device
    timer = StageTimer(device)
    stream = getattr(backend, "stream", None)
    steps = spec.steps
    pipe = MultiviewPipeline(model, TimedDenoiser(backend.denoiser, timer, stream),
                             TimedDecoder(backend.decoder, timer, stream), num_views=spec.views)
    encode_images = image_encoder(reward) if reward is not None else None
    per_run: dict[str, list[float]] = {k: [] for k in STAGES}
    per_step: list[list[float]] = [[] for _ in range(steps)]
    total = warmup + runs
    rss_reset = False
    for i in range(total):
        if i == warmup:
            rss_reset = peak_memory_reset(device)
        timer.sync()
        t0 = time.perf_counter()
        with timed_model_stages(model, timer):
            result = pipe.run(list(prompts), list(seeds), spec)
        timer.sync()
        wall = time.perf_counter() - t0
        if encode_images is not None:
            with torch.no_grad(), timer.stage("image_encode"):
                encode_images(result.images.to(getattr(reward, "device", "cpu")), list(prompts))
        run = timer.collect()
        if on_run:
            on_run(i + 1, total)
        if i < warmup:
            continue
        unet = run.get("unet_step", [])
        for j, sec in enumerate(unet[:steps]):
            per_step[j].append(sec)
        per_run["unet_step"].extend(unet)
        per_run["unet_total"].append(sum(unet))
        for name in ("text_encode", "camera_residuals", "vae_decode", "image_encode"):
            if name in run:
                per_run[name].append(sum(run[name]))
        staged = sum(sum(run.get(n, [])) for n in ("text_encode", "camera_residuals", "unet_step", "vae_decode"))
        per_run["scheduler_and_other"].append(max(wall - staged, 0.0))
        per_run["end_to_end"].append(wall)
    stages = {k: summarize_times(vals) for k, vals in per_run.items() if vals}
    e2e = stages["end_to_end"]["median_ms"] / 1000.0
    return {
        "stages": stages,
        "unet_step_median_ms_by_index": [summarize_times(s)["median_ms"] for s in per_step if s],
        "throughput_sets_per_s": len(prompts) / e2e if e2e > 0 else None,
        "peak_memory": peak_memory_mb(device, rss_reset),
        "warmup_runs": warmup,
        "timed_runs": runs,
        "timer": "cuda events on the backend stream" if timer.cuda else "time.perf_counter",
    }


class _StagePeaks:
    """Peak device memory per named stage on CUDA: the torch allocator's peak inside the stage and the whole
    device's used memory at its end (this one includes what TensorRT / ONNX Runtime allocate themselves)."""

    def __init__(self, device):
        self.device = device
        self.peaks: dict[str, dict[str, float]] = {}

    def wrap(self, name: str, fn):
        import torch

        def run(*args):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = fn(*args)
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            rec = self.peaks.setdefault(name, {"torch_peak_allocated_mb": 0.0, "device_used_mb": 0.0})
            rec["torch_peak_allocated_mb"] = max(rec["torch_peak_allocated_mb"],
                                                 torch.cuda.max_memory_allocated(self.device) / 2**20)
            rec["device_used_mb"] = max(rec["device_used_mb"], (total - free) / 2**20)
            return out

        return run


def measure_stage_memory(model, backend, *, prompts, seeds, spec) -> dict:
    """One generation with the peak device memory of each stage (conditioning, unet, vae_decode): CUDA only."""
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import MultiviewPipeline

    device = model.device
    if device.type != "cuda":
        return {"status": "skipped", "reason": "peak device memory per stage is measured on CUDA only"}
    import torch

    peaks = _StagePeaks(device)
    # plain wrappers: the backend's denoiser was made for this spec's view count
    pipe = MultiviewPipeline(model, peaks.wrap("unet", backend.denoiser), peaks.wrap("vae_decode", backend.decoder),
                             num_views=spec.views)
    cameras = CameraSet(azimuths=spec.azimuths, elevation=spec.elevation)
    model.clear_residual_cache()
    with torch.no_grad():
        cond = peaks.wrap("conditioning",
                          lambda: pipe.prepare(list(prompts), cameras, spec.height, spec.width, spec.guidance))()
    pipe.run(list(prompts), list(seeds), spec, conditioning=cond)
    return {"status": "ok", "stages": peaks.peaks}
