"""Forward backends: the packed Qwen2 forward == transformers, and the runner's packed, padded and (emulated)
CUDA-graph paths give the same promises and computed tokens on plain jobs, shared prefixes and cache hits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from service.engine.cuda_graphs import GraphRunner
from service.engine.packed import PackedQwen2, supports
from service.engine.prefix_cache import PrefixCache
from model_store.modeling import build_backbone, load_prm
from service.engine.runner import ScoreJob, TorchRunner, plan_forwards

CONFIGS = {
    "gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96),
    "mha-odd-width": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=3, intermediate_size=200),
    "mqa": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),
}


def backbone(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_backbone(dict(model_type="qwen2", num_hidden_layers=2, vocab_size=300,
                                max_position_embeddings=64, **CONFIGS[kind])).eval()
    with torch.no_grad():  # random biases and norm weights, so every parameter the packed path reads matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_packed_forward_equals_transformers(kind, onednn):
    model = backbone(kind)
    packed = PackedQwen2(model, onednn=onednn)
    if onednn and not packed.onednn:
        pytest.skip("oneDNN linear (torch.ops.mkldnn._linear_pointwise) is not in this torch build")
    assert packed.onednn == onednn
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 7, 33, 20, 90]  # 90 > max_position_embeddings: the RoPE table grows
    seqs = [torch.randint(3, 300, (n,), generator=gen) for n in lengths]
    with torch.inference_mode():
        hidden, kv = packed.forward(torch.cat(seqs), lengths, keep_kv=True)
        offset = 0
        for s in seqs:
            ref_cache = DynamicCache()
            ref = model(input_ids=s[None], past_key_values=ref_cache, use_cache=True).last_hidden_state[0]
            assert torch.allclose(hidden[offset:offset + len(s)], ref, atol=1e-5, rtol=1e-5)
            for (k, v), layer in zip(kv, ref_cache.layers):  # keys after RoPE, as transformers caches them
                assert torch.allclose(k[offset:offset + len(s)].transpose(0, 1), layer.keys[0], atol=1e-5)
                assert torch.allclose(v[offset:offset + len(s)].transpose(0, 1), layer.values[0], atol=1e-5)
            offset += len(s)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_packed_forward_continues_a_shared_past(kind):
    model = backbone(kind, seed=2)
    packed = PackedQwen2(model)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 300, (1, 25), generator=gen)
    suffixes = [torch.randint(3, 300, (n,), generator=gen) for n in (1, 9, 4)]
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=prefix, past_key_values=cache, use_cache=True)
        past = [(layer.keys, layer.values) for layer in cache.layers]  # [1, kvh, 25, hd]
        hidden, _ = packed.forward(torch.cat(suffixes), [len(s) for s in suffixes], pasts=[past] * len(suffixes))
        offset = 0
        for s in suffixes:
            ref = model(input_ids=torch.cat([prefix[0], s])[None]).last_hidden_state[0, prefix.shape[1]:]
            assert torch.allclose(hidden[offset:offset + len(s)], ref, atol=1e-5, rtol=1e-5)
            offset += len(s)


def test_packed_refuses_what_it_does_not_implement():
    model = backbone("gqa")
    assert supports(model.config)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert not supports(model.config)
    with pytest.raises(ValueError, match="full attention"):
        PackedQwen2(model)


def test_packed_plan_budgets_real_tokens():
    lengths = [100, 300, 50, 250, 120]
    groups = plan_forwards(lengths, max_forward_tokens=400, packed=True)
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert all(sum(lengths[i] for i in g) <= 400 for g in groups)
    assert plan_forwards([500, 10], max_forward_tokens=400, packed=True) == [[1], [0]]  # too long: alone


# -- the runner on every backend -----------------------------------------------------------------------------
def _jobs(rng: np.random.Generator, vocab: int, marker: int) -> list[list[ScoreJob]]:
    """Batches that exercise every runner phase: plain jobs, a shared-prefix group, then a cache hit."""
    def seq(n):
        ids = rng.integers(3, vocab, n)
        ids[rng.random(n) < 0.15] = marker
        ids[-1] = marker
        return tuple(int(t) for t in ids)

    def job(ids, prefix_len=0):
        return ScoreJob(ids, tuple(int(i) for i in np.flatnonzero(np.asarray(ids) == marker)), prefix_len)

    plain = [job(seq(n)) for n in (5, 40, 17, 64, 3)]
    shared = seq(48)
    group = [job(shared + seq(n), prefix_len=len(shared)) for n in (1, 12, 7)]
    grown = job(plain[3].ids + seq(20))  # an agent re-sending a grown history: a cache hit
    # Several groups in one batch (beam-expand over several beams): each against its own prefix, one of them
    # continuing a cached chain, next to a grown history and a plain job.
    beam_a, beam_b = group[1].ids, seq(21)
    mixed = ([job(beam_a + seq(n), prefix_len=len(beam_a)) for n in (4, 9, 2)]
             + [job(beam_b + seq(n), prefix_len=len(beam_b)) for n in (6, 1)]
             + [job(grown.ids + seq(11)), job(seq(26))])
    return [plain, group + [job(seq(30))], [grown], mixed]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_prm(tiny_checkpoint)


def _run_all(loaded, backend: str, graphs: bool = False, cache_bytes: int = 1 << 24):
    marker = loaded.tokenizer.token_to_id(loaded.manifest.template.action_end)
    vocab = loaded.model.backbone.config.vocab_size
    runner_graphs = None
    if graphs:
        runner_graphs = GraphRunner(loaded.model, [(1, 64), (4, 64), (8, 128)], torch.device("cpu"),
                                    with_kv=cache_bytes > 0, emulate=True)
    runner = TorchRunner(loaded.model, torch.device("cpu"), max_forward_tokens=128,
                         cache=PrefixCache(cache_bytes, block_size=8), marker_ids=(marker,), backend=backend,
                         graphs=runner_graphs)
    out = []
    for batch in _jobs(np.random.default_rng(7), vocab, marker):
        results = runner.run_batch(batch)
        out.append([(r.promises, r.computed_tokens) for r in results])
    return runner, out, results.stats  # the last batch's stats travel with its results


@pytest.mark.parametrize("cache_bytes", [0, 1 << 24])
def test_runner_backends_agree(loaded, cache_bytes):
    packed_runner, packed, packed_stats = _run_all(loaded, "packed", cache_bytes=cache_bytes)
    padded_runner, padded, _ = _run_all(loaded, "padded", cache_bytes=cache_bytes)
    graph_runner, graphed, _ = _run_all(loaded, "padded", graphs=True, cache_bytes=cache_bytes)
    assert packed_runner.backend == "packed" and padded_runner.backend == "padded"
    assert graph_runner.graphs is not None and graph_runner.graphs.replays > 0  # plain passes went through it
    for other in (padded, graphed):
        for batch_a, batch_b in zip(packed, other):
            for (pa, ca), (pb, cb) in zip(batch_a, batch_b):
                assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1e-5
                assert ca == cb
    promises = np.concatenate([p for batch in packed for p, _ in batch])
    assert promises.std() > 1e-4  # distinct values: the comparison is not between constants
    if cache_bytes:  # the grown history was served from the cache on every backend
        assert packed[2][0][1] < 64 + 20
    assert packed_stats.padded_tokens == packed_stats.computed_tokens


def test_auto_backend_is_packed_on_the_cpu(loaded):
    runner = TorchRunner(loaded.model, torch.device("cpu"))
    assert runner.backend == "packed"
    with pytest.raises(ValueError, match="backend"):
        TorchRunner(loaded.model, torch.device("cpu"), backend="fast")
