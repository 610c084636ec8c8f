"""The work behind ``mvz generate`` (kept out of the Typer module so ``mvz --help`` stays instant)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mvz.errors import InputError

BACKENDS = ("torch", "torch-compile", "torch-cudagraph", "onnxruntime", "tensorrt")


@dataclass
class GenerateRequest:
    prompt: str | None = None
    prompts_file: Path | None = None
    model: str = "sdxl-lcm"
    base_model: str | None = None
    unet_model: str | None = None
    vae_model: str | None = None
    adapter: str | None = None
    random_weights: bool = False
    lora: Path | None = None
    lora_scale: float = 1.0
    seed: int = 42
    steps: int = 8
    guidance: float = 7.0
    views: int | None = None
    azimuths: str | None = None
    elevation: float = 0.0
    resolution: int | None = None
    zmv: bool = False
    zmv_steps: int = 1
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "torch"
    engines: Path | None = None
    out: Path | None = None
    out_dir: Path | None = None
    save_views: bool = False
    json_out: bool = False


def slugify(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "prompt"


def _cameras(req: GenerateRequest):
    from mvz.cli.common import parse_csv_floats
    from mvz.models.cameras import CameraSet

    if req.azimuths:
        az = tuple(parse_csv_floats(req.azimuths, "--azimuths"))
        if not az:
            raise InputError("--azimuths is empty.", "Give comma-separated degrees, e.g. 0,90,180,270.")
        if req.views is not None and req.views != len(az):
            raise InputError(f"--views {req.views} but {len(az)} --azimuths given.", "Drop --views or make them agree.")
        return CameraSet(azimuths=az, elevation=req.elevation)
    if req.views is not None and req.views < 1:
        raise InputError(f"--views must be at least 1, got {req.views}.")
    base = CameraSet.default(req.views)
    return CameraSet(azimuths=base.azimuths, elevation=req.elevation)


def _check_request(req: GenerateRequest) -> list[str]:
    """Everything that can be checked before loading a model. Returns the prompts."""
    from mvz.prompts import read_prompt_file

    if req.prompt is not None and req.prompts_file is not None:
        raise InputError("give either a prompt or --prompts FILE, not both.")
    if req.prompts_file is not None:
        prompts = read_prompt_file(req.prompts_file)
        if req.out_dir is None:
            raise InputError("--prompts writes one grid per prompt and needs --out-dir DIR.")
    elif req.prompt is not None:
        if not req.prompt.strip():
            raise InputError("the prompt is empty.", 'Pass some text, e.g. mvz generate "a red chair".')
        prompts = [req.prompt.strip()]
    else:
        raise InputError("no prompt given.", 'Pass a prompt (mvz generate "a red chair") or --prompts FILE.')
    if req.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {req.batch_size}.")
    if req.resolution is not None and req.resolution < 1:
        raise InputError(f"--resolution must be positive, got {req.resolution}.")
    if req.backend not in BACKENDS:
        raise InputError(f"unknown backend {req.backend!r}.", f"Use one of: {', '.join(BACKENDS)}.")
    if req.out is not None and req.out.suffix.lower() != ".png":
        raise InputError(f"--out {req.out} must be a .png file.")
    if req.lora is not None and not req.lora.exists():
        raise InputError(f"LoRA {req.lora} does not exist.", "Pass the path of a mvczigal_lcm_sdxl_lora.safetensors file.")
    return prompts


def _create_backend_or_rebuild(create_backend, req: GenerateRequest, model, num_views: int, res: int, device, console):
    """The backend; for TensorRT engines whose LoRA cannot be switched by refit, the CLI (never the runtime)
    rebuilds: after the ``except`` block, so the failed refit's engine and refitter are released first."""
    from export.refit_map import RefitRefusedError

    kwargs = {"num_views": num_views, "height": res, "width": res, "batch": req.batch_size, "device": device}
    why = None
    try:
        return create_backend(req.backend, model, engines_dir=req.engines, **kwargs)
    except RefitRefusedError as err:
        why = err.what
    from engines.tensorrt_build import free_device_memory, rebuild_for_model
    from engines.tensorrt_manifest import find_engine_folder

    free_device_memory()
    console.print(f"[yellow]rebuilding TensorRT engines[/yellow]: {why}")
    folder = rebuild_for_model(model, find_engine_folder(Path(req.engines))[0], why)
    return create_backend(req.backend, model, engines_dir=folder, **kwargs)


def run_generate(req: GenerateRequest) -> list[Path]:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mvz.atomic import ensure_writable_dir, save_image, write_json
    from mvz.models.loading import load_model, resolve_device, resolve_dtype
    from mvz.pipeline import MultiviewPipeline, images_to_grid, validate_request, validate_sampling

    prompts = _check_request(req)
    cameras = _cameras(req)
    validate_sampling(prompts, req.steps, cameras.num_views)  # before loading any model
    if req.zmv_steps < 1 or req.zmv_steps > req.steps:
        raise InputError(f"--zmv-steps must be between 1 and --steps ({req.steps}), got {req.zmv_steps}.")
    if req.out_dir is not None:
        ensure_writable_dir(req.out_dir, "--out-dir")
    else:
        ensure_writable_dir((req.out or Path("out.png")).parent, "the folder of --out")

    console = Console(stderr=True, quiet=req.json_out)
    device = resolve_device(req.device)
    dtype = resolve_dtype(req.dtype, device)

    t_load = time.perf_counter()
    model = load_model(
        req.model,
        base_model=req.base_model,
        unet_model=req.unet_model,
        vae_model=req.vae_model,
        adapter=req.adapter,
        random_weights=req.random_weights,
        device=device,
        dtype=dtype,
        lora=str(req.lora) if req.lora else None,
        lora_scale=req.lora_scale,
    )
    load_s = time.perf_counter() - t_load
    res = req.resolution or model.info.default_resolution
    # fail on bad sizes before any output is written
    validate_request(prompts, req.steps, cameras.num_views, res, res, model.resolution_multiple)

    if req.backend == "torch":
        pipe = MultiviewPipeline(model, num_views=cameras.num_views)
        backend_info = {"name": "torch"}
    else:
        from engines import create_backend

        backend = _create_backend_or_rebuild(create_backend, req, model, cameras.num_views, res, device, console)
        pipe = MultiviewPipeline(model, denoiser=backend.denoiser, decoder=backend.decoder, num_views=cameras.num_views)
        backend_info = {"name": backend.name, **dict(backend.info)}

    outputs: list[Path] = []
    summary = []
    total_steps = len(prompts) * req.steps
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("sampling", total=total_steps)
        for start in range(0, len(prompts), req.batch_size):
            chunk = prompts[start : start + req.batch_size]
            seeds = [req.seed + start + i for i in range(len(chunk))]
            done = progress.tasks[task].completed
            result = pipe.sample(
                chunk, seeds, steps=req.steps, guidance=req.guidance, cameras=cameras, height=res, width=res,
                zmv=req.zmv, zmv_steps=req.zmv_steps,
                on_step=lambda i, n, d=done, k=len(chunk): progress.update(task, completed=d + i * k),
            )
            for j, text in enumerate(chunk):
                idx = start + j
                if req.prompts_file is not None:
                    grid_path = req.out_dir / f"{idx:03d}_{slugify(text)}.png"
                elif req.out_dir is not None and req.out is None:
                    grid_path = req.out_dir / f"{slugify(text)}.png"
                else:
                    grid_path = req.out or Path("out.png")
                views = result.images[j]
                save_image(grid_path, images_to_grid(views))
                outputs.append(grid_path)
                entry = {
                    "prompt": text,
                    "seed": seeds[j],
                    "grid": str(grid_path),
                    "steps": req.steps,
                    "guidance": req.guidance,
                    "zmv": req.zmv,
                    "zmv_steps": req.zmv_steps if req.zmv else 0,
                    "nfe": result.nfe,
                    "views": [{"azimuth": a, "elevation": cameras.elevation} for a in cameras.azimuths],
                    "resolution": res,
                    "model": model.info.name,
                    "model_sources": model.info.sources,
                    "random_weights": model.info.random_weights,
                    "lora": str(req.lora) if req.lora else None,
                    "lora_scale": req.lora_scale if req.lora else None,
                    "backend": backend_info,
                    "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""),
                    "timings": {"load_s": round(load_s, 4), **{k: round(v, 4) for k, v in result.timings.items()},
                                "prompts_in_call": len(chunk)},
                }
                if req.save_views:
                    view_paths = []
                    for v, az in enumerate(cameras.azimuths):
                        vp = grid_path.with_name(f"{grid_path.stem}_view{v}_az{az:g}.png")
                        save_image(vp, images_to_grid(views[v : v + 1]))
                        view_paths.append(str(vp))
                    entry["view_files"] = view_paths
                    write_json(grid_path.with_suffix(".json"), entry)
                summary.append(entry)
            if device.type == "cuda":
                torch.cuda.synchronize()

    if req.json_out:
        print(json.dumps(summary if len(summary) > 1 else summary[0], indent=2))
    else:
        for entry in summary:
            t = entry["timings"]
            console.quiet = False
            Console().print(
                f"[green]wrote[/green] {entry['grid']}  ({len(cameras.azimuths)} views, {req.steps} steps, "
                f"{entry['nfe']} UNet calls, denoise {t['denoise_s']:.2f}s, decode {t.get('decode_s', 0):.2f}s)"
            )
    return outputs
