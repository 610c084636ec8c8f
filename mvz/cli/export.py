"""``mvz export``: model (+ LoRA) -> ONNX graphs with a manifest -> TensorRT engines where TensorRT exists."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        out: Path = typer.Option(..., "--out", help="Export folder (graphs, manifest, engines/)."),
        model: str = typer.Option("sdxl-lcm", "--model", "-m", help="Preset (tiny, sdxl-lcm) or an assembled model folder."),
        lora: Path | None = typer.Option(None, "--lora", help="LoRA file (upstream PEFT layout) to fuse into the UNet."),
        lora_scale: float = typer.Option(1.0, "--lora-scale", help="LoRA strength fused into the weights."),
        precision: str = typer.Option("fp16", "--precision", help="fp16 (TensorRT needs it: strongly typed), fp32, or int8|fp8 (ModelOpt-quantized UNet)."),
        calib_prompts: Path | None = typer.Option(None, "--calib-prompts", help="int8/fp8: calibration prompts, one a line (default: the shipped list)."),
        calib_steps: int | None = typer.Option(None, "--calib-steps", help="int8/fp8: sampler steps per calibration prompt (default 8)."),
        vae_precision: str | None = typer.Option(None, "--vae-precision", help="fp16|fp32; default fp16 only for fp16-fix/tiny VAEs."),
        views: int = typer.Option(6, "--views", help="Views per prompt (baked into the graphs)."),
        resolution: int | None = typer.Option(None, "--resolution", help="Image side in pixels (default: the model's)."),
        batch: int = typer.Option(1, "--batch-size", help="Prompts per call (the UNet sees batch x views rows)."),
        dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Symbolic batch axis (static is faster for engines)."),
        onnx_only: bool = typer.Option(False, "--onnx-only", help="Stop after the ONNX graphs; build no engines."),
        refittable: bool = typer.Option(False, "--refittable", help="Build refittable engines (switch LoRAs without a rebuild)."),
        timing_cache: Path | None = typer.Option(None, "--timing-cache", help="TensorRT timing cache file, read and updated."),
        workspace_gb: float = typer.Option(8.0, "--workspace", help="TensorRT builder workspace in GiB."),
        opt_level: int = typer.Option(3, "--opt-level", help="TensorRT builder optimisation level 0-5."),
        opset: int = typer.Option(19, "--opset", help="ONNX opset (19 or newer)."),
        exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (dynamo=False) or dynamo."),
        text_encoders: bool = typer.Option(False, "--text-encoders", help="Also export both text encoders."),
        skip_parity: bool = typer.Option(False, "--skip-parity", help="Skip the ONNX Runtime vs PyTorch parity check."),
        device: str = typer.Option("auto", "--device", help="Device to trace on: auto, cpu, cuda, cuda:N."),
        force: bool = typer.Option(False, "--force", help="Replace whatever OUT holds."),
        memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check",
                                          help="Refuse early when the GPU has less free memory than the plan needs."),
        json_out: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
    ) -> None:
        """Fuse a LoRA, export the UNet and VAE decoder to ONNX (manifest + parity), build TensorRT engines."""
        run_export(**locals())


def run_export(*, out, model, lora, lora_scale, precision, vae_precision, views, resolution, batch, dynamic_batch,
               onnx_only, calib_prompts=None, calib_steps=None, refittable, timing_cache, workspace_gb, opt_level, opset,
               exporter, text_encoders, skip_parity, device, force, json_out, memory_check=True) -> None:
    import json
    import time

    from rich.table import Table

    from mvz.cli import output
    from mvz.errors import InputError

    console = output.console(stderr=json_out)
    if precision not in ("fp16", "fp32", "int8", "fp8"):
        raise InputError(f"--precision must be fp16, fp32, int8 or fp8, got {precision!r}.")
    quantized = precision in ("int8", "fp8")
    if quantized:
        _check_quantized_request(precision, calib_prompts, calib_steps, refittable, onnx_only, device)
    if lora is not None and not lora.is_file():
        raise InputError(f"--lora {lora} is not a file.", "Pass the path of a LoRA .safetensors file.")
    if not 0 <= opt_level <= 5:
        raise InputError(f"--opt-level must be 0..5, got {opt_level}.")
    from mvz.cli import checks

    checks.finite(lora_scale, "--lora-scale", low=-10.0, high=10.0)
    checks.finite(workspace_gb, "--workspace", low=0.0625)
    checks.at_least(views, "--views")
    checks.at_least(batch, "--batch-size")
    checks.resolution(resolution)
    checks.fits_memory(resolution, views, batch)
    from mvz.atomic import ensure_writable_dir

    ensure_writable_dir(out.parent if out.parent != out else out, "export folder's parent")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file.", "Pass a folder path (it is created if missing).")

    from export.exporter import export_model
    from mvz.models.loading import load_model, resolve_device

    dev = resolve_device(device)
    dtype = "fp16" if precision in ("fp16", "int8", "fp8") and dev.type == "cuda" else "fp32"
    stages: list[tuple[str, str, float | None]] = []
    t0 = time.perf_counter()

    with console.status("loading model...") as status:
        mv = load_model(model, device=dev, dtype=dtype)
        resolution = resolution or mv.info.default_resolution
        _memory_plan(console, mv, dev, views=views, batch=batch, resolution=resolution, precision=precision,
                     vae_precision=vae_precision, workspace_gb=workspace_gb, build=not onnx_only,
                     parity=not skip_parity, text_encoders=text_encoders, check=memory_check)

        def on_stage(stage: str, event: str, info: dict) -> None:
            if event == "start":
                status.update(f"{stage}...")
                output.log(f"export stage {stage} started")
            elif event == "done":
                extra = ""
                if "status" in info:
                    extra = f"  parity {info['status']}" + (
                        f" (max rel {info['max_rel_err']:.2e}, cos {info['cosine']:.6f})" if "max_rel_err" in info else "")
                if "mapped" in info:
                    extra = f"  {info['mapped']} weights mapped, {info['unmapped']} unmapped, {info['shared']} shared"
                console.print(f"[green]done[/] {stage}{extra}  [dim]{info.get('seconds', 0):.1f}s[/]")
                stages.append((stage, "done", info.get("seconds")))
            elif event == "skip":
                console.print(f"[yellow]skip[/] {stage}: {info.get('reason', '')}")
                stages.append((stage, "skip", None))
            elif event == "note":
                console.print(f"[cyan]note[/] {info.get('message', '')}")

        result = export_model(
            mv, out, lora=lora, lora_scale=lora_scale, num_views=views, height=resolution, width=resolution,
            batch=batch, precision=precision, vae_precision=vae_precision, opset=opset, exporter=exporter,
            dynamic_batch=dynamic_batch, parity=not skip_parity, text_encoders=text_encoders, force=force,
            on_stage=on_stage, offload=True, calib_prompts=calib_prompts, calib_steps=calib_steps,
        )
        del mv  # the torch model (already off the GPU: offload) is not needed for the engine builds

        engines_note = None
        engine_manifest = None
        if onnx_only:
            engines_note = "skipped (--onnx-only)"
        else:
            from engines.tensorrt_backend import unavailable_reason
            from engines.tensorrt_build import build_engines, free_device_memory

            reason = unavailable_reason(need_builder=True)
            if reason:
                engines_note = f"not built: {reason} The ONNX export is complete and runs with --backend onnxruntime."
            else:
                free_device_memory()
                engine_manifest = build_engines(
                    result.folder, workspace_bytes=int(workspace_gb * (1 << 30)), opt_level=opt_level,
                    refittable=refittable, timing_cache=timing_cache, force=force, on_stage=on_stage,
                )

    m = result.manifest
    table = Table(title=f"mvz export -> {result.folder}" + ("  (already up to date)" if result.reused else ""))
    for col in ("graph", "precision", "size", "max rel err", "median rel err", "cosine", "parity", "export s"):
        table.add_column(col, justify="right" if col not in ("graph", "parity") else "left")
    for name, g in m.graphs.items():
        p = g.parity
        secs = result.timings.get(f"{name}_export_s")
        table.add_row(name, g.precision, _size(g.bytes), _fmt(p, "max_rel_err", "{:.2e}"), _fmt(p, "median_rel_err", "{:.2e}"),
                      _fmt(p, "cosine", "{:.6f}"), p.get("status", "-"), f"{secs:.1f}" if secs else "-")
    if engine_manifest is not None:
        for name, e in engine_manifest.engines.items():
            table.add_row(f"{name} (TensorRT {engine_manifest.tensorrt})", m.graphs[name].precision, _size(e.bytes),
                          "-", "-", "-", "refittable" if e.refittable else "-", f"{e.build_seconds:.1f}")
    console.print(table)
    summary = m.summary()
    console.print(
        f"model {summary['model']}, LoRA {summary['lora'] or 'none'}, {m.num_views} views, {m.width}x{m.height}, "
        f"batch {m.batch}{' (dynamic)' if m.dynamic_batch else ''}, opset {m.opset}, exporter {m.exporter}; "
        f"total {time.perf_counter() - t0:.1f}s"
    )
    if engines_note:
        console.print(f"TensorRT engines: {engines_note}")
    if json_out:
        payload = {"folder": str(result.folder), "reused": result.reused, "manifest": summary,
                   "parity": {k: g.parity for k, g in m.graphs.items()}, "engines": engines_note or "built"}
        typer.echo(json.dumps(payload, indent=2, default=str))


def _memory_plan(console, mv, dev, *, views, batch, resolution, precision, vae_precision, workspace_gb, build, parity,
                 text_encoders, check) -> None:
    """Print the export's memory plan (per stage); on a GPU, refuse early when it does not fit."""
    from export.exporter import vae_fp16_safe
    from export.memory_plan import GiB, check_fits, export_plan, model_plan_request

    if dev.type != "cuda":
        return
    import torch

    if not text_encoders:  # not exported: off the GPU for the whole export
        for enc in (mv.text_encoder, mv.text_encoder_2):
            if enc is not None:
                enc.to("cpu")
    vae_prec = vae_precision or ("fp16" if precision in ("fp16", "int8", "fp8") and vae_fp16_safe(mv) else "fp32")
    from mvz.pipeline import DEFAULT_VAE_VIEWS_PER_CALL

    # int8/fp8: the plan counts the fp16 base the calibration and the Q/DQ graph carry (an upper bound)
    plan = export_plan(model_plan_request(mv, views=views, batch=batch, height=resolution, width=resolution,
                                          precision="fp16" if precision in ("int8", "fp8") else precision,
                                          vae_precision=vae_prec, vae_views_per_call=DEFAULT_VAE_VIEWS_PER_CALL,
                                          workspace_bytes=int(workspace_gb * GiB), build_engines=build, parity=parity))
    for s in plan.stages:
        console.print(f"[dim]plan[/] {s.name:<28} weights {s.weights / GiB:5.1f}  activations {s.activations / GiB:5.1f}"
                      f"  workspace {s.workspace / GiB:4.1f}  total {s.total / GiB:5.1f} GiB")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    available = free + torch.cuda.memory_allocated(dev)  # the model already loaded counts as ours
    console.print(f"[dim]plan[/] peak {plan.peak.total / GiB:.1f} GiB ({plan.peak.name}); {available / GiB:.1f} GiB available")
    if check:
        check_fits(plan, available, device=torch.cuda.get_device_name(dev))


def _check_quantized_request(precision, calib_prompts, calib_steps, refittable, onnx_only, device) -> None:
    """int8/fp8 input checks before any model is loaded or anything written (each one line, exit 2)."""
    from export.quantize import check_precision_for_device, load_calib_prompts
    from mvz.errors import InputError
    from mvz.models.loading import resolve_device

    if refittable:
        raise InputError(f"--refittable does not apply to --precision {precision}: a quantized engine is never refit.",
                         "Re-export with the LoRA instead (--lora FILE); drop --refittable.")
    if calib_steps is not None and calib_steps < 1:
        raise InputError(f"--calib-steps must be at least 1, got {calib_steps}.")
    load_calib_prompts(calib_prompts)
    check_precision_for_device(precision, resolve_device(device), build_engines=not onnx_only)


def _fmt(figures: dict, key: str, spec: str) -> str:
    return spec.format(figures[key]) if key in figures else "-"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
