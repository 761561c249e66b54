"""Fault isolation and engine death.

- A runner that raises on one batch fails only that batch's requests: 500 with the error shape, no
  traceback or internal detail, logged with their request ids; requests in other batches and later ones
  succeed.
- An engine that cannot recover turns /health and /ready to 503 and refuses work with 503; a real
  `agentprm serve` process whose device fails exits with code 3 so an orchestrator restarts it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.server import EXIT_ENGINE_DEAD
from service.engine.engine import EngineConfig, PRMEngine
from model_store.modeling import load_prm
from tests.conftest import REPO, free_port, make_trajectory, trajectory_json, wait_ready
from tests.reliability.helpers import GatedRunner, ThreadedServer, wait_until


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_prm(tiny_checkpoint)


def assert_error_shape(response, code: int) -> dict:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["code"] == code
    assert "Traceback" not in response.text and "injected" not in response.text
    return body["error"]


def test_a_failing_batch_fails_only_its_requests(loaded, caplog):
    engine = PRMEngine(loaded, EngineConfig(device="cpu", max_wait_ms=0))
    poison = tuple(engine.renderer.render(make_trajectory("poison", 2, seed=7)).ids)
    runner = GatedRunner(engine.scheduler.run_batch)

    def faulty(jobs):
        if any(j.ids == poison for j in jobs):
            runner.computed.extend(j.ids for j in jobs)
            raise RuntimeError("injected failure with a secret internal detail")
        return runner(jobs)

    engine.scheduler.run_batch = faulty
    responses: dict[str, httpx.Response] = {}

    def post(name: str, trajectory: dict):
        responses[name] = httpx.post(f"{server.url}/v1/score", json={"trajectories": [trajectory]},
                                     headers={"X-Request-ID": f"req-{name}"}, timeout=30)

    caplog.set_level(logging.ERROR, logger="agentprm")
    with ThreadedServer(create_app(engine)) as server:
        runner.gate.clear()
        first = threading.Thread(target=post, args=("first", trajectory_json("before", 1)))
        first.start()
        assert runner.started.wait(20)
        # Queued together behind the held batch: they become one batch, which fails.
        together = [threading.Thread(target=post, args=(name, traj)) for name, traj in
                    (("poisoned", trajectory_json("poison", 2, seed=7)), ("neighbour", trajectory_json("n", 3)))]
        for t in together:
            t.start()
        wait_until(lambda: engine.scheduler.queue_depth == 2, what="both requests to queue")
        runner.gate.set()
        for t in [first, *together]:
            t.join(30)
        post("after", trajectory_json("after", 2))
        still_alive = engine.scheduler.alive
    assert still_alive and engine.scheduler.failure is None
    assert responses["first"].status_code == 200 and responses["after"].status_code == 200
    for name in ("poisoned", "neighbour"):
        error = assert_error_shape(responses[name], 500)
        assert error["type"] == "internal_error" and "secret" not in error["message"]
        assert responses[name].headers["x-request-id"] == f"req-{name}"
    failure_logs = [r.getMessage() for r in caplog.records if "batch of" in r.getMessage()]
    assert len(failure_logs) == 1 and "req-poisoned" in failure_logs[0] and "req-neighbour" in failure_logs[0]


def test_a_dead_engine_fails_health_readiness_and_work(loaded):
    engine = PRMEngine(loaded, EngineConfig(device="cpu"))

    def broken(jobs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.scheduler.run_batch = broken
    with TestClient(create_app(engine)) as client:
        assert client.get("/ready").status_code == 200
        assert_error_shape(client.post("/v1/score", json={"trajectories": [trajectory_json("t", 1)]}), 500)
        wait_until(lambda: not engine.scheduler.alive, what="the scheduler to stop")
        assert assert_error_shape(client.get("/health"), 503)["type"] == "not_live"
        assert assert_error_shape(client.get("/ready"), 503)["type"] == "not_ready"
        refused = client.post("/v1/score", json={"trajectories": [trajectory_json("t", 1)]})
        error = assert_error_shape(refused, 503)
        assert "unrecoverable device error" in error["message"] and refused.headers["retry-after"] == "1"


def test_a_server_whose_device_fails_exits_non_zero(tiny_checkpoint):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.faulty_serve", "device-error", "serve",
                             "--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--log-level", "warning", "--log-format", "json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        response = httpx.post(f"{url}/v1/score", json={"trajectories": [trajectory_json("t", 2)]}, timeout=30)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read().decode(errors="replace")
    assert response.status_code in (500, 503)
    assert code == EXIT_ENGINE_DEAD, output[-3000:]
    assert '"event": "engine_dead"' in output and "unrecoverable device error" in output
