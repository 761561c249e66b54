"""The backend protocol and the data that crosses it (service.engine.backends)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from model_store.modeling import PRMModel

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [B, kv_heads, T, head_dim]


@dataclass
class ForwardPass:
    """One forward pass: seqs[b] continues pasts[b] (None: from position 0); the promises at wanted[b]
    (positions within seqs[b]) are read; with `keep_kv` the output can hand out each sequence's KV."""
    seqs: list[tuple[int, ...]]
    pasts: list[KV | None]
    wanted: list[np.ndarray]
    keep_kv: bool = False


@dataclass
class PassOutput:
    promises: list[np.ndarray]  # per sequence: float32 promises at wanted[b]
    shape: list[int]  # what ran: [sequences, tokens] (padded: [B, T]; packed: [B, sum of lengths])
    slots: int  # token slots the pass ran, padding included
    # (b, n) -> KV of pasts[b] + seqs[b][:n], [1, kvh, P + n, hd]. Call it before the backend's next pass; what it
    # returns is the caller's to keep (never a view of memory a later pass reuses, such as a CUDA graph's).
    kv_rows: Callable[[int, int], KV] | None = None

    def kv(self, b: int, n: int) -> KV:
        if self.kv_rows is None:
            raise RuntimeError("this pass ran without keep_kv")
        return self.kv_rows(b, n)


class Backend(Protocol):
    name: str
    # True: a pass may mix sequences with different pasts, and its token budget is the sum of the lengths.
    # False: one past shared by all sequences of a pass (or none), budget B * T_max.
    packs: bool
    # True: a past shared by sequences of a pass is attended once (its P keys count once in the budget); False: it
    # is copied per sequence (B x P).
    attends_past_once: bool

    def run(self, fwd: ForwardPass) -> PassOutput:
        """Run one pass (ForwardPass) and return the promises it asked for."""
        ...


def read_promises(model: PRMModel, hidden: torch.Tensor, offsets: np.ndarray, wanted: list[np.ndarray],
                  device: torch.device) -> list[np.ndarray]:
    """One value-head call for every wanted position; hidden [N, H] or [B, T, H], row b starting at offsets[b]
    of the flattened positions."""
    counts = [len(w) for w in wanted]
    if not sum(counts):
        return [np.empty(0, dtype=np.float32) for _ in wanted]
    flat = torch.from_numpy(np.concatenate([offsets[b] + np.asarray(w, dtype=np.int64)
                                            for b, w in enumerate(wanted)])).to(device)
    values = model.readout(hidden, flat).float().cpu().numpy()
    return np.split(values, np.cumsum(counts)[:-1])
