"""Shared fixtures: tiny random checkpoints made on the fly, an engine, an app client, a live server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model_store.export import init_random

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Qwen2 PRM with a random head (promises vary, so numerical checks mean something)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_random(path, name="tiny-prm", version="1", layers=2, hidden=64, heads=4, kv_heads=2, seed=0,
                max_seq_len=512)
    return path


def make_trajectory(task: str, n_steps: int, seed: int = 0):
    from service.engine.types import Step, Trajectory

    words = ["red ball", "blue key", "wall", "yellow door", "green box", "grey box"]
    actions = ["turn left", "turn right", "move forward", "pick up", "drop", "toggle"]
    steps = tuple(Step(f"You see a {words[(seed + i) % 6]} {(seed * 7 + i) % 5 + 1} steps ahead.",
                       actions[(seed * 3 + i * 5) % 6]) for i in range(n_steps))
    return Trajectory(task, steps)


def trajectory_json(task: str, n_steps: int, seed: int = 0) -> dict:
    t = make_trajectory(task, n_steps, seed)
    return {"task": t.task, "steps": [{"observation": s.observation, "action": s.action} for s in t.steps]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not ready after {timeout}s")


# ready_timeout: a model load took 108 s on the shared 2-core machine at a load average of 12 (2026-12-02).
def start_server(checkpoint: Path, *extra: str, env: dict | None = None,
                 ready_timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, ready_timeout)
    except Exception:
        proc.kill()
        output = proc.communicate(timeout=10)[0].decode(errors="replace")
        raise RuntimeError(f"server did not start:\n{output[-3000:]}") from None
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint):
    """A real `agentprm serve` process on 127.0.0.1 (started once, stopped after the session)."""
    proc, url = start_server(tiny_checkpoint)
    yield url
    stop_server(proc)
