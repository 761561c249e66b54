"""The CUDA-graph backend: a padded pass without a past replays a captured bucket of the GraphRunner
(service.engine.cuda_graphs) when its shape fits one; anything else runs on the padded backend."""

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
