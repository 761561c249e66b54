"""Policies for the BabyAI text environment: the expert (minigrid's BabyAIBot), a noisy expert, random.

Contract:
- `ExpertPolicy` follows minigrid's `BabyAIBot`. The bot is stateful (it remembers what it has seen and
  re-plans after every action actually taken), so the policy never attaches it to the caller's environment:
  it keeps a private copy of the level (same level, same seed) and walks it through the environment's
  `history` action by action, calling `bot.replan(action)` after each, exactly as if the bot had watched
  the episode from the start. This stays right whoever chose the actions (noise, another policy, a PRM
  search) and after any `replay`: the suggestion for a state depends only on (level, seed, history).
  Rebuilt positions are kept as deep-copied snapshots (LRU), so k continuation rollouts from one prefix
  pay for catching up once. Invalid actions change nothing, so the bot is not told about them.
  If the bot gives up (it raises, e.g. after a box was opened, or answers minigrid's `done`), a fresh bot
  is started from the current state; if that fails too the action is "turn left". Both count in
  `fallbacks`.
- `NoisyExpertPolicy(epsilon, seed)`: the bot's action with probability 1 - epsilon, else a uniformly random
  valid action. `propose(k)`: the bot's action first, then the others in a seeded random order.
- `RandomPolicy(seed)`: uniform over the valid actions; works with any `TextEnv`.
- Policies with randomness re-seed on `reset(seed)` from (their own seed, that seed): deterministic per episode.
"""

from __future__ import annotations

import copy
import random
from collections import OrderedDict

from envs.babyai import ACTIONS, BabyAITextEnv, make_level, parse_action, quiet_reset
from envs.base import Policy, TextEnv, check_k, derive_seed

FALLBACK_ACTION = "turn left"
POLICY_NAMES = ("expert", "noisy", "random")


class _BotTracker:
    """A private copy of one episode, advanced through the same actions, with the bot that watched them."""

    def __init__(self, level: str, seed: int) -> None:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        self._bot_class = BabyAIBot
        self.level, self.seed = level, seed
        self.env = make_level(level)
        quiet_reset(self.env, seed)
        self.actions: list[str] = []
        self.fallbacks = 0
        self.bot = BabyAIBot(self.env)
        self.suggestion = self._ask(None)

    def follows(self, level: str, seed: int, history: list[str]) -> bool:
        """True if this copy is at a prefix of `history` of episode (level, seed)."""
        n = len(self.actions)
        return (level, seed) == (self.level, self.seed) and n <= len(history) and history[:n] == self.actions

    def advance(self, history: list[str]) -> None:
        for action in history[len(self.actions):]:
            self.actions.append(action)
            index = parse_action(action)
            if index is None:
                continue  # an invalid action changes nothing; telling the bot would pop a subgoal
            self.env.step(index)
            self.suggestion = self._ask(index)

    def _ask(self, taken: int | None) -> str:
        try:
            suggested = self.bot.replan(taken)
        except Exception:  # the third-party bot asserts or raises when its plan breaks
            suggested = None
        if suggested is None or not 0 <= int(suggested) < len(ACTIONS):
            self.fallbacks += 1
            try:
                self.bot = self._bot_class(self.env)
                suggested = self.bot.replan()
            except Exception:
                suggested = None
            if suggested is None or not 0 <= int(suggested) < len(ACTIONS):
                return FALLBACK_ACTION
        return ACTIONS[int(suggested)]


class ExpertPolicy(Policy):
    """minigrid's BabyAIBot, kept in step with the environment's history (see module docstring)."""

    name = "expert"
    max_snapshots = 16

    def __init__(self) -> None:
        self._live: _BotTracker | None = None
        self._snapshots: OrderedDict[tuple, _BotTracker] = OrderedDict()
        self._retired_fallbacks = 0

    @property
    def fallbacks(self) -> int:
        """How often the bot gave up and had to be restarted (0 on the levels it solves)."""
        live = self._live.fallbacks if self._live is not None else 0
        return self._retired_fallbacks + live

    def expert_action(self, env: TextEnv) -> str:
        if not isinstance(env, BabyAITextEnv):
            raise TypeError(f"the BabyAI expert needs a BabyAITextEnv, got {type(env).__name__}")
        if env.seed is None:
            raise RuntimeError("reset() the environment before asking the expert")
        level, seed, history = env.level, env.seed, env.history
        live = self._live
        if live is not None and live.follows(level, seed, history):
            live.advance(history)
            return live.suggestion
        if live is not None:
            self._retired_fallbacks += live.fallbacks
        self._live = live = self._restore(level, seed, history)
        live.advance(history)
        if history:
            key = (level, seed, tuple(history))
            self._snapshots[key] = copy.deepcopy(live)
            self._snapshots.move_to_end(key)
            while len(self._snapshots) > self.max_snapshots:
                self._snapshots.popitem(last=False)
        return live.suggestion

    def _restore(self, level: str, seed: int, history: list[str]) -> _BotTracker:
        best_key, best = None, None
        for key, snap in self._snapshots.items():
            if snap.follows(level, seed, history) and (best is None or len(snap.actions) > len(best.actions)):
                best_key, best = key, snap
        if best is None:
            return _BotTracker(level, seed)
        self._snapshots.move_to_end(best_key)
        restored = copy.deepcopy(best)
        restored.fallbacks = 0  # counted once, when the snapshot's original was retired
        return restored

    def act(self, env: TextEnv) -> str:
        return self.expert_action(env)


class NoisyExpertPolicy(ExpertPolicy):
    """The expert's action with probability 1 - epsilon, otherwise a uniformly random valid action."""

    name = "noisy"

    def __init__(self, epsilon: float, seed: int = 0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        super().__init__()
        self.epsilon = float(epsilon)
        self.seed = int(seed)
        self.reset(None)

    def reset(self, seed: int | None = None) -> None:
        self._rng = random.Random(derive_seed("noisy", self.seed, seed))

    def act(self, env: TextEnv) -> str:
        if self._rng.random() < self.epsilon:
            return self._rng.choice(env.valid_actions)
        return self.expert_action(env)

    def propose(self, env: TextEnv, k: int) -> list[str]:
        check_k(env, k)
        first = self.expert_action(env)
        rest = [a for a in env.valid_actions if a != first]
        self._rng.shuffle(rest)
        return [first] + rest[: k - 1]

    def meta(self) -> dict:
        return {"policy": self.name, "epsilon": self.epsilon}


class RandomPolicy(Policy):
    """Uniformly random valid actions (any TextEnv)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.reset(None)

    def reset(self, seed: int | None = None) -> None:
        self._rng = random.Random(derive_seed("random", self.seed, seed))

    def act(self, env: TextEnv) -> str:
        return self._rng.choice(env.valid_actions)

    def propose(self, env: TextEnv, k: int) -> list[str]:
        check_k(env, k)
        return self._rng.sample(list(env.valid_actions), k)


def make_policy(name: str, epsilon: float = 0.2, seed: int = 0) -> Policy:
    """A policy by its CLI name: expert | noisy | random."""
    if name == "expert":
        return ExpertPolicy()
    if name == "noisy":
        return NoisyExpertPolicy(epsilon, seed)
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
