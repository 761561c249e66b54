"""API keys: every route of the app is enumerated, so a route added later cannot be left open by accident.

Without a key (or with a wrong one, or another scheme) every route except /health and /ready answers 401;
with the key none does. /metrics follows the metrics-auth setting. Keys come from flags, the environment
(comma-separated) and a key file, all at once; an unreadable key file stops `serve` before anything loads.
"""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from service.api.app import ApiConfig, create_app
from service.cli import _settings_from_args, build_parser, main
from service.engine.engine import EngineConfig, PRMEngine
from model_store.modeling import load_prm
from tests.conftest import trajectory_json
from tests.reliability.helpers import API_KEY, AUTH

OTHER_KEY = "second-key-abcdef"
PUBLIC = {"/health", "/ready"}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_prm(tiny_checkpoint)


@pytest.fixture
def engine(loaded):  # a fresh engine per app: an app's lifespan stops its engine for good
    return PRMEngine(loaded, EngineConfig(device="cpu"))


def endpoints(app) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        # A Mount or websocket route would need its own rule here: fail loudly rather than skip it.
        assert isinstance(route, (APIRoute, Route)), f"unknown route type {type(route).__name__}: extend this test"
        for method in sorted(route.methods or ()):
            found.append((method, route.path))
    return found


def call(client: TestClient, method: str, path: str, headers: dict):
    body = None
    if method == "POST":
        body = {"trajectories": [trajectory_json("t", 1)]} if path == "/v1/score" else {}
    return client.request(method, path, headers=headers, json=body)


@pytest.mark.parametrize("metrics_auth", [True, False])
def test_every_route_needs_a_key_except_the_probes(engine, metrics_auth):
    app = create_app(engine, config=ApiConfig(api_keys=(API_KEY, OTHER_KEY), metrics_auth=metrics_auth))
    open_paths = PUBLIC | (set() if metrics_auth else {"/metrics"})
    routes = endpoints(app)
    assert {p for _, p in routes} >= {"/v1/score", "/v1/rerank", "/v1/beam-expand", "/v1/models", "/metrics",
                                      "/openapi.json", "/docs"}
    with TestClient(app) as client:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"},
                            {"Authorization": "Bearer"}, {"X-API-Key": API_KEY}):
                r = call(client, method, path, headers)
                if path in open_paths:
                    assert r.status_code != 401, (method, path, headers)
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    if method != "HEAD":
                        assert r.json()["error"]["type"] == "unauthorized"
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    assert r.headers["x-request-id"]
            for key in (API_KEY, OTHER_KEY):
                r = call(client, method, path, {"Authorization": f"Bearer {key}"})
                assert r.status_code != 401, (method, path)
                assert r.status_code < 500, (method, path, r.text)
        scored = client.post("/v1/score", headers=AUTH, json={"trajectories": [trajectory_json("t", 2)]})
        assert scored.status_code == 200 and len(scored.json()["results"][0]["steps"]) == 2


def test_unknown_paths_do_not_reveal_themselves_without_a_key(engine):
    with TestClient(create_app(engine, config=ApiConfig(api_keys=(API_KEY,)))) as client:
        assert client.get("/v2/secret").status_code == 401
        assert client.get("/v2/secret", headers=AUTH).status_code == 404


def test_no_keys_means_open(engine):
    with TestClient(create_app(engine)) as client:
        assert client.get("/v1/models").status_code == 200
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_openapi_declares_the_bearer_scheme_and_the_public_probes(engine):
    with TestClient(create_app(engine, config=ApiConfig(api_keys=(API_KEY,)))) as client:
        schema = client.get("/openapi.json", headers=AUTH).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}
    assert schema["security"] == [{"bearer": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert schema["paths"]["/ready"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/v1/score"]["post"]  # inherits the global requirement


def test_keys_from_flags_environment_and_file_all_count(tmp_path, monkeypatch):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# rotated 2026-01\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("AGENTPRM_API_KEY", "env-key-1, env-key-2")
    args = build_parser().parse_args(["serve", "--api-key-file", str(key_file)])
    assert _settings_from_args(args).api_keys() == ("env-key-1", "env-key-2", "file-key-1", "file-key-2")
    args = build_parser().parse_args(["serve", "--api-key", "flag-1", "--api-key", "flag-2"])
    assert _settings_from_args(args).api_keys() == ("flag-1", "flag-2")  # flags replace the environment
    monkeypatch.setenv("AGENTPRM_METRICS_AUTH", "false")
    assert _settings_from_args(build_parser().parse_args(["serve"])).metrics_auth is False
    assert _settings_from_args(build_parser().parse_args(["serve", "--metrics-auth"])).metrics_auth is True


@pytest.mark.parametrize("content,message", [(None, "cannot read the API key file"),
                                             ("# only a comment\n\n", "has no keys")])
def test_an_unusable_key_file_stops_serve_before_loading(tmp_path, capsys, content, message):
    key_file = tmp_path / "keys.txt"
    if content is not None:
        key_file.write_text(content)
    code = main(["serve", "--model", str(tmp_path / "no-such-model"), "--api-key-file", str(key_file)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(key_file) in err
    assert "no-such-model" not in err  # refused before the checkpoint was even looked at
