"""Precisions side by side: what INT8/FP8 (and fp16) cost in fidelity and quality for what they gain in speed.

For each precision's backend (an export folder run by ONNX Runtime or TensorRT, or torch itself):

* **latency and peak memory**: ``bench.latency.measure_latency`` (whole generations, per-stage timers);
* **fidelity against the fp32 reference** (eager torch, fp32, same prompts and seeds):
  ``bench.fidelity.compare_samples`` -> per-step latent error, PSNR and SSIM per view;
* **quality by reward**: every reward scores every set, and the per-set differences against fp16 (or the fp32
  reference when fp16 is not measured) get a mean with a 95 % Student-t interval
  (``bench.quality.summarize_quality``), so "INT8 is worse" is a claim the interval supports or not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

ORDER = ("fp32", "fp16", "int8", "fp8")
REFERENCE = "fp32 (torch eager)"


def ordered(precisions: Sequence[str]) -> list[str]:
    return sorted(precisions, key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER))


def compare_precisions(
    model,
    backends: dict[str, Any],
    *,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cameras,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    rewards: dict | None = None,
    warmup: int = 1,
    runs: int = 3,
    fidelity_prompts: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``backends``: {precision: object with ``denoiser``/``decoder``}; ``model`` is the fp32 torch reference
    (its text encoders and camera adapter also feed every backend). Returns the report section."""
    from bench.fidelity import compare_samples
    from bench.latency import measure_latency
    from bench.quality import summarize_quality
    from mvz.pipeline import MultiviewPipeline
    from mvz.spec import SampleSpec

    if not backends:
        raise ValueError("no precision to compare")
    v = cameras.num_views
    spec = SampleSpec(steps=steps, guidance=guidance, azimuths=cameras.azimuths, elevation=cameras.elevation,
                      height=height, width=width)
    fid_p, fid_s = list(prompts[:fidelity_prompts]), list(seeds[:fidelity_prompts])
    sample_kw = {"steps": steps, "guidance": guidance, "cameras": cameras, "height": height, "width": width}
    reference = MultiviewPipeline(model, num_views=v).run(fid_p, fid_s, spec, record=True)
    section: dict[str, Any] = {"reference": REFERENCE, "reference_dtype": str(model.dtype), "precisions": {}}
    scores: dict[str, dict[str, dict[str, list]]] = {}
    for precision in ordered(list(backends)):
        backend = backends[precision]
        if log:
            log(f"precision {precision}: fidelity, latency, quality")
        pipe = MultiviewPipeline(model, denoiser=backend.denoiser, decoder=backend.decoder, num_views=v)
        fidelity = compare_samples(pipe.run(fid_p, fid_s, spec, record=True), reference)
        latency = measure_latency(model, backend, prompts=fid_p, seeds=fid_s, spec=spec, warmup=warmup, runs=runs)
        section["precisions"][precision] = {
            "backend": getattr(backend, "name", "?"), "info": dict(getattr(backend, "info", {}) or {}),
            "latency": latency, "fidelity": fidelity,
        }
        if rewards:
            scores[precision] = _reward_scores(pipe, rewards, prompts, seeds, sample_kw)
    if rewards:
        base = "fp16" if "fp16" in scores else None
        order = ([base] if base else []) + [p for p in ordered(list(scores)) if p != base]
        if base is None:  # deltas then go against the fp32 reference itself
            ref_pipe = MultiviewPipeline(model, num_views=v)
            scores[REFERENCE] = _reward_scores(ref_pipe, rewards, prompts, seeds, sample_kw)
            order = [REFERENCE, *order]
        section["quality"] = summarize_quality(scores, order)
        section["quality"]["base"] = order[0]
    return section


def _reward_scores(pipe, rewards: dict, prompts, seeds, sample_kw) -> dict[str, dict[str, list]]:
    per = {r: {"per_set": [], "per_view": []} for r in rewards}
    for p, s in zip(prompts, seeds, strict=True):
        images = pipe.sample([p], [s], **sample_kw).images
        for name, reward in rewards.items():
            out = reward.score(images, [p])
            per[name]["per_set"].extend(out.per_set.float().tolist())
            if out.per_view is not None:
                per[name]["per_view"].extend(out.per_view.float().tolist())
    return per


def precision_rows(section: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per precision (for the CLI table and report.md)."""
    rows = []
    diffs = section.get("quality", {}).get("differences_vs_base", {})
    base = section.get("quality", {}).get("base")
    for precision, entry in section["precisions"].items():
        e2e = entry["latency"]["stages"]["end_to_end"]
        unet = entry["latency"]["stages"].get("unet_step", {})
        fid = entry["fidelity"]
        row = {"precision": precision, "backend": entry["backend"], "end_to_end_ms": e2e["median_ms"],
               "unet_step_ms": unet.get("median_ms"), "peak_memory": entry["latency"].get("peak_memory"),
               "final_latent_rel_error": fid["final_latent_rel_error"],
               "max_step_latent_rel_error": max(fid.get("per_step_latent_rel_error") or [fid["final_latent_rel_error"]]),
               "psnr_db_min": fid.get("psnr_db_min"), "ssim_min": fid.get("ssim_min"), "reward_delta": {}}
        for reward, ci in diffs.get(precision, {}).items():
            row["reward_delta"][reward] = {"vs": base, "mean": ci["mean"], "ci_low": ci["ci_low"],
                                           "ci_high": ci["ci_high"], "direction": ci["direction"]}
        rows.append(row)
    return rows


def peak_mb(memory: dict | None) -> float | None:
    """The headline peak of ``bench.timing.peak_memory_mb``: device memory in use on a GPU, else peak RSS."""
    memory = memory or {}
    return memory.get("device_used_mb", memory.get("process_peak_rss_mb"))


def render_rows(rows: list[dict[str, Any]]) -> str:
    """Plain-text table: latency, memory, fidelity, reward deltas with 95 % intervals."""
    def num(x, spec):
        return "-" if x is None else spec.format(x)

    lines = [f"{'precision':9s} {'backend':12s} {'e2e ms':>9s} {'UNet ms':>9s} {'peak MiB':>9s} {'latent err':>10s} "
             f"{'PSNR min':>8s} {'SSIM min':>8s}  reward deltas (95% CI)"]
    for r in rows:
        deltas = "; ".join(
            f"{k} {num(d['mean'], '{:+.4f}')} [{num(d['ci_low'], '{:+.4f}')}, {num(d['ci_high'], '{:+.4f}')}] vs {d['vs']}"
            for k, d in r["reward_delta"].items()) or "-"
        lines.append(f"{r['precision']:9s} {r['backend']:12s} {num(r['end_to_end_ms'], '{:9.1f}')} "
                     f"{num(r['unet_step_ms'], '{:9.1f}')} {num(peak_mb(r['peak_memory']), '{:9.0f}')} "
                     f"{num(r['final_latent_rel_error'], '{:10.2e}')} "
                     f"{num(r['psnr_db_min'], '{:8.2f}')} {num(r['ssim_min'], '{:8.4f}')}  {deltas}")
    return "\n".join(lines)


def run_precision_bench(
    *,
    model_name: str,
    precisions: Sequence[str],
    backend: str,
    out,
    views: int,
    resolution: int | None,
    steps: int,
    guidance: float,
    prompts: Sequence[str],
    seed: int = 0,
    exports: dict[str, str] | None = None,
    calib_prompts: str | None = None,
    calib_steps: int | None = None,
    rewards: Sequence[str] = (),
    reward_preset: str | None = "auto",
    device: str | None = None,
    warmup: int = 1,
    runs: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``mvz bench --precisions``: export each precision (or use ``exports[p]``), run it with ``backend``
    (onnxruntime | tensorrt), compare with the fp32 torch reference; writes ``OUT/precision.json``."""
    from pathlib import Path

    from bench.backends import open_backend
    from bench.quality import load_rewards
    from bench.report import sanitize
    from export.exporter import export_model
    from mvz.atomic import write_json
    from mvz.errors import InputError, MvzError
    from mvz.models.cameras import CameraSet
    from mvz.models.loading import load_model, resolve_device

    unknown = [p for p in precisions if p not in ORDER]
    if unknown or not precisions:
        raise InputError(f"--precisions takes {', '.join(ORDER)}; got {', '.join(unknown) or 'nothing'}.")
    out = Path(out)
    dev = resolve_device(device or "auto")
    model = load_model(model_name, device=dev, dtype="fp32")
    res = resolution or model.info.default_resolution
    cameras = CameraSet.default(views)
    backends, skipped = {}, {}
    for p in ordered(list(precisions)):
        folder = (exports or {}).get(p) or str(out / "exports" / p)
        try:
            if not (exports or {}).get(p):
                if log:
                    log(f"exporting {p} into {folder}")
                export_model(model, folder, num_views=views, height=res, width=res, precision=p,
                             calib_prompts=calib_prompts, calib_steps=calib_steps)
            backends[p] = open_backend(backend, model, engines_dir=folder, num_views=views, height=res, width=res,
                                       batch=1, device=dev, log=log).backend
        except MvzError as exc:  # e.g. fp16 kernels ORT lacks on this CPU: reported, the others still run
            skipped[p] = str(exc)
    if not backends:
        raise InputError(f"no precision could run: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
    loaded = {}
    if rewards:
        preset = ("tiny" if model.info.name == "tiny" else None) if reward_preset == "auto" else reward_preset
        loaded, missing = load_rewards(list(rewards), preset, dev)
        skipped.update({f"reward {k}": v for k, v in missing.items()})
    ps = list(prompts)
    section = compare_precisions(model, backends, prompts=ps, seeds=[seed + i for i in range(len(ps))],
                                 cameras=cameras, height=res, width=res, steps=steps, guidance=guidance,
                                 rewards=loaded or None, warmup=warmup, runs=runs, log=log)
    section["skipped"] = skipped
    section["backend"] = backend
    section["rows"] = precision_rows(section)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "precision.json", sanitize(section))
    return section

