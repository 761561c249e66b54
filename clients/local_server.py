"""A server in a subprocess on 127.0.0.1, for tests, benchmarks and evaluation: the one `free_port` and the one
launcher (tests/, bench/ and envs/ all use these).

- `free_port()`: a TCP port free on 127.0.0.1 right now.
- `ServerProcess(cmd, url, ...)`: any HTTP server command, started in its own process group, its output in a
  log file (or, with `pipe_output`, on `proc.stdout`, for the caller to read once the process ends), ready
  when `ready_path` answers 200 (bounded wait; an early exit or a timeout raises `ServerStartError` with the
  output's tail). Stopping sends SIGTERM to the group, then SIGKILL.
- `serve_command(...)` / `local_server(...)`: `python -m service.cli serve` of the running tree (the same
  interpreter, the repository as working directory), optionally with `--model`, as a context manager that
  yields the started `ServerProcess` (`.url`, `.proc`).

This module imports nothing from service/: the server runs in the child process only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
SERVER_MODULE = "service.cli"


class ServerStartError(RuntimeError):
    """The server exited before it was ready, or was not ready in time; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, model: Path | str | None = None, *extra: str, device: str | None = "cpu",
                  log_level: str = "warning", module: tuple[str, ...] = (SERVER_MODULE,)) -> list[str]:
    """`python -m service.cli serve` on 127.0.0.1:port (`module` may name a wrapper module and its args)."""
    cmd = [sys.executable, "-m", *module, "serve"]
    if model is not None:
        cmd += ["--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", log_level]
    if device is not None:
        cmd += ["--device", device]
    return cmd + list(extra)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0, ready_path: str = "/ready",
               poll_s: float = 0.2) -> float:
    """Seconds until `url + ready_path` answers 200. RuntimeError when `proc` exits first, TimeoutError after
    `timeout` seconds."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            if httpx.get(url + ready_path, timeout=2.0).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"server at {url} not ready after {timeout:.0f}s")


class ServerProcess:
    """A server subprocess in its own process group, with a log file and a bounded readiness wait."""

    def __init__(self, cmd: list[str], url: str, ready_path: str = "/ready", log_path: Path | str | None = None,
                 env: dict | None = None, cwd: Path | str | None = None, pipe_output: bool = False):
        self.cmd, self.url, self.ready_path = cmd, url, ready_path
        self.env, self.cwd, self.pipe_output = env, cwd, pipe_output
        self._own_log = log_path is None and not pipe_output
        if self._own_log:
            fd, log_path = tempfile.mkstemp(prefix="agentprm-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path) if log_path is not None else None
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None
        self._log = None
        self._t0 = 0.0

    def launch(self) -> "ServerProcess":
        """Start the process without waiting for it (see `wait`)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log or subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=str(self.cwd or REPO), start_new_session=True)
        return self

    def wait(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> float:
        """Seconds from launch to ready; ServerStartError (the process stopped, its output in the message)
        when it exits first or is not ready within `timeout_s`."""
        if self.proc is None:
            raise ServerStartError("the server was not launched")
        try:
            wait_ready(self.url, self.proc, timeout_s, self.ready_path, poll_s)
        except (RuntimeError, TimeoutError) as exc:
            tail = self._stop_and_tail()
            raise ServerStartError(f"{' '.join(self.cmd)}: {exc}:\n{tail}") from None
        self.start_s = time.monotonic() - self._t0
        return self.start_s

    def start(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> "ServerProcess":
        """Launch and wait until ready."""
        self.launch().wait(timeout_s, poll_s)
        return self

    def _stop_and_tail(self) -> str:
        proc = self.proc
        self.stop()
        if self.pipe_output and proc is not None and proc.stdout is not None:
            return proc.stdout.read().decode(errors="replace")[-3000:]
        return self.log_tail()

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop, and remove the log file when this object made it."""
        self.stop()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def local_server(model: Path | str | None = None, *extra: str, device: str | None = "cpu",
                 log_level: str = "warning", env: dict | None = None, log_path: Path | str | None = None,
                 ready_timeout_s: float = 300.0, module: tuple[str, ...] = (SERVER_MODULE,)
                 ) -> Iterator[ServerProcess]:
    """`agentprm serve` of this tree on 127.0.0.1 and a free port for the duration of a `with` block."""
    port = free_port()
    server = ServerProcess(serve_command(port, model, *extra, device=device, log_level=log_level, module=module),
                           f"http://127.0.0.1:{port}", log_path=log_path,
                           env={**os.environ, **(env or {})} if env is not None else None)
    server.start(ready_timeout_s)
    try:
        yield server
    finally:
        server.cleanup()
