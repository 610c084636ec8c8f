"""The web page's request path without a browser (model-free runner, serve.fake): the same messages as the
API, the same bounded queue ("busy, retry in N s"), progress from the queue and the steps, result files in
azimuth order with a zip; and the page mounted at / beside the API, under a path prefix. Cheap."""

from __future__ import annotations

import asyncio
import json
import threading
import zipfile

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.app import create_app
from serve.fake import FakeRunner
from serve.service import LocalService
from serve.ui_request import (
    CUSTOM,
    EVENLY_SPACED,
    RANDOM_SEED_MAX,
    ResultStore,
    UiError,
    body_from_form,
    example_prompts,
    footer,
    run_request,
)

FORM = {"prompt": "a red chair", "seed": 7, "random_seed": False, "steps": 2, "guidance": 7.0,
        "preset": EVENLY_SPACED, "views": 4, "custom": "", "resolution": 16, "zmv": False, "lora_scale": None}


def _service(runner: FakeRunner, max_queue: int = 4) -> LocalService:
    return LocalService(lambda: runner, max_batch=runner.max_batch, window_s=0.0, max_queue=max_queue,
                        timeout_s=30.0, warmup=False)


async def _started(service: LocalService) -> LocalService:
    service.start()
    while not service.ready:
        await asyncio.sleep(0.01)
    return service


def _api_422(field_values: dict) -> str:
    """The API's message for a body (the one-line error the page must repeat)."""
    with TestClient(create_app(_service(FakeRunner()))) as client:
        while client.get("/healthz").status_code != 200:
            pass
        r = client.post("/v1/generate", json={"prompt": "a red chair", **field_values})
        assert r.status_code == 422
        d = r.json()["detail"][0]
        return f"{d['loc'][-1]}: {d['msg']}"


def test_bad_form_values_give_the_apis_message():
    with pytest.raises(UiError) as err:
        body_from_form(**{**FORM, "steps": 0})
    assert str(err.value) == _api_422({"steps": 0}) == "steps: Input should be greater than or equal to 1"
    with pytest.raises(UiError, match="azimuths: give degrees"):
        body_from_form(**{**FORM, "preset": CUSTOM, "custom": "0, north"})


def test_limits_of_the_server_give_the_apis_message():
    async def main():
        service = await _started(_service(FakeRunner()))
        with pytest.raises(UiError) as err:
            await run_request(service, body_from_form(**{**FORM, "views": 9}), lambda p: None)
        await service.stop()
        return str(err.value)

    assert asyncio.run(main()) == _api_422({"views": 9}) == "views: views must be at most 8, got 9."


def test_random_seed_is_drawn_and_reported_in_the_body():
    seeds = {body_from_form(**{**FORM, "random_seed": True}).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < RANDOM_SEED_MAX for s in seeds)
    assert body_from_form(**{**FORM, "preset": CUSTOM, "custom": "0, 90 180"}).azimuths == [0.0, 90.0, 180.0]


def test_page_requests_wait_in_the_same_bounded_queue_and_report_progress():
    gate = threading.Event()
    runner = FakeRunner(max_batch=1, gate=gate)

    async def main():
        service = await _started(_service(runner, max_queue=1))
        body = body_from_form(**FORM)
        first_seen: list = []
        second_seen: list = []
        first = asyncio.ensure_future(run_request(service, body, first_seen.append))
        while not first_seen or first_seen[-1].position is not None:  # the worker took it: the queue is empty
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(run_request(service, body, second_seen.append))
        while not second_seen:
            await asyncio.sleep(0.01)
        with pytest.raises(UiError) as busy:  # one waiting = max_queue: a third is refused, not piled up
            await run_request(service, body, lambda p: None)
        retry = service.retry_after_s()  # what the API's 429 would say now (its Retry-After)
        gate.set()
        outs = await asyncio.gather(first, second)
        await service.stop()
        return busy.value, retry, second_seen, outs

    busy, retry, seen, outs = asyncio.run(main())
    assert str(busy) == f"busy, retry in {retry} s"
    assert seen[0].position == 1 and seen[0].step is None
    assert [o.metadata["seed"] for o, _ in outs] == [7, 7]
    assert [key.azimuths for _, key in outs] == [(0.0, 90.0, 180.0, 270.0)] * 2
    assert runner.batches and all(len(b) == 1 for b in runner.batches)


def test_results_are_written_in_azimuth_order_with_a_zip(tmp_path):
    runner = FakeRunner()
    from serve.runner import BatchKey, Work

    azimuths = (180.0, 0.0, 90.0)
    out = runner.run(BatchKey(steps=2, guidance=7.0, azimuths=azimuths, height=16, width=16), [Work("a chair", 3)])[0]
    files = ResultStore(tmp_path).write(out, azimuths)
    assert [c for _, c in files.views] == ["azimuth 0°", "azimuth 90°", "azimuth 180°"]
    names = zipfile.ZipFile(files.archive).namelist()
    assert sorted(names) == sorted(["mvz_seed3.png", "mvz_seed3.json", "mvz_seed3_cameras.json",
                                    "mvz_seed3_view0_az180.png", "mvz_seed3_view1_az0.png", "mvz_seed3_view2_az90.png"])
    assert json.loads(zipfile.ZipFile(files.archive).read("mvz_seed3.json"))["seed"] == 3
    assert json.loads(Image.open(files.grid).text["mvz"])["seed"] == 3  # the page's PNGs carry the metadata
    cams = json.loads(zipfile.ZipFile(files.archive).read("mvz_seed3_cameras.json"))
    assert [(f["file_path"], f["azimuth_deg"]) for f in cams["frames"]] == [
        ("mvz_seed3_view0_az180.png", 180.0), ("mvz_seed3_view1_az0.png", 0.0), ("mvz_seed3_view2_az90.png", 90.0)]
    assert (cams["w"], cams["h"]) == (16, 16)


def test_examples_are_the_smoke_prompts():
    assert example_prompts() == ["a red wooden chair", "a ceramic teapot", "a toy robot", "a yellow rubber duck"]


def test_footer_says_the_state_before_the_model_is_loaded():
    assert footer(_service(FakeRunner())) == "model loading"


def test_page_is_mounted_at_root_beside_the_api_under_a_prefix():
    pytest.importorskip("gradio", reason="needs gradio (the ui extra)")
    app = create_app(_service(FakeRunner()), ui=True)
    with TestClient(app, root_path="/mvz") as client:  # what uvicorn --root-path /mvz gives the app
        while client.get("/healthz").status_code != 200:
            pass
        page = client.get("/")
        assert page.status_code == 200 and '"root":"http://testserver/mvz"' in page.text
        assert "url: '/mvz/openapi.json'" in client.get("/docs").text
        r = client.post("/v1/generate", json={"prompt": "a chair", "views": 2, "resolution": 16})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


class _SteppedRunner(FakeRunner):
    """Holds its batch after the first step until ``go_on`` is set."""

    def __init__(self):
        super().__init__(max_batch=1)
        self.go_on = threading.Event()

    def run(self, key, works, on_step=None):
        on_step(1, key.steps)
        self.go_on.wait(timeout=30)
        return super().run(key, works, on_step)


def test_page_requests_report_each_step_of_their_batch():
    runner = _SteppedRunner()

    async def main():
        service = await _started(_service(runner))
        seen: list = []
        task = asyncio.ensure_future(run_request(service, body_from_form(**FORM), seen.append))
        for _ in range(2000):  # the step report arrives while the batch is held (20 s at most)
            if any(p.step for p in seen):
                break
            await asyncio.sleep(0.01)
        runner.go_on.set()
        await task
        await service.stop()
        return seen

    steps = [p.step for p in asyncio.run(main()) if p.step]
    assert steps[0] == (1, 2)


@pytest.mark.parametrize(("args", "says"), [(["--root-path", "mvz"], "--root-path"),
                                            (["--root-path", "/mvz/"], "--root-path")])
def test_bad_ui_options_exit_2_with_one_line(args, says, capsys):
    from mvz.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "tiny", "--port", "0", *args])
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and says in lines[0]


def test_ui_without_gradio_is_refused(monkeypatch):
    from mvz.errors import InputError
    from serve import server

    monkeypatch.setattr(server, "ui_available", lambda: False)
    with pytest.raises(InputError, match="needs Gradio"):
        server.check_options(server.ServeOptions(ui=True))
    server.check_options(server.ServeOptions(ui=False))


def test_closing_a_tab_frees_its_queue_slot():
    pytest.importorskip("gradio", reason="needs gradio (the ui extra)")
    from types import SimpleNamespace

    from serve.ui import OpenTabs

    gate = threading.Event()
    runner = FakeRunner(max_batch=1, gate=gate)

    async def main():
        service = await _started(_service(runner))
        tabs = OpenTabs(service)
        body = body_from_form(**FORM)
        first_seen: list = []
        first = asyncio.ensure_future(run_request(service, body, first_seen.append))  # holds the worker
        while not first_seen or first_seen[-1].position is not None:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(run_request(service, body, lambda p: None,
                                                   lambda job: tabs.track("tab-1", job)))
        while len(service.queue) == 0:
            await asyncio.sleep(0.01)
        tabs.close(SimpleNamespace(session_hash="tab-1"))  # what Gradio's unload event passes
        depth = len(service.queue)
        with pytest.raises(UiError, match="cancelled"):
            await asyncio.wait_for(second, 10)
        gate.set()
        await first
        await service.stop()
        return depth

    assert asyncio.run(main()) == 0
    assert len(runner.batches) == 1  # the closed tab's request never ran
