"""The packed backend (default on a CPU for Qwen2 backbones; `--backend packed` on a GPU): sequences concatenated
without padding, fused projections, attention per sequence on a CPU and one varlen (FlexAttention) call per
layer on a GPU (service.engine.packed.PackedQwen2). Sequences of one pass may continue different pasts, so the
runner mixes prefix groups in a pass; each distinct past is attended once, never copied per sequence."""

from __future__ import annotations

import numpy as np
import torch

from model_store.modeling import PRMModel
from service.engine.backends.base import KV, ForwardPass, PassOutput, read_promises
from service.engine.packed import PackedQwen2, supports

__all__ = ["PackedBackend", "supports"]


class PackedBackend:
    name = "packed"
    packs = True
    attends_past_once = True

    def __init__(self, model: PRMModel, device: torch.device, attention: str = "auto"):
        self.model = model
        self.device = device
        self.packed = PackedQwen2(model.backbone, attention=attention)  # auto: varlen on a GPU, units on a CPU

    def run(self, fwd: ForwardPass) -> PassOutput:
        lengths = [len(s) for s in fwd.seqs]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids = torch.tensor([t for s in fwd.seqs for t in s], dtype=torch.long, device=self.device)  # [N]
        hidden, new_kv = self.packed.forward(ids, lengths, keep_kv=fwd.keep_kv, pasts=fwd.pasts)  # [N, H]

        def kv_rows(b: int, n: int) -> KV:
            lo = int(offsets[b])
            rows = [(k[lo:lo + n].transpose(0, 1).unsqueeze(0), v[lo:lo + n].transpose(0, 1).unsqueeze(0))
                    for k, v in new_kv]  # [1, kvh, n, hd]
            if fwd.pasts[b] is None:
                return rows
            return [(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
                    for (pk, pv), (k, v) in zip(fwd.pasts[b], rows)]

        promises = read_promises(self.model, hidden, offsets, fwd.wanted, self.device)
        return PassOutput(promises, [len(lengths), sum(lengths)], sum(lengths), kv_rows if fwd.keep_kv else None)
