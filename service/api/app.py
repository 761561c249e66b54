"""The FastAPI application factory. Depends only on the EngineClient interface and the protocol models.

`ApiConfig` holds the HTTP-side limits: body size, API keys and whether /metrics needs one, the default
and maximum request deadline, and the bound on scoring requests in progress. `app.state.server` is the
`ServerState` (draining, in-flight count, engine failure) that the server runner (service.api.server)
drives on SIGTERM and on engine death.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import Gauge

from service.api.admission import ServerState
from service.api.config import ApiConfig
from service.api.errors import install_error_handlers
from service.api.middleware import install_middleware
from service.api.reward import router as reward_router
from service.api.routes import models, ops, scoring
from service.engine.client import EngineClient
from service.metrics import Metrics

def create_app(engine: EngineClient, metrics: Metrics | None = None, config: ApiConfig = ApiConfig()) -> FastAPI:
    metrics = metrics or getattr(engine, "metrics", None) or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        app.state.server.engine_started = True
        try:
            yield
        finally:
            app.state.server.engine_started = False
            await engine.shutdown()

    app = FastAPI(title="AgentPRM Serve", version="0.1.0", lifespan=lifespan,
                  description="Process reward model service for LLM agents: per-step promise and progress, "
                              "Best-of-N reranking and step-level beam search.")
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.config = config
    app.state.server = ServerState(request_timeout_s=config.request_timeout_s,
                                   max_timeout_s=config.max_request_timeout_s,
                                   max_inflight=config.max_inflight_requests)
    app.state.server.saturated = getattr(engine, "saturated", None)  # EngineClient default: never saturated
    _export_state(metrics, app.state.server)
    install_error_handlers(app)
    for router in (scoring, reward_router, models, ops):
        app.include_router(router)
    if config.api_keys:
        _document_auth(app, config.public_paths)
    install_middleware(app, metrics=metrics, max_body_bytes=config.max_body_bytes, api_keys=config.api_keys,
                       public_paths=config.public_paths, log_access=config.access_log, state=app.state.server)
    return app


def _export_state(metrics: Metrics, state: ServerState) -> None:
    """agentprm_ready (the one place it is set: ServerState.ready) and agentprm_inflight_requests (scoring
    requests admitted and not yet answered: what a drain waits for)."""
    metrics.ready.set_function(lambda: 1 if state.ready() else 0)
    gauge = getattr(metrics, "inflight_requests", None)
    if gauge is None:
        gauge = Gauge("agentprm_inflight_requests", "Scoring requests admitted and not yet answered",
                      registry=metrics.registry)
        metrics.inflight_requests = gauge
    gauge.set_function(lambda: state.inflight)


def _document_auth(app: FastAPI, public: frozenset[str]) -> None:
    """Declare the Bearer scheme in /openapi.json: required everywhere except the public paths."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}
            schema["security"] = [{"bearer": []}]
            for path, item in schema.get("paths", {}).items():
                if path in public:
                    for operation in item.values():
                        operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
