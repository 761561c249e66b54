"""Every request and response model of the HTTP API (the contract in README.md; docs/ARCHITECTURE.md, "One request"), in one place.

Request models convert themselves into engine parameters (`to_engine`); response models build themselves
from engine outputs (`from_engine`). Field names are the contract that clients and adapters rely on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from service.api import messages as M
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


class FunctionCallIn(_In):
    name: str = Field(description="The tool's name")
    arguments: str | dict = Field(default="{}", description="The arguments: a JSON string (OpenAI) or an object")


class ToolCallIn(_In):
    id: str | None = None
    type: str = "function"
    function: FunctionCallIn


class MessageIn(_In):
    """An OpenAI-style chat message (content may be a string, null, or a list of content parts)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict | str] | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, description="An assistant message's tool calls")
    tool_call_id: str | None = None
    name: str | None = None


def _message_dicts(messages: list[MessageIn]) -> list[dict]:
    return [m.model_dump(exclude_none=True) for m in messages]


def _mapped(messages: list[MessageIn], where: str = "messages") -> M.MappedConversation:
    try:
        return M.map_messages(_message_dicts(messages), where)
    except M.MessagesError as exc:
        raise ValueError(str(exc)) from None


class TrajectoryIn(_In):
    """A trajectory: `task` and `steps`, or OpenAI-style `messages` instead (exactly one of the two forms)."""

    task: str | None = Field(default=None, description="The task instruction u")
    steps: list[StepIn] = Field(default_factory=list, description="Observation/action pairs in order")
    messages: list[MessageIn] | None = Field(default=None, min_length=1, description=(
        "Chat messages instead of task/steps: system + first user message = task, every assistant message "
        "(text + tool calls) = one action, the messages after it = the next observation (README: Chat messages)"))
    _conversation: M.MappedConversation | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_form(self):
        if self.messages is not None:
            if self.task is not None or self.steps:
                raise ValueError("give either task and steps, or messages, not both")
            self._conversation = _mapped(self.messages)
        elif self.task is None:
            raise ValueError("give task (with steps) or messages")
        return self

    @property
    def message_indices(self) -> list[int] | None:
        """Each step's assistant-message index, for the messages form (None for the task/steps form)."""
        return None if self._conversation is None else [s.message_index for s in self._conversation.steps]

    def to_engine(self) -> E.Trajectory:
        if self._conversation is not None:
            c = self._conversation
            return E.Trajectory(c.task, tuple(E.Step(s.observation, s.action) for s in c.steps))
        return E.Trajectory(self.task, tuple(E.Step(s.observation, s.action) for s in self.steps))


class ScoreRequest(_In):
    model: str = E.DEFAULT_MODEL_ALIAS
    trajectories: list[TrajectoryIn] = Field(min_length=1)
    aggregate: Aggregate = E.DEFAULT_AGGREGATE
    timeout_s: float | None = _timeout_field()


class StepOut(BaseModel):
    promise: float = Field(description="Q_t: expected final success after taking this step")
    progress: float = Field(description="A_t = Q_t - Q_{t-1} (for t = 0, Q_0 - initial_value)")
    message_index: int | None = Field(default=None, description="For messages input: the position of this "
                                                                "step's assistant message (absent otherwise)")

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


def attach_message_indices(steps: list[StepOut], indices: list[int] | None) -> None:
    """Mark each step with its assistant message's position (messages input only)."""
    if indices is not None:
        for step, index in zip(steps, indices, strict=True):
            step.message_index = index


class CandidateIn(_In):
    steps: list[StepIn] | None = Field(default=None, min_length=1)
    messages: list[MessageIn] | None = Field(default=None, min_length=1, description=(
        "Instead of steps: this candidate's messages, appended to the request's messages"))

    @model_validator(mode="after")
    def _one_form(self):
        if (self.steps is None) == (self.messages is None):
            raise ValueError("give either steps or messages")
        return self


class RerankRequest(_In):
    model: str = E.DEFAULT_MODEL_ALIAS
    task: str | None = Field(default=None, description="The task (with candidates as steps)")
    messages: list[MessageIn] | None = Field(default=None, min_length=1, description=(
        "Instead of task: the conversation so far, shared by every candidate (candidates then give messages)"))
    candidates: list[CandidateIn] = Field(min_length=1)
    aggregate: Aggregate = E.DEFAULT_AGGREGATE
    top_n: int | None = Field(default=None, ge=1, description="Return only the best top_n candidates")
    timeout_s: float | None = _timeout_field()
    _conversations: list[M.MappedConversation] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_form(self):
        if (self.task is None) == (self.messages is None):
            raise ValueError("give either task (candidates as steps) or messages (candidates as messages)")
        form = "messages" if self.messages is not None else "steps"
        for i, c in enumerate(self.candidates):
            if getattr(c, form) is None:
                raise ValueError(f"candidates.{i}: with {'messages' if form == 'messages' else 'task'} in the "
                                 f"request, every candidate gives {form}")
        if self.messages is not None:
            self._conversations = [_mapped(self.messages + c.messages, f"candidates.{i} (request + candidate "
                                           f"messages)") for i, c in enumerate(self.candidates)]
            tasks = {c.task for c in self._conversations}
            if len(tasks) > 1:
                raise ValueError("candidates' messages give different tasks: put the system and first user "
                                 "message in the request's messages")
        return self

    @property
    def engine_task(self) -> str:
        return self._conversations[0].task if self._conversations else self.task

    def message_indices(self, index: int) -> list[int] | None:
        """Candidate `index`'s steps' message positions in (request messages + candidate messages)."""
        return None if self._conversations is None else [s.message_index for s in self._conversations[index].steps]

    def to_engine(self) -> list[tuple[E.Step, ...]]:
        if self._conversations is not None:
            return [tuple(E.Step(s.observation, s.action) for s in c.steps) for c in self._conversations]
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
    trajectory: TrajectoryIn | None = Field(default=None, description="The beam's history (steps may be empty)")
    observation: str | None = Field(default=None, description="The observation the candidate actions respond to "
                                                              "(with trajectory)")
    messages: list[MessageIn] | None = Field(default=None, min_length=1, description=(
        "Instead of trajectory and observation: the beam's messages, ending with the observation (the messages "
        "after the last assistant message) the candidates respond to"))
    candidates: list[str | MessageIn] = Field(min_length=1, description="Candidate actions: strings, or "
                                                                        "assistant messages")
    _conversation: M.MappedConversation | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_form(self):
        if self.messages is not None:
            if self.trajectory is not None or self.observation is not None:
                raise ValueError("give either trajectory and observation, or messages, not both")
            self._conversation = _mapped(self.messages)
            if self._conversation.steps and self._conversation.pending_observation is None:
                raise ValueError("messages end with an assistant message: they must end with the observation "
                                 "(user or tool messages) the candidates respond to")
        elif self.trajectory is None or self.observation is None:
            raise ValueError("give trajectory and observation, or messages")
        for i, c in enumerate(self.candidates):
            if isinstance(c, MessageIn) and c.role != "assistant":
                raise ValueError(f"candidates.{i}: a candidate message must have role 'assistant', not {c.role!r}")
        return self

    @property
    def candidate_message_index(self) -> int | None:
        """Where a candidate would sit if appended to the messages (None for the trajectory form)."""
        return None if self.messages is None else len(self.messages)

    def to_engine(self) -> E.Beam:
        actions = tuple(c if isinstance(c, str) else M.assistant_action(c.model_dump(exclude_none=True))
                        for c in self.candidates)
        if self._conversation is not None:
            c = self._conversation
            observation = c.pending_observation if c.steps else c.first_observation
            history = E.Trajectory(c.task, tuple(E.Step(s.observation, s.action) for s in c.steps))
            return E.Beam(history, observation, actions)
        return E.Beam(self.trajectory.to_engine(), self.observation, actions)


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


class Provenance(BaseModel):
    method: str | None = None  # training method (agentprm, pvm, ...) or imported:<kind>
    data_sha256: str | None = None  # hash of the training data, when we trained it
    source: str | None = None  # the folder an imported model came from


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    name: str
    version: str
    max_seq_len: int
    aliases: list[str]
    method: str | None = None
    created_at: str | None = None
    head_kind: str = Field("linear", description="value head: linear | linear2 | lm_pair | mlp")
    template_kind: str = Field("marker", description="marker (ours) or native (an imported PRM's own format)")
    template_family: str | None = Field(None, description="the native template's family (math-shepherd, ...)")
    provenance: Provenance = Field(default_factory=Provenance)
    dtype: str = Field("float32", description="The backbone's compute dtype (float32 or bfloat16, chosen by "
                                              "--dtype); the value head is always float32")

    @classmethod
    def from_engine(cls, m: E.ModelInfo) -> "ModelCard":
        return cls(id=m.ref, name=m.name, version=m.version, max_seq_len=m.max_seq_len, aliases=list(m.aliases),
                   method=m.method, created_at=m.created_at, head_kind=m.head_kind, template_kind=m.template_kind,
                   template_family=m.template_family, dtype=m.dtype,
                   provenance=Provenance(method=m.method, data_sha256=m.data_sha256, source=m.source))


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
