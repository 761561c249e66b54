"""Which floating-point type a model computes in: bf16 where the processor runs it measurably faster, fp32 elsewhere.

Shared by training (training/precision.py: bf16 autocast) and serving (service/engine: the backbone's dtype), so
both decide from the same probe.

Contract:
- `cpu_bf16_speedup(rows, hidden)`: fp32 time / bf16 time of a [rows, hidden] x [hidden, 4*hidden] matmul on
  this CPU (best of a few, after a warm-up), cached per shape for the process. CPUs with AVX512-BF16 or AMX
  run bf16 faster; elsewhere bf16 is emulated (often 10-100x slower).
- `measured_speedup()`: `AGENTPRM_BF16_SPEEDUP` when set (a figure measured once for a fleet of identical
  machines; the test suite sets 1.0 so its fp32 numerics hold on any CPU), else the probe.
- `bf16_pays(device)`: True on a GPU; on a CPU, True when `measured_speedup()` is at least `MIN_SPEEDUP`.
- `resolve_dtype(setting, device, hint=None, speedup=None)` -> `DtypeChoice(name, reason)` for serving:
  "float32" / "bfloat16" are taken as given; "auto" is bf16 on a GPU (or the checkpoint's own half type, the
  manifest's `dtype` being the hint) and on a CPU where bf16 pays, fp32 otherwise. `speedup` replaces the
  probe (tests). The value head stays fp32 whatever is chosen (the serving engine keeps it so).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

MIN_SPEEDUP = 1.3
SPEEDUP_ENV = "AGENTPRM_BF16_SPEEDUP"
DTYPE_SETTINGS = ("auto", "float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    torch.matmul(a, b)  # warm-up (oneDNN picks its kernel on the first call)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=8)
def cpu_bf16_speedup(rows: int = 2048, hidden: int = 256, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a [rows, hidden] x [hidden, 4*hidden] matmul on this CPU (best of `repeats`)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, hidden, generator=generator)
    b = torch.randn(hidden, 4 * hidden, generator=generator)
    fp32 = _best_time(a, b, repeats)
    bf16 = _best_time(a.bfloat16(), b.bfloat16(), repeats)
    return fp32 / bf16 if bf16 > 0 else 0.0


def measured_speedup() -> float:
    """$AGENTPRM_BF16_SPEEDUP if set (a number), else `cpu_bf16_speedup()` at its default shape."""
    override = os.environ.get(SPEEDUP_ENV, "").strip()
    if override:
        try:
            return float(override)
        except ValueError:
            raise ValueError(f"{SPEEDUP_ENV}={override!r} is not a number") from None
    return cpu_bf16_speedup()


def bf16_pays(device: torch.device | str, speedup: Callable[[], float] | None = None) -> bool:
    if torch.device(device).type == "cuda":
        return True
    return (speedup or measured_speedup)() >= MIN_SPEEDUP


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # "float32" | "bfloat16" | "float16"
    reason: str  # one line for the start-up log

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.name]


def resolve_dtype(setting: str, device: torch.device | str, hint: str | None = None,
                  speedup: Callable[[], float] | None = None) -> DtypeChoice:
    """The serving dtype for `setting` (auto | float32 | bfloat16) on `device`; `hint`: the manifest's dtype."""
    if setting not in DTYPE_SETTINGS:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return DtypeChoice(setting, f"--dtype {setting}")
    device = torch.device(device)
    if device.type == "cuda":
        half = hint if hint in ("bfloat16", "float16") else "bfloat16"
        return DtypeChoice(half, f"auto: GPU ({'the checkpoint is ' + hint if hint == half else 'bf16 by default'})")
    measured = (speedup or measured_speedup)()
    if measured >= MIN_SPEEDUP:
        return DtypeChoice("bfloat16", f"auto: bf16 matmul {measured:.2f}x fp32 on this CPU (>= {MIN_SPEEDUP}x)")
    return DtypeChoice("float32", f"auto: bf16 matmul {measured:.2f}x fp32 on this CPU (< {MIN_SPEEDUP}x: no "
                                  f"bf16 hardware worth using)")
