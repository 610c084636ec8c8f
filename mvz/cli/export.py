"""``mvz export``: model (+ LoRA) -> ONNX graphs with a manifest -> TensorRT engines where TensorRT exists."""

from __future__ import annotations

from dataclasses import dataclass
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
        exporter: str | None = typer.Option(None, "--exporter", help="dynamo (default: a trace on the meta device, computes "
                                            "nothing) or torchscript (dynamo=False; the default for int8/fp8)."),
        text_encoders: bool = typer.Option(False, "--text-encoders", help="Also export both text encoders."),
        skip_parity: bool = typer.Option(False, "--skip-parity", help="Skip the ONNX Runtime vs PyTorch parity check."),
        random_weights: bool = typer.Option(False, "--random-weights", help="Full-size architecture with random weights "
                                            "(no download): try the whole export and build on this machine."),
        device: str = typer.Option("auto", "--device", help="Device to trace on: auto, cpu, cuda, cuda:N."),
        force: bool = typer.Option(False, "--force", help="Replace whatever OUT holds."),
        memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check",
                                          help="Refuse early when the GPU or the host has less memory than the plan needs."),
        json_out: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
    ) -> None:
        """Fuse a LoRA, export the UNet and VAE decoder to ONNX (manifest + parity), build TensorRT engines."""
        run_export(ExportRequest(
            out=out, model=model, lora=lora, lora_scale=lora_scale, precision=precision, vae_precision=vae_precision,
            views=views, resolution=resolution, batch=batch, dynamic_batch=dynamic_batch, onnx_only=onnx_only,
            calib_prompts=calib_prompts, calib_steps=calib_steps, refittable=refittable, timing_cache=timing_cache,
            workspace_gb=workspace_gb, opt_level=opt_level, opset=opset, exporter=exporter,
            text_encoders=text_encoders, parity=not skip_parity, random_weights=random_weights, device=device,
            force=force, memory_check=memory_check, json_out=json_out,
        ))


@dataclass(frozen=True)
class ExportRequest:
    """Everything ``mvz export`` was asked for, as parsed (checked by :func:`_check_request`)."""

    out: Path
    model: str = "sdxl-lcm"
    lora: Path | None = None
    lora_scale: float = 1.0
    precision: str = "fp16"
    vae_precision: str | None = None
    views: int = 6
    resolution: int | None = None
    batch: int = 1
    dynamic_batch: bool = False
    onnx_only: bool = False
    calib_prompts: Path | None = None
    calib_steps: int | None = None
    refittable: bool = False
    timing_cache: Path | None = None
    workspace_gb: float = 8.0
    opt_level: int = 3
    opset: int = 19
    exporter: str | None = None
    text_encoders: bool = False
    parity: bool = True
    random_weights: bool = False
    device: str = "auto"
    force: bool = False
    memory_check: bool = True
    json_out: bool = False

    @property
    def quantized(self) -> bool:
        return self.precision in ("int8", "fp8")


def _check_request(req: ExportRequest) -> None:
    """Input checks before any model is loaded or anything written (each one line, exit 2)."""
    from mvz.atomic import ensure_writable_dir
    from mvz.cli import checks
    from mvz.errors import InputError

    if req.precision not in ("fp16", "fp32", "int8", "fp8"):
        raise InputError(f"--precision must be fp16, fp32, int8 or fp8, got {req.precision!r}.")
    if req.quantized:
        _check_quantized_request(req.precision, req.calib_prompts, req.calib_steps, req.refittable, req.onnx_only,
                                 req.device)
    if req.lora is not None and not req.lora.is_file():
        raise InputError(f"--lora {req.lora} is not a file.", "Pass the path of a LoRA .safetensors file.")
    from export import EXPORTERS

    if req.exporter is not None and req.exporter not in EXPORTERS:
        raise InputError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {req.exporter!r}.")
    if not 0 <= req.opt_level <= 5:
        raise InputError(f"--opt-level must be 0..5, got {req.opt_level}.")
    checks.finite(req.lora_scale, "--lora-scale", low=-10.0, high=10.0)
    checks.finite(req.workspace_gb, "--workspace", low=0.0625)
    checks.at_least(req.views, "--views")
    checks.at_least(req.batch, "--batch-size")
    checks.resolution(req.resolution)
    checks.fits_memory(req.resolution, req.views, req.batch)
    out = req.out
    ensure_writable_dir(out.parent if out.parent != out else out, "export folder's parent")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file.", "Pass a folder path (it is created if missing).")


def load_dtype(precision: str, device, parity: bool):
    """The dtype the model is loaded in: the export's own (fp16) on a GPU, and on a CPU too when no parity
    check computes in torch (the dynamo trace computes nothing), so no second, halved UNet is made; fp32
    otherwise (CPU kernels lack much of fp16)."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision in ("int8", "fp8"):  # calibrated in fp16 on a GPU, fp32 on a CPU (export.quantize)
        return torch.float16 if device.type == "cuda" else torch.float32
    return torch.float16 if device.type == "cuda" or not parity else torch.float32


def run_export(req: ExportRequest) -> None:
    import json
    import time

    from mvz.cli import output

    console = output.console(stderr=req.json_out)
    _check_request(req)

    from export.exporter import export_model
    from mvz.models.loading import load_model, resolve_device

    dev = resolve_device(req.device)
    dtype = load_dtype(req.precision, dev, req.parity)
    stages: list[tuple[str, str, float | None]] = []
    t0 = time.perf_counter()

    with console.status("loading model...") as status:
        mv = load_model(req.model, device=dev, dtype=dtype, random_weights=req.random_weights)
        load_s = time.perf_counter() - t0
        resolution = req.resolution or mv.info.default_resolution
        if not req.text_encoders:
            _set_aside_text_encoders(mv, dev, keep_on_host=req.quantized)
        _memory_plans(console, mv, dev, req, resolution)
        result = export_model(
            mv, req.out, lora=req.lora, lora_scale=req.lora_scale, num_views=req.views, height=resolution,
            width=resolution, batch=req.batch, precision=req.precision, vae_precision=req.vae_precision,
            opset=req.opset, exporter=req.exporter, dynamic_batch=req.dynamic_batch, parity=req.parity,
            text_encoders=req.text_encoders, force=req.force, on_stage=_stage_printer(console, status, stages),
            offload=True, calib_prompts=req.calib_prompts, calib_steps=req.calib_steps,
        )
        result.timings["load_s"] = load_s
        del mv  # the torch model (already off the GPU: offload) is not needed for the engine builds
        engines_note, engine_manifest = _build_engines(req, result, _stage_printer(console, status, stages))

    _print_results(console, req, result, engine_manifest, engines_note, time.perf_counter() - t0)
    if req.json_out:
        m = result.manifest
        payload = {"folder": str(result.folder), "reused": result.reused, "manifest": m.summary(),
                   "timings": result.timings, "parity": {k: g.parity for k, g in m.graphs.items()},
                   "engines": engines_note or "built"}
        typer.echo(json.dumps(payload, indent=2, default=str))


def _stage_printer(console, status, stages: list):
    from mvz.cli import output

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

    return on_stage


def _build_engines(req: ExportRequest, result, on_stage):
    """(a note on the engines, the engine manifest or None): built where TensorRT exists, unless --onnx-only."""
    if req.onnx_only:
        return "skipped (--onnx-only)", None
    from engines.tensorrt_backend import unavailable_reason
    from engines.tensorrt_build import build_engines
    from mvz.devices import release_device_memory

    reason = unavailable_reason(need_builder=True)
    if reason:
        return f"not built: {reason} The ONNX export is complete and runs with --backend onnxruntime.", None
    release_device_memory()
    return None, build_engines(
        result.folder, workspace_bytes=int(req.workspace_gb * (1 << 30)), opt_level=req.opt_level,
        refittable=req.refittable, timing_cache=req.timing_cache, force=req.force, on_stage=on_stage,
    )


def _print_results(console, req: ExportRequest, result, engine_manifest, engines_note, seconds: float) -> None:
    from rich.table import Table

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
        f"total {seconds:.1f}s"
    )
    if engines_note:
        console.print(f"TensorRT engines: {engines_note}")


def _memory_plans(console, mv, dev, req: ExportRequest, resolution: int) -> None:
    """Print the export's memory plans, host and (on a GPU) device, per stage; refuse early, in one line, when
    the host or the GPU has less memory available than the plan's peak stage needs."""
    from export.exporter import QUANTIZED, vae_fp16_safe
    from export.memory_plan import (
        GiB,
        available_host_memory,
        check_fits,
        check_host_fits,
        export_plan,
        host_export_plan,
        model_plan_request,
    )
    from mvz.pipeline import DEFAULT_VAE_VIEWS_PER_CALL

    fp16ish = req.precision in ("fp16", *QUANTIZED)
    vae_prec = req.vae_precision or ("fp16" if fp16ish and vae_fp16_safe(mv) else "fp32")
    # int8/fp8: the plan counts the fp16 base the calibration and the Q/DQ graph carry (an upper bound)
    plan_req = model_plan_request(mv, views=req.views, batch=req.batch, height=resolution, width=resolution,
                                  precision="fp16" if fp16ish else req.precision, vae_precision=vae_prec,
                                  vae_views_per_call=DEFAULT_VAE_VIEWS_PER_CALL,
                                  workspace_bytes=int(req.workspace_gb * GiB), build_engines=not req.onnx_only,
                                  parity=req.parity)
    host = host_export_plan(_host_request(mv, dev, req, plan_req))
    used_by_model = _host_bytes(mv) if dev.type == "cpu" else 0
    available = available_host_memory() + used_by_model  # the model already loaded counts as ours
    _print_plan(console, host, available, "host")
    if req.memory_check:
        check_host_fits(host, available)
    if dev.type != "cuda":
        return
    import torch

    plan = export_plan(plan_req)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    available = free + torch.cuda.memory_allocated(dev)  # the model already loaded counts as ours
    _print_plan(console, plan, available, "GPU")
    if req.memory_check:
        check_fits(plan, available, device=torch.cuda.get_device_name(dev))


def _set_aside_text_encoders(mv, dev, keep_on_host: bool) -> None:
    """Text encoders that are not exported leave the GPU for the whole export; on the host their weights are
    dropped (the export reads only their configs; the CLI owns the model), unless the quantizer's calibration
    samples with them."""
    for enc in (mv.text_encoder, mv.text_encoder_2):
        if enc is None:
            continue
        if dev.type == "cuda" or keep_on_host:
            enc.to("cpu")
        else:
            enc.to("meta")


def _host_request(mv, dev, req: ExportRequest, plan_req):
    from export.exporter import PRECISIONS, QUANTIZED
    from export.memory_plan import HostRequest
    from export.onnx_export import DEFAULT_EXPORTER

    exporter = req.exporter or ("torchscript" if req.quantized else DEFAULT_EXPORTER)
    on_cpu = dev.type == "cpu"
    base = "fp32" if req.precision in QUANTIZED and on_cpu else plan_req.precision
    copy = mv.dtype != PRECISIONS[base] or req.quantized  # _unet_to_export makes a UNet copy in the export dtype
    unet_copy = plan_req.unet_params * (4 if base == "fp32" else 2) if copy else 0
    return HostRequest(plan_req, _host_bytes(mv) if on_cpu else 0, exporter=exporter, on_cpu=on_cpu,
                       copy_bytes=unet_copy)


def _host_bytes(mv) -> int:
    """Bytes of every torch component of the model held on the host (parameters and buffers; not on meta)."""
    return sum(t.numel() * t.element_size() for m in (mv.unet, mv.vae, mv.text_encoder, mv.text_encoder_2,
                                                       getattr(mv, "adapter", None)) if m is not None
               for t in (*m.parameters(), *m.buffers()) if t.device.type == "cpu")


def _print_plan(console, plan, available: int, where: str) -> None:
    from export.memory_plan import GiB

    for s in plan.stages:
        console.print(f"[dim]plan[/] {s.name:<32} weights {s.weights / GiB:5.1f}  activations {s.activations / GiB:5.1f}"
                      f"  workspace {s.workspace / GiB:4.1f}  total {s.total / GiB:5.1f} GiB")
    console.print(f"[dim]plan[/] {where} peak {plan.peak.total / GiB:.1f} GiB ({plan.peak.name}); "
                  f"{available / GiB:.1f} GiB available")


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
