"""Every request and response model of the HTTP API (the contract in README.md; docs/ARCHITECTURE.md, "One request"), in one place.

Request models convert themselves into engine parameters (`to_engine`); response models build themselves
from engine outputs (`from_engine`). Field names are the contract that clients and adapters rely on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine import types as E

Aggregate = Literal[E.AGGREGATES]


def _timeout_field():
    return Field(default=None, gt=0, le=86400,
                 description="Deadline of this request in seconds (504 beyond it; its remaining work is dropped). "
                             "Default: the server's request timeout; values above the server's cap are lowered "
                             "to the cap.")


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StepIn(_In):
    observation: str = Field(description="What the agent observed before acting")
    action: str = Field(description="The action the agent took")


class TrajectoryIn(_In):
    task: str = Field(description="The task instruction u")
    steps: list[StepIn] = Field(default_factory=list, description="Observation/action pairs in order")

    def to_engine(self) -> E.Trajectory:
        return E.Trajectory(self.task, tuple(E.Step(s.observation, s.action) for s in self.steps))


class ScoreRequest(_In):
    model: str = E.DEFAULT_MODEL_ALIAS
    trajectories: list[TrajectoryIn] = Field(min_length=1)
    aggregate: Aggregate = E.DEFAULT_AGGREGATE
    timeout_s: float | None = _timeout_field()


class StepOut(BaseModel):
    promise: float = Field(description="Q_t: expected final success after taking this step")
    progress: float = Field(description="A_t = Q_t - Q_{t-1} (for t = 0, Q_0 - initial_value)")

    @classmethod
    def from_engine(cls, s: E.StepScore) -> "StepOut":
        return cls(promise=s.promise, progress=s.progress)


class Usage(BaseModel):
    prompt_tokens: int
    computed_tokens: int
    cached_tokens: int

    @classmethod
    def from_engine(cls, u: E.Usage) -> "Usage":
        return cls(prompt_tokens=u.prompt_tokens, computed_tokens=u.computed_tokens, cached_tokens=u.cached_tokens)


class TrajectoryResult(BaseModel):
    score: float
    initial_value: float
    steps: list[StepOut]


class ScoreResponse(BaseModel):
    model: str
    results: list[TrajectoryResult]
    usage: Usage

    @classmethod
    def from_engine(cls, out: E.ScoreOutput) -> "ScoreResponse":
        return cls(model=out.model, usage=Usage.from_engine(out.usage),
                   results=[cls.result_from_engine(r) for r in out.results])

    @staticmethod
    def result_from_engine(r: E.TrajectoryScore) -> TrajectoryResult:
        return TrajectoryResult(score=r.score, initial_value=r.initial_value,
                                steps=[StepOut.from_engine(s) for s in r.steps])


class CandidateIn(_In):
    steps: list[StepIn] = Field(min_length=1)


class RerankRequest(_In):
    model: str = E.DEFAULT_MODEL_ALIAS
    task: str
    candidates: list[CandidateIn] = Field(min_length=1)
    aggregate: Aggregate = E.DEFAULT_AGGREGATE
    top_n: int | None = Field(default=None, ge=1, description="Return only the best top_n candidates")
    timeout_s: float | None = _timeout_field()

    def to_engine(self) -> list[tuple[E.Step, ...]]:
        return [tuple(E.Step(s.observation, s.action) for s in c.steps) for c in self.candidates]


class RerankResult(BaseModel):
    index: int = Field(description="Position of the candidate in the request")
    score: float
    initial_value: float
    steps: list[StepOut]


class RerankResponse(ScoreResponse):
    results: list[RerankResult]

    @staticmethod
    def result_from_engine(r: E.RankedCandidate) -> RerankResult:
        return RerankResult(index=r.index, score=r.score, initial_value=r.initial_value,
                            steps=[StepOut.from_engine(s) for s in r.steps])


class BeamIn(_In):
    trajectory: TrajectoryIn = Field(description="The beam's history (steps may be empty)")
    observation: str = Field(description="The observation the candidate actions respond to")
    candidates: list[str] = Field(min_length=1, description="Candidate actions to score")

    def to_engine(self) -> E.Beam:
        return E.Beam(self.trajectory.to_engine(), self.observation, tuple(self.candidates))


class BeamExpandRequest(_In):
    model: str = E.DEFAULT_MODEL_ALIAS
    beam_width: int = Field(ge=1, description="How many (beam, candidate) pairs survive")
    beams: list[BeamIn] = Field(min_length=1)
    timeout_s: float | None = _timeout_field()


class Selected(BaseModel):
    beam: int
    candidate: int
    promise: float
    progress: float


class BeamExpandResponse(BaseModel):
    model: str
    candidates: list[list[StepOut]]
    selected: list[Selected]
    usage: Usage

    @classmethod
    def from_engine(cls, out: E.ExpandOutput) -> "BeamExpandResponse":
        return cls(model=out.model, usage=Usage.from_engine(out.usage),
                   candidates=[[StepOut.from_engine(s) for s in beam] for beam in out.candidates],
                   selected=[Selected(beam=s.beam, candidate=s.candidate, promise=s.promise, progress=s.progress)
                             for s in out.selected])


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    name: str
    version: str
    max_seq_len: int
    aliases: list[str]
    method: str | None = None
    created_at: str | None = None

    @classmethod
    def from_engine(cls, m: E.ModelInfo) -> "ModelCard":
        return cls(id=m.ref, name=m.name, version=m.version, max_seq_len=m.max_seq_len, aliases=list(m.aliases),
                   method=m.method, created_at=m.created_at)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(BaseModel):
    status: str
    model: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
