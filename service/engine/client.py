"""The abstract engine interface the HTTP layer depends on (and nothing else of the engine)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from service.engine.types import (DEFAULT_AGGREGATE, Beam, ExpandOutput, Health, ModelInfo, RerankOutput,
                                  ScoreOutput, Step, Trajectory)


class EngineClient(ABC):
    @abstractmethod
    def models(self) -> list[ModelInfo]: ...

    @abstractmethod
    async def score(self, model: str, trajectories: list[Trajectory], aggregate: str = DEFAULT_AGGREGATE,
                    request_id: str = "") -> ScoreOutput: ...

    @abstractmethod
    async def rerank(self, model: str, task: str, candidates: list[tuple[Step, ...]],
                     aggregate: str = DEFAULT_AGGREGATE, top_n: int | None = None,
                     request_id: str = "") -> RerankOutput: ...

    @abstractmethod
    async def expand(self, model: str, beams: list[Beam], beam_width: int, request_id: str = "") -> ExpandOutput: ...

    @abstractmethod
    async def check_health(self) -> Health: ...

    def saturated(self) -> float | None:
        """Retry-After seconds when the engine would refuse any new scoring request (queue at a bound), else
        None. The HTTP layer asks this before reading a body, so overload costs no parsing. Default: never."""
        return None

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...
