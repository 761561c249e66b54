"""Graceful drain of a real `agentprm serve` process under load.

SIGTERM while requests are in flight and queued: /ready turns 503 at once, a new scoring request gets
503 `draining` with Retry-After, every request admitted before the signal finishes 200, and the process
exits 0. When the drain timeout is shorter than the work left, the process still exits, with code 4; a
second signal stops it at once with code 5. Either way the requests cut short get 503 `shutting_down` in the
JSON error shape.
"""

from __future__ import annotations

import signal
import threading

import httpx

from service.api.server import EXIT_DRAIN_TIMEOUT, EXIT_FORCED, EXIT_OK
from tests.conftest import stop_server, trajectory_json
from tests.reliability.faulty_serve import SLOW_BATCH_S
from tests.reliability.helpers import metric, start_instrumented, wait_until

# One trajectory per batch (small token budget, no wait), each batch SLOW_BATCH_S slower than the model:
# the admitted work takes at least N_INFLIGHT * TRAJECTORIES * SLOW_BATCH_S = 2 s whatever the CPU.
SLOW_FLAGS = ("--max-batch-tokens", "32", "--max-wait-ms", "0")
N_INFLIGHT, TRAJECTORIES, STEPS = 4, 10, 3
assert N_INFLIGHT * TRAJECTORIES * SLOW_BATCH_S >= 2.0


def load(url: str) -> tuple[list[threading.Thread], dict[int, object]]:
    results: dict[int, object] = {}

    def one(i: int):
        body = {"trajectories": [trajectory_json(f"task {i}", STEPS, seed=i * 100 + k) for k in range(TRAJECTORIES)]}
        try:
            results[i] = httpx.post(f"{url}/v1/score", json=body, timeout=120)
        except httpx.HTTPError as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N_INFLIGHT)]
    for t in threads:
        t.start()
    return threads, results


def test_sigterm_drains_in_flight_work_refuses_new_work_and_exits_0(tiny_checkpoint):
    proc, url = start_instrumented("slow", tiny_checkpoint, *SLOW_FLAGS, "--drain-timeout-s", "120")
    try:
        threads, results = load(url)
        wait_until(lambda: metric(url, "agentprm_inflight_requests") == N_INFLIGHT, what="all requests admitted")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 503, what="/ready to turn 503")
        ready = httpx.get(f"{url}/ready", timeout=5)
        refused = httpx.post(f"{url}/v1/score", json={"trajectories": [trajectory_json("late", 2)]}, timeout=30)
        health = httpx.get(f"{url}/health", timeout=5)
        unfinished = sum(1 for i in range(N_INFLIGHT) if i not in results)
        for t in threads:
            t.join(120)
        code = proc.wait(timeout=120)
    finally:
        stop_server(proc)
    output = proc.stdout.read().decode(errors="replace")
    assert unfinished > 0, "the admitted work finished before the drain could be observed (make the load larger)"
    assert ready.json()["error"]["type"] == "draining"
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "draining"
    assert refused.headers["retry-after"] == "1"
    assert health.status_code == 200  # liveness holds while draining: the orchestrator must not kill it
    for i in range(N_INFLIGHT):
        assert isinstance(results[i], httpx.Response), results[i]
        assert results[i].status_code == 200, results[i].text
        assert len(results[i].json()["results"]) == TRAJECTORIES
    assert code == EXIT_OK, output[-3000:]
    assert "drained after" in output


def test_a_drain_past_its_timeout_still_exits_with_code_4(tiny_checkpoint):
    proc, url = start_instrumented("slow", tiny_checkpoint, *SLOW_FLAGS, "--drain-timeout-s", "0.3")
    try:
        threads, results = load(url)
        wait_until(lambda: metric(url, "agentprm_inflight_requests") == N_INFLIGHT, what="all requests admitted")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        for t in threads:
            t.join(60)
    finally:
        stop_server(proc)
    output = proc.stdout.read().decode(errors="replace")
    assert code == EXIT_DRAIN_TIMEOUT, output[-3000:]
    assert "drain timed out" in output
    assert_cancelled_in_json(results, output)


def assert_cancelled_in_json(results: dict, output: str) -> None:
    """Every request a forced stop cut short got the JSON error shape (503 shutting_down), not a text/plain
    500, and the server logged no traceback for it."""
    assert len(results) == N_INFLIGHT, results
    cancelled = [r for r in results.values() if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert cancelled, "every request finished: the forced stop cancelled nothing (make the load larger)"
    for r in cancelled:
        assert isinstance(r, httpx.Response), r
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", (r.status_code, r.text)
        assert r.json()["error"]["type"] == "shutting_down" and r.headers["retry-after"] == "1"
    assert "Traceback" not in output and "Internal Server Error" not in output, output[-3000:]


def test_a_second_signal_stops_at_once_with_its_own_exit_code(tiny_checkpoint):
    proc, url = start_instrumented("slow", tiny_checkpoint, *SLOW_FLAGS, "--drain-timeout-s", "120")
    try:
        threads, results = load(url)
        wait_until(lambda: metric(url, "agentprm_inflight_requests") == N_INFLIGHT, what="all requests admitted")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 503, what="the drain to start")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        for t in threads:
            t.join(60)
    finally:
        stop_server(proc)
    output = proc.stdout.read().decode(errors="replace")
    assert code == EXIT_FORCED, output[-3000:]  # never 0: that code means every admitted request finished
    assert_cancelled_in_json(results, output)
