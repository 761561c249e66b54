"""Which precision the trainer computes in: bf16 autocast where the processor runs it faster, fp32 elsewhere.

Contract:
- `resolve_precision(setting, device)`: "fp32" or "bf16". `setting` is "fp32", "bf16" or "auto". On a GPU
  "auto" is bf16 (autocast; weights, optimizer state and the value head stay fp32). On a CPU "auto" measures
  (`cpu_bf16_speedup`, model_store/precision.py, the same probe serving's `--dtype auto` uses): bf16 when a
  bf16 matmul at a training-like shape runs at least `MIN_SPEEDUP` times faster than fp32 (CPUs with
  AVX512-BF16 or AMX), fp32 where bf16 is emulated (often 10-100x slower).
- The loss, the TD/GAE targets and the value head run in fp32 under either setting (the trainer casts the
  promises to fp32 before the loss), so bf16 changes only the backbone's matmuls.
"""

from __future__ import annotations

import torch

from model_store.precision import MIN_SPEEDUP, bf16_pays, cpu_bf16_speedup  # noqa: F401  (one probe, shared)

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(setting: str, device: torch.device | str) -> str:
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "bf16" if bf16_pays(device) else "fp32"
