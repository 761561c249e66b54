"""Admission: the one place that decides whether a scoring request may in, and if not, which error (429
overloaded, 503 not ready / draining) and which Retry-After. Everyone else asks:

- the scheduler (`queue_refusal`) when a request's jobs would join the queue, and when the engine reports
  itself saturated (the same question for the smallest possible request: one job of one token);
- the HTTP layer (service.api.admission.ServerState.refusal -> `server_refusal`) before a scoring body is
  read and again before the engine is called;
- the error handlers, the middleware and /ready (`retry_after_header`) when they write the response.

It knows no HTTP: the status codes live on the errors (service.engine.errors). Policy in brief (details in
docs/ARCHITECTURE.md, "Admission"): draining -> 503 `draining`; a dead engine -> 503; more than
`max_inflight` scoring requests in progress -> 429 (Retry-After 1 s); a queue at one of its bounds (jobs,
tokens, or seconds of work at the measured throughput) -> 429 with Retry-After = the queued tokens at that
throughput, at least 1 s and at most `max_retry_after_s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from service.engine.errors import EngineError, NotReady, Overloaded


class Draining(NotReady):
    type = "draining"


@dataclass(frozen=True)
class QueueBounds:
    max_jobs: int
    max_tokens: int
    max_delay_s: float  # 0: no bound in time
    max_retry_after_s: float


@dataclass(frozen=True)
class QueueLoad:
    jobs: int
    tokens: int
    tokens_per_s: float  # measured throughput; 0 until a batch has run

    @property
    def delay_s(self) -> float:
        """Seconds the queued tokens take at the measured throughput (0 until measured)."""
        return self.tokens / self.tokens_per_s if self.tokens_per_s > 0 else 0.0


def retry_after_s(load: QueueLoad, bounds: QueueBounds) -> float:
    """How long until the queued tokens are likely computed (at least 1 s, at most the configured cap)."""
    if load.tokens_per_s <= 0:
        return 1.0
    return float(min(bounds.max_retry_after_s, max(1.0, math.ceil(load.delay_s))))


def queue_refusal(load: QueueLoad, bounds: QueueBounds, jobs: int = 1, tokens: int = 1) -> Overloaded | None:
    """Overloaded when `jobs` more jobs of `tokens` tokens in all would push a non-empty queue past a bound."""
    if not load.jobs:
        return None  # an empty queue takes anything: one request larger than the bounds still runs
    if load.jobs + jobs > bounds.max_jobs or load.tokens + tokens > bounds.max_tokens:
        return Overloaded(f"queue full ({load.jobs} jobs, {load.tokens} tokens queued)",
                          retry_after_s=retry_after_s(load, bounds))
    delay = load.delay_s
    if bounds.max_delay_s and delay > bounds.max_delay_s:
        return Overloaded(f"queue full (about {delay:.1f} s of work queued; the bound is "
                          f"{bounds.max_delay_s:g} s)", retry_after_s=retry_after_s(load, bounds))
    return None


def server_refusal(draining: bool, fatal: str | None, inflight: int, max_inflight: int,
                   saturated: Callable[[], float | None] | None = None) -> EngineError | None:
    """Why the server refuses a new scoring request right now (cheap: no body read yet), or None."""
    if draining:
        return Draining("the server is draining (shutting down); retry on another replica")
    if fatal:
        return NotReady(f"the engine failed ({fatal}); the server is restarting")
    if inflight >= max_inflight:
        return Overloaded(f"too many requests in progress ({inflight}); retry later", retry_after_s=1.0)
    retry_after = saturated() if saturated is not None else None
    if retry_after is not None:
        return Overloaded("queue full; retry later", retry_after_s=retry_after)
    return None


def retry_after_header(error: EngineError) -> dict[str, str] | None:
    """The Retry-After header of a refusal: whole seconds, at least 1; 503s say 1 s. None for other errors."""
    if isinstance(error, Overloaded):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    if error.code == 503:
        return {"Retry-After": "1"}
    return None
