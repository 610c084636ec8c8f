"""The web page's requests, without Gradio: form values -> the API's request body -> the same bounded queue.

The page builds a :class:`serve.schema.GenerateBody` from its controls and checks it with
:func:`serve.schema.resolve` against the server's limits, exactly as ``POST /v1/generate`` does, so a bad
value fails with the API's message (:class:`UiError`, one line). It then waits in the service's queue (and
batch) like any API request, reporting its queue position and each denoising step, and writes the result
as files the page can show and download.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from mvz.models.cameras import DEFAULT_AZIMUTHS
from serve.batching import QueueFullError
from serve.schema import FieldError, GenerateBody, resolve
from serve.service import BatchFailedError, NotReadyError

POLL_S = 0.1
RANDOM_SEED_MAX = 2**31 - 1
# the camera presets of the page: (label, azimuths); "evenly spaced" and "custom" take the views/azimuths boxes
AZIMUTH_PRESETS = {
    "paper's 6 views": DEFAULT_AZIMUTHS,
    "4 orthogonal": (0.0, 90.0, 180.0, 270.0),
}
EVENLY_SPACED = "N evenly spaced"
CUSTOM = "custom azimuths"
KEPT_RESULTS = 32  # result folders kept on disk (Gradio serves its own copies)


class UiError(Exception):
    """A request the page refuses or that failed: one line, the API's wording."""


def example_prompts() -> list[str]:
    """The one-click examples: ``bench/prompts/smoke.txt``."""
    from mvz.prompts import read_prompt_file

    return read_prompt_file(Path(str(resources.files("bench").joinpath("prompts", "smoke.txt"))))


def body_from_form(prompt: str, seed, random_seed: bool, steps, guidance, preset: str, views, custom: str,
                   resolution, zmv: bool, lora_scale) -> GenerateBody:
    """The API body of the form's values (a random seed drawn here, so the page can show it)."""
    fields: dict = {"prompt": prompt, "seed": secrets.randbelow(RANDOM_SEED_MAX) if random_seed else seed,
                    "steps": steps, "guidance": guidance, "resolution": resolution, "zmv": zmv}
    if preset in AZIMUTH_PRESETS:
        fields["azimuths"] = list(AZIMUTH_PRESETS[preset])
    elif preset == CUSTOM:
        fields["azimuths"] = parse_azimuths(custom)
    else:
        fields["views"] = views
    if lora_scale is not None:
        fields["lora_scale"] = lora_scale
    try:
        return GenerateBody(**fields)
    except ValidationError as err:
        e = err.errors()[0]
        raise UiError(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}") from None


def parse_azimuths(text: str) -> list[float]:
    try:
        return [float(a) for a in (text or "").replace(",", " ").split()]
    except ValueError:
        raise UiError("azimuths: give degrees separated by commas, e.g. 0, 90, 180, 270") from None


@dataclass
class Progress:
    """What a waiting request reports: its place in the queue, then the steps of its batch."""

    position: int | None
    step: tuple[int, int] | None


async def run_request(service, body: GenerateBody, report: Callable[[Progress], None],
                      on_queued: Callable[[object], None] | None = None):
    """Queue ``body`` like ``POST /v1/generate``; wait for its :class:`serve.runner.Output` (and return it
    with its batch key: the azimuths the views are in)."""
    try:
        key, work = resolve(body, service.limits)
        job = service.enqueue(key, work)
    except FieldError as err:
        raise UiError(f"{err.field}: {err.message}") from None
    except NotReadyError:
        raise UiError(f"the model is {service.state}; retry in a few seconds.") from None
    except QueueFullError:
        raise UiError(f"busy, retry in {service.retry_after_s()} s") from None
    if on_queued:
        on_queued(job)  # the page can abandon it when its tab closes
    m = service.metrics
    m.in_flight.inc()
    deadline = time.monotonic() + service.timeout_s
    status = "499"
    try:
        while not job.future.done():
            if time.monotonic() > deadline:
                status = "504"
                raise UiError(f"timed out after {service.timeout_s:g}s.")
            report(Progress(service.queue.position(job), job.step))
            await asyncio.wait({job.future}, timeout=POLL_S)
        if job.future.cancelled():
            raise UiError("cancelled: the page was closed.")
        try:
            out = job.future.result()
        except BatchFailedError as err:
            status = "500"
            raise UiError(str(err)) from None
        status = "200"
        return out, key
    finally:
        if not job.future.done():  # timed out, or the page went away: free the slot like the API does
            service.abandon(job)
        m.in_flight.dec()
        m.requests.labels(status=status).inc()


@dataclass
class ResultFiles:
    views: list[tuple[str, str]]  # (path, caption) in azimuth order
    grid: str
    sidecar: str
    archive: str


class ResultStore:
    """One folder per result under ``root``; the oldest go once ``KEPT_RESULTS`` are there."""

    def __init__(self, root: Path):
        self.root = root
        self._count = 0

    def write(self, out, azimuths) -> ResultFiles:
        from mvz.pipeline import images_to_grid
        from mvz.png_metadata import png_text, pnginfo

        self._count += 1
        folder = self.root / f"{self._count:06d}-{secrets.token_hex(4)}"
        folder.mkdir(parents=True)
        self._prune()
        meta = out.metadata
        text = pnginfo(png_text(meta))  # the same chunks as the API's and mvz generate's PNGs
        stem = f"mvz_seed{meta.get('seed', 0)}"
        order = sorted(range(len(azimuths)), key=lambda v: azimuths[v] % 360)
        views = []
        for v in order:
            path = folder / f"{stem}_view{v}_az{azimuths[v]:g}.png"
            images_to_grid(out.images[v:v + 1]).save(path, pnginfo=text)
            views.append((str(path), f"azimuth {azimuths[v]:g}°"))
        grid = folder / f"{stem}.png"
        images_to_grid(out.images).save(grid, pnginfo=text)
        sidecar = folder / f"{stem}.json"
        sidecar.write_text(json.dumps(meta, indent=2, default=str))
        cameras = folder / f"{stem}_cameras.json"
        cameras.write_text(json.dumps(_cameras(out, azimuths, meta, stem), indent=2))
        archive = folder / f"{stem}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in [grid, sidecar, cameras, *(Path(p) for p, _ in views)]:
                zf.write(path, path.name)
        return ResultFiles(views, str(grid), str(sidecar), str(archive))

    def _prune(self) -> None:
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        for old in folders[:-KEPT_RESULTS]:
            shutil.rmtree(old, ignore_errors=True)


def footer(service) -> str:
    """Model, backend, device and the last request's measured timings (Markdown, one line)."""
    runner = service.runner
    if runner is None:
        return f"model {service.state}"
    model = getattr(getattr(getattr(runner, "model", None), "info", None), "name", "?")
    backend = getattr(runner, "backend_info", {}).get("name", "?")
    parts = [f"model **{model}**", f"backend **{backend}**", f"device **{getattr(runner, 'device', '?')}**"]
    t = service.last_timings
    if t:
        stages = [f"{name[:-2]} {t[name]:.2f} s" for name in ("conditioning_s", "denoise_s", "decode_s", "batch_s")
                  if isinstance(t.get(name), (int, float))]
        parts.append("last request: " + ", ".join(stages) + f" (batch of {t.get('prompts_in_call', 1)})")
    return " · ".join(parts)


def _cameras(out, azimuths, meta: dict, stem: str) -> dict:
    """``cameras.json`` for the views as written (file names by view index, as mvz generate names them)."""
    from mvz.models.camera_file import cameras_record
    from mvz.models.cameras import CameraSet

    views = meta.get("views") or [{}]
    height, width = out.images.shape[-2:]
    names = [f"{stem}_view{v}_az{az:g}.png" for v, az in enumerate(azimuths)]
    return cameras_record(CameraSet(tuple(azimuths), float(views[0].get("elevation", 0.0))), names, width, height)
