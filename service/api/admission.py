"""The HTTP side of admission around every engine call: drain, in-flight bound, deadline, client disconnect.
Whether a request may in, and with which code and Retry-After, is decided by service.engine.admission.

`ServerState` is the process-wide serving state the HTTP layer and the server runner share: whether the
server is draining (SIGTERM), how many scoring requests are in progress, and why the engine died (if it
did). `guarded(request, call, timeout_s)` runs one scoring call under those rules:

- draining -> 503 `draining` (with Retry-After), before any work is queued;
- more than `max_inflight` scoring requests in progress, or an engine that reports itself saturated
  (`ServerState.saturated`) -> 429 with Retry-After. `ServerState.refusal()` is cheap, so the middleware
  also asks it before reading a scoring request's body: under overload a refusal costs no JSON parsing,
  validation or tokenization, which keeps the event loop free for the requests that were admitted;
- the call runs under a deadline (the request's own `timeout_s`, capped by `max_timeout_s`, else the
  server default); past it the call is cancelled -- its queued jobs leave the scheduler's queue and are
  never computed -- and the client gets 504;
- when the client disconnects the call is cancelled the same way (the response, 499, goes nowhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from fastapi import Request

from service.api.config import ApiConfig
from service.engine.admission import server_refusal
from service.engine.errors import DeadlineExceeded, EngineError

log = logging.getLogger("agentprm.api")
T = TypeVar("T")


__all__ = ["ClientClosed", "ServerState", "guarded"]


class ClientClosed(Exception):
    """The client went away before its response was ready; its work was cancelled."""


_API = ApiConfig()


@dataclass
class ServerState:
    request_timeout_s: float = _API.request_timeout_s
    max_timeout_s: float = _API.max_request_timeout_s
    max_inflight: int = _API.max_inflight_requests
    engine_started: bool = False  # set by the app's lifespan around engine.start() / engine.shutdown()
    draining: bool = False
    drain_started: float | None = None
    inflight: int = 0
    fatal: str | None = None
    # Optional engine probe: seconds to Retry-After when a new request would surely be refused now, else None.
    saturated: Callable[[], float | None] | None = None

    def refusal(self) -> EngineError | None:
        """Why a new scoring request must be refused right now (cheap; no body read yet), or None."""
        return server_refusal(self.draining, self.fatal, self.inflight, self.max_inflight, self.saturated)

    def ready(self) -> bool:
        """What /ready and agentprm_ready report: the engine started, not draining, not dead."""
        return self.engine_started and not self.draining and not self.fatal

    def begin_drain(self) -> None:
        """Stop taking scoring work. Safe to call from a signal handler (plain attribute writes)."""
        if not self.draining:
            self.drain_started = time.monotonic()
            self.draining = True

    def deadline_s(self, requested: float | None) -> float:
        if requested is None:
            return min(self.request_timeout_s, self.max_timeout_s)
        return min(float(requested), self.max_timeout_s)


async def _until_disconnect(request: Request) -> None:
    """Return when the client has gone away. Blocks on the ASGI receive channel (no polling)."""
    while True:
        try:
            message = await request.receive()
        except asyncio.CancelledError:
            raise
        except Exception:  # a server that cannot tell us: never treat that as a disconnect
            await asyncio.Event().wait()
        if message.get("type") == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # an unexpected message (pipelining): don't spin


async def guarded(request: Request, call: Callable[[], Awaitable[T]], timeout_s: float | None) -> T:
    state: ServerState = request.app.state.server
    refused = state.refusal()
    if refused is not None:
        raise refused
    deadline = state.deadline_s(timeout_s)
    state.inflight += 1
    work = asyncio.ensure_future(call())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait((work, watcher), timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)  # let the cancellation drop the queued jobs
        request_id = getattr(request.state, "request_id", "-")
        if watcher in done:
            log.info("client of request %s disconnected; its work was dropped", request_id,
                     extra={"request_id": request_id, "event": "client_disconnected"})
            raise ClientClosed()
        raise DeadlineExceeded(f"the request did not finish within its deadline of {deadline:g} s; its remaining "
                               "work was dropped (raise timeout_s, or send less per request)")
    finally:
        state.inflight -= 1
        for task in (work, watcher):
            if not task.done():
                task.cancel()
