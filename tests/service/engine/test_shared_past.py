"""A shared past is attended once: the padded backend's suffix passes over B candidates of one shared prefix use
one copy of its KV (service.engine.shared_past), equal to the packed backend and to transformers' own cache (which
copies it B times); the planner counts the past once for such passes and B times where copies remain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model_store.modeling import PRMModel, build_backbone, load_prm
from service.engine import shared_past
from service.engine.backends.base import ForwardPass
from service.engine.backends.padded import PaddedBackend
from service.engine.prefix_cache import PrefixCache
from service.engine.runner import ScoreJob, TorchRunner, plan_forwards


def test_plan_counts_the_past():
    lengths = [5, 6, 7, 8, 5, 6]
    assert plan_forwards(lengths, 64) == [list(np.argsort(lengths, kind="stable"))]  # 6 x 8 = 48 without a past
    groups = plan_forwards(lengths, 64, past=24, past_once=False)  # B copies: B x (24 + T) <= 64, two at a time
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) * (24 + max(lengths[i] for i in g)) <= 64 for g in groups) and len(groups) == 3
    # Attended once, padded: 24 + B x T_max <= 64 (five of them fit).
    once = plan_forwards(lengths, 64, past=24, past_once=True)
    assert all(24 + len(g) * max(lengths[i] for i in g) <= 64 for g in once) and len(once) == 2
    # Packed: one past per pass, then the real tokens.
    assert all(24 + sum(lengths[i] for i in g) <= 64 for g in plan_forwards(lengths, 64, packed=True, past=24))
    assert plan_forwards([3, 4], 10, past=40, past_once=False) == [[0], [1]]  # beyond the budget: one per pass


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_prm(tiny_checkpoint)


def _rerank(loaded, prefix_len=48, lengths=(2, 3, 4, 5, 3, 2, 4, 5, 3, 4), seed=3):
    marker = loaded.tokenizer.token_to_id(loaded.manifest.template.action_end)
    rng = np.random.default_rng(seed)
    prefix = tuple(int(t) for t in rng.integers(3, 200, prefix_len))
    jobs = []
    for n in lengths:  # a rerank: short candidates on one history
        ids = prefix + tuple(int(t) for t in rng.integers(3, 200, n)) + (marker,)
        jobs.append(ScoreJob(ids, (len(ids) - 1,), len(prefix)))
    return marker, prefix, jobs


def _runner(loaded, backend, marker, budget, one_past=None, cache_bytes=0):
    runner = TorchRunner(loaded.model, torch.device("cpu"), max_forward_tokens=budget,
                         cache=PrefixCache(cache_bytes, block_size=8), marker_ids=(marker,), backend=backend)
    if one_past is not None:
        runner.executor = PaddedBackend(loaded.model, torch.device("cpu"), one_past=one_past)
    return runner


def test_padded_attends_the_shared_past_once_and_equals_packed(loaded):
    marker, prefix, jobs = _rerank(loaded)
    budget = 160
    results, shapes = {}, {}
    for name, backend, one_past in (("packed", "packed", None), ("padded", "padded", None),
                                    ("copies", "padded", False)):
        runner = _runner(loaded, backend, marker, budget, one_past)
        batch = runner.run_batch(jobs)
        results[name] = np.concatenate([r.promises for r in batch])
        shapes[name] = batch.stats.shapes[1:]  # the first pass computes the prefix
    assert PaddedBackend(loaded.model, torch.device("cpu")).attends_past_once  # the default for this backbone
    # One past: 48 + 10 x 6 <= 160, every candidate in one pass; B copies: at most 2 (at 48 + 6 tokens) per pass.
    assert shapes["padded"] == [[10, 6]] and len(shapes["packed"]) == 1
    assert all(b * (len(prefix) + t) <= budget for b, t in shapes["copies"]) and len(shapes["copies"]) == 4
    assert results["packed"].std() > 1e-4  # distinct promises: the comparison is not between constants
    np.testing.assert_allclose(results["padded"], results["packed"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(results["copies"], results["packed"], atol=1e-5, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) any op creates while active: what a pass allocates at most at once."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def _pass_on_a_past(model, rows=16, length=4, past_len=256, seed=0):
    config = model.backbone.config
    kvh = config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        prefix = torch.randint(3, 200, (1, past_len), generator=gen)
        _, cache = model.hidden_states(prefix, past_key_values=shared_past.DynamicCache())
        past = [(layer.keys, layer.values) for layer in cache.layers]  # [1, kvh, P, hd]
    seqs = [tuple(int(t) for t in torch.randint(3, 200, (length,), generator=gen)) for _ in range(rows)]
    wanted = [np.arange(length)] * rows
    return ForwardPass(seqs, [past] * rows, wanted, keep_kv=True), rows * kvh * past_len * hd


def test_a_pass_on_a_shared_past_never_holds_a_copy_per_candidate(loaded):
    """16 candidates of 4 tokens on a 256-token past: with copies, the cache's first update makes [16, kvh, 260, hd]
    keys (then every layer keeps its own); attended once, nothing that pass makes is as large as that."""
    fwd, one_copy_per_row = _pass_on_a_past(loaded.model)
    outputs, largest = {}, {}
    for one_past in (True, False):
        backend = PaddedBackend(loaded.model, torch.device("cpu"), one_past=one_past)
        with torch.inference_mode(), _LargestTensor() as spy:
            out = backend.run(fwd)
            kv = out.kv(3, 4)
        outputs[one_past], largest[one_past] = (np.concatenate(out.promises), kv), spy.largest
    assert largest[False] >= one_copy_per_row  # the measure sees the copies where they are made
    assert largest[True] < one_copy_per_row / 4, largest
    np.testing.assert_allclose(outputs[True][0], outputs[False][0], atol=1e-5, rtol=1e-5)
    for (k1, v1), (k2, v2) in zip(outputs[True][1], outputs[False][1]):  # KV handed out: past + row 3's tokens
        assert k1.shape == k2.shape == (1, k1.shape[1], 256 + 4, k1.shape[3])
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)


def test_one_past_serves_other_families_and_leaves_other_passes_to_sdpa():
    """A Llama backbone (GQA): one-past attention == transformers' copies; a pass without a past is SDPA's."""
    torch.manual_seed(0)
    backbone = build_backbone(dict(model_type="llama", num_hidden_layers=2, vocab_size=256, hidden_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                   max_position_embeddings=512)).eval()
    model = PRMModel(backbone)
    ids = torch.randint(3, 200, (3, 9))
    with torch.inference_mode():
        before, _ = model.hidden_states(ids)  # SDPA
    assert shared_past.supports(backbone)
    fwd, _ = _pass_on_a_past(model, rows=5, length=7, past_len=40)
    once = PaddedBackend(model, torch.device("cpu"))
    assert once.attends_past_once and backbone.config._attn_implementation == shared_past.ATTENTION
    with torch.inference_mode():
        after, _ = model.hidden_states(ids)
        a = np.concatenate(once.run(fwd).promises)
        b = np.concatenate(PaddedBackend(model, torch.device("cpu"), one_past=False).run(fwd).promises)
    assert torch.equal(before, after)  # outside a one-past pass the switched backbone computes SDPA exactly
    assert a.std() > 1e-4
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_backbones_whose_attention_it_does_not_state_keep_the_copies():
    torch.manual_seed(0)
    backbone = build_backbone(dict(model_type="qwen2", num_hidden_layers=2, vocab_size=256, hidden_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                   use_sliding_window=True, sliding_window=16, max_window_layers=1))
    assert "sliding_attention" in backbone.config.layer_types
    assert not shared_past.supports(backbone)
    backend = PaddedBackend(PRMModel(backbone), torch.device("cpu"))
    assert not backend.attends_past_once and backbone.config._attn_implementation == "sdpa"


def test_runner_with_the_cache_on_equals_packed_on_a_grown_history(loaded):
    """A group of one (an agent re-sending its history) continues a cached chain and caches its own KV: the KV the
    one-past pass hands out (the past once + the row's tokens) is what the next call reads back."""
    marker, prefix, jobs = _rerank(loaded, prefix_len=40, lengths=(6, 9), seed=5)
    grown = ScoreJob(jobs[0].ids + jobs[1].ids[40:], (len(jobs[0].ids) - 1, len(jobs[0].ids) + 9), 0)
    regrown = ScoreJob(grown.ids + (7, 8, marker), grown.readouts + (len(grown.ids) + 2,), 0)
    out = {}
    for backend in ("padded", "packed"):
        runner = _runner(loaded, backend, marker, 512, cache_bytes=1 << 22)
        first = runner.run_batch([jobs[0]])
        second = runner.run_batch([grown])
        third = runner.run_batch([regrown])
        assert third[0].computed_tokens < len(regrown.ids) - 8  # served from the cache
        out[backend] = np.concatenate([first[0].promises, second[0].promises, third[0].promises])
    np.testing.assert_allclose(out["padded"], out["packed"], atol=1e-5, rtol=1e-5)
