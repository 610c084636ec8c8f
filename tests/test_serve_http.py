"""The HTTP layer over a model-free runner (serve.fake): backpressure, timeouts, disconnects, failures,
and a schemathesis fuzz of the OpenAPI spec. Real uvicorn on loopback; cheap (no model)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from serve.app import create_app
from serve.fake import FakeRunner
from serve.server import ThreadedServer
from serve.service import LocalService


@contextmanager
def fake_server(runner: FakeRunner, *, max_queue: int = 8, window_s: float = 0.0, timeout_s: float = 30.0):
    service = LocalService(lambda: runner, max_batch=runner.max_batch, window_s=window_s, max_queue=max_queue,
                           timeout_s=timeout_s)
    with ThreadedServer(create_app(service)) as srv:
        wait_until(lambda: service.ready)
        yield srv.url, service


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def post_in_thread(url: str, body: dict, results: dict, name: str, timeout: float = 30.0) -> threading.Thread:
    def go():
        try:
            results[name] = httpx.post(url + "/v1/generate", json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            results[name] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


BODY = {"prompt": "a red chair", "steps": 2, "views": 2}


def test_full_queue_answers_429_with_retry_after():
    gate = threading.Event()
    runner = FakeRunner(max_batch=1, gate=gate)
    with fake_server(runner, max_queue=2) as (url, service):
        res: dict = {}
        threads = [post_in_thread(url, {**BODY, "seed": 0}, res, "running")]
        wait_until(lambda: service.metrics.in_flight._value.get() == 1 and len(service.queue) == 0)
        threads += [post_in_thread(url, {**BODY, "seed": i}, res, f"q{i}") for i in (1, 2)]
        wait_until(lambda: len(service.queue) == 2)
        full = httpx.post(url + "/v1/generate", json=BODY, timeout=10)
        assert full.status_code == 429
        assert int(full.headers["Retry-After"]) >= 1
        gate.set()
        for t in threads:
            t.join(30)
        assert [res[k].status_code for k in ("running", "q1", "q2")] == [200, 200, 200]
        assert 'mvz_requests_total{status="429"} 1.0' in httpx.get(url + "/metrics").text


def test_timed_out_request_frees_its_slot_and_others_finish():
    gate = threading.Event()
    runner = FakeRunner(max_batch=1, gate=gate)
    with fake_server(runner, max_queue=1) as (url, service):
        res: dict = {}
        first = post_in_thread(url, {**BODY, "seed": 0}, res, "running")
        wait_until(lambda: service.metrics.in_flight._value.get() == 1 and len(service.queue) == 0)
        late = httpx.post(url + "/v1/generate", json={**BODY, "seed": 1, "timeout_s": 1.0}, timeout=10)
        assert late.status_code == 504
        assert len(service.queue) == 0  # its slot is free again: the next one is accepted, not 429
        after = post_in_thread(url, {**BODY, "seed": 2}, res, "after")
        wait_until(lambda: len(service.queue) == 1)
        gate.set()
        first.join(30)
        after.join(30)
        assert res["running"].status_code == 200 and res["after"].status_code == 200
        assert [w.seed for b in runner.batches for w in b] == [0, 2]  # the timed-out one never ran


def test_disconnected_client_is_dropped_without_running():
    gate = threading.Event()
    runner = FakeRunner(max_batch=1, gate=gate)
    with fake_server(runner, max_queue=4) as (url, service):
        res: dict = {}
        first = post_in_thread(url, {**BODY, "seed": 0}, res, "running")
        wait_until(lambda: service.metrics.in_flight._value.get() == 1 and len(service.queue) == 0)
        gone = post_in_thread(url, {**BODY, "seed": 1}, res, "gone", timeout=0.5)  # client gives up, closes
        gone.join(10)
        assert isinstance(res["gone"], httpx.TimeoutException)
        wait_until(lambda: len(service.queue) == 0, timeout=5)  # the server noticed and freed the slot
        gate.set()
        first.join(30)
        assert res["running"].status_code == 200
        assert [w.seed for b in runner.batches for w in b] == [0]


def test_failing_batch_fails_only_its_requests():
    runner = FakeRunner(max_batch=4, fail_on="boom")
    with fake_server(runner) as (url, _):
        bad = httpx.post(url + "/v1/generate", json={**BODY, "prompt": "boom"}, timeout=10)
        assert bad.status_code == 500 and "injected failure" in bad.json()["detail"]
        ok = httpx.post(url + "/v1/generate", json=BODY, timeout=10)
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
        assert httpx.get(url + "/healthz").json() == {"status": "ready"}


def test_healthz_is_503_until_loaded():
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return FakeRunner()

    service = LocalService(slow_load, max_batch=4, window_s=0.0, max_queue=4, timeout_s=10)
    with ThreadedServer(create_app(service)) as srv:
        assert httpx.get(srv.url + "/healthz").status_code == 503
        assert httpx.post(srv.url + "/v1/generate", json=BODY).status_code == 503
        loaded.set()
        wait_until(lambda: service.ready)
        assert httpx.get(srv.url + "/healthz").status_code == 200


# ---- schema fuzz ----------------------------------------------------------------------------------------
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)


def test_fuzzed_requests_get_no_5xx():
    """Schema-driven requests (valid and invalid bodies) to every route of the OpenAPI spec: never a 5xx."""
    from hypothesis import given
    from schemathesis.checks import not_a_server_error

    with fake_server(FakeRunner(max_batch=4), max_queue=64) as (url, _):
        api = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [result.ok() for result in api.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/generate", "/healthz", "/metrics"}
        from schemathesis.generation.modes import GenerationMode

        for op, mode in [(op, mode) for op in operations for mode in GenerationMode
                         if op.method.upper() == "POST" or mode == GenerationMode.POSITIVE]:
            @given(case=op.as_strategy(mode))
            @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
            def call(case):
                case.call_and_validate(checks=[not_a_server_error])

            call()


def test_load_test_reports_throughput_latency_and_batches():
    import asyncio

    from bench.load_test import format_report, run_load

    runner = FakeRunner(max_batch=4)
    with fake_server(runner, window_s=0.05, max_queue=16) as (url, _):
        report = asyncio.run(run_load(url, clients=4, duration_s=1.0, body={"steps": 2, "views": 2}))
    ran = [len(b) for b in runner.batches]
    assert report["ok"] == report["requests"] == sum(ran) > 0 and report["errors"] == {}
    assert report["batch_sizes"] == {k: ran.count(k) for k in set(ran)}
    assert max(report["batch_sizes"]) > 1
    assert report["latency_s"]["p50"] <= report["latency_s"]["p99"]
    assert "req/s" in format_report(report)
    assert set(report["server_stage_mean_s"]) >= {"queue", "total", "encode"}


def test_served_pngs_carry_generate_s_metadata():
    """The grid PNG and every base64 view carry the A1111 ``parameters`` line and the ``mvz`` JSON chunk
    (nothing under ComfyUI's ``prompt``/``workflow`` keys), as ``mvz generate``'s files do."""
    import base64
    import io
    import json

    from PIL import Image

    from mvz.png_metadata import parse_parameters

    with fake_server(FakeRunner(max_batch=4)) as (url, _):
        grid = httpx.post(url + "/v1/generate", json=BODY, timeout=10)
        views = httpx.post(url + "/v1/generate", json={**BODY, "format": "json"}, timeout=10).json()["images"]
    for raw in [grid.content, *(base64.b64decode(v) for v in views)]:
        text = Image.open(io.BytesIO(raw)).text
        assert "prompt" not in text and "workflow" not in text
        meta = json.loads(text["mvz"])
        assert (meta["prompt"], meta["seed"]) == (BODY["prompt"], BODY.get("seed", meta["seed"]))
        assert parse_parameters(text["parameters"])["Seed"] == str(meta["seed"])
