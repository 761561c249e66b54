"""Asyncio scheduler: dynamic batches under a token budget and a max wait, model in a worker thread.

`submit(jobs)` enqueues a request's jobs and awaits their results. The batching loop waits for the
first job, then up to `max_wait_s` for more unless the token budget is already full (default 0: continuous
batching -- what queued while the previous batch ran forms the next one, a lone request never waits); it pops jobs in
arrival order up to the budget (a job too big for the remaining budget goes back to the head of the
queue; one larger than the whole budget runs alone), runs the batch in a single worker thread, and
resolves each job's future.

Admission and cancellation: queue bounds make `submit` raise `Overloaded` at once -- in jobs, in tokens,
and in time (`max_queue_delay_s`: the queued tokens at the measured throughput, so that under sustained
overload admitted requests still finish well within their deadlines). The decision and its Retry-After
are service.engine.admission's; the scheduler only reports its load. When a request is cancelled
(deadline, client gone) its queued jobs leave the queue at once and are never computed.

Faults: a failing batch fails only the futures of its own jobs (`BatchFailed`, logged with the request
ids). The engine is declared dead -- `alive` turns False, queued work fails with `NotReady`, `failure`
says why -- when the error is one a process cannot recover from (a CUDA error), when
`max_consecutive_failures` batches in a row fail, or when the loop itself crashes. Whoever owns the
process (service.api.server) then exits non-zero so an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Callable

from service.engine.admission import QueueBounds, QueueLoad, queue_refusal, retry_after_s
from service.engine.errors import BatchFailed, NotReady
from service.engine.types import JobResult, ScoreJob

log = logging.getLogger("agentprm.scheduler")

# Substrings of errors after which a CUDA context is unusable (sticky errors): the process must restart.
FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                 "illegal memory access", "NCCL error")


def is_fatal(exc: BaseException) -> bool:
    """True for errors after which the device (and so this process) cannot serve again."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError: that batch only
        return False
    if type(exc).__name__ == "AcceleratorError":  # torch >= 2.8 raises this for CUDA runtime errors
        return True
    text = str(exc)
    return any(marker in text for marker in FATAL_MARKERS)


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
    max_wait_s: float = 0.0
    max_queue_jobs: int = 4096
    max_queue_tokens: int = 1 << 20
    max_queue_delay_s: float = 10.0  # refuse when the queued work would take longer than this (0: no bound)
    max_consecutive_failures: int = 5  # 0: never give up
    max_retry_after_s: float = 30.0


class Scheduler:
    def __init__(self, run_batch: Callable[[list[ScoreJob]], list[JobResult]], config: SchedulerConfig,
                 on_batch: Callable[[list[JobResult], float], None] | None = None):
        """`run_batch` runs in the worker thread and returns one result per job (the runner's BatchResults,
        which carry the batch's stats); `on_batch(results, seconds)` sees each successful batch."""
        self.run_batch = run_batch
        self.config = config
        self.bounds = QueueBounds(config.max_queue_jobs, config.max_queue_tokens, config.max_queue_delay_s,
                                  config.max_retry_after_s)
        self.on_batch = on_batch
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentprm-model")
        self._closed = False
        self.batches_run = 0
        self.consecutive_failures = 0
        self.failure: str | None = None  # why the engine died; None while it serves
        self._tokens_per_s = 0.0  # moving average of the measured throughput (Retry-After estimates)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="agentprm-scheduler")
            self._task.add_done_callback(self._on_loop_exit)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _on_loop_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if exc is not None and self.failure is None:
            self.failure = f"scheduler loop crashed: {type(exc).__name__}: {exc}"
            log.critical("%s", self.failure, exc_info=exc)
        self._fail_queued(NotReady(f"the engine failed ({self.failure or 'stopped'})"))

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_queued(NotReady("the engine is shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _fail_queued(self, error: Exception) -> None:
        for entry in self._queue:
            if not entry.future.done():
                entry.future.set_exception(error)
        self._queue.clear()
        self._queued_tokens = 0

    # -- queue -----------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def load(self) -> QueueLoad:
        return QueueLoad(len(self._queue), self._queued_tokens, self._tokens_per_s)

    def queue_delay_s(self) -> float:
        """Seconds the queued tokens take at the measured throughput (0 until a batch has been measured)."""
        return self.load().delay_s

    def retry_after_s(self) -> float:
        """How long until the queued tokens are likely computed (service.engine.admission)."""
        return retry_after_s(self.load(), self.bounds)

    def saturated(self) -> float | None:
        """Retry-After seconds when the queue is at a bound (any new request would be refused), else None."""
        refused = queue_refusal(self.load(), self.bounds)
        return refused.retry_after_s if refused is not None else None

    async def submit(self, jobs: list[ScoreJob], tag: str = "") -> list[JobResult]:
        if self._closed or not self.alive:
            raise NotReady(f"the engine is not running ({self.failure})" if self.failure
                           else "the engine is not running")
        tokens = sum(len(j.ids) for j in jobs)
        refused = queue_refusal(self.load(), self.bounds, jobs=len(jobs), tokens=tokens)
        if refused is not None:
            raise refused
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [_Entry(job, loop.create_future(), now, tag) for job in jobs]
        self._queue.extend(entries)
        self._queued_tokens += tokens
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        except BaseException:
            self._drop(entries)  # deadline, client gone, or a sibling failed: never compute the rest
            raise

    def _drop(self, entries: list[_Entry]) -> None:
        dropped = False
        for e in entries:  # gather() may already have cancelled them
            if not e.future.done():
                e.future.cancel()
            dropped = dropped or e.future.cancelled()
        if dropped:
            kept = collections.deque(e for e in self._queue if not e.future.done())
            self._queued_tokens = sum(e.tokens for e in kept)
            self._queue = kept

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
                if len(outputs) != len(jobs):
                    raise RuntimeError(f"runner returned {len(outputs)} results for {len(jobs)} jobs")
            except Exception as exc:  # fail this batch's requests only; keep serving if we can
                if self._batch_failed(batch, exc):
                    return
                continue
            seconds = time.perf_counter() - start
            self.batches_run += 1
            self.consecutive_failures = 0
            for e, out in zip(batch, outputs):
                if not e.future.done():
                    e.future.set_result(out)
            rate = sum(e.tokens for e in batch) / max(seconds, 1e-6)
            self._tokens_per_s = rate if self._tokens_per_s <= 0 else 0.8 * self._tokens_per_s + 0.2 * rate
            if self.on_batch is not None:
                try:
                    self.on_batch(outputs, seconds)
                except Exception:  # metrics must never take the engine down
                    log.exception("batch callback failed")

    def _batch_failed(self, batch: list[_Entry], exc: Exception) -> bool:
        """Fail the batch's requests; return True when the engine must stop for good."""
        self.consecutive_failures += 1
        tags = sorted({e.tag for e in batch if e.tag})
        log.error("batch of %d jobs failed (requests %s): %s: %s", len(batch), ", ".join(tags) or "-",
                  type(exc).__name__, exc, exc_info=exc)
        for e in batch:
            if not e.future.done():
                e.future.set_exception(BatchFailed(f"scoring failed: {type(exc).__name__}"))
        limit = self.config.max_consecutive_failures
        if is_fatal(exc):
            self.failure = f"unrecoverable device error: {type(exc).__name__}: {exc}"
        elif limit and self.consecutive_failures >= limit:
            self.failure = f"{self.consecutive_failures} consecutive batches failed (last: {type(exc).__name__}: {exc})"
        if self.failure is None:
            return False
        log.critical("engine is dead: %s", self.failure)
        self._fail_queued(NotReady(f"the engine failed ({self.failure})"))
        return True
