"""The CUDA-graph backend: a padded pass without a past replays a captured bucket of the GraphRunner
(service.engine.cuda_graphs) when its shape fits one; anything else runs on the padded backend.

Passes with a past (a shared prefix's suffixes, a grown history) are not graphed, on purpose. A graph fixes every
shape, and such a pass has three: B, T and the past length P. Graphing them needs buckets over P too (the past
copied into static [1, kvh, P_bucket, hd] buffers per layer before each replay, its padding masked, positions fed
from a static buffer): with P in 1.5x steps from 32 to 16k tokens (16 steps) and the 49 (B, T) buckets that is
~780 captures instead of 49 (start-up in minutes, not seconds), ~0.6 GB (0.5B model) to ~2.8 GB (7B) of static
past buffers (sum over the P buckets, ~3 x the longest past, of KV), and a copy of the whole past per replay,
which is about the attention's own read of it: the pass that graphs would speed up (launch-bound, small B x T on
a long past) would pay it twice. What graphs save is the launch overhead of one pass (~35 kernel launches per layer,
~0.8k for a 24-layer model: a few ms of host time); the runner runs one pass per prefix group, and the packed backend (`--backend
packed`) puts every group's suffixes of a batch in one varlen pass. So pasts stay eager, attended once
(service/engine/shared_past.py). docs/ARCHITECTURE.md says the same."""

from __future__ import annotations

import numpy as np
import torch

from model_store.modeling import PRMModel
from service.engine.backends.base import ForwardPass, PassOutput
from service.engine.backends.padded import PaddedBackend, kv_rows_of
from service.engine.cuda_graphs import GraphRunner


class GraphBackend(PaddedBackend):
    name = "padded"  # the padded function, replayed from graphs where a bucket fits

    def __init__(self, model: PRMModel, device: torch.device, pad_id: int, graphs: GraphRunner):
        super().__init__(model, device, pad_id)
        self.graphs = graphs

    def run(self, fwd: ForwardPass) -> PassOutput:
        if fwd.pasts[0] is None and all(p is None for p in fwd.pasts) and (self.graphs.with_kv or not fwd.keep_kv):
            ids, offsets = self.pad(fwd)
            flat = (np.concatenate([offsets[b] + w for b, w in enumerate(fwd.wanted)]) if fwd.wanted
                    else np.empty(0, int))
            ids_dev, index = ids.to(self.device), torch.from_numpy(flat)
            out = (self.graphs.maybe_run_with_kv(ids_dev, index) if fwd.keep_kv
                   else self.graphs.maybe_run(ids_dev, index))
            if out is not None:
                promises, kv = out if fwd.keep_kv else (out, None)
                values = promises.float().cpu().numpy()
                split = np.split(values, np.cumsum([len(w) for w in fwd.wanted])[:-1])
                return PassOutput(split, list(ids.shape), ids.numel(), _owned(kv_rows_of(kv, 0)))
        return super().run(fwd)


def _owned(kv_rows):
    """KV rows copied out of the graph's static memory: the next replay of the bucket (the next shared prefix
    of the same batch, say) overwrites it, while the runner attends to a prefix's KV passes later."""
    if kv_rows is None:
        return None
    return lambda b, n: [(k.clone(), v.clone()) for k, v in kv_rows(b, n)]
