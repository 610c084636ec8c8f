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
    overwrite: bool = False
    skip_existing: bool = False
    save_views: bool = False
    json_out: bool = False


def slugify(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "prompt"


def _check_cameras(req: GenerateRequest) -> int:
    """The camera numbers, checked without torch. Returns the number of views."""
    from mvz.cli import checks
    from mvz.cli.common import parse_csv_floats

    checks.elevation(req.elevation)
    if req.azimuths:
        az = checks.azimuths(parse_csv_floats(req.azimuths, "--azimuths"))
        if not az:
            raise InputError("--azimuths is empty.", "Give comma-separated degrees, e.g. 0,90,180,270.")
        if req.views is not None and req.views != len(az):
            raise InputError(f"--views {req.views} but {len(az)} --azimuths given.", "Drop --views or make them agree.")
        return len(az)
    if req.views is not None:
        checks.at_least(req.views, "--views")
    return 6 if req.views is None else req.views


def _cameras(req: GenerateRequest):
    from mvz.cli.common import parse_csv_floats
    from mvz.models.cameras import CameraSet

    if req.azimuths:
        return CameraSet(azimuths=tuple(parse_csv_floats(req.azimuths, "--azimuths")), elevation=req.elevation)
    base = CameraSet.default(req.views)
    return CameraSet(azimuths=base.azimuths, elevation=req.elevation)


def _check_request(req: GenerateRequest) -> list[str]:
    """Everything that can be checked before loading a model (and before importing torch). Returns the prompts."""
    from mvz.cli import checks
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
    checks.steps(req.steps)
    if req.zmv_steps < 1 or req.zmv_steps > req.steps:
        raise InputError(f"--zmv-steps must be between 1 and --steps ({req.steps}), got {req.zmv_steps}.")
    checks.at_least(req.batch_size, "--batch-size")
    checks.resolution(req.resolution)
    checks.seed(req.seed, len(prompts))
    checks.finite(req.guidance, "--guidance", low=0.0, high=100.0)
    checks.finite(req.lora_scale, "--lora-scale", low=-10.0, high=10.0)
    views = _check_cameras(req)
    checks.fits_memory(req.resolution, views, min(req.batch_size, len(prompts)))
    if req.overwrite and req.skip_existing:
        raise InputError("--overwrite and --skip-existing contradict each other.", "Pass one of them.")
    if req.backend not in BACKENDS:
        raise InputError(f"unknown backend {req.backend!r}.", f"Use one of: {', '.join(BACKENDS)}.")
    if req.out is not None and req.out.is_dir():
        raise InputError(f"--out {req.out} is a folder.", f"Name a .png file (e.g. {req.out / 'out.png'}) or pass --out-dir {req.out}.")
    if req.out is not None and req.out.suffix.lower() != ".png":
        raise InputError(f"--out {req.out} must be a .png file.")
    if req.out_dir is not None and req.out_dir.exists() and not req.out_dir.is_dir():
        raise InputError(f"--out-dir {req.out_dir} is a file.", "Pass a folder (it is created if missing).")
    if req.lora is not None and not req.lora.exists():
        raise InputError(f"LoRA {req.lora} does not exist.", "Pass the path of a mvczigal_lcm_sdxl_lora.safetensors file.")
    return prompts


def _create_backend_or_rebuild(create_backend, req: GenerateRequest, model, num_views: int, res: int, device, console):
    """The backend; for TensorRT engines whose LoRA cannot be switched by refit, the CLI (never the runtime)
    rebuilds: after the ``except`` block, so the failed refit's engine and refitter are released first."""
    from mvz.artifacts.refit_plan import RefitRefusedError

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


def grid_paths(req: GenerateRequest, prompts: list[str]) -> list[Path]:
    """Where each prompt's grid goes (decided before anything runs, so existing files are refused up front)."""
    if req.prompts_file is not None:
        return [req.out_dir / f"{i:03d}_{slugify(text)}.png" for i, text in enumerate(prompts)]
    if req.out_dir is not None and req.out is None:
        return [req.out_dir / f"{slugify(prompts[0])}.png"]
    return [req.out or Path("out.png")]


def _todo(req: GenerateRequest, paths: list[Path]) -> list[int]:
    """Indices of the prompts to generate under the output policy (refuse / --overwrite / --skip-existing)."""
    existing = [i for i, p in enumerate(paths) if p.exists()]
    if existing and not (req.overwrite or req.skip_existing):
        first = paths[existing[0]]
        what = f"{first} already exists" if len(paths) == 1 else f"{len(existing)} of {len(paths)} grids exist (first {first})"
        raise InputError(f"{what}.", "Pass --overwrite to replace, or --skip-existing to keep what exists and make the rest.")
    if req.skip_existing:
        return [i for i in range(len(paths)) if i not in set(existing)]
    return list(range(len(paths)))


def png_text(entry: dict) -> dict[str, str]:
    """PNG text chunks: prompt, seed, steps, model (and the A1111-style ``parameters`` line other tools read)."""
    import mvz

    res = entry["resolution"]
    params = (f"{entry['prompt']}\nSteps: {entry['steps']}, Sampler: LCM, CFG scale: {entry['guidance']}, "
              f"Seed: {entry['seed']}, Size: {res}x{res}, Model: {entry['model']}")
    if entry.get("lora"):
        params += f", LoRA: {Path(entry['lora']).name}:{entry['lora_scale']}"
    return {"prompt": entry["prompt"], "seed": str(entry["seed"]), "steps": str(entry["steps"]),
            "guidance": str(entry["guidance"]), "model": entry["model"], "zmv": str(entry["zmv"]).lower(),
            "parameters": params, "Software": f"mvz {mvz.__version__}"}


def _note_truncated(model, prompts: list[str]) -> None:
    """Say (once per prompt) when the text encoders will see only the first 77 tokens, as ``mvz score`` does."""
    from mvz.cli.output import note

    tok = model.tokenizer
    limit = int(getattr(tok, "model_max_length", 77) or 77)
    for text in dict.fromkeys(prompts):
        n = len(tok(text, truncation=False)["input_ids"])
        if n > limit:
            short = text if len(text) <= 40 else text[:37] + "..."
            note(f"prompt {short!r} has {n} tokens; the text encoders see the first {limit}.")


def run_generate(req: GenerateRequest) -> list[Path]:
    from mvz.atomic import ensure_writable_dir
    from mvz.cli import checks, interrupts, output

    prompts = _check_request(req)  # before loading any model, or even torch
    paths = grid_paths(req, prompts)
    todo = _todo(req, paths)
    if req.out_dir is not None:
        ensure_writable_dir(req.out_dir, "--out-dir")
    else:
        ensure_writable_dir((req.out or Path("out.png")).parent, "the folder of --out")
    if not todo:
        output.note(f"all {len(paths)} grids exist already (--skip-existing); nothing to do.")
        return []

    import torch
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    from mvz.atomic import save_image, write_json
    from mvz.models.loading import load_model, resolve_device, resolve_dtype
    from mvz.pipeline import MultiviewPipeline, images_to_grid, validate_request
    from mvz.sidecar import generation_record

    cameras = _cameras(req)
    console = output.console(stderr=True, quiet=req.json_out)
    device = resolve_device(req.device)
    dtype = resolve_dtype(req.dtype, device)
    if device.type == "cuda" and req.resolution:
        props = torch.cuda.get_device_properties(device)
        checks.fits_memory(req.resolution, cameras.num_views, req.batch_size, props.total_memory, props.name)

    t_load = time.perf_counter()
    output.log(f"loading model {req.model} on {device}")
    with console.status(f"loading model {req.model}..."):
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
    output.log(f"loaded {model.info.name} in {load_s:.1f}s")
    res = req.resolution or model.info.default_resolution
    # fail on bad sizes before any output is written
    validate_request(prompts, req.steps, cameras.num_views, res, res, model.resolution_multiple)
    checks.fits_memory(res, cameras.num_views, req.batch_size)
    _note_truncated(model, [prompts[i] for i in todo])

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
    total_steps = len(todo) * req.steps
    with output.progress_bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                             TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("sampling", total=total_steps)
        for start in range(0, len(todo), req.batch_size):
            batch = todo[start : start + req.batch_size]
            chunk = [prompts[i] for i in batch]
            seeds = [req.seed + i for i in batch]  # a prompt keeps its seed when others are skipped
            output.log(f"sampling prompts {batch[0] + 1}-{batch[-1] + 1} of {len(prompts)}")
            done = progress.tasks[task].completed
            result = pipe.sample(
                chunk, seeds, steps=req.steps, guidance=req.guidance, cameras=cameras, height=res, width=res,
                zmv=req.zmv, zmv_steps=req.zmv_steps,
                on_step=lambda i, n, d=done, k=len(chunk): progress.update(task, completed=d + i * k),
            )
            for j, text in enumerate(chunk):
                grid_path = paths[batch[j]]
                views = result.images[j]
                entry = generation_record(
                    prompt=text, seed=seeds[j], grid=str(grid_path), steps=req.steps, guidance=req.guidance,
                    zmv=req.zmv, zmv_steps=req.zmv_steps, result=result, azimuths=cameras.azimuths,
                    elevation=cameras.elevation, resolution=res, model_info=model.info,
                    lora=str(req.lora) if req.lora else None, lora_scale=req.lora_scale, backend=backend_info,
                    device=device, dtype=dtype, load_s=load_s, prompts_in_call=len(chunk),
                )
                text_chunks = png_text(entry)
                if req.save_views:
                    view_paths = []
                    for v, az in enumerate(cameras.azimuths):
                        vp = grid_path.with_name(f"{grid_path.stem}_view{v}_az{az:g}.png")
                        save_image(vp, images_to_grid(views[v : v + 1]), text=text_chunks)
                        view_paths.append(str(vp))
                    entry["view_files"] = view_paths
                    write_json(grid_path.with_suffix(".json"), entry)
                save_image(grid_path, images_to_grid(views), text=text_chunks)  # last: a grid marks a complete set
                outputs.append(grid_path)
                summary.append(entry)
                if len(paths) > 1:
                    interrupts.set_outcome(f"{len(paths) - len(todo) + len(outputs)} of {len(paths)} grids in "
                                           f"{grid_path.parent}; resume with the same command plus --skip-existing")
                else:
                    interrupts.set_outcome(f"{grid_path} written")
            if device.type == "cuda":
                torch.cuda.synchronize()

    if req.json_out:
        print(json.dumps(summary if len(summary) > 1 else summary[0], indent=2))
    else:
        out = output.console(stderr=False)
        for entry in summary:
            t = entry["timings"]
            out.print(
                f"[green]wrote[/green] {entry['grid']}  ({len(cameras.azimuths)} views, {req.steps} steps, "
                f"{entry['nfe']} UNet calls, denoise {t['denoise_s']:.2f}s, decode {t.get('decode_s', 0):.2f}s)",
                highlight=False,
            )
    return outputs
