"""The evaluation's parts: Wilson intervals, the horizon cap, held-out seeds, and Best-of-N picks through a
live server (one /v1/rerank over all samples picks what a /v1/rerank of the first N picks)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("minigrid", reason="needs the envs extra (minigrid)")

from clients.sdk import PRMClient  # noqa: E402
from envs.evaluate import (CappedBabyAIEnv, DataConfig, RandomChooser, bon_picks, collect, env_from_meta,  # noqa: E402
                           evaluate_beam, heldout_episodes, read_jsonl, wilson)
from envs.policies import make_policy  # noqa: E402
from envs.rollout import episode_seed  # noqa: E402
from tests.conftest import trajectory_json  # noqa: E402

LEVEL = "BabyAI-GoToRedBall-v0"


@pytest.mark.parametrize("k, n, low, high", [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
                                             (81, 263, 0.2553, 0.3662)])
def test_wilson_interval_matches_published_values(k, n, low, high):
    got = wilson(k, n)
    assert got[0] == pytest.approx(low, abs=5e-4) and got[1] == pytest.approx(high, abs=5e-4)


def test_horizon_ends_episodes_and_replays_from_meta():
    env = CappedBabyAIEnv(LEVEL, horizon=5)
    env.reset(3)
    assert env.max_steps == 5
    done = [env.step("turn left").done for _ in range(5)]
    assert done == [False] * 4 + [True]
    with pytest.raises(RuntimeError):
        env.step("turn left")
    uncapped = CappedBabyAIEnv(LEVEL, horizon=None)
    uncapped.reset(3)
    assert uncapped.max_steps > 5  # the level's own limit would have let the episode go on


def test_rollouts_are_capped_and_rebuilt_exactly_by_env_from_meta(tmp_path):
    out = tmp_path / "train.jsonl"
    summary = collect(DataConfig(levels=(LEVEL,), episodes=6, epsilon=0.9, horizon=7), out, progress=False)
    rows = read_jsonl(out)
    assert summary["episodes"] == len(rows) == 6
    assert all(len(r["steps"]) <= 7 for r in rows) and any(len(r["steps"]) == 7 for r in rows)
    for r in rows:
        env = env_from_meta(r["meta"])  # what `agentprm train --mc-env envs.evaluate:env_from_meta` builds
        actions = [s["action"] for s in r["steps"]]
        for t in range(len(actions)):
            assert env.replay(r["meta"]["seed"], actions[:t]) == r["steps"][t]["observation"]
        env.replay(r["meta"]["seed"], actions)
        assert env.done and env.last_outcome.reward == r["reward"]


def test_held_out_episodes_skip_seeds_used_for_training(tmp_path):
    config = DataConfig(levels=(LEVEL, "BabyAI-GoToObj-v0"))
    first = episode_seed(1, 0)
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"task": "t", "steps": [{"observation": "o", "action": "a"}], "reward": 0.0,
                                 "meta": {"env": "babyai", "level": LEVEL, "seed": first}}) + "\n")
    held = heldout_episodes(config, 3, test_seed=1, train_file=train)
    assert held[:3] == [(LEVEL, episode_seed(1, i)) for i in (1, 2, 3)]
    assert held[3:] == [("BabyAI-GoToObj-v0", episode_seed(1, i)) for i in (0, 1, 2)]


def test_best_of_n_from_one_rerank_equals_a_rerank_per_n_and_the_argmax_of_scores(live_server):
    candidates = [trajectory_json("go to the red ball", 1 + i % 5, seed=i)["steps"] for i in range(12)]
    ns = (1, 2, 3, 4, 8, 12)
    with PRMClient(live_server) as prm:
        one = bon_picks(prm, "go to the red ball", candidates, ns, per_n=False)
        per_n = bon_picks(prm, "go to the red ball", candidates, ns, per_n=True)
        scores = [r.score for r in prm.score([{"task": "go to the red ball", "steps": c} for c in candidates]).results]
    assert one == per_n
    for n in ns:
        assert one[n] == max(range(n), key=lambda i: (scores[i], -i))
    assert len(set(one.values())) > 1  # the random checkpoint does prefer different candidates


def test_random_choice_beam_search_is_reproducible_and_uses_the_noisy_proposals():
    config = DataConfig(levels=(LEVEL,), horizon=10)
    episodes = [(LEVEL, episode_seed(1, i)) for i in range(3)]
    first = evaluate_beam(lambda seed: RandomChooser(seed), config, episodes, ((2, 2), (8, 8)), progress=False)
    again = evaluate_beam(lambda seed: RandomChooser(seed), config, episodes, ((2, 2), (8, 8)), progress=False)
    assert first == again
    assert set(first) == {"2x2", "8x6"}  # 8 candidates are capped at the 6 valid actions
    assert all(r["n"] == 3 for r in first.values())
    policy = make_policy("noisy", 0.7, 0)
    env = CappedBabyAIEnv(LEVEL, 10)
    env.reset(episodes[0][1])
    assert sorted(policy.propose(env, 6)) == sorted(env.valid_actions)
