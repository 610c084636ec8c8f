"""Dynamic batching, with no HTTP and no model: a bounded queue of jobs and the rule that packs them.

A :class:`Job` carries a ``key`` (everything that must be equal for jobs to share one UNet call per step:
steps, cameras, resolution, ZMV, guidance, LoRA scale) and an asyncio future for its result. The worker
asks :meth:`BatchQueue.next_batch` for the next batch: the oldest waiting job, plus every compatible job
that arrives within the batch window, up to ``max_batch`` (FIFO among compatible jobs; an incompatible
job waits for a later batch but is never starved: the oldest job always leads the next batch).
A job whose future is already done (its client timed out or went away) is dropped without running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    """The queue holds ``max_queue`` waiting jobs; the caller should retry later."""


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    step: tuple[int, int] | None = None  # (done, total) of its running batch, set by the worker per step

    @property
    def abandoned(self) -> bool:
        return self.future.done()


def pick_batch(waiting: list[Job], max_batch: int) -> list[Job]:
    """The jobs of the next batch (removed from ``waiting``): the oldest live job and the oldest live jobs
    with its key, at most ``max_batch``. Abandoned jobs are removed and never returned."""
    waiting[:] = [j for j in waiting if not j.abandoned]
    if not waiting:
        return []
    key = waiting[0].key
    batch = [j for j in waiting if j.key == key][:max_batch]
    taken = set(map(id, batch))
    waiting[:] = [j for j in waiting if id(j) not in taken]
    return batch


class BatchQueue:
    """A bounded FIFO of :class:`Job` with batch collection (one consumer, any number of producers;
    all calls from the event loop's thread)."""

    def __init__(self, max_queue: int, max_batch: int, window_s: float):
        if max_queue < 1 or max_batch < 1 or window_s < 0:
            raise ValueError("max_queue and max_batch must be >= 1 and window_s >= 0")
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.window_s = window_s
        self._waiting: list[Job] = []
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        """Live waiting jobs (what counts against ``max_queue``)."""
        return sum(not j.abandoned for j in self._waiting)

    def put(self, job: Job) -> None:
        if len(self) >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are waiting")
        self._waiting.append(job)
        self._changed.set()

    def _compatible(self, key: Hashable) -> int:
        return sum(j.key == key and not j.abandoned for j in self._waiting)

    async def _wait_change(self, timeout: float | None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def next_batch(self) -> list[Job]:
        """Wait for a live job, then up to ``window_s`` for compatible ones (returns early once
        ``max_batch`` are waiting); return the batch."""
        while not len(self):
            await self._wait_change(None)
        lead = next(j for j in self._waiting if not j.abandoned)
        deadline = lead.enqueued + self.window_s
        while self._compatible(lead.key) < self.max_batch and not lead.abandoned:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            await self._wait_change(left)
        return pick_batch(self._waiting, self.max_batch)

    def position(self, job: Job) -> int | None:
        """1 for the next live job to run, 2 behind it...; None once ``job`` left the queue."""
        live = [j for j in self._waiting if not j.abandoned]
        return live.index(job) + 1 if job in live else None

    def drain_abandoned(self) -> None:
        self._waiting[:] = [j for j in self._waiting if not j.abandoned]
