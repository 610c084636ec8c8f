"""The benchmark run behind ``mvz bench``: latency, compute floor, fidelity, quality, then the reports."""

from __future__ import annotations

import copy
import datetime as _dt
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from bench import SCHEMA_VERSION
from mvz.errors import InputError, MvzError

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
DEFAULT_REWARDS = ("pickscore", "hpsv2", "imagereward", "hyperscore")



IN_PLACE_BACKENDS = ("torch-compile", "torch-cudagraph")

def shipped_prompts(name: str) -> Path:
    """A prompt set shipped in ``bench/prompts`` (``objects``, ``smoke``)."""
    return Path(str(resources.files("bench").joinpath("prompts").joinpath(f"{name}.txt")))


@dataclass
class BenchConfig:
    model: str = "tiny"
    random_weights: bool = False
    device: str | None = None
    dtype: str | None = None
    height: int | None = None
    width: int | None = None
    views: int = 6
    steps: int = 8
    guidance: float = 7.0
    batch: int = 1  # prompts per multiview set batch (latency)
    backends: list[str] = field(default_factory=lambda: ["torch"])
    baseline: str | None = None  # default: the first backend measured
    reference: str = "torch"
    reference_dtype: str = "fp32"
    warmup: int = DEFAULT_WARMUP
    runs: int = DEFAULT_RUNS
    seed: int = 0
    prompts_file: str | None = None  # default: bench/prompts/objects.txt
    latency: bool = True
    fidelity: bool = True
    fidelity_prompts: int = 1
    quality: str = "auto"  # auto | on | off
    quality_prompts: int = 8
    rewards: list[str] = field(default_factory=lambda: list(DEFAULT_REWARDS))
    reward_preset: str | None = "auto"  # auto: "tiny" for the tiny model, else real checkpoints
    latency_reward: str | None = "auto"  # reward whose image tower is timed; auto = first loaded reward
    zmv: bool = True
    lora: str | None = None
    lora_scale: float = 1.0
    engines_dir: str | None = None
    export: bool = True  # export ONNX into OUT/engines when an ONNX backend is asked for without --engines-dir
    compile_mode: str | None = None  # torch-compile mode (default: the backend's choice)
    stage_memory: bool = True  # one extra run per backend for the peak device memory of each stage (CUDA)
    peak_tflops: float | None = None
    threads: int | None = None
    plots: bool = True
    out: str = "bench-report"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _reference_model(model, dtype_name: str):
    """The reference network in ``dtype_name`` (a deep copy when the model runs in another dtype)."""
    import torch

    from mvz.models.loading import resolve_dtype

    dt = resolve_dtype(dtype_name, model.device)
    if model.dtype == dt and next(model.vae.parameters()).dtype == dt:
        return model
    ref = copy.deepcopy(model)
    ref.to(dtype=dt)
    ref.vae.to(dtype=dt)
    if dt == torch.float32 and model.device.type == "cuda":
        pass  # TF32 stays as the process has it: reported in environment.gpu.tf32_matmul
    return ref


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None, argv: list[str] | None = None) -> dict:
    """Run everything ``cfg`` asks for, write the reports into ``cfg.out``; return the report dict."""
    import torch

    from bench import backends as bk
    from bench import env as benv
    from bench.stats import ratio
    from mvz.atomic import ensure_writable_dir
    from mvz.models.cameras import CameraSet
    from mvz.models.loading import load_model
    from mvz.prompts import read_prompt_file

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(cfg.out).expanduser()
    # before anything is measured
    ensure_writable_dir(out, "report folder", fix="Pass --out with a folder you can write to.")
    if cfg.runs < 1 or cfg.warmup < 0:
        raise InputError(f"--runs must be >= 1 and --warmup >= 0 (got {cfg.runs}, {cfg.warmup}).")
    if cfg.quality not in ("auto", "on", "off"):
        raise InputError(f"--quality must be auto, on or off, got {cfg.quality!r}.")
    unknown = [b for b in cfg.backends if b not in bk.KNOWN_BACKENDS]
    if unknown or not cfg.backends:
        raise InputError(f"unknown backend(s) {', '.join(unknown) or '(none)'}.", f"Choose from {', '.join(bk.KNOWN_BACKENDS)}.")
    if cfg.baseline and cfg.baseline not in cfg.backends:
        raise InputError(f"--baseline {cfg.baseline} is not among --backends {','.join(cfg.backends)}.")
    prompts_path = Path(cfg.prompts_file) if cfg.prompts_file else shipped_prompts("objects")
    prompts = read_prompt_file(prompts_path)
    if cfg.lora:
        from mvz.models.lora import read_lora_file

        read_lora_file(cfg.lora)  # a bad LoRA path fails now, not after the latency runs
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    log(f"loading model {cfg.model}{' (random weights)' if cfg.random_weights else ''}")
    model = load_model(cfg.model, random_weights=cfg.random_weights, device=cfg.device, dtype=cfg.dtype)
    height = cfg.height or model.info.default_resolution
    width = cfg.width or model.info.default_resolution
    cameras = CameraSet.default(cfg.views)
    from mvz.pipeline import validate_request

    validate_request(prompts[:1], cfg.steps, cfg.views, height, width, model.resolution_multiple)
    device = model.device
    environment = benv.environment(device)
    reward_preset = ("tiny" if cfg.model == "tiny" else None) if cfg.reward_preset == "auto" else cfg.reward_preset

    # rewards first: an explicit --quality on with a missing checkpoint fails before measuring
    rewards, missing_rewards = {}, {}
    if cfg.quality != "off" or cfg.latency_reward not in (None, "none"):
        from bench.quality import load_rewards

        names = list(cfg.rewards) if cfg.quality != "off" else []
        if cfg.latency_reward not in (None, "none", "auto") and cfg.latency_reward not in names:
            names.append(cfg.latency_reward)
        rewards, missing_rewards = load_rewards(names, reward_preset, device)
        if cfg.quality == "on" and missing_rewards:
            name, why = next(iter(missing_rewards.items()))
            raise MvzError(f"quality was requested but reward {name} cannot be loaded: {why}")

    report: dict = {
        "schema": "mvz.bench.report",
        "schema_version": SCHEMA_VERSION,
        "created": _now(),
        "command": argv,
        "config": {**asdict(cfg), "height": height, "width": width, "dtype": str(model.dtype).replace("torch.", ""),
                   "vae_dtype": str(next(model.vae.parameters()).dtype).replace("torch.", ""),
                   "device": str(device), "prompts_file": str(prompts_path), "reward_preset": reward_preset},
        "environment": environment,
        "model": {"name": model.info.name, "random_weights": model.info.random_weights, "sources": model.info.sources,
                  "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in model.modules().items()}},
        "backends": {},
        "latency": {"backends": {}, "notes": []},
        "compute": {},
        "fidelity": {"status": "skipped", "reason": "not run"},
        "quality": {"status": "skipped", "reason": "not run"},
        "artifacts": {},
    }

    # ---- fidelity reference, on the pristine model (compiled backends may rewrite the UNet in place) --
    ref, ref_error = None, None
    fp = [prompts[i % len(prompts)] for i in range(max(cfg.fidelity_prompts, 1))]
    fs = [cfg.seed + i for i in range(len(fp))]
    fid_kw = dict(steps=cfg.steps, guidance=cfg.guidance, cameras=cameras, height=height, width=width, record=True)
    if cfg.fidelity:
        from bench.backends import torch_backend
        from mvz.pipeline import MultiviewPipeline

        if cfg.reference != "torch":
            raise InputError(f"--reference {cfg.reference} is not supported; the reference is eager torch.")
        log(f"fidelity reference: torch {cfg.reference_dtype}")
        try:
            ref_model = _reference_model(model, cfg.reference_dtype)
            ref_b = torch_backend(ref_model, cfg.views)
            ref = MultiviewPipeline(ref_model, ref_b.denoiser, ref_b.decoder, num_views=cfg.views).sample(fp, fs, **fid_kw)
            del ref_model, ref_b
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except MvzError as exc:
            ref_error = str(exc)

    # ---- backends ----------------------------------------------------------------------------------
    avail = bk.availability()
    made = {}
    engines_dir = cfg.engines_dir
    needs_onnx = [n for n in cfg.backends if n in ("onnxruntime", "tensorrt") and not avail.get(n)]
    # TensorRT is measured, not skipped: its export (and engines, below) are made when it can run here
    if needs_onnx and engines_dir is None and (cfg.export or "tensorrt" in needs_onnx):
        engines_dir = str(out / "engines")
        try:
            from export import export_model

            precision = "fp32" if model.dtype == torch.float32 else "fp16"
            log(f"exporting ONNX ({precision}) for {', '.join(needs_onnx)} into {engines_dir}")
            export_model(model, engines_dir, num_views=cfg.views, height=height, width=width, batch=cfg.batch,
                         precision=precision, parity=False)
            report["engines_export"] = {"folder": engines_dir, "precision": precision}
        except ImportError as exc:
            report["engines_export"] = {"folder": None, "error": f"export package not available: {exc}"}
        except MvzError as exc:
            report["engines_export"] = {"folder": None, "error": str(exc)}
            log(f"export failed: {exc}")
            engines_dir = None
    if "tensorrt" in needs_onnx and engines_dir is not None:
        report["engines_build"] = bk.build_tensorrt_engines(Path(engines_dir), log)
        free_cuda_cache(device)

    # every backend of the run shares the model: TensorRT must not move its torch UNet/VAE off the GPU here
    per_backend = {"torch-compile": {"compile_mode": cfg.compile_mode} if cfg.compile_mode else {},
                   "tensorrt": {"release_torch": False}}

    def create_backend(name: str) -> None:
        try:
            b = bk.create(name, model, engines_dir=engines_dir, num_views=cfg.views, height=height, width=width,
                          batch=cfg.batch, device=device, **per_backend.get(name, {}))
        except MvzError as exc:
            report["backends"][name] = {"status": "skipped", "reason": str(exc)}
            log(f"backend {name}: skipped ({exc})")
            return
        except Exception as exc:  # a broken backend is reported, the others still run
            report["backends"][name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            log(f"backend {name}: failed ({type(exc).__name__}: {exc})")
            return
        made[name] = b
        report["backends"][name] = {"status": "ok", "reason": None, "info": dict(getattr(b, "info", {}) or {})}

    # torch-compile / torch-cudagraph optimise the shared UNet in place (fused QKV, channels-last): they are
    # created last, after the other backends have been timed, so "torch" is measured on the plain UNet
    pending: list[str] = []
    for name in cfg.backends:
        if avail.get(name):
            report["backends"][name] = {"status": "skipped", "reason": avail[name]}
            log(f"backend {name}: skipped ({avail[name]})")
        elif name in IN_PLACE_BACKENDS:
            pending.append(name)
            report["backends"][name] = {"status": "pending", "reason": None}
        else:
            create_backend(name)

    # ---- compute floor -----------------------------------------------------------------------------
    log("counting FLOPs from the model configuration (meta device)")
    try:
        from bench.flops import count_model, floor_seconds

        counts = count_model(model, height, width, cfg.views, cfg.batch)
        flops = counts.as_dict(cfg.steps)
        if cfg.peak_tflops:
            peak, source = cfg.peak_tflops, "--peak-tflops"
        else:
            peak, source = benv.lookup_peak(environment.get("gpu", {}).get("name"), model.dtype)
        report["compute"] = {
            "flops": flops, "peak_tflops": peak, "peak_source": source,
            "floor_s": {"unet": floor_seconds(flops["job"]["unet"], peak),
                        "vae_decode": floor_seconds(flops["job"]["vae_decode"], peak),
                        "total": floor_seconds(flops["job_total"], peak)},
            "achieved": {},
            "method": "TorchFunctionMode count of conv/linear/SDPA/matmul on a meta-device copy built from the configs",
        }
    except Exception as exc:
        counts = None
        report["compute"] = {"status": "skipped", "reason": f"FLOP count failed: {type(exc).__name__}: {exc}"}

    # ---- latency -----------------------------------------------------------------------------------
    lat_prompts = [prompts[i % len(prompts)] for i in range(cfg.batch)]
    lat_seeds = [cfg.seed + i for i in range(cfg.batch)]
    lat_reward = None
    if cfg.latency_reward not in (None, "none"):
        lat_reward = (next(iter(rewards.values()), None) if cfg.latency_reward == "auto" else rewards.get(cfg.latency_reward))
        if lat_reward is None:
            report["latency"]["notes"].append("image encoding not timed: no reward model could be loaded")
        else:
            report["latency"]["image_encode_reward"] = lat_reward.name
    report["latency"]["notes"].append(
        "camera residuals are recomputed every run here (cache emptied); a served model computes them once per camera set")
    if cfg.latency:
        from bench.latency import measure_latency

        for name in [*made, *pending]:
            if name not in made:
                create_backend(name)
                if name not in made:
                    continue
            b = made[name]
            log(f"latency: {name} ({cfg.warmup} warm-up + {cfg.runs} timed runs)")
            try:
                res = measure_latency(model, b, prompts=lat_prompts, seeds=lat_seeds, cameras=cameras, height=height,
                                      width=width, steps=cfg.steps, guidance=cfg.guidance, warmup=cfg.warmup,
                                      runs=cfg.runs, reward=lat_reward)
            except Exception as exc:
                report["backends"][name] = {"status": "failed", "reason": f"latency run: {type(exc).__name__}: {exc}"}
                log(f"backend {name}: failed during latency ({exc})")
                continue
            if cfg.stage_memory:
                res["stage_memory"] = measure_stage_memory(model, b, prompts=lat_prompts, seeds=lat_seeds,
                                                           cameras=cameras, height=height, width=width,
                                                           steps=cfg.steps, guidance=cfg.guidance)
            report["latency"]["backends"][name] = res
        names = list(report["latency"]["backends"])
        base = cfg.baseline if cfg.baseline in names else (names[0] if names else None)
        if cfg.baseline and base != cfg.baseline:
            report["latency"]["notes"].append(f"baseline {cfg.baseline} was not measured; ratios are against {base}")
        report["latency"]["baseline"] = base
        for name in names:
            st, bst = report["latency"]["backends"][name]["stages"], report["latency"]["backends"][base]["stages"]
            report["latency"]["backends"][name]["ratios_vs_baseline"] = {
                k: ratio(st[k]["median_ms"], bst.get(k, {}).get("median_ms")) for k in st}
        if counts is not None:
            from bench.flops import achieved_fraction

            peak = report["compute"]["peak_tflops"]
            for name in names:
                stg = report["latency"]["backends"][name]["stages"]
                unet_s = stg["unet_step"]["median_ms"] / 1000.0
                vae_s = stg["vae_decode"]["median_ms"] / 1000.0 if "vae_decode" in stg else None
                vae_flops = counts.rows * counts.vae_decode_per_image
                e2e = stg["end_to_end"]["median_ms"] / 1000.0
                report["compute"]["achieved"][name] = {
                    "unet_tflops": counts.unet_per_call / unet_s / 1e12,
                    "unet_fraction": achieved_fraction(counts.unet_per_call, unet_s, peak),
                    "vae_tflops": vae_flops / vae_s / 1e12 if vae_s else None,
                    "vae_fraction": achieved_fraction(vae_flops, vae_s, peak),
                    "end_to_end_over_floor": (e2e / report["compute"]["floor_s"]["total"]) if report["compute"]["floor_s"]["total"] else None,
                }

    for name in pending:  # not created yet when latency was off
        if name not in made and report["backends"][name]["status"] == "pending":
            if cfg.fidelity:
                create_backend(name)
            else:
                report["backends"][name] = {"status": "skipped", "reason": "neither latency nor fidelity was asked for"}

    # ---- fidelity ----------------------------------------------------------------------------------
    sheet_rows: list[tuple[str, object]] = []
    if cfg.fidelity and made and ref is not None:
        from bench.fidelity import compare_samples
        from mvz.pipeline import MultiviewPipeline

        log(f"fidelity against {cfg.reference} {cfg.reference_dtype}")
        sheet_rows.append((f"reference: torch {cfg.reference_dtype} | {fp[0]}", ref.images[0]))
        fid = {"status": "ok", "reference": f"torch {cfg.reference_dtype}", "prompts": fp, "seeds": fs, "backends": {}}
        for name, b in made.items():
            res = MultiviewPipeline(model, b.denoiser, b.decoder, num_views=cfg.views).sample(fp, fs, **fid_kw)
            fid["backends"][name] = compare_samples(res, ref)
            sheet_rows.append((f"{name} ({report['config']['dtype']}) | {fp[0]}", res.images[0]))
        report["fidelity"] = fid
    elif cfg.fidelity and ref_error:
        report["fidelity"] = {"status": "skipped", "reason": ref_error}
    elif not made:
        report["fidelity"] = {"status": "skipped", "reason": "no backend available"}
    else:
        report["fidelity"] = {"status": "skipped", "reason": "--no-fidelity"}

    # ---- quality -----------------------------------------------------------------------------------
    qrewards = {k: v for k, v in rewards.items() if k in cfg.rewards}
    if cfg.quality == "off":
        report["quality"] = {"status": "skipped", "reason": "--quality off"}
    elif not qrewards:
        why = "; ".join(f"{k}: {v}" for k, v in missing_rewards.items()) or "no rewards asked for"
        report["quality"] = {"status": "skipped", "reason": f"no reward checkpoint available ({why})"}
        log("quality: skipped (no reward checkpoint available; pass --reward-preset tiny or install the checkpoints)")
    else:
        from bench.quality import run_quality, variants

        try:  # torch-compile / torch-cudagraph fuse QKV in place; LoRA layers need the plain projections
            from engines.torch_backend import restore_unet

            restore_unet(model.unet)
        except ImportError:
            pass
        if cfg.lora:
            from mvz.models.lora import load_lora

            load_lora(model.unet, cfg.lora, scale=cfg.lora_scale)
        vl = variants(bool(cfg.lora), cfg.lora_scale, cfg.zmv)
        qp = prompts[: max(cfg.quality_prompts, 1)]
        qs = [cfg.seed + i for i in range(len(qp))]
        log(f"quality: {len(vl)} variants × {len(qp)} prompts, rewards {', '.join(qrewards)}")
        section, kept = run_quality(model, qp, qs, qrewards, vl, cameras=cameras, height=height, width=width,
                                    steps=cfg.steps, guidance=cfg.guidance, keep_images=1)
        report["quality"] = {"status": "ok", "prompts_file": str(prompts_path), "num_prompts": len(qp),
                             "rewards": list(qrewards), "reward_preset": reward_preset, "lora": cfg.lora,
                             "missing_rewards": missing_rewards, **section}
        for var, imgs in kept.items():
            sheet_rows.append((f"quality {var} | {qp[0]}", imgs[0]))

    write_outputs(report, out, sheet_rows, plots=cfg.plots)
    return report


def free_cuda_cache(device) -> None:
    """Return torch's cached blocks to the device (before engines allocate their own memory)."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.empty_cache()


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


def measure_stage_memory(model, backend, *, prompts, seeds, cameras, height, width, steps, guidance) -> dict:
    """One generation with the peak device memory of each stage (conditioning, unet, vae_decode): CUDA only."""
    from mvz.pipeline import MultiviewPipeline

    device = model.device
    if device.type != "cuda":
        return {"status": "skipped", "reason": "peak device memory per stage is measured on CUDA only"}
    import torch

    peaks = _StagePeaks(device)
    # plain wrappers: the backend's denoiser was made for these cameras' view count (the pipeline sets it only
    # on denoisers that have the attribute)
    pipe = MultiviewPipeline(model, peaks.wrap("unet", backend.denoiser), peaks.wrap("vae_decode", backend.decoder),
                             num_views=cameras.num_views)
    model.clear_residual_cache()
    with torch.no_grad():
        cond = peaks.wrap("conditioning", lambda: pipe.prepare(list(prompts), cameras, height, width, guidance))()
    pipe.sample(list(prompts), list(seeds), steps=steps, guidance=guidance, cameras=cameras, height=height,
                width=width, conditioning=cond)
    return {"status": "ok", "stages": peaks.peaks}


def write_outputs(report: dict, out: Path, sheet_rows=(), plots: bool = True) -> dict:
    """report.json, report.md, plots and the contact sheet into ``out`` (atomic writes)."""
    from bench.report import render_markdown, write_report_json
    from mvz.atomic import write_text

    art: dict = {"report_json": "report.json", "report_md": "report.md", "plots": [], "contact_sheet": None}
    report["artifacts"] = art
    if plots:
        from bench import plots as pl

        for fn, fname in ((pl.latency_plot, "latency.png"), (pl.fidelity_plot, "fidelity.png"), (pl.quality_plot, "quality.png")):
            try:
                if fn(report, out / fname):
                    art["plots"].append(fname)
            except Exception as exc:  # a figure must never lose the measurements
                art.setdefault("plot_errors", []).append(f"{fname}: {type(exc).__name__}: {exc}")
        if sheet_rows and pl.contact_sheet(list(sheet_rows), out / "contact_sheet.png"):
            art["contact_sheet"] = "contact_sheet.png"
    write_text(out / "report.md", render_markdown(report) + "\n")
    write_report_json(out / "report.json", report)
    return art
