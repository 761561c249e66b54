"""Promise -> progress, trajectory aggregates, ranking (README.md, "Scoring: the HTTP API"; docs/ARCHITECTURE.md, "One request").

progress_t = promise_t - promise_{t-1}, progress_0 = promise_0 - V_0 (the initial-state readout).
Aggregates for Best-of-N: `last` (the paper's rule), `min`, `mean`, `prod` of the step promises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from service.engine.types import AGGREGATES, DEFAULT_AGGREGATE, StepScore


def step_scores(promises: Sequence[float], initial_value: float) -> tuple[StepScore, ...]:
    previous = float(initial_value)
    out = []
    for promise in promises:
        promise = float(promise)
        out.append(StepScore(promise=promise, progress=promise - previous))
        previous = promise
    return tuple(out)


def aggregate(promises: Sequence[float], how: str = DEFAULT_AGGREGATE) -> float:
    if not promises:
        raise ValueError("cannot aggregate an empty trajectory")
    if how == "last":
        return float(promises[-1])
    if how == "min":
        return float(min(promises))
    if how == "mean":
        return float(sum(promises) / len(promises))
    if how == "prod":
        return float(math.prod(promises))
    raise ValueError(f"unknown aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")


def rank(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices sorted best first; ties keep the original order (stable)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order if top_n is None else order[:top_n]
