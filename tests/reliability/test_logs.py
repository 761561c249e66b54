"""Structured logs: with the JSON format every record is one JSON object; the access log carries the
request id, method, route, status, latency and token usage, and never the request body.
"""

from __future__ import annotations

import io
import json
import logging

from fastapi.testclient import TestClient

from service import logs
from service.api.app import create_app
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import trajectory_json

SECRET = "the-agent-saw-a-private-document"


def test_json_access_log_has_the_fields_and_never_the_body(tiny_checkpoint):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.configure("info", "json", stream=stream)
    try:
        engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
        with TestClient(create_app(engine)) as client:
            body = {"trajectories": [{"task": SECRET, "steps": trajectory_json("t", 2)["steps"]}]}
            ok = client.post("/v1/score", json=body, headers={"X-Request-ID": "req-log-1",
                                                              "X-Episode-ID": "episode-7"})
            bad = client.post("/v1/score", json={"trajectories": [{"task": SECRET, "steps": []}]},
                              headers={"X-Request-ID": "req-log-2", "X-Episode-ID": "no spaces allowed"})
            client.get("/health")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert ok.status_code == 200 and bad.status_code == 422
    records = [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is JSON
    access = {r["request_id"]: r for r in records if r["logger"] == "agentprm.access"}
    first = access["req-log-1"]
    assert first["route"] == "/v1/score" and first["method"] == "POST" and first["status"] == 200
    assert first["duration_ms"] > 0 and first["level"] == "info" and first["ts"].endswith("+00:00")
    usage = ok.json()["usage"]
    assert (first["prompt_tokens"], first["computed_tokens"], first["cached_tokens"]) == (
        usage["prompt_tokens"], usage["computed_tokens"], usage["cached_tokens"])
    assert first["episode_id"] == "episode-7"
    assert access["req-log-2"]["status"] == 422 and "prompt_tokens" not in access["req-log-2"]
    assert "episode_id" not in access["req-log-2"]  # a malformed episode id is not written to the log
    assert not any(r["route"] == "/health" for r in access.values())  # probes only at debug level
    assert SECRET not in stream.getvalue()


def test_text_format_appends_the_fields_to_access_lines():
    record = logging.LogRecord("agentprm.access", logging.INFO, __file__, 1, "POST /v1/score 200 3.0ms", (), None)
    record.request_id, record.status = "abc", 200
    assert logs.TextFormatter().format(record).endswith("POST /v1/score 200 3.0ms request_id=abc status=200")
