"""A model-free runner with the :class:`serve.runner.ModelRunner` interface: images drawn from the seed
in microseconds. For tests of the HTTP layer (schema fuzzing, backpressure) and load-test dry runs of the
service itself; it never stands in for the model where an image's correctness is checked.

``gate`` (a threading.Event) holds every batch until set; a prompt containing ``fail_on`` makes its batch
raise (one failing batch must fail only its own requests)."""

from __future__ import annotations

import threading

import torch

from serve.runner import BatchKey, Limits, Output, Work


class FakeRunner:
    def __init__(self, max_batch: int = 4, gate: threading.Event | None = None, fail_on: str | None = None):
        self.limits = Limits(default_resolution=16, resolution_multiple=8, max_views=8, max_resolution=64)
        self.max_batch = max_batch
        self.gate = gate
        self.fail_on = fail_on
        self.batches: list[list[Work]] = []

    def warmup(self) -> float:
        return 0.0

    def run(self, key: BatchKey, works: list[Work], on_step=None) -> list[Output]:
        if self.gate is not None:
            self.gate.wait(timeout=60)
        if self.fail_on and any(self.fail_on in w.prompt for w in works):
            raise RuntimeError("injected failure")
        self.batches.append(list(works))
        for i in range(1, key.steps + 1) if on_step else ():
            on_step(i, key.steps)
        v, r = len(key.azimuths), key.height
        outs = []
        for w in works:
            g = torch.Generator().manual_seed(w.seed)
            meta = {"prompt": w.prompt, "seed": w.seed, "steps": key.steps, "guidance": key.guidance,
                    "zmv": key.zmv, "views": [{"azimuth": a, "elevation": key.elevation} for a in key.azimuths],
                    "resolution": r, "model": "fake", "lora": None,
                    "timings": {"denoise_s": 0.0, "prompts_in_call": len(works)}}
            outs.append(Output(torch.rand(v, 3, r, r, generator=g), meta))
        return outs
