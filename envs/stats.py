"""Statistics of the evaluation: intervals, paired tests, per-level tables, mean and spread over seeds.

Contract (pure functions, no I/O):
- `wilson(k, n)`: 95% Wilson score interval of a binomial proportion; `rate(outcomes)` wraps it.
- `paired_test(a, b)`: two-sided p-value that two systems evaluated on the *same* episodes have the same mean
  outcome. a[i] and b[i] are the outcomes of episode i (0/1, or a mean over training seeds in [0, 1]); the
  test is an exact sign-flip permutation test of the per-episode differences (Monte-Carlo with a fixed seed
  when there are more than 2^16 sign patterns). Equal outcomes everywhere give p = 1.
- `per_level(levels, outcomes)`: {level: rate} over the episodes of each level.
- `spread(values)`: mean, min, max and standard deviation over training seeds.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(outcomes: list) -> dict:
    """Success rate of 0/1 (or fractional, e.g. averaged over seeds) outcomes with its 95% interval."""
    values = [float(o) for o in outcomes]
    k, n = sum(values), len(values)
    low, high = wilson(k, n)
    return {"successes": round(k, 4), "n": n, "rate": k / n if n else float("nan"), "ci95": [low, high]}


def paired_test(a: list[float], b: list[float], samples: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value for mean(a) == mean(b) over paired episodes."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs outcomes of the same episodes: {len(a)} vs {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b) if float(x) != float(y)]
    if not diffs:
        return 1.0
    observed = abs(sum(diffs))
    n = len(diffs)
    if n <= 16:  # exact: every sign pattern
        extreme = 0
        for mask in range(1 << n):
            total = sum(-d if mask >> i & 1 else d for i, d in enumerate(diffs))
            extreme += abs(total) >= observed - 1e-12
        return extreme / (1 << n)
    rng = random.Random(seed)
    extreme = 0
    for _ in range(samples):
        total = sum(d if rng.random() < 0.5 else -d for d in diffs)
        extreme += abs(total) >= observed - 1e-12
    return (extreme + 1) / (samples + 1)


def per_level(levels: list[str], outcomes: list[float]) -> dict[str, dict]:
    """{level: rate(...)} of the outcomes of each level's episodes (levels[i] is the level of outcome i)."""
    by_level: dict[str, list[float]] = defaultdict(list)
    for level, outcome in zip(levels, outcomes):
        by_level[level].append(outcome)
    return {level: rate(values) for level, values in by_level.items()}


def spread(values: list[float]) -> dict:
    """Mean, min, max and sample standard deviation of a figure over training seeds."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "min": min(values), "max": max(values), "std": std, "n": len(values)}


def mean_over_seeds(per_seed: list[list[float]]) -> list[float]:
    """Per-episode mean of outcomes lists that share their episodes (one list per training seed)."""
    if not per_seed:
        return []
    return [sum(column) / len(column) for column in zip(*per_seed)]
