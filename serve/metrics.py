"""Prometheus metrics of one server (own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("queue", "conditioning", "denoise", "decode", "encode", "total")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("mvz_queue_depth", "Requests waiting for a batch.", registry=r)
        self.in_flight = Gauge("mvz_in_flight", "Requests accepted and not yet answered.", registry=r)
        self.batch_size = Histogram("mvz_batch_size", "Prompts per batch (one UNet call per step).",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.stage_seconds = Histogram("mvz_stage_seconds", "Seconds per request stage.", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("mvz_requests", "Answered requests by outcome.", ["status"], registry=r)
        self.batches_failed = Counter("mvz_batches_failed", "Batches whose run raised.", registry=r)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
