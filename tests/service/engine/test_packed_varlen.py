"""The packed backend's varlen attention (the GPU default: one masked call per layer over every token, each
distinct past attended once) equals its per-sequence attention, transformers, and the padded backend, on the
CPU: through SDPA with the dense mask and through (uncompiled) FlexAttention with the same mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from model_store.modeling import load_prm
from service.engine.backends.packed import PackedBackend
from service.engine.packed import PackedQwen2
from service.engine.prefix_cache import PrefixCache
from service.engine.runner import TorchRunner
from tests.service.engine.test_backends import _jobs, backbone

VARIANTS = {"varlen-sdpa": dict(attention="varlen", flex=False), "varlen-flex": dict(attention="varlen", flex=True)}


def past_of(model, ids):
    cache = DynamicCache()
    model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]  # [1, kvh, P, hd]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["gqa", "mha-odd-width"])
def test_varlen_equals_units_and_transformers_with_mixed_pasts(kind, variant):
    model = backbone(kind, seed=4)
    units = PackedQwen2(model, attention="units")
    varlen = PackedQwen2(model, **VARIANTS[variant])
    gen = torch.Generator().manual_seed(5)
    prefix_a, prefix_b = torch.randint(3, 300, (25,), generator=gen), torch.randint(3, 300, (9,), generator=gen)
    with torch.inference_mode():
        past_a, past_b = past_of(model, prefix_a), past_of(model, prefix_b)
        # Sequences without a past, two groups on past a (not adjacent), one on past b: one pass.
        lengths = [7, 1, 12, 4, 30, 3]
        pasts = [None, past_a, past_b, past_a, None, past_a]
        prefixes = [None, prefix_a, prefix_b, prefix_a, None, prefix_a]
        seqs = [torch.randint(3, 300, (n,), generator=gen) for n in lengths]
        ids = torch.cat(seqs)
        got, kv = varlen.forward(ids, lengths, keep_kv=True, pasts=pasts)
        ref, ref_kv = units.forward(ids, lengths, keep_kv=True, pasts=pasts)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        for (k, v), (k_ref, v_ref) in zip(kv, ref_kv):
            assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)
        offset = 0
        for s, prefix in zip(seqs, prefixes):
            full = s if prefix is None else torch.cat([prefix, s])
            expected = model(input_ids=full[None]).last_hidden_state[0, len(full) - len(s):]
            assert torch.allclose(got[offset:offset + len(s)], expected, atol=1e-5, rtol=1e-5)
            offset += len(s)


def test_varlen_attends_each_distinct_past_once():
    model = backbone("gqa")
    packed = PackedQwen2(model, attention="varlen", flex=False)
    kvh, hd = packed.kv_heads, packed.head_dim
    past = [(torch.randn(1, kvh, 40, hd), torch.randn(1, kvh, 40, hd)) for _ in packed.layers]
    layout = packed._varlen([3] * 50, [past] * 50, torch.device("cpu"))
    assert len(layout.pasts) == 1 and layout.kv_past.numel() == 40 + 150  # keys: the past once, then 150 tokens


@pytest.mark.parametrize("cache_bytes", [0, 1 << 24])
def test_runner_on_varlen_packed_equals_padded(tiny_checkpoint, cache_bytes):
    loaded = load_prm(tiny_checkpoint)
    marker = loaded.tokenizer.token_to_id(loaded.manifest.template.action_end)
    vocab = loaded.model.backbone.config.vocab_size
    outputs = {}
    for name in ("padded", "varlen"):
        runner = TorchRunner(loaded.model, torch.device("cpu"), max_forward_tokens=128,
                             cache=PrefixCache(cache_bytes, block_size=8), marker_ids=(marker,), backend="padded")
        if name == "varlen":  # the GPU's packed backend, run on the CPU
            runner.executor = PackedBackend(loaded.model, torch.device("cpu"), attention="varlen")
        outputs[name] = [[(r.promises, r.computed_tokens) for r in runner.run_batch(batch)]
                         for batch in _jobs(np.random.default_rng(7), vocab, marker)]
    for batch_a, batch_b in zip(outputs["padded"], outputs["varlen"]):
        for (p_a, c_a), (p_b, c_b) in zip(batch_a, batch_b):
            np.testing.assert_allclose(p_a, p_b, atol=1e-5, rtol=1e-5)
            assert c_a == c_b
