"""The FastAPI application factory. Depends only on the EngineClient interface and the protocol models."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from service.api.errors import install_error_handlers
from service.api.middleware import ServiceMiddleware
from service.api.routes import models, ops, scoring
from service.engine.client import EngineClient
from service.metrics import Metrics


@dataclass(frozen=True)
class ApiConfig:
    max_body_bytes: int = 8 * 1024 * 1024


def create_app(engine: EngineClient, metrics: Metrics | None = None, config: ApiConfig = ApiConfig()) -> FastAPI:
    metrics = metrics or getattr(engine, "metrics", None) or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="AgentPRM Serve", version="0.1.0", lifespan=lifespan,
                  description="Process reward model service for LLM agents: per-step promise and progress, "
                              "Best-of-N reranking and step-level beam search.")
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in (scoring, models, ops):
        app.include_router(router)
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=config.max_body_bytes)
    return app
