"""The web page of ``mvz serve``: Gradio Blocks mounted at ``/`` of the API's FastAPI app (extra ``ui``).

Layout only: the form's values become the API's request body and go through the service's own bounded
queue and batching (:mod:`serve.ui_request`), so two browsers generating at once share UNet calls, a full
queue says "busy, retry in N s", and an error is the API's one-line message. The controls take their
defaults and bounds from :class:`serve.schema.GenerateBody` and, once the model is loaded, the server's
:class:`serve.runner.Limits` (views, resolution, LoRA weight).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from serve.schema import GenerateBody
from serve.service import NotReadyError
from serve.ui_request import (
    AZIMUTH_PRESETS,
    CUSTOM,
    EVENLY_SPACED,
    Progress,
    ResultStore,
    UiError,
    body_from_form,
    example_prompts,
    footer,
    run_request,
)

TITLE = "mvz: text to multiview"
CSS = "#status p { margin: 0; } footer { display: none !important; }"


def _default(name: str):
    return GenerateBody.model_fields[name].default


def _bound(name: str, kind: str):
    """The ``ge``/``le`` bound of a request field (the schema is the one place for them)."""
    return next(getattr(m, kind) for m in GenerateBody.model_fields[name].metadata if hasattr(m, kind))


def _report(progress: gr.Progress, p: Progress) -> None:
    if p.step is not None:
        progress(p.step, desc=f"step {p.step[0]}/{p.step[1]}", unit="steps")
    elif p.position is not None:
        progress(0.0, desc=f"queued: position {p.position}")


def build_ui(service) -> gr.Blocks:
    store = ResultStore(Path(tempfile.mkdtemp(prefix="mvz-ui-")))
    tabs = OpenTabs(service)
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nSix consistent views of an object from a prompt, in a few steps. "
                    "The same queue and batching as `POST /v1/generate` ([API docs](docs)).")
        with gr.Row():
            with gr.Column(scale=3):
                c = _form()
            with gr.Column(scale=4):
                c.gallery = gr.Gallery(label="views (azimuth order)", columns=6, height=300, format="png",
                                       buttons=["download"], interactive=False, elem_id="views-out")
                c.grid = gr.Image(label="grid", type="filepath", format="png", buttons=["download"],
                                  interactive=False, elem_id="grid")
                c.archive = gr.File(label="everything (grid, views, JSON sidecar) as a zip", elem_id="zip")
        c.footer = gr.Markdown(elem_id="mvz-footer")
        inputs = [c.prompt, c.seed, c.random_seed, c.steps, c.guidance, c.preset, c.views, c.custom,
                  c.resolution, c.zmv, c.lora]
        outputs = [c.gallery, c.grid, c.archive, c.seed, c.status, c.footer]
        # concurrency_limit=None: every click reaches the service's queue at once, which batches and bounds them
        c.generate.click(_generate_handler(service, store, tabs, c), inputs, outputs, concurrency_limit=None,
                         api_name="generate")
        demo.load(_load_handler(service, c), None, [c.views, c.resolution, c.lora, c.status, c.footer])
        demo.unload(tabs.close)
    return demo


def _form() -> SimpleNamespace:
    """The controls (defaults and bounds from the request schema; the server's limits come on load)."""
    c = SimpleNamespace()
    c.prompt = gr.Textbox(label="prompt", lines=2, max_length=_bound("prompt", "max_length"),
                          placeholder="a red wooden chair", elem_id="prompt")
    gr.Examples([[p] for p in example_prompts()], inputs=[c.prompt], label="examples (one click)")
    with gr.Row():
        c.seed = gr.Number(label="seed", value=_default("seed"), precision=0, elem_id="seed")
        c.random_seed = gr.Checkbox(label="random seed (shows the seed used)", elem_id="random-seed")
    with gr.Row():
        c.steps = gr.Number(label=f"steps ({_bound('steps', 'ge')}-{_bound('steps', 'le')})",
                            value=_default("steps"), precision=0, elem_id="steps")
        c.guidance = gr.Number(label="guidance", value=_default("guidance"), elem_id="guidance")
        c.resolution = gr.Number(label="resolution (px)", precision=0, elem_id="resolution")
    c.preset = gr.Radio([*AZIMUTH_PRESETS, EVENLY_SPACED, CUSTOM], value=next(iter(AZIMUTH_PRESETS)),
                        label="cameras", elem_id="preset")
    with gr.Row():
        c.views = gr.Slider(1, 16, value=6, step=1, label="views (N evenly spaced)", elem_id="views")
        c.custom = gr.Textbox(label="custom azimuths (degrees)", placeholder="0, 90, 180, 270", elem_id="azimuths")
    with gr.Row():
        c.zmv = gr.Checkbox(label="ZMV-Sampling", value=_default("zmv"), elem_id="zmv")
        c.lora = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA weight", visible=False, elem_id="lora")
    c.generate = gr.Button("Generate", variant="primary", elem_id="generate")
    c.status = gr.Markdown(elem_id="status")
    return c


def _load_handler(service, c: SimpleNamespace):
    """On page load: the controls follow the server's limits; the footer says what runs."""

    def on_load():
        try:
            lim = service.limits
        except NotReadyError:
            return {c.status: f"the model is {service.state}; reload the page in a few seconds.",
                    c.footer: footer(service)}
        has_lora = lim.lora_scale is not None
        return {
            c.views: gr.update(maximum=lim.max_views, value=lim.fixed_views or min(6, lim.max_views),
                               interactive=lim.fixed_views is None),
            c.resolution: gr.update(value=lim.fixed_resolution or lim.default_resolution,
                                    interactive=lim.fixed_resolution is None,
                                    label=f"resolution (px; a multiple of {lim.resolution_multiple}, "
                                          f"at most {lim.max_resolution})"),
            c.lora: gr.update(visible=has_lora, value=lim.lora_scale if has_lora else 1.0,
                              interactive=lim.lora_scale_settable,
                              label="LoRA weight" + ("" if lim.lora_scale_settable else " (baked into the engines)")),
            c.status: "", c.footer: footer(service),
        }

    return on_load


class OpenTabs:
    """The queued jobs of each browser tab (Gradio session), so that closing the tab frees their queue slots."""

    def __init__(self, service):
        self.service = service
        self._jobs: dict[str, set] = {}

    def track(self, session: str, job) -> None:
        self._jobs.setdefault(session, set()).add(job)
        job.future.add_done_callback(lambda _: self._jobs.get(session, set()).discard(job))

    def close(self, request: gr.Request) -> None:
        """Gradio's unload event (the tab closed or reloaded): abandon its jobs still waiting or running."""
        for job in list(self._jobs.pop(request.session_hash, ())):
            if not job.future.done():
                self.service.abandon(job)


def _generate_handler(service, store: ResultStore, tabs: OpenTabs, c: SimpleNamespace):
    async def on_generate(prompt, seed, random_seed, steps, guidance, preset, views, custom, resolution, zmv,
                          lora, request: gr.Request, progress=gr.Progress()):
        t0 = time.perf_counter()
        try:
            has_lora = service.ready and service.limits.lora_scale is not None
            body = body_from_form(prompt, seed, random_seed, steps, guidance, preset, views, custom, resolution,
                                  zmv, lora if has_lora else None)
            out, key = await run_request(service, body, lambda p: _report(progress, p),
                                         lambda job: tabs.track(request.session_hash, job))
            files = store.write(out, key.azimuths)
        except UiError as err:
            return {c.gallery: None, c.grid: None, c.archive: None, c.status: f"error: {err}",
                    c.footer: footer(service)}
        batch = out.metadata.get("timings", {}).get("prompts_in_call", 1)
        return {c.gallery: files.views, c.grid: files.grid, c.archive: files.archive, c.seed: body.seed,
                c.status: f"seed {body.seed} · {len(files.views)} views · batch of {batch} · "
                          f"{time.perf_counter() - t0:.2f} s", c.footer: footer(service)}

    return on_generate


def mount_ui(app, service):
    """Mount the page at ``/`` of ``app`` (mount it last: the API's routes match first)."""
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=None)
    return gr.mount_gradio_app(app, demo, path="/", show_error=False,
                               footer_links=[], css=CSS)
