"""Plain data types of the engine interface. No HTTP, no pydantic: frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

AGGREGATES = ("last", "min", "mean", "prod")


@dataclass(frozen=True)
class Step:
    observation: str
    action: str


@dataclass(frozen=True)
class Trajectory:
    task: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Beam:
    trajectory: Trajectory
    observation: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class StepScore:
    promise: float
    progress: float


@dataclass(frozen=True)
class TrajectoryScore:
    score: float
    initial_value: float
    steps: tuple[StepScore, ...]


@dataclass
class Usage:
    prompt_tokens: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.computed_tokens += other.computed_tokens
        self.cached_tokens += other.cached_tokens


@dataclass(frozen=True)
class ScoreOutput:
    model: str
    results: tuple[TrajectoryScore, ...]
    usage: Usage


@dataclass(frozen=True)
class RankedCandidate:
    index: int
    score: float
    initial_value: float
    steps: tuple[StepScore, ...]


@dataclass(frozen=True)
class RerankOutput:
    model: str
    results: tuple[RankedCandidate, ...]
    usage: Usage


@dataclass(frozen=True)
class Selection:
    beam: int
    candidate: int
    promise: float
    progress: float


@dataclass(frozen=True)
class ExpandOutput:
    model: str
    candidates: tuple[tuple[StepScore, ...], ...]
    selected: tuple[Selection, ...]
    usage: Usage


@dataclass(frozen=True)
class ModelInfo:
    ref: str
    name: str
    version: str
    max_seq_len: int
    aliases: tuple[str, ...] = ("default",)
    method: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    detail: str = ""
    extra: dict = field(default_factory=dict)
