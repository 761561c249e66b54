"""Plain data types of the engine: its interface (requests in, outputs out) and what flows between the
engine, the scheduler and the runner (ScoreJob in, JobResult out, BatchStats with every batch). No HTTP, no
pydantic, no torch: dataclasses and numpy arrays (docs/ARCHITECTURE.md, "One request").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model_store.render import Step, Trajectory  # noqa: F401  (the inputs: defined with the renderer)

AGGREGATES = ("last", "min", "mean", "prod")  # how step promises become one trajectory score (postprocess)
DEFAULT_AGGREGATE = "last"
DEFAULT_MODEL_ALIAS = "default"  # the name every server answers to for the model it serves


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

@dataclass(frozen=True)
class ScoreOutput:
    model: str
    results: tuple[TrajectoryScore, ...]
    usage: Usage


@dataclass(frozen=True)
class RankedCandidate(TrajectoryScore):
    index: int = 0  # position of the candidate in the request


@dataclass(frozen=True)
class RerankOutput(ScoreOutput):
    results: tuple[RankedCandidate, ...]  # best first


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
    aliases: tuple[str, ...] = (DEFAULT_MODEL_ALIAS,)
    method: str | None = None
    created_at: str | None = None
    head_kind: str = "linear"  # manifest value_head.kind
    template_kind: str = "marker"  # manifest template.kind
    template_family: str | None = None  # the native template's source family (math-shepherd, ...)
    data_sha256: str | None = None  # provenance: the training data's hash (training.data.sha256)
    source: str | None = None  # provenance of an imported model: the folder it came from
    dtype: str = "float32"  # the backbone's compute dtype (the value head is always float32)


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    detail: str = ""


# -- between the engine, the scheduler and the runner ------------------------------------------------
@dataclass(frozen=True)
class ScoreJob:
    """Token ids to run and the positions whose promise is wanted. `prefix_len` hints that ids[:prefix_len]
    is shared with other jobs of the batch (a rerank's task, a beam's history): computed once."""
    ids: tuple[int, ...]
    readouts: tuple[int, ...]
    prefix_len: int = 0


@dataclass
class JobResult:
    promises: np.ndarray  # [len(readouts)] float32
    computed_tokens: int  # tokens this job ran through the model (the rest came from a cache or a sibling)


@dataclass
class BatchStats:
    """What one batch cost: filled by the runner, handed back with the batch's results (BatchResults)."""
    jobs: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    padded_tokens: int = 0  # token slots the passes ran, padding included
    forwards: int = 0
    seconds: float = 0.0
    shapes: list = field(default_factory=list)  # per pass: [sequences, tokens] (padded: [B, T]; packed: [B, N])
    cache_hits: int = 0  # prefix-cache lookups of this batch that found a chain
    cache_misses: int = 0
    cache_evictions: int = 0  # blocks evicted while this batch inserted its own


class BatchResults(list):
    """The results of one batch, one JobResult per job in order, carrying the batch's `stats` with them (a
    list, so whatever wraps a runner's run_batch passes them on unchanged)."""

    def __init__(self, results: list[JobResult], stats: BatchStats):
        super().__init__(results)
        self.stats = stats
