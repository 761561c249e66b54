"""Asyncio scheduler: dynamic batches under a token budget and a max wait, model in a worker thread.

`submit(jobs)` enqueues a request's jobs and awaits their results. The batching loop waits for the
first job, then up to `max_wait_s` for more unless the token budget is already full; it pops jobs in
arrival order up to the budget (a job too big for the remaining budget goes back to the head of the
queue; one larger than the whole budget runs alone), skips jobs whose request was cancelled (client gone),
runs the batch in a single worker thread, and resolves each job's future. A failing batch fails only the
futures of its own jobs. Queue bounds (jobs, tokens) make `submit` raise `Overloaded` at once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from service.engine.errors import BatchFailed, NotReady, Overloaded
from service.engine.runner import ScoreJob

log = logging.getLogger("agentprm.scheduler")


@dataclass
class _Entry:
    job: ScoreJob
    future: asyncio.Future
    enqueued: float
    tag: str = ""

    @property
    def tokens(self) -> int:
        return len(self.job.ids)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 16384
    max_wait_s: float = 0.005
    max_queue_jobs: int = 4096
    max_queue_tokens: int = 1 << 20


class Scheduler:
    def __init__(self, run_batch: Callable[[list[ScoreJob]], list[np.ndarray]], config: SchedulerConfig,
                 on_batch: Callable[[list[ScoreJob], float], None] | None = None):
        self.run_batch = run_batch
        self.config = config
        self.on_batch = on_batch
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentprm-model")
        self._closed = False
        self.batches_run = 0
        self.last_error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="agentprm-scheduler")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for entry in self._queue:
            if not entry.future.done():
                entry.future.set_exception(NotReady("the engine is shutting down"))
        self._queue.clear()
        self._queued_tokens = 0
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- queue -----------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    async def submit(self, jobs: list[ScoreJob], tag: str = "") -> list[np.ndarray]:
        if self._closed or not self.alive:
            raise NotReady("the engine is not running")
        tokens = sum(len(j.ids) for j in jobs)
        cfg = self.config
        if self._queue and (len(self._queue) + len(jobs) > cfg.max_queue_jobs
                            or self._queued_tokens + tokens > cfg.max_queue_tokens):
            raise Overloaded(f"queue full ({len(self._queue)} jobs, {self._queued_tokens} tokens queued)",
                             retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [_Entry(job, loop.create_future(), now, tag) for job in jobs]
        self._queue.extend(entries)
        self._queued_tokens += tokens
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        except BaseException:
            for e in entries:  # the client went away or a sibling failed: drop what is still queued
                if not e.future.done():
                    e.future.cancel()
            raise

    def _pop_batch(self) -> list[_Entry]:
        budget = self.config.max_batch_tokens
        batch: list[_Entry] = []
        used = 0
        while self._queue:
            entry = self._queue[0]
            if entry.future.done():  # cancelled: its client is gone, never compute it
                self._queue.popleft()
                self._queued_tokens -= entry.tokens
                continue
            if batch and used + entry.tokens > budget:
                break
            self._queue.popleft()
            self._queued_tokens -= entry.tokens
            batch.append(entry)
            used += entry.tokens
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0].enqueued
            while self._queued_tokens < cfg.max_batch_tokens:
                remaining = first + cfg.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._pop_batch()
            if not batch:
                continue
            jobs = [e.job for e in batch]
            start = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self.run_batch, jobs)
            except Exception as exc:  # fail this batch's requests only; keep serving
                self.last_error = exc
                tags = sorted({e.tag for e in batch if e.tag})
                log.exception("batch of %d jobs failed (requests %s)", len(batch), ", ".join(tags) or "-")
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(BatchFailed(f"scoring failed: {type(exc).__name__}"))
                continue
            self.batches_run += 1
            if self.on_batch is not None:
                self.on_batch(jobs, time.perf_counter() - start)
            for e, out in zip(batch, outputs):
                if not e.future.done():
                    e.future.set_result(out)
