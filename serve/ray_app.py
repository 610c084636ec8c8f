"""The same HTTP API as a Ray Serve deployment: one replica per GPU, batching by ``@serve.batch``.

Run it with ``mvz serve --ray ...`` or with Ray's own CLI on a cluster::

    serve run serve.ray_app:app_builder model=tiny max_batch=4 batch_window_ms=20

(``app_builder``'s keys: the fields of :class:`serve.runner.RunnerConfig` and :class:`serve.server.ServeOptions`
plus ``replicas``). Each replica loads the model once, warms it up, and serves the routes of
:func:`serve.app.create_app`; ``@serve.batch`` collects the concurrent requests of a replica and this
module packs the compatible ones (same :class:`~serve.runner.BatchKey`) into one pipeline call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from serve.batching import Job, QueueFullError
from serve.metrics import Metrics
from serve.runner import BatchKey, Output, RunnerConfig, Work, load_runner
from serve.server import ServeOptions
from serve.service import STAGE_TIMINGS, BatchFailedError


def group_compatible(items: list[tuple[BatchKey, Work]], max_batch: int) -> list[list[int]]:
    """Indices of ``items`` grouped by key (first-seen order), each group at most ``max_batch`` long."""
    groups: dict[BatchKey, list[list[int]]] = {}
    for i, (key, _) in enumerate(items):
        chunks = groups.setdefault(key, [[]])
        if len(chunks[-1]) == max_batch:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in groups.values() for chunk in chunks]


class RayReplicaService:
    """The service interface of :mod:`serve.app` inside one replica (the model is loaded before it exists)."""

    state = "ready"
    error = None
    ready = True

    def __init__(self, runner, batched, opts: ServeOptions):
        self.runner = runner
        self.limits = runner.limits
        self.timeout_s = opts.timeout_s
        self.max_queue = opts.max_queue
        self.metrics = Metrics(runner.max_batch)
        self._batched = batched
        self._pending = 0
        self.last_batch_s = 1.0

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def enqueue(self, key: BatchKey, work: Work) -> Job:
        if self._pending >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are waiting")
        self._pending += 1
        self.metrics.queue_depth.set(self._pending)
        task = asyncio.ensure_future(self._batched((key, work, time.perf_counter())))
        task.add_done_callback(lambda _: self._done())
        return Job(key, work, task)

    def _done(self) -> None:
        self._pending -= 1
        self.metrics.queue_depth.set(self._pending)

    async def result(self, job: Job) -> Output:
        out = await job.future
        if isinstance(out, Exception):
            raise out
        return out

    def abandon(self, job: Job) -> None:
        job.future.cancel()

    def retry_after_s(self) -> int:
        return max(1, round(self.last_batch_s * (self._pending / max(1, self.runner.max_batch) + 1)))


@serve.deployment(name="mvz")
@serve.ingress()
class MvzDeployment:
    def __init__(self, cfg: RunnerConfig, opts: ServeOptions):
        runner = load_runner(cfg)
        if opts.warmup:
            runner.warmup()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mvz-model")
        self.generate_batch.set_max_batch_size(runner.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(opts.batch_window_ms / 1000)
        self.service = RayReplicaService(runner, self.generate_batch, opts)

    def __serve_build_asgi_app__(self):
        from serve.app import create_app

        return create_app(self.service)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def generate_batch(self, items: list[tuple[BatchKey, Work, float]]) -> list[Output | Exception]:
        svc, loop = self.service, asyncio.get_running_loop()
        results: list[Output | Exception] = [BatchFailedError("not run")] * len(items)
        for group in group_compatible([(k, w) for k, w, _ in items], svc.runner.max_batch):
            started = time.perf_counter()
            for i in group:
                svc.metrics.observe_stage("queue", started - items[i][2])
            svc.metrics.batch_size.observe(len(group))
            key = items[group[0]][0]
            try:
                outs = await loop.run_in_executor(self._executor, svc.runner.run, key, [items[i][1] for i in group])
            except Exception as exc:  # noqa: BLE001 - one failed batch fails only its own requests
                svc.metrics.batches_failed.inc()
                for i in group:
                    results[i] = BatchFailedError(f"generation failed: {exc}")
                continue
            svc.last_batch_s = time.perf_counter() - started
            for stage, name in STAGE_TIMINGS.items():
                if name in outs[0].metadata.get("timings", {}):
                    svc.metrics.observe_stage(stage, outs[0].metadata["timings"][name])
            for i, out in zip(group, outs, strict=True):
                results[i] = out
        return results


def build_deployment(cfg: RunnerConfig, opts: ServeOptions, replicas: int | None = None):
    """The bound application: ``replicas`` (default one per GPU in the cluster, else 1), one GPU each."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    n = replicas or max(1, gpus)
    actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    cfg.max_batch = opts.max_batch
    return MvzDeployment.options(num_replicas=n, ray_actor_options=actor,
                                 max_ongoing_requests=opts.max_queue + opts.max_batch).bind(cfg, opts)


def _split_args(args: dict[str, Any]) -> tuple[RunnerConfig, ServeOptions, int | None]:
    cfg_fields = {f.name: f for f in dataclasses.fields(RunnerConfig)}
    opt_fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    cfg, opts, replicas = {}, {}, None
    for k, v in args.items():
        if k == "replicas":
            replicas = int(v)
        elif k in cfg_fields:
            cfg[k] = _coerce(v, cfg_fields[k].default)
        elif k in opt_fields:
            opts[k] = _coerce(v, opt_fields[k].default)
        else:
            raise ValueError(f"unknown argument {k!r}; use fields of RunnerConfig / ServeOptions or replicas")
    for k in ("lora", "engines"):
        if cfg.get(k):
            cfg[k] = Path(cfg[k])
    return RunnerConfig(**cfg), ServeOptions(**opts), replicas


def _coerce(value, default):
    if isinstance(value, str) and isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default)(value)
    return value


def app_builder(args: dict[str, Any]):
    """``serve run serve.ray_app:app_builder key=value ...`` (Ray Serve's application-builder hook)."""
    cfg, opts, replicas = _split_args(args)
    return build_deployment(cfg, opts, replicas)


def run_ray(cfg: RunnerConfig, opts: ServeOptions, replicas: int | None = None) -> int:
    """``mvz serve --ray``: join the cluster in RAY_ADDRESS (or start a local one), serve until SIGTERM/SIGINT."""
    import signal
    import threading

    import ray

    from serve.runner import check_config
    from serve.server import check_options

    check_options(opts)
    check_config(cfg)
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(build_deployment(cfg, opts, replicas), name="mvz", route_prefix="/")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"mvz serve (Ray Serve) on http://{opts.host}:{opts.port}", flush=True)
    while not stop.wait(0.5):
        pass
    serve.delete("mvz")  # Ray Serve drains the replicas' in-flight requests before removing them
    serve.shutdown()
    ray.shutdown()
    return 0
