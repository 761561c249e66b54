"""A synthetic text task whose outcome is decided by one visible choice, as an `envs.base.TextEnv`.

Episode `seed`: a walk of 4-7 steps toward a goal; at one step (1 <= d <= n-2) the path forks and the only
valid actions are "take the stone bridge" (success) and "take the rope bridge" (failure); every other step's
only action is "walk on". Observations after the fork do not depend on the choice, so the action at step d
is the only evidence of the outcome: a PRM should keep its promise flat before d, jump there (up for stone,
down for rope) and stay flat after. Reward 1 on success, 0 on failure, at the end of the walk.

`make_dataset` rolls out a uniformly random policy (envs.policies.RandomPolicy), several samples per initial
state. Command line (the method comparison in the training notes):
    python -m tests.training.synthetic data OUT.jsonl [N_SEEDS [SAMPLES]]   # write a data file
    python -m tests.training.synthetic eval CHECKPOINT_DIR                   # serve and score fresh walks
"""

from __future__ import annotations

import random
import sys

from envs.base import StepOutcome, TextEnv, run_episode
from envs.policies import RandomPolicy

WALK = "walk on"
SAFE, UNSAFE = "take the stone bridge", "take the rope bridge"
GOALS = ("Reach the old tower.", "Find the way to the castle.", "Walk to the lighthouse.", "Get to the mill.")
PLACES = ("a dark corridor", "a narrow path", "a long hallway", "a quiet garden", "a muddy road", "a stone stair")


class ForkEnv(TextEnv):
    name = "fork"
    valid_actions: tuple[str, ...] = (WALK,)

    def _reset(self, seed: int) -> tuple[str, str, int]:
        rng = random.Random(seed)
        self.length = rng.randint(4, 7)
        self.fork = rng.randint(1, self.length - 2)
        self.places = [rng.choice(PLACES) for _ in range(self.length)]
        self.t = 0
        self.crossed_safely = None
        self._set_actions()
        return rng.choice(GOALS), self._observation(), self.length

    def _observation(self) -> str:
        if self.t == self.fork:
            return "The path splits at the river; two bridges cross it."
        return f"You are in {self.places[self.t]}."

    def _set_actions(self) -> None:
        self.valid_actions = (SAFE, UNSAFE) if self.t == self.fork else (WALK,)

    def _step(self, action: str, render: bool = True) -> StepOutcome:
        if action not in self.valid_actions:
            return StepOutcome(f"You cannot {action} here. " + self._observation(), 0.0, False, False)
        if self.t == self.fork:
            self.crossed_safely = action == SAFE
        self.t += 1
        if self.t == self.length:
            success = bool(self.crossed_safely)
            return StepOutcome("You arrived." if success else "The rope bridge broke; you fell.",
                               1.0 if success else 0.0, True, success)
        self._set_actions()
        return StepOutcome(self._observation(), 0.0, False, False)


def make_env(meta: dict | None = None) -> ForkEnv:
    """The factory `agentprm train --mc-env tests.training.synthetic:make_env` calls with a trajectory's meta."""
    return ForkEnv()


def random_episodes(env: TextEnv, n_seeds: int, samples: int, first_seed: int, deciding_step) -> list[dict]:
    """`samples` random-policy episodes of `env` from each of `n_seeds` initial states; meta gets the
    `deciding_step(env)` fields of each (where its outcome is decided)."""
    rows = []
    for seed in range(first_seed, first_seed + n_seeds):
        for j in range(samples):
            row = run_episode(env, RandomPolicy(seed=j), seed)
            row["meta"].update(deciding_step(env))
            rows.append(row)
    return rows


def make_dataset(n_seeds: int, samples: int = 4, first_seed: int = 0) -> list[dict]:
    """`samples` random-policy walks from each of `n_seeds` initial states, with meta.fork (the deciding step)."""
    return random_episodes(ForkEnv(), n_seeds, samples, first_seed, lambda env: {"fork": env.fork})


COLOURS = ("red", "green", "blue", "purple", "yellow", "grey")


class DoorEnv(TextEnv):
    """Task matching: "open the red door" in a room with three doors of different colours.

    Episode `seed`: 1-3 "walk on" steps through a corridor, then a room with three doors (the task's colour
    among them, in a random order); the valid actions there are "open the C door" for each visible colour.
    After the choice one more "walk through" step ends the episode; reward 1 iff the opened door's colour is
    the task's. Nothing after the choice reveals the outcome, so a PRM must match the action's colour word
    against the task's: the task-matching skill the BabyAI levels need, in a form that trains in seconds.
    """

    name = "doors"
    valid_actions: tuple[str, ...] = (WALK,)

    def _reset(self, seed: int) -> tuple[str, str, int]:
        rng = random.Random(seed)
        self.target = rng.choice(COLOURS)
        others = rng.sample([c for c in COLOURS if c != self.target], 2)
        self.doors = [self.target, *others]
        rng.shuffle(self.doors)
        self.corridor = rng.randint(1, 3)
        self.t = 0
        self.opened = None
        self._set_actions()
        return f"open the {self.target} door", self._observation(), self.corridor + 2

    def _observation(self) -> str:
        if self.t < self.corridor:
            return f"You walk down a corridor ({self.corridor - self.t} more steps to the room)."
        if self.t == self.corridor:
            return f"You see a {self.doors[0]} door, a {self.doors[1]} door and a {self.doors[2]} door."
        return "A door stands open in front of you."

    def _set_actions(self) -> None:
        if self.t == self.corridor:
            self.valid_actions = tuple(f"open the {c} door" for c in self.doors)
        elif self.t > self.corridor:
            self.valid_actions = ("walk through",)
        else:
            self.valid_actions = (WALK,)

    def _step(self, action: str, render: bool = True) -> StepOutcome:
        if action not in self.valid_actions:
            return StepOutcome(f"You cannot {action} here. " + self._observation(), 0.0, False, False)
        if self.t == self.corridor:
            self.opened = action.split()[2]
        self.t += 1
        if self.t == self.corridor + 2:
            success = self.opened == self.target
            return StepOutcome("You went through.", 1.0 if success else 0.0, True, success)
        self._set_actions()
        return StepOutcome(self._observation(), 0.0, False, False)


def make_door_dataset(n_seeds: int, samples: int = 2, first_seed: int = 0) -> list[dict]:
    """`samples` random-policy episodes of `DoorEnv` from each of `n_seeds` initial states (success ~1/3)."""
    return random_episodes(DoorEnv(), n_seeds, samples, first_seed, lambda env: {"choice_step": env.corridor})


def evaluate_checkpoint(path, n_seeds: int = 100, samples: int = 2, first_seed: int = 50_000) -> dict:
    """Serve a checkpoint (PRMEngine, CPU) on fresh walks: AUC of the last promise, the mean promise change at
    the fork (successes, failures) and elsewhere, and the MSE of every promise against the true on-policy
    value (0.5 before the fork for a random policy, the outcome from the fork on)."""
    import asyncio

    import numpy as np

    from service.engine.engine import EngineConfig, PRMEngine
    from service.engine.types import Step, Trajectory
    from training.trainer import roc_auc

    rows = make_dataset(n_seeds, samples, first_seed)
    engine = PRMEngine.from_checkpoint(path, EngineConfig(device="cpu"))

    async def score():
        await engine.start()
        try:
            trajectories = [Trajectory(r["task"], tuple(Step(**s) for s in r["steps"])) for r in rows]
            return [res for i in range(0, len(rows), 64)
                    for res in (await engine.score("default", trajectories[i:i + 64])).results]
        finally:
            await engine.shutdown()

    results = asyncio.run(score())
    up, down, elsewhere, errors = [], [], [], []
    for row, res in zip(rows, results):
        promises = np.array([res.initial_value, *(s.promise for s in res.steps)])
        fork, outcome = row["meta"]["fork"], row["reward"]
        truth = np.array([0.5] * (fork + 1) + [outcome] * (len(promises) - fork - 1))  # V_0, Q_0, ...
        errors.extend((promises - truth) ** 2)
        changes = np.diff(promises)
        (up if outcome > 0 else down).append(changes[fork])
        elsewhere.extend(abs(c) for t, c in enumerate(changes) if t != fork)
    return {"auc": roc_auc([r.steps[-1].promise for r in results], [row["reward"] > 0 for row in rows]),
            "jump_success": float(np.mean(up)), "jump_failure": float(np.mean(down)),
            "mean_abs_change_elsewhere": float(np.mean(elsewhere)), "value_mse": float(np.mean(errors)),
            "n": len(rows)}


if __name__ == "__main__":
    import json

    if len(sys.argv) < 3 or sys.argv[1] not in ("data", "eval"):
        sys.exit("usage: python -m tests.training.synthetic data OUT.jsonl [N_SEEDS [SAMPLES]]\n"
                 "       python -m tests.training.synthetic eval CHECKPOINT_DIR")
    if sys.argv[1] == "eval":
        print(json.dumps(evaluate_checkpoint(sys.argv[2])))
    else:
        n_seeds = int(sys.argv[3]) if len(sys.argv) > 3 else 100
        samples = int(sys.argv[4]) if len(sys.argv) > 4 else 4
        with open(sys.argv[2], "w") as handle:
            for row in make_dataset(n_seeds, samples):
                handle.write(json.dumps(row) + "\n")
