"""Route handlers: thin; each converts its request into engine parameters and the result back.

Scoring routes run their engine call through `admission.guarded` (drain, in-flight bound, deadline,
client disconnect) and leave the token usage in `request.state.usage` for the access log.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.admission import guarded
from service.engine.admission import Draining, retry_after_header
from service.api.deps import EngineDep
from service.api.errors import error_response
from service.api.protocol import (BeamExpandRequest, BeamExpandResponse, ErrorResponse, ModelCard, ModelList,
                                  RerankRequest, RerankResponse, ScoreRequest, ScoreResponse, Status,
                                  attach_message_indices)
from service.metrics import CONTENT_TYPE_LATEST

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 500, 503, 504)}

scoring = APIRouter(prefix="/v1", tags=["scoring"], responses=_ERRORS)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "")


async def _served(request: Request, timeout_s: float | None, call):
    """Run one engine call under admission (service.api.admission.guarded); its usage goes to the access log."""
    out = await guarded(request, call, timeout_s)
    request.state.usage = out.usage
    return out


# exclude_none: `message_index` appears only for messages input, so trajectory-form answers keep their shape.
@scoring.post("/score", response_model=ScoreResponse, response_model_exclude_none=True)
async def score(body: ScoreRequest, engine: EngineDep, request: Request) -> ScoreResponse:
    """Score whole trajectories: a promise and a progress for every step, from one forward pass each."""
    response = ScoreResponse.from_engine(await _served(request, body.timeout_s, lambda: engine.score(
        body.model, [t.to_engine() for t in body.trajectories], body.aggregate, request_id=_request_id(request))))
    for result, item in zip(response.results, body.trajectories):
        attach_message_indices(result.steps, item.message_indices)
    return response


@scoring.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True)
async def rerank(body: RerankRequest, engine: EngineDep, request: Request) -> RerankResponse:
    """Best-of-N: score candidate trajectories of one task and return them sorted best first."""
    response = RerankResponse.from_engine(await _served(request, body.timeout_s, lambda: engine.rerank(
        body.model, body.engine_task, body.to_engine(), body.aggregate, body.top_n,
        request_id=_request_id(request))))
    for result in response.results:
        attach_message_indices(result.steps, body.message_indices(result.index))
    return response


@scoring.post("/beam-expand", response_model=BeamExpandResponse, response_model_exclude_none=True)
async def beam_expand(body: BeamExpandRequest, engine: EngineDep, request: Request) -> BeamExpandResponse:
    """One step of step-level beam search: score every candidate action of every beam, keep the top beam_width."""
    response = BeamExpandResponse.from_engine(await _served(request, body.timeout_s, lambda: engine.expand(
        body.model, [b.to_engine() for b in body.beams], body.beam_width, request_id=_request_id(request))))
    for candidates, beam in zip(response.candidates, body.beams):
        attach_message_indices(candidates, None if beam.candidate_message_index is None
                               else [beam.candidate_message_index] * len(candidates))
    return response


models = APIRouter(prefix="/v1", tags=["models"], responses={401: {"model": ErrorResponse}})


@models.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep) -> ModelList:
    """The models this server scores with ('default' is an alias of the served model)."""
    return ModelList(data=[ModelCard.from_engine(m) for m in engine.models()])


ops = APIRouter(tags=["operations"])
_NOT_READY = {503: {"model": ErrorResponse}}


@ops.get("/health", response_model=Status, responses=_NOT_READY)
async def health(engine: EngineDep, request: Request):
    """Liveness: the process answers and its engine has not died (stays 200 while draining)."""
    state = await engine.check_health()
    fatal = request.app.state.server.fatal
    if not state.live or fatal:
        return error_response(503, "not_live", fatal or state.detail or "engine not running")
    return Status(status="ok")


@ops.get("/ready", response_model=Status, responses=_NOT_READY)
async def ready(engine: EngineDep, request: Request):
    """Readiness: the model is loaded, the engine accepts work, and the server is not draining."""
    server = request.app.state.server
    if server.draining:
        draining = Draining("the server is draining (shutting down)")
        return error_response(draining.code, draining.type, draining.message, retry_after_header(draining))
    state = await engine.check_health()
    if not state.ready or server.fatal:
        return error_response(503, "not_ready", server.fatal or state.detail or "not ready")
    return Status(status="ready", model=engine.models()[0].ref)


@ops.get("/metrics", response_class=Response, responses={401: {"model": ErrorResponse}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (prefix agentprm_, base units)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
