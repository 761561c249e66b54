"""Prefix sharing and the cross-request KV cache: same numbers as the independent path, bounded memory, LRU."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch

from service.engine.engine import EngineConfig, PRMEngine
from service.engine.prefix_cache import PrefixCache
from service.engine.types import Beam, Step, Trajectory
from tests.conftest import make_trajectory

TOL = 1e-5


def engines(checkpoint, **cached):
    reference = PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu", prefix_cache_bytes=0,
                                                                   share_prefixes=False))
    fast = PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu", prefix_block_size=8, **cached))
    return reference, fast


def run(*engines_and_coro):
    *engs, coro_fn = engines_and_coro

    async def main():
        for e in engs:
            await e.start()
        try:
            return await coro_fn()
        finally:
            for e in engs:
                await e.shutdown()
    return asyncio.run(main())


def random_steps(rng: random.Random, n: int) -> tuple[Step, ...]:
    words = ["red", "blue", "ball", "key", "door", "wall", "ahead", "left", "right", "steps", "open", "box"]
    actions = ["turn left", "turn right", "move forward", "pick up", "drop", "toggle", "go north"]
    return tuple(Step(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))), rng.choice(actions))
                 for _ in range(n))


def promises(result) -> np.ndarray:
    return np.array([result.initial_value] + [s.promise for s in result.steps])


def test_cached_score_equals_uncached_on_growing_histories(tiny_checkpoint):
    reference, fast = engines(tiny_checkpoint)
    rng = random.Random(0)
    tasks = [f"task {i}: " + " ".join(rng.choice(["go", "to", "the", "red", "ball"]) for _ in range(6)) for i in range(3)]
    histories = {t: random_steps(rng, 14) for t in tasks}

    async def go():
        worst, cached = 0.0, 0
        for n in range(1, 15):  # an agent re-sending a history that grows one step at a time
            for task in tasks:
                traj = Trajectory(task, histories[task][:n])
                a = (await reference.score("default", [traj])).results[0]
                out = await fast.score("default", [traj])
                worst = max(worst, np.abs(promises(a) - promises(out.results[0])).max())
                cached += out.usage.cached_tokens
                assert out.usage.cached_tokens + out.usage.computed_tokens == out.usage.prompt_tokens
        return worst, cached

    worst, cached = run(reference, fast, go)
    assert worst <= TOL
    assert cached > 0  # the cache really served tokens


def test_shared_prefix_rerank_equals_independent_scoring(tiny_checkpoint):
    reference, fast = engines(tiny_checkpoint, prefix_cache_bytes=0)  # sharing alone, no cross-request cache
    rng = random.Random(1)

    async def go():
        for trial in range(4):
            common = random_steps(rng, rng.randint(1, 4))  # candidates that share their first steps
            cands = [common + random_steps(rng, rng.randint(1, 5)) for _ in range(rng.randint(2, 7))]
            a = await reference.rerank("default", "pick up the key", cands, aggregate="mean")
            b = await fast.rerank("default", "pick up the key", cands, aggregate="mean")
            assert [r.index for r in a.results] == [r.index for r in b.results]
            for x, y in zip(a.results, b.results):
                assert np.abs(promises(x) - promises(y)).max() <= TOL
            assert b.usage.computed_tokens < a.usage.computed_tokens  # the shared prefix ran once
            assert b.usage.cached_tokens == a.usage.computed_tokens - b.usage.computed_tokens

    run(reference, fast, go)


def test_beam_expand_agent_loop_equals_independent_and_reuses_history(tiny_checkpoint):
    reference, fast = engines(tiny_checkpoint)
    rng = random.Random(2)

    async def go():
        task = "go to the red ball"
        beams = [Trajectory(task, ()), Trajectory(task, random_steps(rng, 2))]
        saved = []
        for step in range(6):
            requests = [Beam(b, f"observation {step} " + " ".join(rng.choice(["ball", "wall", "door"]) for _ in range(5)),
                             ("turn left", "turn right", "move forward", "pick up")) for b in beams]
            a = await reference.expand("default", requests, beam_width=2)
            b = await fast.expand("default", requests, beam_width=2)
            for beam_a, beam_b in zip(a.candidates, b.candidates):
                for x, y in zip(beam_a, beam_b):
                    assert abs(x.promise - y.promise) <= TOL and abs(x.progress - y.progress) <= TOL
            assert [(s.beam, s.candidate) for s in a.selected] == [(s.beam, s.candidate) for s in b.selected]
            saved.append(b.usage.cached_tokens / b.usage.prompt_tokens)
            beams = [Trajectory(task, requests[s.beam].trajectory.steps
                                + (Step(requests[s.beam].observation, requests[s.beam].candidates[s.candidate]),))
                     for s in b.selected]
        return saved

    saved = run(reference, fast, go)
    assert min(saved[1:]) > 0.5  # from the second step on, most of every request is shared or cached


def _kv(layers: int, length: int, fill: float):
    return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill)) for _ in range(layers)]


def test_cache_finds_the_longest_cached_prefix_and_its_markers():
    cache = PrefixCache(max_bytes=1 << 20, block_size=4)
    ids = tuple(range(100, 111))  # 11 tokens: 2 whole blocks
    markers = np.full(11, np.nan, dtype=np.float32)
    markers[5] = 0.25
    assert cache.insert(ids, _kv(2, 11, 1.0), markers) == 2
    hit = cache.lookup(ids + (7, 8, 9))
    assert hit.tokens == 8
    k, v = hit.kv()[1]
    assert k.shape == (1, 2, 8, 4) and float(k.mean()) == 1.0 and float(v.mean()) == -1.0
    assert hit.markers()[5] == pytest.approx(0.25) and np.isnan(hit.markers()[4])
    assert cache.lookup(ids[:7]).tokens == 4
    assert cache.lookup((100, 101, 102, 999) + ids[4:]).tokens == 0  # a different first block: nothing
    assert cache.lookup(ids, max_tokens=5).tokens == 4


def test_cache_stays_within_its_byte_bound_and_evicts_lru():
    block_bytes = 2 * 2 * (2 * 4 * 4) * 4 + 4 * 4  # 2 layers x (k, v) [2, 4, 4] fp32 + markers
    cache = PrefixCache(max_bytes=10 * block_bytes, block_size=4)
    rng = random.Random(3)
    sequences = [tuple(rng.randrange(50) for _ in range(rng.randint(4, 24))) for _ in range(300)]
    for i, seq in enumerate(sequences):
        cache.insert(seq, _kv(2, len(seq), float(i)), np.full(len(seq), np.nan, dtype=np.float32))
        assert cache.bytes <= cache.max_bytes
        if i % 7 == 0:
            cache.lookup(sequences[rng.randrange(i + 1)])
    assert cache.stats.evicted_blocks > 0 and len(cache) <= 10
    # LRU: touching A after inserting B keeps A and evicts B when C arrives.
    small = PrefixCache(max_bytes=2 * block_bytes, block_size=4)
    a, b, c = (1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)
    nan = np.full(4, np.nan, dtype=np.float32)
    small.insert(a, _kv(2, 4, 1.0), nan)
    small.insert(b, _kv(2, 4, 2.0), nan)
    assert small.lookup(a).tokens == 4
    small.insert(c, _kv(2, 4, 3.0), nan)
    assert small.lookup(a).tokens == 4 and small.lookup(c).tokens == 4 and small.lookup(b).tokens == 0


def test_eviction_keeps_chains_reachable_from_their_root():
    block_bytes = 2 * 2 * (2 * 4 * 4) * 4 + 4 * 4
    cache = PrefixCache(max_bytes=3 * block_bytes, block_size=4)
    nan = np.full(12, np.nan, dtype=np.float32)
    chain = tuple(range(12))  # 3 blocks
    cache.insert(chain, _kv(2, 12, 1.0), nan)
    cache.insert((50, 51, 52, 53), _kv(2, 4, 2.0), nan[:4])  # one more block forces one eviction
    assert cache.lookup(chain).tokens == 8  # the deepest block went, the root and middle stayed usable


def test_cache_metrics_are_exported(tiny_checkpoint):
    _, fast = engines(tiny_checkpoint)
    traj = make_trajectory("go to the red ball", 8)

    async def go():
        await fast.score("default", [traj])
        await fast.score("default", [Trajectory(traj.task, traj.steps + (Step("more", "drop"),))])

    run(fast, go)
    text = fast.metrics.render().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("agentprm_") and " " in line and "{" not in line}
    assert values["agentprm_prefix_cache_hits_total"] >= 1
    assert values["agentprm_tokens_cached_total"] > 0
    assert 0 < values["agentprm_prefix_cache_bytes"] <= 256 * 1024 * 1024


def test_a_chain_longer_than_the_cache_keeps_its_root_side():
    block_bytes = 2 * 2 * (2 * 4 * 4) * 4 + 4 * 4
    cache = PrefixCache(max_bytes=3 * block_bytes, block_size=4)
    other = (90, 91, 92, 93)
    cache.insert(other, _kv(2, 4, 5.0), np.full(4, np.nan, dtype=np.float32))
    chain = tuple(range(20))  # 5 blocks into a cache of 3: the other block goes, the chain's first 3 stay
    assert cache.insert(chain, _kv(2, 20, 1.0), np.full(20, np.nan, dtype=np.float32)) == 3
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert cache.lookup(chain).tokens == 12 and cache.lookup(other).tokens == 0
    k, v = cache.lookup(chain).kv()[0]
    assert k.shape == (1, 2, 12, 4) and float(k.mean()) == 1.0 and float(v.mean()) == -1.0


def test_a_hit_read_after_its_slots_were_reused_raises_instead_of_serving_other_kv():
    block_bytes = 2 * 2 * (2 * 4 * 4) * 4 + 4 * 4
    cache = PrefixCache(max_bytes=1 * block_bytes, block_size=4)
    nan = np.full(4, np.nan, dtype=np.float32)
    cache.insert((1, 2, 3, 4), _kv(2, 4, 1.0), nan)
    hit = cache.lookup((1, 2, 3, 4, 5))
    cache.insert((7, 8, 9, 10), _kv(2, 4, 2.0), nan)  # evicts the hit's block and writes its slot
    with pytest.raises(RuntimeError, match="reused"):
        hit.kv()
    assert float(cache.lookup((7, 8, 9, 10, 11)).kv()[0][0].mean()) == 2.0
