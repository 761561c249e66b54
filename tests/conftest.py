"""Shared fixtures: tiny random checkpoints made on the fly, an engine, an app client, a live server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from clients.local_server import SERVER_MODULE, ServerProcess, free_port, serve_command, wait_ready  # noqa: F401
from model_store.export import init_random

REPO = Path(__file__).resolve().parents[1]
# `--dtype auto` (and `train --precision auto`) measure the CPU's bf16 speed-up; the suite's fp32 numerics
# (1e-5 against transformers) must not depend on the machine it runs on, so auto resolves to fp32 here, in this
# process and in every server it starts. bf16 is tested with an explicit dtype (tests/service/engine/test_dtype.py).
os.environ.setdefault("AGENTPRM_BF16_SPEEDUP", "1.0")


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


# ready_timeout: a model load took 108 s on the shared 2-core machine at a load average of 12 (2026-12-02).
def start_server(checkpoint: Path, *extra: str, env: dict | None = None,
                 module: tuple[str, ...] = (SERVER_MODULE,), ready_timeout: float = 180.0
                 ) -> tuple[subprocess.Popen, str]:
    """`agentprm serve` of this tree (clients.local_server); its output stays on proc.stdout for the test."""
    port = free_port()
    server = ServerProcess(serve_command(port, checkpoint, *extra, module=module), f"http://127.0.0.1:{port}",
                           env={**os.environ, **(env or {})}, pipe_output=True)
    server.start(timeout_s=ready_timeout)
    return server.proc, server.url


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
