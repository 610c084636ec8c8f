"""The benchmark run behind ``mvz bench``: a short list of stages over deployment sessions, then the reports.

:func:`run_bench` prepares a :class:`BenchRun` (checks, model, rewards, the report's head) and runs
:data:`STAGES` in order: reference, backends, floor, latency, fidelity, quality. Each stage is one small
function that returns its report section(s); backends are ``engines.session`` sessions, so a backend
registered in ``engines.registry`` is benchmarked as it is generated and served, rebuild policy included.
``mvz bench --precisions`` is the precision stage, with its own report (``bench/precision.py``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bench import SCHEMA_VERSION
from bench.report import write_outputs
from mvz import spec as sp
from mvz.errors import InputError, MvzError

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
DEFAULT_REWARDS = ("pickscore", "hpsv2", "imagereward", "hyperscore")


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
    views: int = len(sp.DEFAULT_AZIMUTHS)
    steps: int = sp.DEFAULT_STEPS
    guidance: float = sp.DEFAULT_GUIDANCE
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

    def sample_spec(self) -> sp.SampleSpec:
        """What every timed and compared generation samples (size None: the model's)."""
        return sp.SampleSpec.build(views=self.views, steps=self.steps, guidance=self.guidance, height=self.height,
                                   width=self.width)


@dataclass
class BenchRun:
    """What the stages share: the config, the loaded model, the sized spec, the sessions, the report."""

    cfg: BenchConfig
    log: Callable[[str], None]
    out: Path
    model: Any
    spec: sp.SampleSpec
    prompts: list[str]
    prompts_path: Path
    rewards: dict
    missing_rewards: dict
    reward_preset: str | None
    report: dict
    sessions: dict[str, Any] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # backends that rewrite the model: opened last
    engines_dir: str | None = None
    reference: Any = None
    reference_error: str | None = None
    counts: Any = None
    sheet_rows: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def fidelity_inputs(self) -> tuple[list[str], list[int]]:
        n = max(self.cfg.fidelity_prompts, 1)
        return [self.prompts[i % len(self.prompts)] for i in range(n)], [self.cfg.seed + i for i in range(n)]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None, argv: list[str] | None = None) -> dict:
    """Run everything ``cfg`` asks for, write the reports into ``cfg.out``; return the report dict."""
    run = prepare(cfg, log or (lambda msg: print(msg, file=sys.stderr)), argv)
    for stage in STAGES:
        run.report.update(stage(run))
    write_outputs(run.report, run.out, run.sheet_rows, plots=cfg.plots)
    return run.report


def check_config(cfg: BenchConfig) -> None:
    """What can be refused before anything is loaded or measured."""
    from engines import registry

    if cfg.runs < 1 or cfg.warmup < 0:
        raise InputError(f"--runs must be >= 1 and --warmup >= 0 (got {cfg.runs}, {cfg.warmup}).")
    if cfg.quality not in ("auto", "on", "off"):
        raise InputError(f"--quality must be auto, on or off, got {cfg.quality!r}.")
    known = registry.backend_names()
    unknown = [b for b in cfg.backends if b not in known]
    if unknown or not cfg.backends:
        raise InputError(f"unknown backend(s) {', '.join(unknown) or '(none)'}.", f"Choose from {', '.join(known)}.")
    if cfg.baseline and cfg.baseline not in cfg.backends:
        raise InputError(f"--baseline {cfg.baseline} is not among --backends {','.join(cfg.backends)}.")
    if cfg.fidelity and cfg.reference != "torch":
        raise InputError(f"--reference {cfg.reference} is not supported; the reference is eager torch.")
    cfg.sample_spec().check()


def prepare(cfg: BenchConfig, log: Callable[[str], None], argv: list[str] | None) -> BenchRun:
    """Checks, the model, the rewards and the report's head: everything before the first stage."""
    import torch

    from bench import env as benv
    from mvz.atomic import ensure_writable_dir
    from mvz.models.loading import load_model
    from mvz.pipeline import validate_prompts
    from mvz.prompts import read_prompt_file

    out = Path(cfg.out).expanduser()
    ensure_writable_dir(out, "report folder", fix="Pass --out with a folder you can write to.")  # before measuring
    check_config(cfg)
    prompts_path = Path(cfg.prompts_file) if cfg.prompts_file else shipped_prompts("objects")
    prompts = read_prompt_file(prompts_path)
    if cfg.lora:
        from mvz.models.lora import read_lora_file

        read_lora_file(cfg.lora)  # a bad LoRA path fails now, not after the latency runs
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    log(f"loading model {cfg.model}{' (random weights)' if cfg.random_weights else ''}")
    model = load_model(cfg.model, random_weights=cfg.random_weights, device=cfg.device, dtype=cfg.dtype)
    validate_prompts(prompts[:1])
    spec = cfg.sample_spec().sized(model.info.default_resolution)
    spec.check(sp.HOUSE_LIMITS.narrowed(resolution_multiple=model.resolution_multiple))
    reward_preset = ("tiny" if cfg.model == "tiny" else None) if cfg.reward_preset == "auto" else cfg.reward_preset
    rewards, missing = _load_rewards(cfg, reward_preset, model.device)
    report = _report_head(cfg, argv, model, spec, benv.environment(model.device), prompts_path, reward_preset)
    return BenchRun(cfg, log, out, model, spec, prompts, prompts_path, rewards, missing, reward_preset, report)


def _load_rewards(cfg: BenchConfig, reward_preset: str | None, device) -> tuple[dict, dict]:
    """Rewards first: an explicit --quality on with a missing checkpoint fails before measuring."""
    if cfg.quality == "off" and cfg.latency_reward in (None, "none"):
        return {}, {}
    from bench.quality import load_rewards

    names = list(cfg.rewards) if cfg.quality != "off" else []
    if cfg.latency_reward not in (None, "none", "auto") and cfg.latency_reward not in names:
        names.append(cfg.latency_reward)
    rewards, missing = load_rewards(names, reward_preset, device)
    if cfg.quality == "on" and missing:
        name, why = next(iter(missing.items()))
        raise MvzError(f"quality was requested but reward {name} cannot be loaded: {why}")
    return rewards, missing


def _report_head(cfg: BenchConfig, argv, model, spec: sp.SampleSpec, environment: dict, prompts_path: Path,
                 reward_preset: str | None) -> dict:
    def dtype(t) -> str:
        return str(t).replace("torch.", "")

    return {
        "schema": "mvz.bench.report", "schema_version": SCHEMA_VERSION, "created": _now(), "command": argv,
        "config": {**asdict(cfg), "height": spec.height, "width": spec.width, "dtype": dtype(model.dtype),
                   "vae_dtype": dtype(next(model.vae.parameters()).dtype), "device": str(model.device),
                   "prompts_file": str(prompts_path), "reward_preset": reward_preset},
        "environment": environment,
        "model": {"name": model.info.name, "random_weights": model.info.random_weights, "sources": model.info.sources,
                  "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in model.modules().items()}},
        "backends": {}, "latency": {"backends": {}, "notes": []}, "compute": {},
        "fidelity": {"status": "skipped", "reason": "not run"}, "quality": {"status": "skipped", "reason": "not run"},
        "artifacts": {},
    }


# ---- stages: each returns its report section(s) -------------------------------------------------------------
def _reference_model(model, dtype_name: str):
    """The reference network in ``dtype_name`` (a deep copy when the model runs in another dtype)."""
    from mvz.models.loading import resolve_dtype

    dt = resolve_dtype(dtype_name, model.device)
    if model.dtype == dt and next(model.vae.parameters()).dtype == dt:
        return model
    ref = copy.deepcopy(model)
    ref.to(dtype=dt)
    ref.vae.to(dtype=dt)
    # TF32 stays as the process has it: reported in environment.gpu.tf32_matmul
    return ref


def stage_reference(run: BenchRun) -> dict:
    """The fidelity reference, on the pristine model (compiled backends may rewrite the UNet in place)."""
    from engines.session import BackendSpec, open_session

    cfg = run.cfg
    if not cfg.fidelity:
        return {}
    run.log(f"fidelity reference: torch {cfg.reference_dtype}")
    try:
        ref_model = _reference_model(run.model, cfg.reference_dtype)
        session = open_session(ref_model, BackendSpec("torch", num_views=run.spec.views, device=ref_model.device))
        run.reference = session.sample(*run.fidelity_inputs, run.spec, record=True)
        del ref_model, session
        free_cuda_cache(run.model.device)
    except MvzError as exc:
        run.reference_error = str(exc)
    return {}


def stage_backends(run: BenchRun) -> dict:
    """Export and build what the asked backends need, then open a session per backend (those that rewrite
    the shared UNet in place wait until the others are timed, so "torch" is measured on the plain UNet)."""
    from bench import backends as bk
    from engines import registry

    avail = bk.availability()
    sections = _prepare_engines(run, avail)
    for name in run.cfg.backends:
        if avail.get(name):
            run.report["backends"][name] = {"status": "skipped", "reason": avail[name]}
            run.log(f"backend {name}: skipped ({avail[name]})")
        elif registry.get(name).rewrites_model:
            run.pending.append(name)
            run.report["backends"][name] = {"status": "pending", "reason": None}
        else:
            _open(run, name)
    return {"backends": run.report["backends"], **sections}


def _prepare_engines(run: BenchRun, avail: dict) -> dict:
    """Export ONNX into OUT/engines when an exported backend runs here and no --engines was given; build the
    engines of backends that need a build (TensorRT is measured, not skipped, when it can run here)."""
    from bench import backends as bk
    from engines import registry

    cfg = run.cfg
    needs = [n for n in cfg.backends if registry.get(n).needs_export and not avail.get(n)]
    builders = [n for n in needs if registry.get(n).build is not None]
    run.engines_dir = cfg.engines_dir
    sections: dict = {}
    if needs and run.engines_dir is None and (cfg.export or builders):
        run.engines_dir, sections["engines_export"] = _export(run, needs)
    if builders and run.engines_dir is not None:
        sections["engines_build"] = bk.build_engines(builders[0], Path(run.engines_dir), run.log)
        free_cuda_cache(run.model.device)
    return sections


def _export(run: BenchRun, needs: list[str]) -> tuple[str | None, dict]:
    import torch

    from export import export_model

    folder = str(run.out / "engines")
    precision = "fp32" if run.model.dtype == torch.float32 else "fp16"
    run.log(f"exporting ONNX ({precision}) for {', '.join(needs)} into {folder}")
    s = run.spec
    try:
        export_model(run.model, folder, num_views=s.views, height=s.height, width=s.width, batch=run.cfg.batch,
                     precision=precision, parity=False)
    except MvzError as exc:
        run.log(f"export failed: {exc}")
        return None, {"folder": None, "error": str(exc)}
    return folder, {"folder": folder, "precision": precision}


def _open(run: BenchRun, name: str) -> None:
    """A session of backend ``name`` (every backend shares the model: TensorRT must not move its torch
    UNet/VAE off the GPU here); a backend that cannot run is reported, the others still run."""
    from bench import backends as bk

    options = {"release_torch": False, **({"compile_mode": run.cfg.compile_mode} if run.cfg.compile_mode else {})}
    s = run.spec
    try:
        session = bk.open_backend(name, run.model, engines_dir=run.engines_dir, num_views=s.views, height=s.height,
                                  width=s.width, batch=run.cfg.batch, device=run.model.device, log=run.log, **options)
    except MvzError as exc:
        run.report["backends"][name] = {"status": "skipped", "reason": str(exc)}
        run.log(f"backend {name}: skipped ({exc})")
        return
    except Exception as exc:  # a broken backend is reported, the others still run
        run.report["backends"][name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        run.log(f"backend {name}: failed ({type(exc).__name__}: {exc})")
        return
    run.sessions[name] = session
    run.report["backends"][name] = {"status": "ok", "reason": None, "info": dict(session.backend.info or {})}


def stage_floor(run: BenchRun) -> dict:
    """The compute floor: FLOPs counted from the model configuration on the meta device, over the peak."""
    from bench import env as benv

    cfg, s = run.cfg, run.spec
    run.log("counting FLOPs from the model configuration (meta device)")
    try:
        from bench.flops import count_model, floor_seconds

        run.counts = count_model(run.model, s.height, s.width, s.views, cfg.batch)
        flops = run.counts.as_dict(s.steps)
        if cfg.peak_tflops:
            peak, source = cfg.peak_tflops, "--peak-tflops"
        else:
            peak, source = benv.lookup_peak(run.report["environment"].get("gpu", {}).get("name"), run.model.dtype)
    except Exception as exc:
        run.counts = None
        return {"compute": {"status": "skipped", "reason": f"FLOP count failed: {type(exc).__name__}: {exc}"}}
    return {"compute": {
        "flops": flops, "peak_tflops": peak, "peak_source": source,
        "floor_s": {"unet": floor_seconds(flops["job"]["unet"], peak),
                    "vae_decode": floor_seconds(flops["job"]["vae_decode"], peak),
                    "total": floor_seconds(flops["job_total"], peak)},
        "achieved": {},
        "method": "TorchFunctionMode count of conv/linear/SDPA/matmul on a meta-device copy built from the configs",
    }}


def stage_latency(run: BenchRun) -> dict:
    """Whole generations per backend, per-stage timers, ratios to the baseline, fractions of the floor."""
    cfg = run.cfg
    latency = run.report["latency"]
    reward = _latency_reward(run, latency)
    latency["notes"].append("camera residuals are recomputed every run here (cache emptied); "
                            "a served model computes them once per camera set")
    if cfg.latency:
        for name in [*run.sessions, *run.pending]:
            if name not in run.sessions:
                _open(run, name)
            if name in run.sessions:
                _time_backend(run, name, reward)
        _ratios(run, latency)
        _achieved(run, list(latency["backends"]))
    _settle_pending(run)
    return {"latency": latency, "compute": run.report["compute"]}


def _latency_reward(run: BenchRun, latency: dict):
    """The reward whose image tower is timed with each generation (None: not timed)."""
    if run.cfg.latency_reward in (None, "none"):
        return None
    auto = run.cfg.latency_reward == "auto"
    reward = next(iter(run.rewards.values()), None) if auto else run.rewards.get(run.cfg.latency_reward)
    if reward is None:
        latency["notes"].append("image encoding not timed: no reward model could be loaded")
    else:
        latency["image_encode_reward"] = reward.name
    return reward


def _time_backend(run: BenchRun, name: str, reward) -> None:
    from bench.latency import measure_latency, measure_stage_memory

    cfg = run.cfg
    prompts = [run.prompts[i % len(run.prompts)] for i in range(cfg.batch)]
    seeds = [cfg.seed + i for i in range(cfg.batch)]
    backend = run.sessions[name].backend
    run.log(f"latency: {name} ({cfg.warmup} warm-up + {cfg.runs} timed runs)")
    try:
        res = measure_latency(run.model, backend, prompts=prompts, seeds=seeds, spec=run.spec, warmup=cfg.warmup,
                              runs=cfg.runs, reward=reward)
    except Exception as exc:
        run.report["backends"][name] = {"status": "failed", "reason": f"latency run: {type(exc).__name__}: {exc}"}
        run.log(f"backend {name}: failed during latency ({exc})")
        return
    if cfg.stage_memory:
        res["stage_memory"] = measure_stage_memory(run.model, backend, prompts=prompts, seeds=seeds, spec=run.spec)
    run.report["latency"]["backends"][name] = res


def _ratios(run: BenchRun, latency: dict) -> None:
    from bench.stats import ratio

    names = list(latency["backends"])
    baseline = run.cfg.baseline
    base = baseline if baseline in names else (names[0] if names else None)
    if baseline and base != baseline:
        latency["notes"].append(f"baseline {baseline} was not measured; ratios are against {base}")
    latency["baseline"] = base
    for name in names:
        st, bst = latency["backends"][name]["stages"], latency["backends"][base]["stages"]
        latency["backends"][name]["ratios_vs_baseline"] = {
            k: ratio(st[k]["median_ms"], bst.get(k, {}).get("median_ms")) for k in st}


def _achieved(run: BenchRun, names: list[str]) -> None:
    """TFLOP/s achieved per backend and the fraction of the device's peak."""
    if run.counts is None:
        return
    from bench.flops import achieved_fraction

    compute, counts = run.report["compute"], run.counts
    peak = compute["peak_tflops"]
    for name in names:
        stg = run.report["latency"]["backends"][name]["stages"]
        unet_s = stg["unet_step"]["median_ms"] / 1000.0
        vae_s = stg["vae_decode"]["median_ms"] / 1000.0 if "vae_decode" in stg else None
        vae_flops = counts.rows * counts.vae_decode_per_image
        e2e = stg["end_to_end"]["median_ms"] / 1000.0
        floor = compute["floor_s"]["total"]
        compute["achieved"][name] = {
            "unet_tflops": counts.unet_per_call / unet_s / 1e12,
            "unet_fraction": achieved_fraction(counts.unet_per_call, unet_s, peak),
            "vae_tflops": vae_flops / vae_s / 1e12 if vae_s else None,
            "vae_fraction": achieved_fraction(vae_flops, vae_s, peak),
            "end_to_end_over_floor": (e2e / floor) if floor else None,
        }


def _settle_pending(run: BenchRun) -> None:
    """Backends still pending (latency was off): opened for fidelity, else skipped."""
    for name in run.pending:
        if name not in run.sessions and run.report["backends"][name]["status"] == "pending":
            if run.cfg.fidelity:
                _open(run, name)
            else:
                run.report["backends"][name] = {"status": "skipped",
                                                "reason": "neither latency nor fidelity was asked for"}


def stage_fidelity(run: BenchRun) -> dict:
    """Each backend against the reference on the same prompts and seeds: per-step latents, PSNR, SSIM."""
    from bench.fidelity import compare_samples

    cfg = run.cfg
    if cfg.fidelity and run.reference_error:
        return {"fidelity": {"status": "skipped", "reason": run.reference_error}}
    if not run.sessions:
        return {"fidelity": {"status": "skipped", "reason": "no backend available"}}
    if not cfg.fidelity:
        return {"fidelity": {"status": "skipped", "reason": "--no-fidelity"}}
    fp, fs = run.fidelity_inputs
    run.log(f"fidelity against {cfg.reference} {cfg.reference_dtype}")
    run.sheet_rows.append((f"reference: torch {cfg.reference_dtype} | {fp[0]}", run.reference.images[0]))
    fid = {"status": "ok", "reference": f"torch {cfg.reference_dtype}", "prompts": fp, "seeds": fs, "backends": {}}
    for name, session in run.sessions.items():
        res = session.sample(fp, fs, run.spec, record=True)
        fid["backends"][name] = compare_samples(res, run.reference)
        run.sheet_rows.append((f"{name} ({run.report['config']['dtype']}) | {fp[0]}", res.images[0]))
    return {"fidelity": fid}


def stage_quality(run: BenchRun) -> dict:
    """Reward scores of the variants (base, base+ZMV, LoRA) with intervals, on the torch model."""
    from bench.quality import run_quality, variants
    from engines.torch_backend import restore_unet

    cfg = run.cfg
    qrewards = {k: v for k, v in run.rewards.items() if k in cfg.rewards}
    if cfg.quality == "off":
        return {"quality": {"status": "skipped", "reason": "--quality off"}}
    if not qrewards:
        why = "; ".join(f"{k}: {v}" for k, v in run.missing_rewards.items()) or "no rewards asked for"
        run.log("quality: skipped (no reward checkpoint available; pass --reward-preset tiny or install the checkpoints)")
        return {"quality": {"status": "skipped", "reason": f"no reward checkpoint available ({why})"}}
    restore_unet(run.model.unet)  # torch-compile / torch-cudagraph fuse QKV in place; LoRA layers need the plain ones
    if cfg.lora:
        from mvz.models.lora_formats import load_lora_any

        load_lora_any(run.model.unet, cfg.lora, scale=cfg.lora_scale)
    vl = variants(bool(cfg.lora), cfg.lora_scale, cfg.zmv)
    qp = run.prompts[: max(cfg.quality_prompts, 1)]
    qs = [cfg.seed + i for i in range(len(qp))]
    run.log(f"quality: {len(vl)} variants × {len(qp)} prompts, rewards {', '.join(qrewards)}")
    s = run.spec
    cameras = _cameras(s)
    section, kept = run_quality(run.model, qp, qs, qrewards, vl, cameras=cameras, height=s.height, width=s.width,
                                steps=s.steps, guidance=s.guidance, keep_images=1)
    for var, imgs in kept.items():
        run.sheet_rows.append((f"quality {var} | {qp[0]}", imgs[0]))
    return {"quality": {"status": "ok", "prompts_file": str(run.prompts_path), "num_prompts": len(qp),
                        "rewards": list(qrewards), "reward_preset": run.reward_preset, "lora": cfg.lora,
                        "missing_rewards": run.missing_rewards, **section}}


def _cameras(spec: sp.SampleSpec):
    from mvz.models.cameras import CameraSet

    return CameraSet(azimuths=spec.azimuths, elevation=spec.elevation)


STAGES: tuple[Callable[[BenchRun], dict], ...] = (
    stage_reference, stage_backends, stage_floor, stage_latency, stage_fidelity, stage_quality)


def free_cuda_cache(device=None) -> None:
    """Return torch's cached blocks to the device (before engines allocate their own memory)."""
    from mvz.devices import release_device_memory

    release_device_memory()
