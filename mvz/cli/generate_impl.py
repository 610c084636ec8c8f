"""The work behind ``mvz generate`` (kept out of the Typer module so ``mvz --help`` stays instant)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mvz import spec as sp
from mvz.errors import InputError


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
    seed: int = sp.DEFAULT_SEED
    steps: int = sp.DEFAULT_STEPS
    guidance: float = sp.DEFAULT_GUIDANCE
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


def sample_spec(req: GenerateRequest, batch: int = 1) -> sp.SampleSpec:
    """The request's sampling spec, checked by the house limits (no model, no torch yet). The LoRA scale is
    checked even without --lora, and travels only with one (the model is loaded at that scale)."""
    from mvz.cli import checks
    from mvz.cli.common import parse_csv_floats

    azimuths = parse_csv_floats(req.azimuths, "--azimuths") if req.azimuths else None
    spec = sp.SampleSpec.build(views=req.views, azimuths=azimuths, resolution=req.resolution, steps=req.steps,
                               guidance=req.guidance, elevation=req.elevation, zmv=req.zmv, zmv_steps=req.zmv_steps,
                               lora_scale=req.lora_scale)
    checks.fits_memory(req.resolution, spec.views, batch)  # before the numbers: says how much is needed
    spec.check(sp.HOUSE_LIMITS.narrowed(lora_scale_settable=True))
    return replace(spec, lora_scale=req.lora_scale if req.lora else None)


def _check_request(req: GenerateRequest) -> tuple[list[str], sp.SampleSpec]:
    """Everything that can be checked before loading a model (and before importing torch): the prompts and
    the sampling spec."""
    from engines import registry
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
    checks.at_least(req.batch_size, "--batch-size")
    checks.resolution(req.resolution)
    checks.seed(req.seed, len(prompts))
    spec = sample_spec(req, min(req.batch_size, len(prompts)))
    if req.overwrite and req.skip_existing:
        raise InputError("--overwrite and --skip-existing contradict each other.", "Pass one of them.")
    registry.get(req.backend)
    _check_outputs(req)
    return prompts, spec


def _check_outputs(req: GenerateRequest) -> None:
    if req.out is not None and req.out.is_dir():
        raise InputError(f"--out {req.out} is a folder.", f"Name a .png file (e.g. {req.out / 'out.png'}) or pass --out-dir {req.out}.")
    if req.out is not None and req.out.suffix.lower() != ".png":
        raise InputError(f"--out {req.out} must be a .png file.")
    if req.out_dir is not None and req.out_dir.exists() and not req.out_dir.is_dir():
        raise InputError(f"--out-dir {req.out_dir} is a file.", "Pass a folder (it is created if missing).")
    if req.lora is not None and not req.lora.exists():
        raise InputError(f"LoRA {req.lora} does not exist.", "Pass the path of a mvczigal_lcm_sdxl_lora.safetensors file.")


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
    from mvz.cli import output

    prompts, spec = _check_request(req)  # before loading any model, or even torch
    paths = grid_paths(req, prompts)
    todo = _todo(req, paths)
    if req.out_dir is not None:
        ensure_writable_dir(req.out_dir, "--out-dir")
    else:
        ensure_writable_dir((req.out or Path("out.png")).parent, "the folder of --out")
    if not todo:
        output.note(f"all {len(paths)} grids exist already (--skip-existing); nothing to do.")
        return []
    console = output.console(stderr=True, quiet=req.json_out)
    session, spec, load_s = _open(req, spec, console)
    _note_truncated(session.model, [prompts[i] for i in todo])
    summary = _sample_all(req, session, spec, prompts, paths, todo, load_s, console)
    _report(req, summary, spec)
    return [Path(entry["grid"]) for entry in summary]


def _open(req: GenerateRequest, spec: sp.SampleSpec, console):
    """Load the model and open its session (engines checked, rebuilt when a refit is refused); the spec gets
    the model's size and is checked against what the session serves before anything is written."""
    import torch

    from engines.session import BackendSpec, open_session, session_limits
    from mvz.cli import checks, output
    from mvz.models.loading import load_model, resolve_device, resolve_dtype

    device = resolve_device(req.device)
    dtype = resolve_dtype(req.dtype, device)
    if device.type == "cuda" and req.resolution:
        props = torch.cuda.get_device_properties(device)
        checks.fits_memory(req.resolution, spec.views, req.batch_size, props.total_memory, props.name)
    t_load = time.perf_counter()
    output.log(f"loading model {req.model} on {device}")
    with console.status(f"loading model {req.model}..."):
        model = load_model(req.model, base_model=req.base_model, unet_model=req.unet_model, vae_model=req.vae_model,
                           adapter=req.adapter, random_weights=req.random_weights, device=device, dtype=dtype,
                           lora=str(req.lora) if req.lora else None, lora_scale=req.lora_scale)
    load_s = time.perf_counter() - t_load
    output.log(f"loaded {model.info.name} in {load_s:.1f}s")
    spec = spec.sized(model.info.default_resolution)
    backend = BackendSpec(req.backend, req.engines, num_views=spec.views, height=spec.height, width=spec.width,
                          batch=req.batch_size, device=device)
    spec.check(session_limits(model, backend))  # fail on bad sizes before any output is written
    checks.fits_memory(spec.height, spec.views, req.batch_size)
    session = open_session(model, backend, say=lambda line: console.print(f"[yellow]{line}[/yellow]", highlight=False))
    return session, spec, load_s


def _sample_all(req: GenerateRequest, session, spec: sp.SampleSpec, prompts: list[str], paths: list[Path],
                todo: list[int], load_s: float, console) -> list[dict]:
    """Sample the prompts to do, ``--batch-size`` at a time, writing each grid as its batch finishes."""
    import torch
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    from mvz.cli import output

    summary: list[dict] = []
    with output.progress_bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                             TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("sampling", total=len(todo) * spec.steps)
        for start in range(0, len(todo), req.batch_size):
            batch = todo[start : start + req.batch_size]
            chunk = [prompts[i] for i in batch]
            seeds = [req.seed + i for i in batch]  # a prompt keeps its seed when others are skipped
            output.log(f"sampling prompts {batch[0] + 1}-{batch[-1] + 1} of {len(prompts)}")
            done = progress.tasks[task].completed
            result = session.sample(chunk, seeds, spec,
                                    on_step=lambda i, n, d=done, k=len(chunk): progress.update(task, completed=d + i * k))
            for j, text in enumerate(chunk):
                entry = _record(req, session, spec, text, seeds[j], paths[batch[j]], result, len(chunk), load_s)
                _write_grid(req, entry, result.images[j], spec)
                summary.append(entry)
                _set_outcome(paths, todo, summary, paths[batch[j]])
            if session.model.device.type == "cuda":
                torch.cuda.synchronize()
    return summary


def _record(req: GenerateRequest, session, spec: sp.SampleSpec, text: str, seed: int, grid_path: Path, result,
            prompts_in_call: int, load_s: float) -> dict:
    from mvz.sidecar import generation_record

    model = session.model
    return generation_record(
        prompt=text, seed=seed, grid=str(grid_path), steps=spec.steps, guidance=spec.guidance, zmv=spec.zmv,
        zmv_steps=spec.zmv_steps, result=result, azimuths=spec.azimuths, elevation=spec.elevation,
        resolution=spec.height, model_info=model.info, lora=str(req.lora) if req.lora else None,
        lora_scale=req.lora_scale, backend=session.info(), device=model.device, dtype=model.dtype, load_s=load_s,
        prompts_in_call=prompts_in_call,
    )


def _write_grid(req: GenerateRequest, entry: dict, views, spec: sp.SampleSpec) -> None:
    """The per-view PNGs and sidecar (with --save-views), then the grid: last, so a grid marks a complete set."""
    from mvz.atomic import save_image, write_json
    from mvz.models.camera_file import cameras_record
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import images_to_grid
    from mvz.png_metadata import png_text

    grid_path = Path(entry["grid"])
    view_paths = [grid_path.with_name(f"{grid_path.stem}_view{v}_az{az:g}.png") for v, az in enumerate(spec.azimuths)]
    cameras = cameras_record(CameraSet(spec.azimuths, spec.elevation), [p.name for p in view_paths],
                             spec.width, spec.height)
    text_chunks = png_text(entry, cameras if req.save_views else None)  # frames name files that exist
    if req.save_views:
        for v, vp in enumerate(view_paths):
            save_image(vp, images_to_grid(views[v : v + 1]), text=text_chunks)
        entry["view_files"] = [str(vp) for vp in view_paths]
        entry["cameras"] = str(grid_path.with_name(f"{grid_path.stem}_cameras.json"))
        write_json(entry["cameras"], cameras)
        write_json(grid_path.with_suffix(".json"), entry)
    save_image(grid_path, images_to_grid(views), text=text_chunks)


def _set_outcome(paths: list[Path], todo: list[int], summary: list[dict], grid_path: Path) -> None:
    from mvz.cli import interrupts

    if len(paths) > 1:
        interrupts.set_outcome(f"{len(paths) - len(todo) + len(summary)} of {len(paths)} grids in "
                               f"{grid_path.parent}; resume with the same command plus --skip-existing")
    else:
        interrupts.set_outcome(f"{grid_path} written")


def _report(req: GenerateRequest, summary: list[dict], spec: sp.SampleSpec) -> None:
    from mvz.cli import output

    if req.json_out:
        print(json.dumps(summary if len(summary) > 1 else summary[0], indent=2))
        return
    out = output.console(stderr=False)
    for entry in summary:
        t = entry["timings"]
        out.print(
            f"[green]wrote[/green] {entry['grid']}  ({spec.views} views, {spec.steps} steps, "
            f"{entry['nfe']} UNet calls, denoise {t['denoise_s']:.2f}s, decode {t.get('decode_s', 0):.2f}s)",
            highlight=False,
        )
