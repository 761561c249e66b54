"""The padded backend: the transformers forward on a right-padded [B, T] batch. Right padding needs no
attention mask under causal attention: real tokens only attend to earlier, real tokens, and pad positions
are never read. All sequences of a pass share one past (or none).

A shared past is attended once (service.engine.shared_past: keys = the past, then every row's new tokens) when
the backbone qualifies (`attends_past_once`); otherwise transformers' cache holds B copies of it, and the runner
budgets B x (P + T) tokens for such a pass."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from model_store.modeling import PRMModel
from service.engine import shared_past
from service.engine.backends.base import KV, ForwardPass, PassOutput, read_promises


def kv_rows_of(kv: KV | None, past_len: int):
    """(b, n) -> the KV of row b up to past_len + n, from a [B, kvh, T, hd] per-layer KV (None: no KV)."""
    if kv is None:
        return None
    return lambda b, n: [(k[b:b + 1, :, :past_len + n], v[b:b + 1, :, :past_len + n]) for k, v in kv]


class PaddedBackend:
    name = "padded"
    packs = False

    def __init__(self, model: PRMModel, device: torch.device, pad_id: int = 0, one_past: bool | None = None):
        """`one_past`: attend a shared past once (None: when the backbone qualifies, shared_past.supports)."""
        self.model = model
        self.device = device
        self.pad_id = pad_id
        if one_past is None:
            one_past = shared_past.supports(model.backbone)
        if one_past:
            shared_past.use_for(model.backbone)  # SDPA as before, except inside a one-past pass
        self.attends_past_once = one_past

    def pad(self, fwd: ForwardPass) -> tuple[torch.Tensor, np.ndarray]:
        """ids [B, T] right-padded (on the CPU) and the offset of each row in the flattened positions."""
        length = max(len(s) for s in fwd.seqs)
        ids = torch.full((len(fwd.seqs), length), self.pad_id, dtype=torch.long)  # [B, T]
        for b, s in enumerate(fwd.seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, np.arange(len(fwd.seqs), dtype=np.int64) * length

    def run(self, fwd: ForwardPass) -> PassOutput:
        past = fwd.pasts[0]
        if any(other is not past for other in fwd.pasts):
            raise ValueError("the padded backend runs sequences with one shared past per pass")
        ids, offsets = self.pad(fwd)
        if past is not None and self.attends_past_once:
            return self._run_on_one_past(fwd, ids, offsets, past)
        cache = None
        if past is not None:
            past = [(k.expand(len(fwd.seqs), -1, -1, -1), v.expand(len(fwd.seqs), -1, -1, -1)) for k, v in past]
            cache = DynamicCache(ddp_cache_data=past)  # B copies of the past, made by the cache's first update
        elif fwd.keep_kv:
            cache = DynamicCache()
        hidden, cache = self.model.hidden_states(ids.to(self.device), past_key_values=cache)  # [B, T, H]
        past_len = past[0][0].shape[2] if past is not None else 0
        kv = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None and fwd.keep_kv else None
        promises = read_promises(self.model, hidden, offsets, fwd.wanted, self.device)
        return PassOutput(promises, list(ids.shape), ids.numel(), kv_rows_of(kv, past_len))

    def _run_on_one_past(self, fwd: ForwardPass, ids: torch.Tensor, offsets: np.ndarray, past: KV) -> PassOutput:
        cache = shared_past.SharedPastCache(past)
        with shared_past.attending_one_past(cache):
            hidden, _ = self.model.hidden_states(ids.to(self.device), past_key_values=cache)  # [B, T, H]
        promises = read_promises(self.model, hidden, offsets, fwd.wanted, self.device)
        kv_rows = None
        if fwd.keep_kv:
            new = [(layer.keys, layer.values) for layer in cache.layers]  # [B, kvh, T, hd], the new tokens only

            def kv_rows(b: int, n: int) -> KV:  # the past once, then row b's tokens: [1, kvh, P + n, hd]
                return [(torch.cat([pk, k[b:b + 1, :, :n]], dim=2), torch.cat([pv, v[b:b + 1, :, :n]], dim=2))
                        for (pk, pv), (k, v) in zip(past, new)]
        return PassOutput(promises, list(ids.shape), ids.numel(), kv_rows)
