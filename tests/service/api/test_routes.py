"""Every route through the app: success shapes, each error code, the error JSON shape, request ids, metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import ApiConfig, create_app
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import trajectory_json


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu", max_candidates=8,
                                                                      max_trajectories=4))
    with TestClient(create_app(engine, config=ApiConfig(max_body_bytes=64 * 1024))) as c:
        yield c


def assert_error(response, code: int, *fragments: str):
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["code"] == code
    for fragment in fragments:
        assert fragment in body["error"]["message"]
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"]


def test_score_returns_promise_and_progress_for_every_step(client):
    r = client.post("/v1/score", json={"trajectories": [trajectory_json("go to the red ball", 3),
                                                        trajectory_json("open the door", 1, seed=2)]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "tiny-prm:1"
    assert [len(res["steps"]) for res in body["results"]] == [3, 1]
    first = body["results"][0]
    assert first["score"] == first["steps"][-1]["promise"]
    assert first["steps"][0]["progress"] == pytest.approx(first["steps"][0]["promise"] - first["initial_value"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["computed_tokens"] > 0


def test_rerank_returns_candidates_sorted_with_indices(client):
    cands = [{"steps": trajectory_json("t", n, seed=n)["steps"]} for n in (1, 4, 2)]
    r = client.post("/v1/rerank", json={"task": "t", "candidates": cands, "aggregate": "mean"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == [0, 1, 2]
    assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)
    assert [len(x["steps"]) for x in results] == [len(cands[x["index"]]["steps"]) for x in results]
    top = client.post("/v1/rerank", json={"task": "t", "candidates": cands, "top_n": 1}).json()["results"]
    assert len(top) == 1


def test_beam_expand_returns_beam_width_selections(client):
    beams = [{"trajectory": trajectory_json("go to the red ball", 2), "observation": "a ball ahead",
              "candidates": ["move forward", "turn left", "turn right"]},
             {"trajectory": {"task": "go to the red ball", "steps": []}, "observation": "a wall",
              "candidates": ["turn left", "toggle"]}]
    r = client.post("/v1/beam-expand", json={"beam_width": 2, "beams": beams})
    assert r.status_code == 200
    body = r.json()
    assert [len(c) for c in body["candidates"]] == [3, 2]
    assert len(body["selected"]) == 2
    for sel in body["selected"]:
        cand = body["candidates"][sel["beam"]][sel["candidate"]]
        assert cand == {"promise": sel["promise"], "progress": sel["progress"]}


def test_models_health_ready_metrics(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-prm:1" and "default" in models["data"][0]["aliases"]
    assert client.get("/health").json() == {"status": "ok", "model": None}
    assert client.get("/ready").json()["status"] == "ready"
    client.post("/v1/score", json={"trajectories": [trajectory_json("t", 2)]})
    text = client.get("/metrics").text
    for name in ("agentprm_requests_total", "agentprm_request_duration_seconds_bucket", "agentprm_queue_depth",
                 "agentprm_batch_size_bucket", "agentprm_batch_tokens_bucket", "agentprm_tokens_computed_total",
                 "agentprm_steps_scored_total", "process_resident_memory_bytes"):
        assert name in text, name
    assert 'agentprm_requests_total{route="/v1/score",status="200"}' in text


def test_openapi_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/rerank", "/v1/beam-expand", "/v1/models", "/health", "/ready", "/metrics"} <= set(paths)


def test_request_id_is_echoed_or_generated(client):
    r = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32 and generated != "abc-123"


def test_unknown_model_is_404(client):
    assert_error(client.post("/v1/score", json={"model": "other", "trajectories": [trajectory_json("t", 1)]}),
                 404, "other")


def test_oversized_body_is_413(client):
    huge = {"trajectories": [{"task": "x" * 70_000, "steps": [{"observation": "o", "action": "a"}]}]}
    assert_error(client.post("/v1/score", json=huge), 413, "limit")


@pytest.mark.parametrize("path,body,fragment", [
    ("/v1/score", {"trajectories": []}, "trajectories"),
    ("/v1/score", {"trajectories": [{"task": "t", "steps": []}]}, "no steps"),
    ("/v1/score", {"trajectories": [trajectory_json("t", 1)], "aggregate": "max"}, "aggregate"),
    ("/v1/score", {"trajectories": [trajectory_json("t", 60)]}, "at most 512"),
    ("/v1/score", {"trajectories": [trajectory_json("t", 1)] * 5}, "limit is 4"),
    ("/v1/score", {"trajectories": [{"task": 3, "steps": "x"}]}, "trajectories.0"),
    ("/v1/rerank", {"task": "t", "candidates": []}, "candidates"),
    ("/v1/rerank", {"task": "t", "candidates": [{"steps": trajectory_json("t", 1)["steps"]}] * 9}, "limit is 8"),
    ("/v1/rerank", {"task": "t", "candidates": [{"steps": []}]}, "candidates.0.steps"),
    ("/v1/beam-expand", {"beam_width": 2, "beams": []}, "beams"),
    ("/v1/beam-expand", {"beam_width": 0, "beams": [{"trajectory": {"task": "t"}, "observation": "o",
                                                      "candidates": ["a"]}]}, "beam_width"),
    ("/v1/beam-expand", {"beam_width": 1, "beams": [{"trajectory": {"task": "t"}, "observation": "o",
                                                      "candidates": ["a"] * 9}]}, "limit is 8"),
])
def test_invalid_requests_are_422(client, path, body, fragment):
    assert_error(client.post(path, json=body), 422, fragment)


def test_malformed_json_is_422(client):
    assert_error(client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"}), 422)


def test_unexpected_engine_failure_is_500_without_traceback(tiny_checkpoint):
    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
    calls = {"n": 0}
    real = engine.runner.run_batch

    def flaky(jobs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("secret internal detail")
        return real(jobs)

    engine.scheduler.run_batch = flaky
    with TestClient(create_app(engine)) as c:
        r = c.post("/v1/score", json={"trajectories": [trajectory_json("t", 2)]})
        assert_error(r, 500)
        assert "secret internal detail" not in r.text
        assert c.post("/v1/score", json={"trajectories": [trajectory_json("t", 2)]}).status_code == 200


def test_a_body_that_is_not_utf8_is_422(client):
    r = client.post("/v1/score", content=b'{"trajectories": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert_error(r, 422, "UTF-8")


@pytest.mark.parametrize("timeout_s", [0, -1, "soon", 10**6])
def test_an_invalid_timeout_is_422(client, timeout_s):
    body = {"trajectories": [trajectory_json("t", 1)], "timeout_s": timeout_s}
    assert_error(client.post("/v1/score", json=body), 422, "timeout_s")


def test_draining_turns_ready_and_scoring_to_503_but_not_health(tiny_checkpoint):
    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
    app = create_app(engine)
    with TestClient(app) as c:
        assert c.post("/v1/score", json={"trajectories": [trajectory_json("t", 1)]}).status_code == 200
        app.state.server.begin_drain()
        ready = c.get("/ready")
        assert_error(ready, 503, "draining")
        for path, body in (("/v1/score", {"trajectories": [trajectory_json("t", 1)]}),
                           ("/v1/rerank", {"task": "t", "candidates": [{"steps": trajectory_json("t", 1)["steps"]}]}),
                           ("/v1/beam-expand", {"beam_width": 1, "beams": [{"trajectory": {"task": "t"},
                                                                             "observation": "o",
                                                                             "candidates": ["a"]}]})):
            r = c.post(path, json=body)
            assert_error(r, 503, "draining")
            assert r.json()["error"]["type"] == "draining" and r.headers["retry-after"] == "1"
        unparsed = c.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert_error(unparsed, 503, "draining")  # refused before the body is read
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 200
        assert "agentprm_inflight_requests 0.0" in c.get("/metrics").text


def test_oversized_body_without_content_length_is_413(client):
    huge = b'{"trajectories": [{"task": "' + b"x" * 70_000 + b'", "steps": []}]}'

    def chunks():
        for i in range(0, len(huge), 8192):
            yield huge[i:i + 8192]

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "limit")


def test_requests_are_served_without_the_worker_thread_pool(client):
    """Every route runs on the event loop: no request hops to FastAPI's thread pool (a sync dependency or
    handler would, and each of its up to 40 threads gets its own C-heap arena)."""
    import threading

    body = {"trajectories": [trajectory_json("go to the red ball", 2)]}
    for _ in range(3):
        assert client.post("/v1/score", json=body).status_code == 200
        assert client.post("/v1/rerank", json={"task": "t", "candidates": [{"steps": body["trajectories"][0]["steps"]}]}
                           ).status_code == 200
        for path in ("/v1/models", "/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200
    pool = [t.name for t in threading.enumerate() if t.name.startswith("AnyIO worker thread")]
    assert pool == []
