"""Run the app under uvicorn with a graceful drain and an exit when the engine dies.

SIGTERM (or Ctrl+C): the server keeps its socket open but turns /ready to 503 and answers new scoring
requests with 503 (`draining`, Retry-After: 1) while the scoring requests already admitted -- in flight
or queued -- finish. When none is left, or `drain_timeout_s` has passed, uvicorn's own shutdown closes
the socket and the connections, and the lifespan stops the engine. A second signal stops at once.

Engine death: every 0.2 s the server asks the engine for its health; when it is no longer live (its
scheduler died: a CUDA error, too many failed batches in a row, a crashed loop) /health and /ready turn
503, and the process exits with EXIT_ENGINE_DEAD so an orchestrator restarts it.

Exit codes (returned by `serve`): 0 drained, 1 could not start (port in use, engine start failed),
3 the engine died, 4 the drain timed out with requests still in progress. (2 is the CLI's user error:
a refused checkpoint or a bad setting, before anything is served.)
"""

from __future__ import annotations

import logging
import time

import uvicorn
from fastapi import FastAPI

from service.api.admission import ServerState

log = logging.getLogger("agentprm.server")

EXIT_OK, EXIT_START_FAILED, EXIT_ENGINE_DEAD, EXIT_DRAIN_TIMEOUT = 0, 1, 3, 4
HEALTH_EVERY_TICKS = 2  # uvicorn ticks every 0.1 s


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float):
        super().__init__(config)
        self.fastapi_app = app
        self.state: ServerState = app.state.server
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = EXIT_OK
        self._drain_announced = False

    def handle_exit(self, sig, frame) -> None:  # runs in a signal handler: only plain attribute writes
        if self.state.draining or self.should_exit:
            self.should_exit = True
            self.force_exit = True
            return
        self.state.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        if not self.should_exit:
            if self.state.fatal is None and counter % HEALTH_EVERY_TICKS == 0:
                await self._check_engine()
            if self.state.draining and self.state.fatal is None:
                self._advance_drain()
        return await super().on_tick(counter)

    async def _check_engine(self) -> None:
        engine = self.fastapi_app.state.engine
        try:
            health = await engine.check_health()
            live, detail = health.live, health.detail
        except Exception as exc:  # a health check that raises is a dead engine too
            live, detail = False, f"health check raised {type(exc).__name__}: {exc}"
        if live:
            return
        reason = detail or "engine not running"
        self.state.fatal = reason  # agentprm_ready follows (ServerState.ready)
        log.critical("the engine cannot recover (%s); exiting with code %d so the process is restarted", reason,
                     EXIT_ENGINE_DEAD, extra={"event": "engine_dead", "exit_code": EXIT_ENGINE_DEAD})
        self.exit_code = EXIT_ENGINE_DEAD
        self.config.timeout_graceful_shutdown = 2.0
        self.should_exit = True

    def _advance_drain(self) -> None:
        state = self.state
        if not self._drain_announced:
            self._drain_announced = True
            log.warning("draining: /ready is 503, new scoring requests get 503; waiting up to %gs for %d in progress",
                        self.drain_timeout_s, state.inflight, extra={"event": "drain_start", "inflight": state.inflight})
        elapsed = time.monotonic() - (state.drain_started or time.monotonic())
        if state.inflight == 0:
            log.warning("drained after %.1fs; shutting down", elapsed, extra={"event": "drained", "exit_code": EXIT_OK})
            self.config.timeout_graceful_shutdown = max(1.0, self.drain_timeout_s - elapsed)
            self.should_exit = True
        elif elapsed >= self.drain_timeout_s:
            log.error("drain timed out after %.1fs with %d requests in progress; they are cancelled", elapsed,
                      state.inflight, extra={"event": "drain_timeout", "inflight": state.inflight,
                                             "exit_code": EXIT_DRAIN_TIMEOUT})
            self.exit_code = EXIT_DRAIN_TIMEOUT
            self.config.timeout_graceful_shutdown = 0.5
            self.should_exit = True


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", drain_timeout_s: float = 30.0,
          keep_alive_s: float = 65.0) -> int:
    """Serve until drained or the engine dies; returns the process exit code.

    `keep_alive_s` is how long an idle connection stays open. It is above the idle timeouts of clients (httpx
    5 s) and proxies (nginx, cloud load balancers: 60 s) so that they close first: a server that closes a
    connection just as a client reuses it (uvicorn's default is 5 s, the same as httpx's) fails that request
    with a reset or an empty reply."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, log_config=None,
                            timeout_graceful_shutdown=max(1.0, drain_timeout_s), timeout_keep_alive=keep_alive_s,
                            lifespan="on")
    server = DrainingServer(config, app, drain_timeout_s)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 itself when it cannot bind
        return EXIT_START_FAILED if exc.code else EXIT_OK
    if not server.started:
        return EXIT_START_FAILED
    return server.exit_code
