"""Helpers for the reliability tests: an in-thread uvicorn server, a gated runner, /metrics parsing."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from tests.conftest import free_port

API_KEY = "reliability-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class ThreadedServer:
    """A real uvicorn server (HTTP over 127.0.0.1) for an in-process app, run in a background thread."""

    def __init__(self, app, server_class=uvicorn.Server, **server_kwargs):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                log_config=None)
        self.server = server_class(config, **server_kwargs)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="test-uvicorn")

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-thread server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class GatedRunner:
    """Wraps a runner's run_batch: records every batch's token ids, and holds each batch until `gate` opens."""

    def __init__(self, run_batch):
        self.real = run_batch
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.computed: list[tuple[int, ...]] = []

    def __call__(self, jobs):
        self.computed.extend(j.ids for j in jobs)
        self.started.set()
        if not self.gate.wait(timeout=20):
            raise RuntimeError("test gate never opened")
        return self.real(jobs)


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` every 20 ms until it is true; fail after `timeout` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """Sum of every sample of a Prometheus metric (all label sets) read from /metrics."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_instrumented(mode: str, checkpoint, *extra: str):
    """Like tests.conftest.start_server, through tests.reliability.faulty_serve MODE (slow, device-error)."""
    from tests.conftest import start_server

    return start_server(checkpoint, *extra, module=("tests.reliability.faulty_serve", mode))