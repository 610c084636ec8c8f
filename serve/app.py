"""The HTTP API over a service: ``POST /v1/generate``, ``GET /healthz``, ``GET /metrics`` (FastAPI).

A service is anything with ``start()``, ``await stop()``, ``ready``/``state``/``error``, ``limits``,
``metrics``, ``timeout_s``, ``enqueue(key, work) -> job``, ``await result(job)``, ``abandon(job)`` and
``retry_after_s()``: :class:`serve.service.LocalService` (one process) or the Ray Serve replica's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from serve.batching import QueueFullError
from serve.schema import FieldError, GenerateBody, resolve
from serve.service import BatchFailedError, NotReadyError

DISCONNECT_POLL_S = 0.25

PNG_RESPONSES = {
    200: {"content": {"image/png": {}, "application/json": {}},
          "description": "The 1xV grid PNG (format=png) or per-view PNGs (base64) and metadata (format=json)."},
    429: {"description": "The queue is full; retry after the Retry-After seconds."},
    500: {"description": "The batch this request ran in failed (the server keeps serving)."},
    503: {"description": "The model is not loaded yet (see /healthz)."},
    504: {"description": "The request timed out before its batch finished."},
}


def _png(images, metadata: dict) -> bytes:
    """PNG bytes carrying the same text chunks as ``mvz generate``'s files (A1111 ``parameters`` + ``mvz`` JSON)."""
    from mvz.pipeline import images_to_grid
    from mvz.png_metadata import png_text, pnginfo

    buf = io.BytesIO()
    images_to_grid(images).save(buf, format="PNG", pnginfo=pnginfo(png_text(metadata)))
    return buf.getvalue()


def encode_output(out, fmt: str) -> tuple[bytes | dict, str]:
    """A result as the response body: the grid PNG, or per-view PNGs (base64) + the sidecar metadata."""
    if fmt == "png":
        return _png(out.images, out.metadata), "image/png"
    views = [base64.b64encode(_png(out.images[v:v + 1], out.metadata)).decode("ascii") for v in range(out.images.shape[0])]
    return {"images": views, "metadata": out.metadata}, "application/json"


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def create_app(service, *, ui: bool = False) -> FastAPI:
    """The API; ``ui`` mounts the web page at ``/`` (needs the ``ui`` extra). A path prefix (``--root-path``)
    is the ASGI server's ``root_path``: /docs and the page's links and assets follow it."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await service.stop()

    app = FastAPI(title="mvz serve", version="1", lifespan=lifespan,
                  description="Text-to-multiview generation with dynamic batching over any mvz backend.")
    m = service.metrics

    @app.get("/healthz")
    async def healthz():
        if service.ready:
            return {"status": "ready"}
        return JSONResponse({"status": service.state, "error": service.error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/generate", responses=PNG_RESPONSES)
    async def generate(body: GenerateBody, request: Request):
        t0 = time.perf_counter()
        try:
            key, work = resolve(body, service.limits)
            job = service.enqueue(key, work)
        except FieldError as err:
            m.requests.labels(status="422").inc()
            return JSONResponse({"detail": err.detail()}, status_code=422)
        except NotReadyError:
            m.requests.labels(status="503").inc()
            return _error(503, f"the model is {service.state}; see /healthz.", **{"Retry-After": "5"})
        except QueueFullError as err:
            m.requests.labels(status="429").inc()
            return _error(429, f"server busy: {err}.", **{"Retry-After": str(service.retry_after_s())})
        timeout = min(body.timeout_s or service.timeout_s, service.timeout_s)
        status, response = await _answer(service, job, request, body.format, timeout)
        m.requests.labels(status=str(status)).inc()
        if status == 200:
            m.observe_stage("total", time.perf_counter() - t0)
        return response

    if ui:
        from serve.ui import mount_ui

        app = mount_ui(app, service)  # last, so /v1, /docs, /healthz and /metrics match first
    return app


async def _answer(service, job, request: Request, fmt: str, timeout: float) -> tuple[int, Response]:
    m = service.metrics
    m.in_flight.inc()
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    result = asyncio.ensure_future(service.result(job))
    try:
        done, _ = await asyncio.wait({result, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if result not in done:
            service.abandon(job)
            if watcher in done:
                return 499, _error(499, "client disconnected.")
            return 504, _error(504, f"timed out after {timeout:g}s.")
        try:
            out = result.result()
        except BatchFailedError as err:
            return 500, _error(500, str(err))
        t = time.perf_counter()
        body, media = await run_in_threadpool(encode_output, out, fmt)
        m.observe_stage("encode", time.perf_counter() - t)
        if media == "image/png":
            return 200, Response(body, media_type=media, headers={"X-Mvz-Seed": str(out.metadata["seed"]),
                                                                   "X-Mvz-Batch": str(out.metadata["timings"]["prompts_in_call"])})
        return 200, JSONResponse(body)
    finally:
        m.in_flight.dec()
        watcher.cancel()
        result.cancel()
