"""Scheduler: token-budget batches, max wait, cancelled work dropped (and its queue room freed), failures isolated
per batch, the engine declared dead on device errors or repeated failures, Retry-After estimates."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.engine.errors import BatchFailed, NotReady, Overloaded
from service.engine.runner import ScoreJob
from service.engine.scheduler import Scheduler, SchedulerConfig, is_fatal


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


def test_cancelled_work_leaves_the_queue_at_once():
    gate = threading.Event()
    runner = RecordingRunner(gate=gate)

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=8, max_wait_s=0.0, max_queue_tokens=20))
        s.start()
        running = asyncio.create_task(s.submit([job(8)]))
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(s.submit([job(6), job(6)]))
        await asyncio.sleep(0.05)
        queued_before = s.queued_tokens
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        queued_after = s.queued_tokens
        # The freed room admits a request that would not have fitted next to the cancelled one.
        admitted = asyncio.create_task(s.submit([job(8), job(8)]))
        await asyncio.sleep(0.05)
        gate.set()
        await running
        result = await admitted
        await s.stop()
        return queued_before, queued_after, result

    before, after, result = asyncio.run(go())
    assert (before, after) == (12, 0)
    assert [r[0] for r in result] == [8, 8]
    assert 6 not in [len(j.ids) for b in runner.batches for j in b]


def test_consecutive_failures_kill_the_engine_and_fail_queued_work():
    runner = RecordingRunner(fail_when=lambda jobs: True)

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=4, max_wait_s=0.0, max_consecutive_failures=3))
        s.start()
        results = await asyncio.gather(*(s.submit([job(4)]) for _ in range(5)), return_exceptions=True)
        alive, failure = s.alive, s.failure
        with pytest.raises(NotReady) as later:
            await s.submit([job(4)])
        await s.stop()
        return results, alive, failure, later.value

    results, alive, failure, later = asyncio.run(go())
    assert [type(r) for r in results[:3]] == [BatchFailed] * 3
    assert all(isinstance(r, NotReady) for r in results[3:])  # queued behind the third failure: never run
    assert len(runner.batches) == 3
    assert not alive and "3 consecutive batches failed" in failure
    assert "consecutive" in later.message


def test_a_success_resets_the_failure_count():
    calls = {"n": 0}

    def runner(jobs):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("flaky")
        return [np.array([1.0]) for _ in jobs]

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=4, max_wait_s=0.0, max_consecutive_failures=2))
        s.start()
        outcomes = [await asyncio.gather(s.submit([job(4)]), return_exceptions=True) for _ in range(6)]
        alive = s.alive
        await s.stop()
        return outcomes, alive

    outcomes, alive = asyncio.run(go())
    assert alive
    assert [isinstance(o[0], BatchFailed) for o in outcomes] == [True, False] * 3


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   RuntimeError("CUDA error: device-side assert triggered")])
def test_a_device_error_kills_the_engine_at_once(error):
    def runner(jobs):
        raise error

    async def go():
        s = Scheduler(runner, SchedulerConfig(max_batch_tokens=4, max_wait_s=0.0, max_consecutive_failures=0))
        s.start()
        first = await asyncio.gather(s.submit([job(4)]), return_exceptions=True)
        await asyncio.sleep(0)
        alive, failure = s.alive, s.failure
        await s.stop()
        return first[0], alive, failure

    first, alive, failure = asyncio.run(go())
    assert isinstance(first, BatchFailed)
    assert not alive and "unrecoverable device error" in failure


def test_out_of_memory_is_not_fatal():
    class OutOfMemoryError(RuntimeError):  # the name torch.cuda.OutOfMemoryError carries
        pass

    assert not is_fatal(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_fatal(ValueError("bad input"))


def test_a_failing_batch_callback_does_not_stop_the_engine():
    def on_batch(jobs, seconds):
        raise ValueError("metrics broke")

    async def go():
        s = Scheduler(RecordingRunner(), SchedulerConfig(max_batch_tokens=4, max_wait_s=0.0), on_batch=on_batch)
        s.start()
        first = await s.submit([job(3)])
        second = await s.submit([job(2)])
        alive = s.alive
        await s.stop()
        return first, second, alive

    first, second, alive = asyncio.run(go())
    assert (first[0][0], second[0][0], alive) == (3, 2, True)


def test_retry_after_grows_with_the_queued_work():
    gate = threading.Event()

    def slow(jobs):
        gate.wait(5)
        return [np.array([1.0]) for _ in jobs]

    async def go():
        s = Scheduler(slow, SchedulerConfig(max_batch_tokens=100, max_wait_s=0.0, max_queue_jobs=3,
                                            max_retry_after_s=30))
        s.start()
        s._tokens_per_s = 100.0  # as if measured: 100 tokens/s
        tasks = [asyncio.create_task(s.submit([job(100)]))]
        await asyncio.sleep(0.05)  # running, held at the gate
        tasks += [asyncio.create_task(s.submit([job(100)])) for _ in range(3)]
        await asyncio.sleep(0.05)  # three queued (300 tokens)
        with pytest.raises(Overloaded) as info:
            await s.submit([job(100)])
        gate.set()
        await asyncio.gather(*tasks)
        await s.stop()
        return info.value.retry_after_s

    assert asyncio.run(go()) == 3.0


def test_queued_work_is_bounded_in_seconds_too():
    gate = threading.Event()

    def slow(jobs):
        gate.wait(5)
        return [np.array([1.0]) for _ in jobs]

    async def go():
        s = Scheduler(slow, SchedulerConfig(max_batch_tokens=100, max_wait_s=0.0, max_queue_delay_s=2.5))
        s.start()
        s._tokens_per_s = 100.0  # as if measured: 100 tokens/s
        tasks = [asyncio.create_task(s.submit([job(100)]))]
        await asyncio.sleep(0.05)  # running, held at the gate
        # Each is admitted while the queue ahead of it holds at most 2.5 s of work (0, 1, 2 s): 3 s queued.
        tasks += [asyncio.create_task(s.submit([job(100)])) for _ in range(3)]
        await asyncio.sleep(0.05)
        queued = s.queue_depth
        with pytest.raises(Overloaded) as info:
            await s.submit([job(10)])
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await s.stop()
        return queued, info.value, results

    queued, refused, results = asyncio.run(go())
    assert queued == 3 and "3.0 s of work queued" in refused.message and refused.retry_after_s == 3.0
    assert [type(r).__name__ for r in results] == ["list", "list", "list", "list"]


def test_a_crashed_loop_fails_queued_work_instead_of_hanging():
    async def go():
        s = Scheduler(RecordingRunner(), SchedulerConfig(max_batch_tokens=4, max_wait_s=0.0))

        def broken_pop():
            raise KeyError("bug in the batching loop")

        s._pop_batch = broken_pop
        s.start()
        result = await asyncio.wait_for(asyncio.gather(s.submit([job(3)]), return_exceptions=True), 5)
        alive, failure = s.alive, s.failure
        await s.stop()
        return result[0], alive, failure

    error, alive, failure = asyncio.run(go())
    assert isinstance(error, NotReady) and "scheduler loop crashed" in error.message
    assert not alive and "KeyError" in failure
