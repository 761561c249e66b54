"""CUDA graph runner: bucket choice, padding and index remapping (CPU), disabled on the CPU, replay == eager (GPU).

The padded static-buffer path is checked on the CPU through `emulate=True`, which runs exactly what a
replay runs (right-padded bucket ids, remapped readout index, first N outputs) without capturing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.cuda_graphs import (GraphRunner, check_buckets, default_buckets, pad_to_bucket, pick_bucket,
                                        remap_flat_index)
from model_store.modeling import load_prm

BUCKETS = check_buckets([(1, 64), (1, 128), (4, 64), (4, 128), (8, 256)])


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_prm(tiny_checkpoint, device="cpu")


def random_batch(batch: int, length: int, vocab: int, readouts_per_row: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)  # [b, t]
    flat = torch.cat([b * length + torch.randperm(length, generator=g)[:readouts_per_row] for b in range(batch)])
    return ids, flat


# -- pure bucket arithmetic ------------------------------------------------------------------------------
def test_pick_bucket_takes_the_fewest_padded_tokens_that_fit():
    assert pick_bucket(BUCKETS, 1, 10) == (1, 64)
    assert pick_bucket(BUCKETS, 1, 64) == (1, 64)
    assert pick_bucket(BUCKETS, 1, 65) == (1, 128)
    assert pick_bucket(BUCKETS, 2, 64) == (4, 64)
    assert pick_bucket(BUCKETS, 3, 100) == (4, 128)
    assert pick_bucket(BUCKETS, 5, 10) == (8, 256)
    # Tie on padded tokens (2x64 and 1x128): the shorter length wins (less attention work).
    assert pick_bucket(check_buckets([(1, 128), (2, 64)]), 1, 50) == (2, 64)


def test_pick_bucket_returns_none_outside_every_bucket():
    assert pick_bucket(BUCKETS, 9, 10) is None
    assert pick_bucket(BUCKETS, 1, 257) is None
    assert pick_bucket([], 1, 1) is None


def test_buckets_are_validated_and_deduplicated():
    assert check_buckets([(4, 64), (1, 64), (4, 64)]) == [(1, 64), (4, 64)]
    with pytest.raises(ValueError, match="must be >= 1"):
        check_buckets([(0, 64)])
    assert default_buckets(4, (32, 64)) == [(1, 32), (1, 64), (2, 32), (2, 64), (4, 32), (4, 64)]


def test_padding_and_remap_keep_every_readout_on_its_token():
    ids = torch.arange(1, 13).reshape(3, 4)  # [3, 4]
    padded = pad_to_bucket(ids, (4, 8), pad_id=0)
    assert padded.shape == (4, 8)
    assert torch.equal(padded[:3, :4], ids) and padded[:3, 4:].eq(0).all() and padded[3].eq(0).all()
    flat = torch.tensor([0, 3, 5, 11])
    remapped = remap_flat_index(flat, 4, 8)
    assert torch.equal(padded.reshape(-1)[remapped], ids.reshape(-1)[flat])


def test_padded_pass_gives_the_unpadded_promises(tiny):
    # What a replay relies on: right padding (rows and columns) changes no real token's promise.
    model = tiny.model
    vocab = model.backbone.config.vocab_size
    ids, flat = random_batch(3, 37, vocab, readouts_per_row=5, seed=1)
    with torch.inference_mode():
        eager = model.readout(model.hidden_states(ids)[0], flat)
        padded = pad_to_bucket(ids, (4, 64), pad_id=0)
        bucketed = model.readout(model.hidden_states(padded)[0], remap_flat_index(flat, 37, 64))
    assert eager.std() > 1e-4  # distinct promises: the comparison compares real values
    assert torch.allclose(bucketed, eager, atol=1e-5, rtol=1e-5)


# -- the runner on the CPU --------------------------------------------------------------------------------
def test_runner_is_disabled_on_the_cpu(tiny):
    runner = GraphRunner(tiny.model, BUCKETS, torch.device("cpu"))
    assert not runner.enabled and "CUDA" in runner.disabled_reason
    ids, flat = random_batch(1, 10, 100, 3, seed=0)
    assert runner.maybe_run(ids, flat) is None
    assert runner.stats == [] and runner.replays == 0


def test_emulated_replay_equals_eager_and_reuses_buffers(tiny):
    runner = GraphRunner(tiny.model, BUCKETS, torch.device("cpu"), pad_id=0, emulate=True)
    vocab = tiny.model.backbone.config.vocab_size
    # Many readouts first, then few in the same bucket: stale index slots must not leak into the result.
    for seed, (batch, length, per_row) in enumerate([(4, 100, 40), (3, 90, 2), (1, 5, 1), (1, 64, 64), (8, 256, 3)]):
        ids, flat = random_batch(batch, length, vocab, per_row, seed)
        got = runner.maybe_run(ids, flat)
        assert got is not None and got.shape == (flat.numel(),)
        assert torch.allclose(got, runner.eager(ids, flat), atol=1e-5, rtol=1e-5)
    assert runner.replays == 5


def eager_kv(model, ids):
    from transformers import DynamicCache

    with torch.inference_mode():
        _, cache = model.hidden_states(ids, past_key_values=DynamicCache())
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_emulated_replay_with_kv_returns_the_unpadded_cache(tiny):
    runner = GraphRunner(tiny.model, BUCKETS, torch.device("cpu"), with_kv=True, emulate=True)
    vocab = tiny.model.backbone.config.vocab_size
    for seed, (batch, length) in enumerate([(3, 90), (1, 7)]):
        ids, flat = random_batch(batch, length, vocab, 4, seed)
        promises, kv = runner.maybe_run_with_kv(ids, flat)
        assert torch.allclose(promises, runner.eager(ids, flat), atol=1e-5, rtol=1e-5)
        expected = eager_kv(tiny.model, ids)
        assert len(kv) == len(expected) == tiny.model.backbone.config.num_hidden_layers
        for (k, v), (k_ref, v_ref) in zip(kv, expected):
            assert k.shape == k_ref.shape and k.shape[0] == batch and k.shape[2] == length
            assert torch.allclose(k, k_ref, atol=1e-5, rtol=1e-5) and torch.allclose(v, v_ref, atol=1e-5, rtol=1e-5)
    plain = GraphRunner(tiny.model, BUCKETS, torch.device("cpu"), emulate=True)
    with pytest.raises(RuntimeError, match="with_kv"):
        plain.maybe_run_with_kv(*random_batch(1, 5, vocab, 1, seed=0))


def test_runner_declines_shapes_outside_the_buckets(tiny):
    runner = GraphRunner(tiny.model, BUCKETS, torch.device("cpu"), emulate=True, max_readouts=16)
    vocab = tiny.model.backbone.config.vocab_size
    assert runner.maybe_run(*random_batch(9, 10, vocab, 1, seed=0)) is None  # batch too big
    assert runner.maybe_run(*random_batch(1, 300, vocab, 1, seed=0)) is None  # too long
    assert runner.maybe_run(*random_batch(1, 60, vocab, 17, seed=0)) is None  # more readouts than the buffer
    assert runner.maybe_run(*random_batch(1, 60, vocab, 16, seed=0)) is not None
    with pytest.raises(IndexError):
        runner.maybe_run(torch.ones(2, 10, dtype=torch.long), torch.tensor([20]))
    with pytest.raises(ValueError, match="batch, length"):
        runner.maybe_run(torch.ones(10, dtype=torch.long), torch.tensor([0]))


# -- the real thing ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_equals_eager_on_cuda(tiny_checkpoint):
    loaded = load_prm(tiny_checkpoint, device="cuda", dtype=torch.float32)
    runner = GraphRunner(loaded.model, BUCKETS, torch.device("cuda"))
    assert runner.enabled, runner.disabled_reason
    assert [s.bucket for s in runner.stats][0] == (8, 256)  # largest captured first
    vocab = loaded.model.backbone.config.vocab_size
    for seed, (batch, length, per_row) in enumerate([(1, 5, 1), (4, 100, 40), (3, 90, 2), (8, 256, 3)]):
        ids, flat = random_batch(batch, length, vocab, per_row, seed)
        got = runner.maybe_run(ids, flat)
        assert got is not None
        assert torch.allclose(got, runner.eager(ids, flat), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_with_kv_equals_eager_on_cuda(tiny_checkpoint):
    loaded = load_prm(tiny_checkpoint, device="cuda", dtype=torch.float32)
    runner = GraphRunner(loaded.model, BUCKETS, torch.device("cuda"), with_kv=True)
    assert runner.enabled, runner.disabled_reason
    ids, flat = random_batch(3, 90, loaded.model.backbone.config.vocab_size, 4, seed=0)
    promises, kv = runner.maybe_run_with_kv(ids, flat)
    assert torch.allclose(promises, runner.eager(ids, flat), atol=1e-4, rtol=1e-4)
    for (k, v), (k_ref, v_ref) in zip(kv, eager_kv(loaded.model, ids.cuda())):
        assert torch.allclose(k, k_ref, atol=1e-4, rtol=1e-4) and torch.allclose(v, v_ref, atol=1e-4, rtol=1e-4)


# -- graph aliasing through the runner -------------------------------------------------------------------------
@pytest.mark.parametrize("cache_bytes", [0, 1 << 24], ids=["cache-off", "cache-on"])
def test_two_uncached_prefixes_in_one_bucket_keep_their_own_kv(tiny, cache_bytes):
    # Two shared prefixes of one batch (two concurrent reranks, two beams) that fall in the same graph bucket:
    # the second prefix pass replays the bucket the first used. Each group's suffixes must still attend to
    # their own prefix, as they do without graphs.
    from service.engine.prefix_cache import PrefixCache
    from service.engine.runner import ScoreJob, TorchRunner

    model = tiny.model
    marker = tiny.tokenizer.token_to_id(tiny.manifest.template.action_end)
    gen = torch.Generator().manual_seed(11)

    def seq(n):
        return tuple(int(t) for t in torch.randint(3, model.backbone.config.vocab_size, (n,), generator=gen))

    jobs = []
    for _ in range(2):
        prefix = seq(40)  # both prefixes in bucket (1, 64)
        for n in (3, 6):
            ids = prefix + seq(n) + (marker,)
            jobs.append(ScoreJob(ids, (len(ids) - 1,), len(prefix)))

    def promises(graphs):
        runner = TorchRunner(model, torch.device("cpu"), cache=PrefixCache(cache_bytes, block_size=8),
                             marker_ids=(marker,), backend="padded", graphs=graphs)
        return [r.promises for r in runner.run_batch(jobs)], runner

    expected, _ = promises(None)
    graphs = GraphRunner(model, BUCKETS, torch.device("cpu"), with_kv=True, emulate=True)
    got, runner = promises(graphs)
    assert runner.graphs is graphs and graphs.replays >= 2  # both prefix passes replayed bucket (1, 64)
    assert np.std(np.concatenate(expected)) > 1e-4
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
