"""The batching rule and queue of serve.batching, without HTTP or a model."""

from __future__ import annotations

import asyncio

import pytest

from serve.batching import BatchQueue, Job, QueueFullError, pick_batch


def _job(key, name, loop):
    return Job(key, name, loop.create_future())


def test_pick_batch_takes_oldest_key_fifo_up_to_max():
    loop = asyncio.new_event_loop()
    try:
        jobs = [_job("a", 1, loop), _job("b", 2, loop), _job("a", 3, loop), _job("a", 4, loop), _job("a", 5, loop)]
        waiting = list(jobs)
        assert [j.payload for j in pick_batch(waiting, 3)] == [1, 3, 4]
        assert [j.payload for j in waiting] == [2, 5]
        # the oldest job (other key) leads the next batch: no starvation
        assert [j.payload for j in pick_batch(waiting, 3)] == [2]
    finally:
        loop.close()


def test_pick_batch_drops_abandoned_jobs():
    loop = asyncio.new_event_loop()
    try:
        jobs = [_job("a", 1, loop), _job("a", 2, loop), _job("a", 3, loop)]
        jobs[0].future.cancel()
        waiting = list(jobs)
        assert [j.payload for j in pick_batch(waiting, 4)] == [2, 3]
        assert waiting == []
    finally:
        loop.close()


def test_queue_bound_counts_live_jobs_only():
    async def main():
        loop = asyncio.get_running_loop()
        q = BatchQueue(max_queue=2, max_batch=4, window_s=0.0)
        a, b = _job("k", 1, loop), _job("k", 2, loop)
        q.put(a)
        q.put(b)
        with pytest.raises(QueueFullError):
            q.put(_job("k", 3, loop))
        a.future.cancel()  # a client that left frees its slot
        q.put(_job("k", 4, loop))
        assert len(q) == 2

    asyncio.run(main())


def test_next_batch_waits_for_window_and_returns_early_when_full():
    async def main():
        loop = asyncio.get_running_loop()
        q = BatchQueue(max_queue=10, max_batch=3, window_s=0.5)
        q.put(_job("k", 1, loop))

        async def later():
            await asyncio.sleep(0.05)
            q.put(_job("other", 9, loop))
            q.put(_job("k", 2, loop))
            q.put(_job("k", 3, loop))

        asyncio.ensure_future(later())
        t0 = loop.time()
        batch = await q.next_batch()
        assert [j.payload for j in batch] == [1, 2, 3]
        assert loop.time() - t0 < 0.4  # full before the window ended
        t0 = loop.time()
        batch = await q.next_batch()  # lone job: waits out (what is left of) its window
        assert [j.payload for j in batch] == [9]

    asyncio.run(main())
