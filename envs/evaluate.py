"""BabyAI evaluation data: capped levels, training rollouts, held-out test sets on levels never trained on.

Contract:
- Episodes are capped at a horizon (`DataConfig.horizon`, default 24 steps; the levels' own limits are 50-64
  and the expert needs about 4-8): `CappedBabyAIEnv`. Training data, MC-labelling rollouts
  (`--mc-env envs.evaluate:env_from_meta`), test samples and beam search all use the same cap (meta.horizon).
- Training rollouts (`collect`): on `DataConfig.levels`, episode i of each level from
  `episode_seed(config.seed, i)`; the noisy expert's epsilon cycles through `DataConfig.epsilons` episode by
  episode (a mixture from near-expert to random: near-expert episodes say what an efficient path is worth,
  noisy ones put every action in every kind of state). `samples_per_start` consecutive episodes share one
  initial state (seed) and differ in the sampler's randomness (seeded by `policy_seed`, the episode seed and
  the sample), so the data holds different actions taken in the same states and what each led to: the
  contrast a PRM needs to rank actions, not only states. With `branch_fraction` > 0, that share of episodes also
  gets one branch point (`branches`): every action not taken there, each followed by the same sampler, so the
  data holds all actions in that state in equal numbers (the base episodes are unchanged).
- Test sets (`heldout_set`) are built on `HeldoutConfig.levels`, levels absent from the training mix by default
  (`HELDOUT_LEVELS`), with exact seeds (`HeldoutConfig.seeds`, or `episodes` seeds from `seed_base`), and any
  (level, seed) that occurs in the training file is skipped. For each test episode: `n_max` samples of the
  sampling policy (epsilon `sample_epsilon`) and of a harder one (`hard_epsilon`: one sample succeeds about a
  third of the time or less, so Best-of-N has room above the sampler), and one expert trajectory; the expert
  states with their optimal actions (`envs.verifiers.expert_states`) for the step-level check.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from envs.babyai import BabyAITextEnv, DEFAULT_LEVELS
from envs.base import derive_seed, run_episode
from envs.policies import NoisyExpertPolicy, make_policy
from envs.rollout import episode_seed

# The training mix: the six default levels plus two more single-room ones (more layouts and instructions).
TRAIN_LEVELS: tuple[str, ...] = (*DEFAULT_LEVELS, "BabyAI-GoToLocalS6N3-v0", "BabyAI-OpenDoorLoc-v0")
# Single-room levels that are *not* in the training mix: other room sizes, distractor counts, objects, doors and
# instructions ("go to a door", "open the yellow door" among several, "pick up a key" among distractors).
HELDOUT_LEVELS: tuple[str, ...] = (
    "BabyAI-GoToRedBallNoDists-v0",
    "BabyAI-GoToLocalS7N4-v0",
    "BabyAI-GoToRedBlueBall-v0",
    "BabyAI-PickupDist-v0",
    "BabyAI-GoToDoor-v0",
    "BabyAI-OpenDoorColor-v0",
)


class CappedBabyAIEnv(BabyAITextEnv):
    """A BabyAI level whose episodes end after min(level limit, horizon) actions."""

    def __init__(self, level: str, horizon: int | None = None) -> None:
        super().__init__(level)
        self.horizon = int(horizon) if horizon else None

    def _reset(self, seed: int) -> tuple[str, str, int]:
        task, observation, limit = super()._reset(seed)
        return task, observation, min(limit, self.horizon) if self.horizon else limit

    def meta(self) -> dict:
        return {**super().meta(), "horizon": self.horizon}


def env_from_meta(meta: dict) -> CappedBabyAIEnv:
    """The environment of a trajectory's meta (for `agentprm train --mc-env envs.evaluate:env_from_meta`)."""
    return CappedBabyAIEnv(meta["level"], meta.get("horizon"))


@dataclass(frozen=True)
class DataConfig:
    levels: tuple[str, ...] = TRAIN_LEVELS
    episodes: int = 300  # per level
    policy: str = "noisy"
    epsilons: tuple[float, ...] = (0.05, 0.15, 0.3, 0.5, 0.75)  # cycled episode by episode
    horizon: int = 24
    seed: int = 0  # episode seeds
    policy_seed: int = 0  # the sampler's own randomness
    samples_per_start: int = 4  # trajectories sampled from each initial state (episodes / this = distinct starts)
    branch_fraction: float = 0.0  # share of episodes that get a branch point: every other action there, played on

    def check(self) -> None:
        if not self.levels:
            raise ValueError("no training levels given")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.samples_per_start < 1:
            raise ValueError(f"samples_per_start must be >= 1, got {self.samples_per_start}")
        if not self.epsilons or any(not 0.0 <= e <= 1.0 for e in self.epsilons):
            raise ValueError(f"epsilons must be in [0, 1], got {self.epsilons}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 0.0 <= self.branch_fraction <= 1.0:
            raise ValueError(f"branch_fraction must be in [0, 1], got {self.branch_fraction}")
        for level in self.levels:
            CappedBabyAIEnv(level, self.horizon)


def write_jsonl(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def collect(config: DataConfig, out: Path | str, progress: bool = True) -> dict:
    """Training rollouts (module docstring) written to `out`; a summary."""
    from tqdm import tqdm

    config.check()
    if config.policy == "noisy":
        policies = [NoisyExpertPolicy(eps, config.policy_seed) for eps in config.epsilons]
    else:
        policies = [make_policy(config.policy, config.epsilons[0], config.policy_seed)]
    start = time.perf_counter()
    rows = []
    with tqdm(total=config.episodes * len(config.levels), unit="ep", desc="rollout", disable=not progress) as bar:
        for level in config.levels:
            env = CappedBabyAIEnv(level, config.horizon)
            for i in range(config.episodes):
                first_state, sample = divmod(i, config.samples_per_start)
                seed = episode_seed(config.seed, first_state)
                policy_seed = derive_seed("policy", config.policy_seed, seed, sample)
                policy = policies[i % len(policies)]
                rows.append(run_episode(env, policy, seed, policy_seed, {"sample": sample}))
                rows.extend(branches(env, policy, rows[-1], config.branch_fraction, policy_seed))
                bar.update(1)
    write_jsonl(rows, Path(out))
    return {"out": str(out), "episodes": len(rows), "seconds": round(time.perf_counter() - start, 2),
            "env_steps": sum(len(r["steps"]) for r in rows), "success_rate": round(_mean(r["reward"] for r in rows), 4),
            "mean_length": round(_mean(len(r["steps"]) for r in rows), 2)}


def branches(env: CappedBabyAIEnv, policy, trajectory: dict, fraction: float, policy_seed: int) -> list[dict]:
    """With probability `fraction` (decided by a seed derived from the episode's), one branch point t drawn
    uniformly in `trajectory`: for every valid action other than the one taken at t, the trajectory's first t
    steps, that action, then the same sampler playing on. The data then holds every action taken in the same
    state with what each led to, in equal numbers: the contrast that ranks actions, without the sampler's
    bias (its random actions are mostly not "move forward", so on average they look worse than they are)."""
    import random

    rng = random.Random(derive_seed("branch", policy_seed))
    if fraction <= 0.0 or rng.random() >= fraction:
        return []
    steps = trajectory["steps"]
    t = rng.randrange(len(steps))
    seed, prefix = trajectory["meta"]["seed"], steps[:t]
    out = []
    for action in env.valid_actions:
        if action == steps[t]["action"]:
            continue
        observation = env.replay(seed, [s["action"] for s in prefix])
        branch = [*prefix, {"observation": observation, "action": action}]
        outcome = env.step(action)
        policy.reset(derive_seed("branch", policy_seed, action))
        while not outcome.done:  # bounded: the environment ends every episode after max_steps actions
            action_next = policy.act(env)
            branch.append({"observation": outcome.observation, "action": action_next})
            outcome = env.step(action_next)
        meta = {**trajectory["meta"], "success": outcome.success, "length": len(branch), "branch_t": t,
                "branch_action": action}
        out.append({"task": trajectory["task"], "steps": branch, "reward": float(outcome.reward), "meta": meta})
    return out


@dataclass(frozen=True)
class HeldoutConfig:
    levels: tuple[str, ...] = HELDOUT_LEVELS
    episodes: int = 12  # per level, from seed_base (ignored when `seeds` is given)
    seeds: tuple[int, ...] = ()  # exact test seeds, used on every test level
    seed_base: int = 1
    n_max: int = 16  # samples per episode (Best-of-N up to n_max)
    sample_epsilon: float = 0.7  # the sampling policy: Best-of-N samples and beam-search candidates
    hard_epsilon: float = 0.9  # the harder Best-of-N setting
    horizon: int = 24


def heldout_episodes(config: HeldoutConfig, train_file: Path | str | None) -> list[tuple[str, int]]:
    """(level, seed) pairs of the test set; none of them occurs in the training file."""
    taken = set()
    if train_file is not None:
        taken = {(r["meta"].get("level"), r["meta"].get("seed")) for r in read_jsonl(train_file)}
    out = []
    for level in config.levels:
        if config.seeds:
            out.extend((level, int(s)) for s in config.seeds if (level, int(s)) not in taken)
            continue
        index, chosen = 0, 0
        while chosen < config.episodes:  # bounded: at most len(taken) seeds are skipped
            seed = episode_seed(config.seed_base, index)
            index += 1
            if (level, seed) not in taken:
                out.append((level, seed))
                chosen += 1
    return out


def sample_episodes(episodes: list[tuple[str, int]], epsilon: float, n: int, horizon: int, tag: str,
                    progress: bool = False) -> list[list[dict]]:
    """n trajectories of the noisy expert (epsilon) per episode; sample j re-seeds the policy with
    (tag, episode seed, j), so every verifier sees the same samples."""
    from tqdm import tqdm

    policy = NoisyExpertPolicy(epsilon, 0)
    envs: dict[str, CappedBabyAIEnv] = {}
    out = []
    for level, seed in tqdm(episodes, unit="ep", desc=f"sample {tag} x{n}", disable=not progress):
        env = envs.setdefault(level, CappedBabyAIEnv(level, horizon))
        out.append([run_episode(env, policy, seed, derive_seed(tag, seed, j), {"sample": j}) for j in range(n)])
    return out


def expert_test_states(config: HeldoutConfig, episodes: list[tuple[str, int]]) -> tuple[list[dict], list[dict]]:
    """The expert's trajectories on `episodes` and the states of the step-level check (`expert_states`)."""
    from envs.verifiers import expert_states

    expert = make_policy("expert")
    experts = []
    envs: dict[str, CappedBabyAIEnv] = {}
    for level, seed in episodes:
        env = envs.setdefault(level, CappedBabyAIEnv(level, config.horizon))
        experts.append(run_episode(env, expert, seed))
    return experts, expert_states(experts, lambda level: CappedBabyAIEnv(level, config.horizon), expert)


def heldout_set(config: HeldoutConfig, train_file: Path | str | None, progress: bool = False) -> dict:
    """Everything the verifiers are judged on (module docstring)."""
    episodes = heldout_episodes(config, train_file)
    experts, states = expert_test_states(config, episodes)
    return {
        "episodes": episodes,
        "samples": sample_episodes(episodes, config.sample_epsilon, config.n_max, config.horizon, "sample", progress),
        "hard": sample_episodes(episodes, config.hard_epsilon, config.n_max, config.horizon, "hard", progress),
        "expert": experts,
        "states": states,
    }


def action_shares(trajectories: list[dict]) -> dict[str, float]:
    """Share of each action among the steps of `trajectories`."""
    counts: dict[str, int] = {}
    for t in trajectories:
        for step in t["steps"]:
            counts[step["action"]] = counts.get(step["action"], 0) + 1
    total = sum(counts.values()) or 1
    return {a: round(c / total, 4) for a, c in sorted(counts.items())}
