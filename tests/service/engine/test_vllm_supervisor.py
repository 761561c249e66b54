"""The managed vLLM process dies with `agentprm serve --backend vllm`, however the server dies, also while vLLM
is still starting (service/engine/vllm_supervisor.py); vLLM's start-up failures stay one line with its exit
code, and a checkpoint vLLM cannot serve is refused in one line before vLLM starts. Default suite: a stand-in for vLLM's interpreter (a shell script given as --vllm-python) plays a vLLM
that is starting: it ignores SIGTERM, as vLLM's API server does until its engine is up (minutes on a CPU), and
has a worker process. The real vLLM is checked in test_vllm_backend.py (marker `vllm`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.local_server import free_port
from model_store.export import init_random
from tests.conftest import REPO

GONE_WITHIN_S = 20.0  # service.engine.vllm_server.ORPHAN_GRACE_S (5 s) plus a busy machine's scheduling

STARTING_VLLM = """#!/bin/sh
# A vLLM still starting: SIGTERM ignored (its API server handles it only once its engine is up), one worker.
trap "" TERM
sleep 600 &
echo "$$ $!" > "$FAKE_VLLM_PIDS"
wait
"""
FAILING_VLLM = """#!/bin/sh
echo "INFO starting the engine"
echo "ValueError: the stand-in refuses to start"
exit 3
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """head_dim 32: a size the vLLM export accepts (model_store.vllm_export.CPU_HEAD_SIZES)."""
    path = tmp_path_factory.mktemp("supervised") / "ckpt"
    init_random(path, name="tiny-supervised", version="1", layers=1, hidden=64, heads=2, kv_heads=1, seed=1,
                max_seq_len=256)
    return path


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def serve(checkpoint: Path, python: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(checkpoint), "--port", str(free_port()),
           "--backend", "vllm", "--vllm-python", str(python), "--vllm-start-timeout-s", "300"]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie has stopped; only its parent's wait is missing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see the vLLM processes")
def test_vllm_still_starting_dies_with_the_server_killed(checkpoint, tmp_path):
    """SIGKILL: no handler, no atexit of ours runs (a SIGTERM before the port is bound ends us the same way)."""
    pid_file = tmp_path / "pids"
    server = serve(checkpoint, script(tmp_path, "python", STARTING_VLLM), {"FAKE_VLLM_PIDS": str(pid_file)})
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or len(pid_file.read_text().split()) < 2:
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the stand-in vLLM was not started within 120 s"
            time.sleep(0.2)
        pids = [int(p) for p in pid_file.read_text().split()]
        assert all(map(running, pids))
        workdir = Path(os.readlink(f"/proc/{pids[0]}/cwd"))  # the server's temporary export folder
        assert (workdir / "model" / "config.json").is_file()
        server.kill()  # during vLLM's start-up: before the port is bound
        server.wait(timeout=30)
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(running, pids)), f"vLLM processes {pids} outlived the server by {GONE_WITHIN_S} s"
        assert not workdir.exists(), "the supervisor removes the export our server could not remove"
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()
        for pid in pids:  # never leave a process behind, even when the assertion failed
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_vllm_that_fails_to_start_is_one_line_with_its_exit_code(checkpoint, tmp_path):
    server = serve(checkpoint, script(tmp_path, "python", FAILING_VLLM), {})
    out, err = server.communicate(timeout=120)
    assert server.returncode == 1
    assert err.strip().splitlines()[-1] == ("agentprm: error: vLLM failed to start (exit code 3): ValueError: "
                                            "the stand-in refuses to start")
    assert "Traceback" not in err and "serving" not in out



def test_a_head_vllm_cannot_serve_is_refused_in_one_line_before_vllm_starts(tmp_path):
    from model_store.importers import import_value_model
    from tests.model_store import public_prms

    public_prms.qwen_prm(tmp_path / "src")  # Linear-ReLU-Linear head: no LAST/ALL classifier in vLLM 0.32
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name="qprm")
    pid_file = tmp_path / "pids"
    server = serve(tmp_path / "ckpt", script(tmp_path, "python", STARTING_VLLM), {"FAKE_VLLM_PIDS": str(pid_file)})
    out, err = server.communicate(timeout=120)
    assert server.returncode == 1
    assert err.strip().splitlines()[-1].startswith(
        f"agentprm: error: vLLM cannot serve {tmp_path / 'ckpt'}: an mlp value head is served by vLLM 0.32 only")
    assert not pid_file.exists()  # vLLM was never started
