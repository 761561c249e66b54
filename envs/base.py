"""Text environments that can continue from a state, policies over them, and the episode helpers.

Contract (generic: nothing here knows about minigrid):
- `TextEnv` is a deterministic text game. `reset(seed)` starts the episode `seed` and returns the first
  observation (and sets `task`); `step(action)` returns a `StepOutcome`; `replay(seed, actions)` resets and
  applies `actions`, reproducing the observations of the original episode exactly. The base class keeps the
  bookkeeping every caller relies on: `seed`, `history` (actions since the last reset, as given),
  `done`, `last_outcome`, and `env_steps`, the count of every step taken through this object, replays
  included (the labelling-cost figure). An episode ends at success, at the environment's own failure
  rule, or after `max_steps` actions; stepping a finished episode raises `RuntimeError`.
- `Policy` chooses actions by looking at an environment: `act(env)` one action, `propose(env, k)` k distinct
  actions with the preferred one first. `reset(seed)` is called at the start of every episode (and of every
  continuation rollout); a policy with randomness re-seeds from its own seed and that episode seed, so an
  episode's actions depend only on (policy config, episode seed, state) and never on what ran before.
- `run_episode` returns one trajectory in the project's JSONL format
  {"task", "steps": [{"observation", "action"}], "reward", "meta": {"env", "level", "seed", "policy", ...}}.
- `continue_rollouts` returns the final rewards of k rollouts started from the state after a prefix of
  actions (the Monte-Carlo labeller's primitive).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class StepOutcome:
    observation: str
    reward: float
    done: bool
    success: bool


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any printable parts, identical in every process (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class TextEnv(ABC):
    """A deterministic text environment. Subclasses implement `_reset` and `_step`; this class counts."""

    name: str = "text"
    valid_actions: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.task: str = ""
        self.seed: int | None = None
        self.history: list[str] = []
        self.max_steps: int = 0
        self.env_steps: int = 0
        self.done: bool = False
        self.last_outcome: StepOutcome | None = None

    @abstractmethod
    def _reset(self, seed: int) -> tuple[str, str, int]:
        """Start episode `seed`; return (task, first observation, max_steps)."""

    @abstractmethod
    def _step(self, action: str, render: bool = True) -> StepOutcome:
        """Apply one action; `done` here means the environment's own end (success or failure).
        With `render=False` (intermediate steps of a replay) the observation may be left empty."""

    def meta(self) -> dict:
        """Fields recorded in a trajectory's meta (at least "env")."""
        return {"env": self.name}

    def reset(self, seed: int) -> str:
        self.task, observation, self.max_steps = self._reset(int(seed))
        self.seed = int(seed)
        self.history = []
        self.done = False
        self.last_outcome = None
        return observation

    def step(self, action: str) -> StepOutcome:
        return self._take(action, render=True)

    def _take(self, action: str, render: bool) -> StepOutcome:
        if self.seed is None:
            raise RuntimeError("step() before reset()")
        if self.done:
            raise RuntimeError("the episode is over; reset() or replay() first")
        outcome = self._step(action, render)
        self.env_steps += 1
        self.history.append(action)
        if not outcome.done and len(self.history) >= self.max_steps:
            outcome = replace(outcome, done=True)
        self.done = outcome.done
        self.last_outcome = outcome
        return outcome

    def replay(self, seed: int, actions: list[str]) -> str:
        """Reset to `seed` and apply `actions`; the observation after the last one (or the first)."""
        observation = self.reset(seed)
        for i, action in enumerate(actions):
            if self.done:
                raise ValueError(f"replay: the episode ended after {i} of {len(actions)} actions")
            # only the last observation is returned, so only the last one is rendered
            observation = self._take(action, render=i == len(actions) - 1).observation
        return observation


class Policy(ABC):
    """Chooses actions from an environment's current state."""

    name: str = "policy"

    def reset(self, seed: int | None = None) -> None:
        """Called at the start of every episode or rollout; `seed` identifies it."""

    @abstractmethod
    def act(self, env: TextEnv) -> str:
        """The action to take in `env`'s current state."""

    def propose(self, env: TextEnv, k: int) -> list[str]:
        """k distinct candidate actions, the policy's preferred first (default: the rest in env order)."""
        check_k(env, k)
        first = self.act(env)
        return [first] + [a for a in env.valid_actions if a != first][: k - 1]

    def meta(self) -> dict:
        """Fields recorded in a trajectory's meta (at least "policy")."""
        return {"policy": self.name}


def check_k(env: TextEnv, k: int) -> None:
    if not 1 <= k <= len(env.valid_actions):
        raise ValueError(f"k must be between 1 and {len(env.valid_actions)} (the number of valid actions), got {k}")


def run_episode(env: TextEnv, policy: Policy, seed: int, policy_seed: int | None = None,
                extra: dict | None = None) -> dict:
    """Play one episode from `seed` to its end, the policy re-seeded by `policy_seed` (default: `seed`); the
    trajectory in the project's JSONL format, with `extra` added to its meta."""
    observation = env.reset(seed)
    policy.reset(seed if policy_seed is None else policy_seed)
    steps = []
    while True:  # bounded: the environment ends every episode after max_steps actions
        action = policy.act(env)
        steps.append({"observation": observation, "action": action})
        outcome = env.step(action)
        observation = outcome.observation
        if outcome.done:
            break
    meta = {**env.meta(), "seed": seed, **policy.meta(), "success": outcome.success, "length": len(steps),
            **(extra or {})}
    return {"task": env.task, "steps": steps, "reward": float(outcome.reward), "meta": meta}


def continue_rollouts(env: TextEnv, seed: int, actions: list[str], policy: Policy, k: int) -> list[float]:
    """Final rewards of `k` rollouts of `policy` from the state after `actions` in episode `seed`.

    Every rollout replays the prefix on `env` (counted in `env.env_steps`, as are the rollout's own steps).
    Rollout j re-seeds the policy with a seed derived from (seed, len(actions), j), so the k rollouts of a
    stochastic policy differ from each other and are reproducible. If the prefix already ends the episode,
    its final reward is returned k times without further steps.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    outcomes = []
    for j in range(k):
        env.replay(seed, actions)
        if env.done:
            outcomes.append(float(env.last_outcome.reward))
            continue
        policy.reset(derive_seed(seed, len(actions), j))
        while True:  # bounded by the environment's max_steps
            outcome = env.step(policy.act(env))
            if outcome.done:
                break
        outcomes.append(float(outcome.reward))
    return outcomes
