"""Scheduler: token-budget batches, max wait, cancelled work dropped, failures isolated per batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.engine.errors import BatchFailed, Overloaded
from service.engine.runner import ScoreJob
from service.engine.scheduler import Scheduler, SchedulerConfig


class RecordingRunner:
    def __init__(self, fail_when=None, gate: threading.Event | None = None):
        self.batches: list[list[ScoreJob]] = []
        self.fail_when = fail_when
        self.gate = gate

    def __call__(self, jobs):
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(jobs)
        if self.fail_when and self.fail_when(jobs):
            raise RuntimeError("injected failure")
        return [np.array([float(len(j.ids))]) for j in jobs]


def job(n: int) -> ScoreJob:
    return ScoreJob(tuple(range(n)), (n - 1,))


def test_batches_stay_within_the_token_budget():
    runner = RecordingRunner()

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=100, max_wait_s=0.05))
        s.start()
        outs = await asyncio.gather(*(s.submit([job(n)]) for n in (40, 40, 40, 30, 150, 10)))
        await s.stop()
        return outs

    outs = asyncio.run(go())
    assert [o[0][0] for o in outs] == [40, 40, 40, 30, 150, 10]  # every request got its own result
    for batch in runner.batches:
        assert sum(len(j.ids) for j in batch) <= 100 or len(batch) == 1
    assert len(runner.batches) >= 3


def test_cancelled_requests_are_not_computed():
    gate = threading.Event()
    runner = RecordingRunner(gate=gate)

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=10, max_wait_s=0.0))
        s.start()
        first = asyncio.create_task(s.submit([job(10)]))  # occupies the worker until the gate opens
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(s.submit([job(7)]))
        kept = asyncio.create_task(s.submit([job(5)]))
        await asyncio.sleep(0.05)
        doomed.cancel()  # the client went away while queued
        gate.set()
        await first
        result = await kept
        await s.stop()
        return result

    result = asyncio.run(go())
    assert result[0][0] == 5
    computed = [len(j.ids) for b in runner.batches for j in b]
    assert 7 not in computed and computed == [10, 5]


def test_a_failing_batch_fails_only_its_requests():
    runner = RecordingRunner(fail_when=lambda jobs: any(len(j.ids) == 13 for j in jobs))

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=13, max_wait_s=0.0))
        s.start()
        bad = await asyncio.gather(s.submit([job(13)]), return_exceptions=True)
        good = await s.submit([job(4)])
        await s.stop()
        return bad[0], good

    bad, good = asyncio.run(go())
    assert isinstance(bad, BatchFailed)
    assert good[0][0] == 4


def test_full_queue_raises_overloaded():
    gate = threading.Event()
    runner = RecordingRunner(gate=gate)

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=8, max_wait_s=0.0, max_queue_jobs=2))
        s.start()
        tasks = [asyncio.create_task(s.submit([job(8)]))]
        await asyncio.sleep(0.05)  # the first one is running (held at the gate)
        tasks += [asyncio.create_task(s.submit([job(8)])) for _ in range(2)]
        await asyncio.sleep(0.05)  # two queued: the queue is full
        with pytest.raises(Overloaded):
            await s.submit([job(8)])
        gate.set()
        await asyncio.gather(*tasks)
        await s.stop()

    asyncio.run(go())
