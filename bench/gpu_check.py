"""The prepared one-GPU check: every GPU measurement of this project in a few minutes.

    python -m bench.gpu_check --out gpu-check            # on a machine with one NVIDIA GPU

1. ``mvz bench`` on the full-size architecture with random weights (``sdxl-lcm --random-weights``, fp16,
   768 px, 6 views, 8 steps): latency per stage of every available backend (torch, torch-compile, and
   onnxruntime / tensorrt when ``--engines-dir`` holds their exports or ``--export`` is given), CUDA-event
   timing, peak memory, the compute floor and the achieved fraction of peak, fidelity against an fp32
   torch reference on one seed. Quality is off (random weights).
2. A training micro-step (MVC-ZigAL style): LoRA r=16 on the MV UNet, the log-prob of one recorded
   denoising step for all 6 views recomputed with gradients, a policy-gradient loss, backward and an AdamW
   step; median time and peak memory over a few steps.

Writes ``OUT/report.json`` / ``report.md`` / PNGs (the bench report) and ``OUT/gpu_check.json`` (the
micro-step and a summary with the gap to the compute floor). Everything but the GPU itself is exercised
on the CPU by ``--model tiny --device cpu`` (see tests/test_bench_gpu_check.py).
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


def summarize(report: dict, train: dict | None) -> dict:
    """The lines that matter: per backend UNet step / end to end vs the floor."""
    comp = report.get("compute", {})
    floor = comp.get("floor_s", {})
    rows = {}
    for name, lat in report["latency"].get("backends", {}).items():
        st = lat["stages"]
        unet_job = st["unet_total"]["median_ms"] / 1000.0
        rows[name] = {
            "end_to_end_ms": st["end_to_end"]["median_ms"],
            "unet_step_ms": st["unet_step"]["median_ms"],
            "unet_8_steps_ms": st["unet_total"]["median_ms"],
            "vae_decode_ms": st.get("vae_decode", {}).get("median_ms"),
            "unet_floor_ms": floor["unet"] * 1000.0 if floor.get("unet") else None,
            "unet_gap_x": unet_job / floor["unet"] if floor.get("unet") else None,
            "unet_fraction_of_peak": comp.get("achieved", {}).get(name, {}).get("unet_fraction"),
            "peak_memory_mb": lat["peak_memory"].get("torch_peak_allocated_mb"),
            "device_used_mb": lat["peak_memory"].get("device_used_mb"),
        }
    return {"device": report["environment"].get("gpu", {}).get("name") or report["environment"].get("cpu"),
            "peak_tflops": comp.get("peak_tflops"), "backends": rows,
            "skipped": {n: b["reason"] for n, b in report["backends"].items() if b["status"] != "ok"},
            "train_microstep": train}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--model", default="sdxl-lcm")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backends", default="torch,torch-compile,onnxruntime,tensorrt")
    ap.add_argument("--engines-dir", default=None)
    ap.add_argument("--export", action="store_true", help="export ONNX first when an ONNX backend is available (slow at full size)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing measured (use --model tiny --device cpu to exercise the script).",
              file=sys.stderr)
        return 3
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from bench.suite import BenchConfig, run_bench
    from mvz.atomic import write_text

    out = Path(args.out)
    t0 = time.perf_counter()
    cfg = BenchConfig(
        model=args.model, random_weights=args.model != "tiny", device=args.device, dtype=args.dtype,
        height=args.height, width=args.height, views=args.views, steps=args.steps,
        backends=[b for b in args.backends.split(",") if b], warmup=args.warmup, runs=args.runs,
        fidelity=not args.no_fidelity, quality="off", latency_reward="none", engines_dir=args.engines_dir,
        export=args.export, peak_tflops=args.peak_tflops, threads=args.threads, out=str(out),
    )
    report = run_bench(cfg, argv=["python", "-m", "bench.gpu_check", *(argv if argv is not None else sys.argv[1:])])
    bench_s = time.perf_counter() - t0

    train = None
    if not args.no_train:
        from mvz.models.loading import load_model

        print("training micro-step", file=sys.stderr)
        model = load_model(args.model, random_weights=args.model != "tiny", device=args.device, dtype=args.dtype)
        try:
            train = train_microstep(model, num_views=args.views, height=args.height, width=args.height,
                                    steps_timed=args.train_steps, grad_checkpointing=args.grad_checkpointing)
        except torch.cuda.OutOfMemoryError as exc:
            train = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        del model
    summary = summarize(report, train)
    summary["wall_s"] = {"bench": bench_s, "total": time.perf_counter() - t0}
    write_text(out / "gpu_check.json", json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
