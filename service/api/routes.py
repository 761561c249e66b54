"""Route handlers: thin; each converts its request into engine parameters and the result back."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.deps import EngineDep, RequestIdDep
from service.api.errors import error_response
from service.api.protocol import (BeamExpandRequest, BeamExpandResponse, ErrorResponse, ModelCard, ModelList,
                                  RerankRequest, RerankResponse, ScoreRequest, ScoreResponse, Status)
from service.metrics import CONTENT_TYPE_LATEST

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 500, 503, 504)}

scoring = APIRouter(prefix="/v1", tags=["scoring"], responses=_ERRORS)


@scoring.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, engine: EngineDep, request_id: RequestIdDep) -> ScoreResponse:
    """Score whole trajectories: a promise and a progress for every step, from one forward pass each."""
    out = await engine.score(body.model, [t.to_engine() for t in body.trajectories], body.aggregate,
                             request_id=request_id)
    return ScoreResponse.from_engine(out)


@scoring.post("/rerank", response_model=RerankResponse)
async def rerank(body: RerankRequest, engine: EngineDep, request_id: RequestIdDep) -> RerankResponse:
    """Best-of-N: score candidate trajectories of one task and return them sorted best first."""
    out = await engine.rerank(body.model, body.task, body.to_engine(), body.aggregate, body.top_n,
                              request_id=request_id)
    return RerankResponse.from_engine(out)


@scoring.post("/beam-expand", response_model=BeamExpandResponse)
async def beam_expand(body: BeamExpandRequest, engine: EngineDep, request_id: RequestIdDep) -> BeamExpandResponse:
    """One step of step-level beam search: score every candidate action of every beam, keep the top beam_width."""
    out = await engine.expand(body.model, [b.to_engine() for b in body.beams], body.beam_width,
                              request_id=request_id)
    return BeamExpandResponse.from_engine(out)


models = APIRouter(prefix="/v1", tags=["models"], responses=_ERRORS)


@models.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep) -> ModelList:
    """The models this server scores with ('default' is an alias of the served model)."""
    return ModelList(data=[ModelCard.from_engine(m) for m in engine.models()])


ops = APIRouter(tags=["operations"])


@ops.get("/health", response_model=Status)
async def health(engine: EngineDep):
    """Liveness: the process answers and its engine has not died."""
    state = await engine.check_health()
    if not state.live:
        return error_response(503, "not_live", state.detail)
    return Status(status="ok")


@ops.get("/ready", response_model=Status, responses={503: {"model": ErrorResponse}})
async def ready(engine: EngineDep):
    """Readiness: the model is loaded and the engine accepts work."""
    state = await engine.check_health()
    if not state.ready:
        return error_response(503, "not_ready", state.detail or "not ready")
    return Status(status="ready", model=engine.models()[0].ref)


@ops.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (prefix agentprm_, base units)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
