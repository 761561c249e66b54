"""Backends execute the forward passes the runner plans (service.engine.runner); one backend per file.

A backend takes a `ForwardPass` (sequences, the KV each continues, the positions whose promise is wanted)
and returns a `PassOutput` (promises at those positions, and the KV of each sequence when asked). All
backends compute the same function up to float rounding; tests/service/engine/test_backends.py checks it.
A new pass backend is one more module implementing `Backend` plus one line in `make_backend`. The vllm backend
(vllm.py) is the exception: vLLM owns the KV cache and batching, so it replaces the runner (`VllmRunner`).
"""

from __future__ import annotations

import torch

from model_store.modeling import PRMModel
from service.engine.backends.base import KV, Backend, ForwardPass, PassOutput
from service.engine.config import BACKENDS
from service.engine.cuda_graphs import GraphRunner

__all__ = ["BACKENDS", "KV", "Backend", "ForwardPass", "PassOutput", "make_backend"]


def make_backend(name: str, model: PRMModel, device: torch.device, pad_id: int = 0,
                 graphs: GraphRunner | None = None) -> Backend:
    """`auto`: packed on a CPU for the architectures it supports, padded elsewhere. A padded backend with an
    enabled GraphRunner tries its captured buckets first (cuda_graphs)."""
    from service.engine.backends.packed import PackedBackend, supports
    from service.engine.backends.padded import PaddedBackend

    if name == "vllm":
        raise ValueError("the vllm backend takes the runner's place: PRMEngine.from_checkpoint starts it "
                         "(service/engine/backends/vllm.py)")
    if name not in BACKENDS:
        raise ValueError(f"backend must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}, not {name!r}")
    if name == "auto":
        name = "packed" if device.type == "cpu" and supports(model.backbone.config) else "padded"
    if name == "packed":
        return PackedBackend(model, device)
    if graphs is not None and graphs.enabled:
        from service.engine.backends.cuda_graphs import GraphBackend

        return GraphBackend(model, device, pad_id, graphs)
    return PaddedBackend(model, device, pad_id)
