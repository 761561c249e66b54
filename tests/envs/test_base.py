"""The generic TextEnv bookkeeping and episode helpers, on a toy environment (no minigrid)."""

from __future__ import annotations

import pytest

from envs.base import Policy, StepOutcome, TextEnv, continue_rollouts, derive_seed, run_episode


class Corridor(TextEnv):
    """Reach cell 3 by moving forward; 'wait' wastes a step; 'jump' falls in a pit (failure)."""

    name = "corridor"
    valid_actions = ("move forward", "wait", "jump")

    def _reset(self, seed):
        self.pos = seed % 2  # odd seeds start one cell closer
        return f"walk to the end ({seed})", self._obs(), 6

    def _obs(self):
        return f"The end is {3 - self.pos} steps ahead."

    def _step(self, action, render=True):
        if action == "jump":
            return StepOutcome("You fell.", 0.0, True, False)
        self.pos += action == "move forward"
        success = self.pos >= 3
        return StepOutcome(self._obs(), float(success), success, success)


class Scripted(Policy):
    name = "scripted"

    def __init__(self, actions):
        self.actions = actions

    def act(self, env):
        return self.actions[len(env.history) % len(self.actions)]


def test_run_episode_writes_the_trajectory_format_and_stops_at_the_step_limit():
    env = Corridor()
    win = run_episode(env, Scripted(["move forward"]), seed=0)
    assert win["task"] == "walk to the end (0)"
    assert [s["action"] for s in win["steps"]] == ["move forward"] * 3
    assert win["steps"][0]["observation"] == "The end is 3 steps ahead."
    assert win["reward"] == 1.0
    assert win["meta"] == {"env": "corridor", "seed": 0, "policy": "scripted", "success": True, "length": 3}
    lose = run_episode(env, Scripted(["wait"]), seed=0)
    assert len(lose["steps"]) == 6 and lose["reward"] == 0.0 and lose["meta"]["success"] is False
    with pytest.raises(RuntimeError):
        env.step("wait")


def test_continue_rollouts_replays_the_prefix_and_counts_every_step():
    env = Corridor()
    before = env.env_steps
    outcomes = continue_rollouts(env, seed=0, actions=["wait", "move forward"], policy=Scripted(["move forward"]), k=3)
    assert outcomes == [1.0, 1.0, 1.0]
    # each rollout: 2 replayed steps + 2 forward steps to the end
    assert env.env_steps - before == 3 * (2 + 2)
    # a prefix that already ended the episode: its reward, k times, no further steps
    before = env.env_steps
    assert continue_rollouts(env, 0, ["jump"], Scripted(["move forward"]), k=2) == [0.0, 0.0]
    assert env.env_steps - before == 2
    with pytest.raises(ValueError):
        env.replay(0, ["jump", "wait"])


def test_derive_seed_is_stable_and_spreads():
    assert derive_seed("episode", 0, 1) == derive_seed("episode", 0, 1)
    assert len({derive_seed("episode", 0, i) for i in range(1000)}) == 1000
    assert 0 <= derive_seed(1, 2, 3) < 2**31
