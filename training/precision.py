"""Which precision the trainer computes in: bf16 autocast where the processor runs it faster, fp32 elsewhere.

Contract:
- `resolve_precision(setting, device)`: "fp32" or "bf16". `setting` is "fp32", "bf16" or "auto". On a GPU
  "auto" is bf16 (autocast; weights, optimizer state and the value head stay fp32). On a CPU "auto" measures
  (`cpu_bf16_speedup`): bf16 when a bf16 matmul at a training-like shape runs at least `MIN_SPEEDUP` times
  faster than fp32 (CPUs with AVX512-BF16 or AMX), fp32 where bf16 is emulated (often 10-100x slower).
- The loss, the TD/GAE targets and the value head run in fp32 under either setting (the trainer casts the
  promises to fp32 before the loss), so bf16 changes only the backbone's matmuls.
"""

from __future__ import annotations

import functools
import time

import torch

MIN_SPEEDUP = 1.3
PRECISIONS = ("auto", "fp32", "bf16")


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    torch.matmul(a, b)  # warm-up (oneDNN picks its kernel on the first call)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(rows: int = 2048, hidden: int = 256, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a [rows, hidden] x [hidden, 4*hidden] matmul on this CPU (best of `repeats`)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, hidden, generator=generator)
    b = torch.randn(hidden, 4 * hidden, generator=generator)
    fp32 = _best_time(a, b, repeats)
    bf16 = _best_time(a.bfloat16(), b.bfloat16(), repeats)
    return fp32 / bf16 if bf16 > 0 else 0.0


def resolve_precision(setting: str, device: torch.device | str) -> str:
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    if torch.device(device).type == "cuda":
        return "bf16"
    return "bf16" if cpu_bf16_speedup() >= MIN_SPEEDUP else "fp32"
