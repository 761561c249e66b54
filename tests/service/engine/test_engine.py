"""Engine numerics: one pass == per-prefix scoring, batched == unbatched, limits, beam-expand semantics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from service.engine.engine import EngineConfig, PRMEngine
from service.engine.errors import InvalidInput, UnknownModel
from service.engine.runner import ScoreJob, plan_forwards
from service.engine.types import Beam, Step, Trajectory
from tests.conftest import make_trajectory


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The reference path: no cross-request cache, no prefix sharing (test_prefix_cache compares against it)."""
    return PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu", max_wait_ms=2,
                                                                   prefix_cache_bytes=0, share_prefixes=False))


def run(engine, coro_fn):
    async def main():
        await engine.start()
        try:
            return await coro_fn()
        finally:
            await engine.shutdown()
            engine.scheduler = type(engine.scheduler)(engine.runner.run_batch, engine.scheduler.config,
                                                      engine.scheduler.on_batch)
    return asyncio.run(main())


def test_one_pass_equals_scoring_each_prefix_alone(engine):
    traj = make_trajectory("pick up the blue key", 6, seed=3)

    async def go():
        full = await engine.score("default", [traj])
        prefixes = await asyncio.gather(*(engine.score("default", [Trajectory(traj.task, traj.steps[: t + 1])])
                                          for t in range(len(traj.steps))))
        return full, prefixes

    full, prefixes = run(engine, go)
    one_pass = np.array([s.promise for s in full.results[0].steps])
    per_prefix = np.array([p.results[0].steps[-1].promise for p in prefixes])
    assert np.abs(one_pass - per_prefix).max() <= 1e-5
    assert one_pass.std() > 1e-4  # a random head gives distinct promises: the check compares real values
    assert full.usage.computed_tokens < sum(p.usage.computed_tokens for p in prefixes)


def test_batched_equals_unbatched_for_mixed_lengths(engine):
    trajs = [make_trajectory(f"task {i}", n, seed=i) for i, n in enumerate([1, 7, 3, 12, 2, 5])]

    async def go():
        together = await engine.score("default", trajs)
        alone = [await engine.score("default", [t]) for t in trajs]
        return together, alone

    together, alone = run(engine, go)
    for batched, single in zip(together.results, alone):
        a = np.array([s.promise for s in batched.steps] + [batched.initial_value])
        b = np.array([s.promise for s in single.results[0].steps] + [single.results[0].initial_value])
        assert np.abs(a - b).max() <= 1e-5


def test_concurrent_requests_are_batched_and_match(engine):
    trajs = [make_trajectory("go to the door", n, seed=n) for n in (2, 9, 4, 4, 11, 1, 6, 3)]

    async def go():
        concurrent = await asyncio.gather(*(engine.score("default", [t]) for t in trajs))
        batches = engine.scheduler.batches_run
        return concurrent, batches

    concurrent, batches = run(engine, go)
    assert batches < len(trajs)  # dynamic batching merged concurrent requests
    for t, out in zip(trajs, concurrent):
        assert len(out.results[0].steps) == len(t.steps)


def test_progress_and_initial_value_semantics(engine):
    traj = make_trajectory("go to the red ball", 4)
    out = run(engine, lambda: engine.score("default", [traj], aggregate="min")).results[0]
    promises = [s.promise for s in out.steps]
    assert out.steps[0].progress == pytest.approx(promises[0] - out.initial_value, abs=1e-7)
    for t in range(1, 4):
        assert out.steps[t].progress == pytest.approx(promises[t] - promises[t - 1], abs=1e-7)
    assert out.score == pytest.approx(min(promises))
    assert all(0.0 <= p <= 1.0 for p in promises)


def test_rerank_sorts_and_matches_score(engine):
    cands = [make_trajectory("t", n, seed=n).steps for n in (3, 1, 5, 2)]

    async def go():
        ranked = await engine.rerank("default", "t", cands, aggregate="mean")
        scored = await engine.score("default", [Trajectory("t", c) for c in cands], aggregate="mean")
        return ranked, scored

    ranked, scored = run(engine, go)
    expected = sorted(range(4), key=lambda i: -scored.results[i].score)
    assert [r.index for r in ranked.results] == expected
    for r in ranked.results:
        assert r.score == pytest.approx(scored.results[r.index].score, abs=1e-5)


def test_beam_expand_scores_candidates_like_the_extended_trajectory(engine):
    history = make_trajectory("go to the red ball", 3, seed=1)
    beams = [Beam(history, "You see a red ball 1 step ahead.", ("move forward", "turn left", "drop")),
             Beam(Trajectory("go to the red ball", ()), "You see a wall.", ("turn right", "toggle"))]

    async def go():
        expanded = await engine.expand("default", beams, beam_width=3)
        direct = []
        for beam in beams:
            for action in beam.candidates:
                steps = beam.trajectory.steps + (Step(beam.observation, action),)
                direct.append((await engine.score("default", [Trajectory(beam.trajectory.task, steps)])).results[0])
        return expanded, direct

    expanded, direct = run(engine, go)
    flat = [s for beam in expanded.candidates for s in beam]
    for got, want in zip(flat, direct):
        assert got.promise == pytest.approx(want.steps[-1].promise, abs=1e-5)
        assert got.progress == pytest.approx(want.steps[-1].progress, abs=1e-5)
    assert len(expanded.selected) == 3
    promises = [s.promise for s in expanded.selected]
    assert promises == sorted(promises, reverse=True)
    assert promises[0] == pytest.approx(max(s.promise for s in flat))


def test_limits_raise_invalid_input(engine, tiny_checkpoint):
    long = make_trajectory("t", 80)  # > 512 tokens for the tiny checkpoint's max_seq_len

    async def go():
        errors = []
        for call in (lambda: engine.score("default", [long]),
                     lambda: engine.score("default", []),
                     lambda: engine.score("default", [Trajectory("t", ())]),
                     lambda: engine.score("default", [make_trajectory("t", 2)], aggregate="max")):
            with pytest.raises(InvalidInput) as info:
                await call()
            errors.append(info.value.message)
        with pytest.raises(UnknownModel):
            await engine.score("nope", [make_trajectory("t", 2)])
        return errors

    messages = run(engine, go)
    assert "trajectories[0] is" in messages[0] and "at most 512" in messages[0]
    assert "empty" in messages[1] and "no steps" in messages[2] and "aggregate" in messages[3]


def test_forward_plan_respects_budget_and_groups_lengths():
    lengths = [5, 100, 7, 98, 6, 99]
    groups = plan_forwards(lengths, max_forward_tokens=300)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 300 or len(g) == 1
    assert {frozenset(g) for g in groups} == {frozenset({0, 2, 4}), frozenset({1, 3, 5})}
    assert len(plan_forwards(lengths, max_forward_tokens=299)) == 3


def test_runner_padding_does_not_change_results(engine):
    a = ScoreJob(tuple(range(10, 20)), (3, 9))
    b = ScoreJob(tuple(range(10, 60)), (9, 49))
    together = engine.runner.run_batch([a, b])
    alone = engine.runner.run_batch([a])
    assert np.abs(together[0].promises - alone[0].promises).max() <= 1e-5
    assert together[1].promises.shape == (2,)
    assert [r.computed_tokens for r in together] == [10, 50]
    assert torch.get_default_dtype() == torch.float32
