"""Admission control over real HTTP (uvicorn in a thread, the model held at a gate so the order is certain):

- a request past its deadline gets 504 and its queued work is never computed; the deadline is the
  request's own timeout_s, capped by the server's maximum, else the server default;
- a client that disconnects has its queued work dropped before it is computed;
- more scoring requests in progress than the bound get 429 with Retry-After;
- a queue full of tokens gets 429 with Retry-After, and once the queue is at its bound, new requests are
  refused before their body is parsed.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from service.api.app import ApiConfig, create_app
from service.engine.engine import EngineConfig, PRMEngine
from model_store.modeling import load_prm
from tests.conftest import make_trajectory, trajectory_json
from tests.reliability.helpers import GatedRunner, ThreadedServer, metric, wait_until


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_prm(tiny_checkpoint)


def serve(loaded, engine_config=EngineConfig(device="cpu", max_wait_ms=0), **api):
    engine = PRMEngine(loaded, engine_config)
    runner = GatedRunner(engine.scheduler.run_batch)
    engine.scheduler.run_batch = runner
    return engine, runner, ThreadedServer(create_app(engine, config=ApiConfig(**api)))


def ids_of(engine, task: str, n_steps: int, seed: int) -> tuple[int, ...]:
    return tuple(engine.renderer.render(make_trajectory(task, n_steps, seed)).ids)


def post_in_thread(url: str, body: dict, results: list) -> threading.Thread:
    def go():
        try:
            results.append(httpx.post(f"{url}/v1/score", json=body, timeout=30))
        except httpx.HTTPError as exc:
            results.append(exc)

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def hold_the_model(url: str, runner: GatedRunner, timeout_s: float | None = None) -> tuple[threading.Thread, list]:
    """Send one request and keep its batch at the gate: everything sent afterwards queues behind it."""
    runner.gate.clear()
    runner.started.clear()
    results: list = []
    body = {"trajectories": [trajectory_json("blocker", 2, seed=99)], "timeout_s": timeout_s}
    thread = post_in_thread(url, body, results)
    assert runner.started.wait(20), "the first batch never reached the model"
    return thread, results


def test_deadline_gives_504_and_drops_the_queued_work(loaded):
    engine, runner, server = serve(loaded, request_timeout_s=0.4, max_request_timeout_s=30)
    with server:
        blocker, blocked = hold_the_model(server.url, runner, timeout_s=30)
        late = httpx.post(f"{server.url}/v1/score", json={"trajectories": [trajectory_json("late", 3, seed=1)]},
                          timeout=30)  # the server default deadline: 0.4 s
        own: list = []
        patient = post_in_thread(server.url, {"trajectories": [trajectory_json("own", 2, seed=3)], "timeout_s": 20},
                                 own)
        wait_until(lambda: engine.scheduler.queue_depth == 1, what="the patient request to be queued")
        runner.gate.set()
        blocker.join(30)
        patient.join(30)
    assert late.status_code == 504 and late.json()["error"]["type"] == "deadline_exceeded"
    assert "deadline of 0.4 s" in late.json()["error"]["message"]
    assert blocked[0].status_code == 200  # the request the model was busy with still finished
    assert own[0].status_code == 200  # its own deadline, above the default and within the cap, was honoured
    computed = set(runner.computed)
    assert ids_of(engine, "late", 3, 1) not in computed
    assert ids_of(engine, "own", 2, 3) in computed


def test_a_requests_own_deadline_is_capped_by_the_server(loaded):
    engine, runner, server = serve(loaded, request_timeout_s=30, max_request_timeout_s=0.5)
    with server:
        blocker, _ = hold_the_model(server.url, runner)
        capped = httpx.post(f"{server.url}/v1/score", timeout=30, json={
            "trajectories": [trajectory_json("capped", 3, seed=2)], "timeout_s": 3600})
        runner.gate.set()
        blocker.join(30)
    assert capped.status_code == 504 and "deadline of 0.5 s" in capped.json()["error"]["message"]
    assert ids_of(engine, "capped", 3, 2) not in set(runner.computed)


def test_a_disconnected_clients_queued_work_is_never_computed(loaded):
    engine, runner, server = serve(loaded)
    with server:
        blocker, blocked = hold_the_model(server.url, runner)
        body = json.dumps({"trajectories": [trajectory_json("gone", 4, seed=5)]}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until(lambda: engine.scheduler.queue_depth == 1, what="the request to be queued")
        # The socket is closed: the server notices, cancels the call, and the job leaves the queue.
        wait_until(lambda: engine.scheduler.queue_depth == 0, what="the queued job to be dropped")
        runner.gate.set()
        blocker.join(30)
        after = httpx.post(f"{server.url}/v1/score", json={"trajectories": [trajectory_json("next", 1)]}, timeout=30)
        disconnected = metric(server.url, 'agentprm_errors_total{code="499"}')
    assert blocked[0].status_code == 200 and after.status_code == 200
    assert ids_of(engine, "gone", 4, 5) not in set(runner.computed)
    assert disconnected == 1


def test_too_many_requests_in_progress_get_429_with_retry_after(loaded):
    engine, runner, server = serve(loaded, max_inflight_requests=2)
    with server:
        blocker, blocked = hold_the_model(server.url, runner)
        second: list = []
        queued = post_in_thread(server.url, {"trajectories": [trajectory_json("second", 1)]}, second)
        wait_until(lambda: engine.scheduler.queue_depth == 1, what="the second request to be queued")
        third = httpx.post(f"{server.url}/v1/score", json={"trajectories": [trajectory_json("third", 1)]}, timeout=30)
        runner.gate.set()
        blocker.join(30)
        queued.join(30)
    assert third.status_code == 429 and third.json()["error"]["type"] == "overloaded"
    assert int(third.headers["retry-after"]) >= 1
    assert blocked[0].status_code == 200 and second[0].status_code == 200


def test_a_full_token_queue_gets_429_with_retry_after(loaded):
    engine, runner, server = serve(loaded, EngineConfig(device="cpu", max_wait_ms=0, max_queue_tokens=60))
    with server:
        blocker, blocked = hold_the_model(server.url, runner)
        first: list = []
        queued = post_in_thread(server.url, {"trajectories": [trajectory_json("fills", 4)]}, first)
        wait_until(lambda: engine.scheduler.queue_depth == 1, what="the queue to fill")
        over = httpx.post(f"{server.url}/v1/score", json={"trajectories": [trajectory_json("over", 4, seed=1)]},
                          timeout=30)
        # The bound is reached: the next request is refused before its body is even parsed.
        unparsed = httpx.post(f"{server.url}/v1/rerank", content=b"{not json", timeout=30,
                              headers={"content-type": "application/json"})
        refused_metric = metric(server.url, 'agentprm_requests_total{route="/v1/rerank",status="429"}')
        runner.gate.set()
        blocker.join(30)
        queued.join(30)
    assert over.status_code == 429 and "queue full" in over.json()["error"]["message"]
    assert int(over.headers["retry-after"]) >= 1
    assert unparsed.status_code == 429 and int(unparsed.headers["retry-after"]) >= 1
    assert refused_metric == 1
    assert first[0].status_code == 200
