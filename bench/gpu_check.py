"""The prepared one-GPU check: every GPU measurement of this project in a few minutes.

    python -m bench.gpu_check --out gpu-check            # on a machine with one NVIDIA GPU

1. ``mvz bench`` on the full-size architecture with random weights (``sdxl-lcm --random-weights``, fp16,
   768 px, 6 views, 8 steps) for torch eager fp16, torch-compile and torch-cudagraph, plus onnxruntime and
   tensorrt where they can run (ONNX exported into ``OUT/engines`` unless ``--engines-dir`` names an export,
   and only when something here can use it: TensorRT or ONNX Runtime's CUDA provider; TensorRT engines built
   there and cached). Each stage's failure is recorded and the rest goes on; the JSON and Markdown are
   always written. Per stage p50/p90 (CUDA events on the backend stream),
   peak device memory per stage, the compute floor and the fraction reached, fidelity against an fp32 torch
   reference on one seed (per-step latent error, PSNR). Quality is off (random weights). A backend that cannot
   run is listed with the reason.
2. A training micro-step (MVC-ZigAL style): LoRA r=16 on the MV UNet with gradient checkpointing (as the
   training presets), the log-prob of one recorded denoising step for all 6 views recomputed with gradients, a policy-gradient loss, backward and an AdamW
   step; median time and peak memory over a few steps.

Writes ``OUT/report.json`` / ``report.md`` / PNGs (the bench report) and ``OUT/gpu_check.json`` +
``OUT/gpu_check.md`` (the summary tables). Target: under 8 minutes on an H100 class GPU once the ONNX export
and the TensorRT engines are cached in ``OUT/engines`` (the first export + build alone takes several minutes
at full size; pass ``--engines-dir`` to reuse one). Never run on a GPU in this repository yet. Everything but
the GPU itself is exercised on the CPU by ``--model tiny --device cpu`` (tests/test_bench_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def train_microstep(model, *, num_views: int, height: int, width: int, steps_timed: int = 3, rank: int = 16,
                    grad_checkpointing: bool = False, lr: float = 3e-4) -> dict:
    """Time LoRA training micro-steps on one recorded denoising step of one multiview set.

    The model gets a LoRA (left in place). Returns {median_s, times_s, peak_allocated_mb, ...}.
    """
    import torch

    from mvz.models.cameras import CameraSet
    from mvz.models.lora import add_lora
    from mvz.pipeline import MultiviewPipeline, TorchDenoiser, recompute_log_probs
    from mvz.scheduler import LCMSchedule

    dev = model.device
    cams = CameraSet.default(num_views)
    pipe = MultiviewPipeline(model, num_views=num_views)
    with torch.no_grad():
        cond = pipe.prepare(["a red wooden chair"], cams, height, width)
    add_lora(model.unet, rank=rank)
    params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights in fp32, base frozen in the model dtype
        p.requires_grad_(True)
    if grad_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.unet.train()
    opt = torch.optim.AdamW(params, lr=lr)
    schedule = LCMSchedule.create(8)
    ac = schedule.alphas_cumprod.to(dev)
    t, t_prev = schedule.timesteps[0], schedule.prev_timestep(0)
    f = model.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    shape = (num_views, model.latent_channels, height // f, width // f)
    states = torch.randn(shape, generator=g).to(dev)
    next_states = (0.9 * states + 0.1 * torch.randn(shape, generator=g).to(dev))
    adv = torch.randn(num_views, generator=g).to(dev)
    denoiser = TorchDenoiser(model, num_views)
    autocast = torch.autocast(dev.type, dtype=model.dtype) if dev.type == "cuda" and model.dtype != torch.float32 else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(steps_timed + 1):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            if autocast is not None:
                with autocast:
                    logp = recompute_log_probs(denoiser, model.dtype, states, next_states, t, t_prev, cond, ac)
            else:
                logp = recompute_log_probs(denoiser, model.dtype, states, next_states, t, t_prev, cond, ac)
            loss = -(adv * logp).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync()
        if i > 0:
            times.append(time.perf_counter() - t0)
    model.unet.eval()
    out = {
        "what": f"LoRA r={rank}: recompute log-prob of 1 step × {num_views} views with grad, backward, AdamW",
        "height": height, "width": width, "views": num_views, "dtype": str(model.dtype).replace("torch.", ""),
        "grad_checkpointing": grad_checkpointing, "trainable_params": sum(p.numel() for p in params),
        "times_s": times, "median_s": statistics.median(times), "loss_finite": bool(torch.isfinite(loss).item()),
    }
    if dev.type == "cuda":
        out["peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["peak_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
    else:
        import resource

        out["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


BUDGET_S = 480.0  # the whole check on an H100 class GPU, engine builds cached
TORCH_BACKENDS = ("torch", "torch-compile", "torch-cudagraph")


def default_backends(avail: dict[str, str | None]) -> tuple[list[str], dict[str, str]]:
    """The backends to measure here and, for the ONNX ones left out, why: the torch ones always; onnxruntime
    and TensorRT only where they can run, so nothing is exported that nothing here would use."""
    chosen, left_out = list(TORCH_BACKENDS), {}
    for name in ("onnxruntime", "tensorrt"):
        if avail.get(name):
            left_out[name] = avail[name]
        else:
            chosen.append(name)
    return chosen, left_out


def onnx_consumers(device: str, avail: dict[str, str | None]) -> tuple[bool, str]:
    """Whether anything here can use an ONNX export (TensorRT; ONNX Runtime with the CUDA provider on a GPU,
    any provider on the CPU), and the reason when nothing can."""
    if not avail.get("tensorrt"):
        return True, ""
    if avail.get("onnxruntime"):
        return False, f"nothing here can use an ONNX export: onnxruntime: {avail['onnxruntime']}; tensorrt: {avail['tensorrt']}"
    if device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False, ("nothing here can use an ONNX export: ONNX Runtime has no CUDA provider (onnxruntime-gpu "
                           f"is not installed) and tensorrt: {avail['tensorrt']}")
    return True, ""


def run_stage(name: str, fn, failures: dict[str, str]):
    """Run one stage; a failure is recorded (one line) and the check goes on."""
    try:
        return fn()
    except Exception as exc:  # every stage's failure is a result of the check, not its end
        failures[name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        print(f"gpu_check: {name} failed: {failures[name]}", file=sys.stderr)
        return None
SUMMARY_STAGES = ("end_to_end", "text_encode", "camera_residuals", "unet_step", "unet_total", "vae_decode",
                  "scheduler_and_other")


def _percentiles(stage: dict | None) -> dict | None:
    return None if not stage else {"p50_ms": stage["median_ms"], "p90_ms": stage["p90_ms"]}


def _fidelity_row(fid: dict | None) -> dict | None:
    if not fid:
        return None
    return {k: fid.get(k) for k in ("per_step_latent_rel_error", "final_latent_rel_error", "psnr_db_mean",
                                     "psnr_db_min", "ok_finite")}


def summarize(report: dict | None, train: dict | None) -> dict:
    """The lines that matter, per backend: per-stage p50/p90, peak device memory per stage, fidelity against
    torch fp32 (per-step latent error, PSNR), the fraction of the compute floor reached; plus what was skipped."""
    if not report:  # the bench stage failed
        return {"device": None, "config": {}, "peak_tflops": None, "backends": {}, "fidelity_reference": None,
                "skipped": {}, "engines_build": None, "train_microstep": train}
    comp = report.get("compute", {})
    floor = comp.get("floor_s", {})
    fid = report.get("fidelity", {}).get("backends", {})
    rows = {}
    for name, lat in report["latency"].get("backends", {}).items():
        st = lat["stages"]
        achieved = comp.get("achieved", {}).get(name, {})
        rows[name] = {
            "stages": {k: _percentiles(st.get(k)) for k in SUMMARY_STAGES if st.get(k)},
            "end_to_end_ms": st["end_to_end"]["median_ms"],
            "unet_step_ms": st["unet_step"]["median_ms"],
            "vae_decode_ms": st.get("vae_decode", {}).get("median_ms"),
            "unet_floor_ms": floor["unet"] * 1000.0 if floor.get("unet") else None,
            "unet_fraction_of_peak": achieved.get("unet_fraction"),
            "vae_fraction_of_peak": achieved.get("vae_fraction"),
            "end_to_end_over_floor": achieved.get("end_to_end_over_floor"),
            "peak_memory_mb": lat["peak_memory"].get("torch_peak_allocated_mb"),
            "device_used_mb": lat["peak_memory"].get("device_used_mb"),
            "stage_memory": lat.get("stage_memory"),
            "fidelity": _fidelity_row(fid.get(name)),
        }
    if not report:
        return {"device": None, "config": {}, "peak_tflops": None, "backends": {}, "fidelity_reference": None,
                "skipped": {}, "engines_build": None, "train_microstep": train}
    return {"device": report["environment"].get("gpu", {}).get("name") or report["environment"].get("cpu"),
            "config": {k: report["config"].get(k) for k in ("model", "height", "width", "views", "steps", "dtype",
                                                            "vae_dtype", "runs", "warmup")},
            "peak_tflops": comp.get("peak_tflops"), "backends": rows,
            "fidelity_reference": report.get("fidelity", {}).get("reference") or report.get("fidelity", {}).get("reason"),
            "skipped": {n: b["reason"] for n, b in report["backends"].items() if b["status"] != "ok"},
            "engines_build": report.get("engines_build"), "train_microstep": train}


def _fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _latency_table(summary: dict) -> list[str]:
    cfg = summary["config"]
    lines: list[str] = []
    lines += [f"{cfg['model']}, {cfg['views']} views x {cfg['height']}x{cfg['width']} px, {cfg['steps']} steps, "
             f"{cfg['dtype']} (VAE {cfg['vae_dtype']}), {cfg['runs']} timed runs after {cfg['warmup']} warm-ups; "
             f"peak {_fmt(summary['peak_tflops'])} TFLOPS; fidelity against {summary['fidelity_reference']}.", "",
             "| backend | end to end p50 / p90 ms | UNet step p50 / p90 ms | VAE p50 / p90 ms | UNet % of peak | "
             "e2e / floor | peak MiB: cond / unet / vae (device used) | max step latent err | PSNR dB mean / min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["backends"].items():
        st = r["stages"]

        def pp(k, st=st):
            return f"{_fmt(st[k]['p50_ms'])} / {_fmt(st[k]['p90_ms'])}" if st.get(k) else "—"

        mem = r.get("stage_memory") or {}
        if mem.get("status") == "ok":
            m = mem["stages"]
            mem_s = " / ".join(_fmt(m.get(k, {}).get("torch_peak_allocated_mb"), ".0f") for k in ("conditioning", "unet", "vae_decode"))
            mem_s += f" ({_fmt(max(v['device_used_mb'] for v in m.values()), '.0f')})"
        else:
            mem_s = mem.get("reason", "—")
        fid = r.get("fidelity") or {}
        steps = fid.get("per_step_latent_rel_error") or []
        frac = r.get("unet_fraction_of_peak")
        lines.append(f"| {name} | {pp('end_to_end')} | {pp('unet_step')} | {pp('vae_decode')} | "
                     f"{_fmt(frac * 100 if frac is not None else None)} | {_fmt(r.get('end_to_end_over_floor'), '.2f')} | "
                     f"{mem_s} | {_fmt(max(steps) if steps else None, '.2e')} | "
                     f"{_fmt(fid.get('psnr_db_mean'))} / {_fmt(fid.get('psnr_db_min'))} |")
    return lines


def markdown(summary: dict) -> str:
    """The summary as the Markdown tables that go into bench/README.md."""
    cfg = summary["config"]
    lines = [f"# GPU check: {summary['device']}", ""]
    if summary.get("failures"):
        lines += ["Failed stages:", *[f"- {n}: {why}" for n, why in summary["failures"].items()], ""]
    if cfg:
        lines += _latency_table(summary)
    if summary["skipped"]:
        lines += ["", "Skipped:", *[f"- {n}: {why}" for n, why in summary["skipped"].items()]]
    tr = summary.get("train_microstep")
    if tr:
        lines += ["", "Training micro-step: " + (tr["error"] if "error" in tr else
                  f"{tr['what']}: median {tr['median_s'] * 1000:.0f} ms, peak "
                  f"{_fmt(tr.get('peak_allocated_mb', tr.get('process_peak_rss_mb')), '.0f')} MiB")]
    wall = summary.get("wall_s", {})
    if wall:
        lines += ["", f"Wall time {wall.get('total', 0):.0f} s (budget {BUDGET_S:.0f} s on an H100 class GPU)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--model", default="sdxl-lcm")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backends", default=None, help="default: torch, torch-compile, torch-cudagraph, and "
                    "onnxruntime / tensorrt where they can run here")
    ap.add_argument("--engines-dir", default=None, help="an export folder to reuse (default: export into OUT/engines)")
    ap.add_argument("--no-export", action="store_true", help="do not export ONNX for onnxruntime (TensorRT still exports)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (max-autotune takes many minutes)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                    help="the training presets checkpoint the UNet's activations; this measures without")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing measured (use --model tiny --device cpu to exercise the script).",
              file=sys.stderr)
        return 3

    from bench.backends import availability
    from bench.suite import free_cuda_cache

    out = Path(args.out)
    t0 = time.perf_counter()
    failures: dict[str, str] = {}
    avail = availability()
    if args.backends is None:
        backends, left_out = default_backends(avail)
    else:
        backends, left_out = [b for b in args.backends.split(",") if b], {}
    usable, why_not = onnx_consumers(args.device, avail)
    if not usable and args.backends is None and "onnxruntime" in backends:  # it would have no export to run
        backends.remove("onnxruntime")
        left_out["onnxruntime"] = why_not
    report = run_stage("bench", lambda: _bench(args, out, backends, export=usable and not args.no_export), failures)
    bench_s = time.perf_counter() - t0

    train = None
    if not args.no_train:
        free_cuda_cache(torch.device(args.device))
        print("training micro-step", file=sys.stderr)
        train = run_stage("train_microstep", lambda: _train(args), failures)
    summary = summarize(report, train)
    summary["failures"] = failures
    summary["skipped"].update(left_out)
    if not usable:
        summary["export"] = f"skipped: {why_not}"
    summary["wall_s"] = {"bench": bench_s, "total": time.perf_counter() - t0, "budget": BUDGET_S}
    _write(out, summary)
    return 0


def _bench(args, out: Path, backends: list[str], export: bool) -> dict:
    from bench.suite import BenchConfig, run_bench

    cfg = BenchConfig(
        model=args.model, random_weights=args.model != "tiny", device=args.device, dtype=args.dtype,
        height=args.height, width=args.height, views=args.views, steps=args.steps, backends=backends,
        warmup=args.warmup, runs=args.runs, fidelity=not args.no_fidelity, quality="off", latency_reward="none",
        engines_dir=args.engines_dir, export=export, compile_mode=args.compile_mode, peak_tflops=args.peak_tflops,
        threads=args.threads, out=str(out),
    )
    return run_bench(cfg, argv=["python", "-m", "bench.gpu_check", *args.argv])


def _train(args) -> dict:
    import torch

    from mvz.models.loading import load_model

    model = load_model(args.model, random_weights=args.model != "tiny", device=args.device, dtype=args.dtype)
    try:
        return train_microstep(model, num_views=args.views, height=args.height, width=args.height,
                               steps_timed=args.train_steps, grad_checkpointing=args.grad_checkpointing)
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}


def _write(out: Path, summary: dict) -> None:
    """JSON + Markdown, whatever failed before."""
    from mvz.atomic import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "gpu_check.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_text(out / "gpu_check.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    sys.exit(main())
