"""Shared-past budgeting: a padded pass over B candidates of one shared prefix attends to B copies of its KV,
so the planner counts B x (P + T) against the token budget; the packed backend attends to the one past."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_store.modeling import load_prm
from service.engine.prefix_cache import PrefixCache
from service.engine.runner import ScoreJob, TorchRunner, plan_forwards


def test_plan_counts_the_past():
    lengths = [5, 6, 7, 8, 5, 6]
    assert plan_forwards(lengths, 64) == [list(np.argsort(lengths, kind="stable"))]  # 6 x 8 = 48 without a past
    groups = plan_forwards(lengths, 64, past=24)  # B x (24 + T) <= 64: two at a time
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) * (24 + max(lengths[i] for i in g)) <= 64 for g in groups) and len(groups) == 3
    # Packed: one past per pass, then the real tokens.
    assert all(24 + sum(lengths[i] for i in g) <= 64 for g in plan_forwards(lengths, 64, packed=True, past=24))
    assert plan_forwards([3, 4], 10, past=40) == [[0], [1]]  # a past beyond the budget: one candidate per pass


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_prm(tiny_checkpoint)


def test_padded_suffix_passes_fit_the_budget_with_their_past(loaded):
    marker = loaded.tokenizer.token_to_id(loaded.manifest.template.action_end)
    rng = np.random.default_rng(3)
    prefix = tuple(int(t) for t in rng.integers(3, 200, 48))
    jobs = []
    for n in (2, 3, 4, 5, 3, 2, 4, 5, 3, 4):  # a rerank: 10 short candidates on a 48-token history
        ids = prefix + tuple(int(t) for t in rng.integers(3, 200, n)) + (marker,)
        jobs.append(ScoreJob(ids, (len(ids) - 1,), len(prefix)))
    budget = 160
    results = {}
    for backend in ("padded", "packed"):
        runner = TorchRunner(loaded.model, torch.device("cpu"), max_forward_tokens=budget, cache=PrefixCache(0),
                             marker_ids=(marker,), backend=backend)
        batch = runner.run_batch(jobs)
        results[backend] = np.concatenate([r.promises for r in batch])
        suffix_shapes = batch.stats.shapes[1:]  # the first pass computes the prefix
        if backend == "padded":
            assert all(b * (len(prefix) + t) <= budget for b, t in suffix_shapes), suffix_shapes
            assert len(suffix_shapes) == 4  # 10 candidates, at most 2 (at 48 + 6 tokens each) per pass
        else:
            assert len(suffix_shapes) == 1  # one pass attends to the one past
    np.testing.assert_allclose(results["padded"], results["packed"], atol=1e-5, rtol=1e-5)


def test_packed_attends_to_one_copy_of_a_shared_past(loaded):
    from service.engine.packed import PackedQwen2

    packed = PackedQwen2(loaded.model.backbone)
    layers, kvh, hd = len(packed.layers), packed.kv_heads, packed.head_dim
    past = [(torch.randn(1, kvh, 48, hd), torch.randn(1, kvh, 48, hd)) for _ in range(layers)]
    lengths = [3] * 10
    units = packed._units(lengths, list(np.cumsum([0] + lengths)), [past] * 10, torch.device("cpu"))
    assert len(units) == 1 and units[0][2] is past  # one attention call, the past concatenated once
