"""The one-process service: a bounded batch queue fed by the HTTP handlers, one worker thread for the model.

Life cycle: :meth:`LocalService.start` loads the model and warms it up in the worker thread (``/healthz``
answers 503 meanwhile), then runs the batching loop as an asyncio task. :meth:`submit` puts a request in
the queue and waits for its result; a batch that raises fails only its own requests. :meth:`stop` runs
after uvicorn has drained the in-flight requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from serve.batching import BatchQueue, Job
from serve.metrics import Metrics
from serve.runner import BatchKey, ModelRunner, Output, Work

log = logging.getLogger("mvz.serve")

STAGE_TIMINGS = {"conditioning": "conditioning_s", "denoise": "denoise_s", "decode": "decode_s"}


class NotReadyError(Exception):
    """The model is still loading (or failed to load)."""


class BatchFailedError(Exception):
    """The batch this request ran in raised; the server keeps serving."""


def _set_step(batch: list[Job], done: int, total: int) -> None:
    for job in batch:  # a tuple assignment from the worker thread; readers only poll it
        job.step = (done, total)


class LocalService:
    def __init__(self, load: Callable[[], ModelRunner], *, max_batch: int, window_s: float, max_queue: int,
                 timeout_s: float, warmup: bool = True, on_fatal: Callable[[BaseException], None] | None = None):
        self._load = load
        self._max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.warmup = warmup
        self.on_fatal = on_fatal
        self.metrics = Metrics(max_batch)
        self.runner: ModelRunner | None = None
        self.queue: BatchQueue | None = None
        self.state = "loading"  # loading | ready | failed
        self.error: str | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mvz-model")
        self._task: asyncio.Task | None = None
        self.last_batch_s = 1.0
        self.last_timings: dict | None = None  # the last batch's measured stage timings (the web page's footer)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def limits(self):
        if self.runner is None:
            raise NotReadyError(self.state)
        return self.runner.limits

    # ---- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._main())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(self._executor, self._load)
            if self.warmup:
                secs = await loop.run_in_executor(self._executor, runner.warmup)
                log.info("warmed up in %.2fs", secs)
        except Exception as exc:  # noqa: BLE001 - reported through /healthz and on_fatal
            self.state, self.error = "failed", str(exc)
            log.error("model failed to load: %s", exc)
            if self.on_fatal:
                self.on_fatal(exc)
            return
        self.runner = runner
        self.queue = BatchQueue(self.max_queue, runner.max_batch, self.window_s)
        self.state = "ready"
        await self._serve_batches(loop)

    async def _serve_batches(self, loop) -> None:
        q = self.queue
        while True:
            batch = await q.next_batch()
            self.metrics.queue_depth.set(len(q))
            if batch:
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop, batch: list[Job]) -> None:
        started = time.perf_counter()
        for job in batch:
            self.metrics.observe_stage("queue", started - job.enqueued)
        self.metrics.batch_size.observe(len(batch))
        key = batch[0].key
        try:
            outs = await loop.run_in_executor(self._executor, self.runner.run, key, [j.payload for j in batch],
                                              functools.partial(_set_step, batch))
        except Exception as exc:  # noqa: BLE001 - one failed batch fails only its own requests
            log.exception("batch of %d failed", len(batch))
            self.metrics.batches_failed.inc()
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(BatchFailedError(f"generation failed: {exc}"))
            return
        self.last_batch_s = time.perf_counter() - started
        self.last_timings = {**outs[0].metadata.get("timings", {}), "batch_s": self.last_batch_s}
        for stage, name in STAGE_TIMINGS.items():
            if name in outs[0].metadata.get("timings", {}):
                self.metrics.observe_stage(stage, outs[0].metadata["timings"][name])
        for job, out in zip(batch, outs, strict=True):
            if not job.future.done():  # the client may have gone away meanwhile
                job.future.set_result(out)

    # ---- requests ---------------------------------------------------------------------------------
    def enqueue(self, key: BatchKey, work: Work) -> Job:
        """Put a request in the queue (raises QueueFullError, NotReadyError)."""
        if not self.ready:
            raise NotReadyError(self.state)
        job = Job(key, work, asyncio.get_running_loop().create_future())
        self.queue.put(job)
        self.metrics.queue_depth.set(len(self.queue))
        return job

    def retry_after_s(self) -> int:
        """A client's wait before a retry can expect a slot: the batches ahead of it at the last batch's pace."""
        ahead = len(self.queue) / max(1, self.runner.max_batch) if self.queue else 1
        return max(1, math.ceil(self.last_batch_s * (ahead + 1)))

    def abandon(self, job: Job) -> None:
        """The client timed out or left: free its queue slot (a running batch just drops its result)."""
        job.future.cancel()
        self.queue.drain_abandoned()
        self.metrics.queue_depth.set(len(self.queue))

    async def result(self, job: Job) -> Output:
        return await job.future
