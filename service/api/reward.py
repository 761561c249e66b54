"""The RL-trainer reward route: OpenRLHF's remote reward-model wire format (`--reward.remote_url`).

OpenRLHF (0.11.2, openrlhf/utils/agent.py `_fetch_rewards_via_http`) POSTs `{"query": [...], "prompts":
[...], "labels": [...]}`, where each query is the decoded prompt + response, and reads `rewards`, `scores`
and `extra_logs` from the answer (`extra_logs` values become logged tensors, one entry per sample).
Older versions split a batch across servers and send empty lists to the spare ones: an empty list gets
empty lists. How a query becomes steps and how steps become one reward are the server's `--reward-*`
settings, overridable per URL with the query parameters `step_format`, `delimiter` and `aggregate` (OpenRLHF
sends the URL as given, query string included). Labels are accepted and ignored (a PRM needs no reference).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from service.api import text_steps
from service.api.admission import guarded
from service.api.deps import EngineDep
from service.api.protocol import ErrorResponse
from service.engine import types as E
from service.engine.errors import InvalidInput

router = APIRouter(prefix="/v1", tags=["rl-trainers"],
                   responses={code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 500, 503, 504)})


class RewardRequest(BaseModel):
    query: list[str] = Field(description="One text per sample: prompt + response, as the trainer decoded it")
    prompts: list[str] | None = Field(default=None, description="The prompt of each query (the task under "
                                                                "step_format=delimiter)")
    labels: list[Any] | None = Field(default=None, description="Reference answers; accepted and ignored")


class RewardResponse(BaseModel):
    rewards: list[float] = Field(description="One reward per query")
    scores: list[float] = Field(description="The same values (OpenRLHF reads scores for filtering and logs)")
    extra_logs: dict[str, list] = Field(description="Per query: prm_num_steps, prm_initial_value, "
                                                    "prm_step_promise and prm_step_progress (lists)")


@router.post("/reward", response_model=RewardResponse)
async def reward(body: RewardRequest, engine: EngineDep, request: Request,
                 step_format: Annotated[text_steps.StepFormat | None, Query(
                     description="How a query splits into steps (default: --reward-step-format)")] = None,
                 delimiter: Annotated[str | None, Query(
                     min_length=1, description="Step delimiter for step_format=delimiter; \\n, \\t and \\\\ "
                                               "read as newline, tab, backslash (default: --reward-step-delimiter)")
                 ] = None,
                 aggregate: Annotated[text_steps.RewardAggregate | None, Query(
                     description="How steps become one reward (default: --reward-aggregate)")] = None,
                 model: Annotated[str, Query(description="Model name or alias")] = "default",
                 timeout_s: Annotated[float | None, Query(gt=0, le=86400, description="Deadline in seconds")] = None,
                 ) -> RewardResponse:
    """OpenRLHF remote reward: one scalar reward per query, from the PRM's per-step promises."""
    config = request.app.state.config
    step_format = step_format or config.reward_step_format
    delimiter = text_steps.decode_escapes(delimiter or config.reward_step_delimiter)
    aggregate = aggregate or config.reward_aggregate
    if body.prompts is not None and len(body.prompts) != len(body.query):
        raise InvalidInput(f"prompts has {len(body.prompts)} items, query has {len(body.query)}: give one prompt "
                           f"per query, or none")
    parsed = []
    for i, text in enumerate(body.query):
        try:
            parsed.append(text_steps.parse_text(text, body.prompts[i] if body.prompts else None, step_format,
                                                delimiter))
        except text_steps.TextStepsError as exc:
            raise InvalidInput(f"query.{i}: {exc}") from None
    scored = [i for i, p in enumerate(parsed) if p.steps]  # a text without a step scores 0.0 without the model
    results: dict[int, E.TrajectoryScore] = {}
    if scored:
        trajectories = [E.Trajectory(parsed[i].task, tuple(E.Step(o, a) for o, a in parsed[i].steps)) for i in scored]
        out = await guarded(request, lambda: engine.score(model, trajectories, "last",
                                                          request_id=getattr(request.state, "request_id", "")),
                            timeout_s)
        request.state.usage = out.usage
        results = dict(zip(scored, out.results))
    rewards, logs = [], {"prm_num_steps": [], "prm_initial_value": [], "prm_step_promise": [],
                         "prm_step_progress": []}
    for i in range(len(body.query)):
        r = results.get(i)
        promises = [s.promise for s in r.steps] if r else []
        progress = [s.progress for s in r.steps] if r else []
        rewards.append(text_steps.aggregate_reward(promises, progress, aggregate))
        logs["prm_num_steps"].append(len(promises))
        logs["prm_initial_value"].append(r.initial_value if r else 0.0)
        logs["prm_step_promise"].append(promises)
        logs["prm_step_progress"].append(progress)
    return RewardResponse(rewards=rewards, scores=list(rewards), extra_logs=logs)
