"""Rollout collection: N episodes per level, over several levels, in several processes, to JSONL.

Contract:
- `collect(config, out_path)` writes one trajectory per line in the project's format
  {"task", "steps": [{"observation", "action"}], "reward", "meta": {"env", "level", "seed", "policy", ...}},
  level by level in the order given, episode i of each level played from seed `episode_seed(config.seed, i)`
  (recorded in meta.seed). The file is identical for any number of workers: an episode depends only on
  (level, its seed, the policy's name/epsilon/seed), because policies re-seed per episode.
- Workers are spawned processes (`multiprocessing` "spawn" context; safe on every platform, callers guard
  their entry point with `if __name__ == "__main__"`). The file is written to a temporary name and moved
  into place at the end, so an interrupted run never leaves a half-written file under the final name.
- Returns a summary: episodes, seconds, episodes per second, success rate and mean length per level.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from envs.babyai import DEFAULT_LEVELS, BabyAITextEnv, make_level
from envs.base import derive_seed, run_episode
from envs.policies import POLICY_NAMES, make_policy

ENVS = ("babyai",)


@dataclass(frozen=True)
class RolloutConfig:
    levels: tuple[str, ...] = DEFAULT_LEVELS
    episodes: int = 100  # per level
    policy: str = "noisy"
    epsilon: float = 0.2
    seed: int = 0
    workers: int = 1
    env: str = "babyai"
    progress: bool = True

    def check(self) -> None:
        """ValueError for anything that would fail later in a worker."""
        if self.env not in ENVS:
            raise ValueError(f"unknown env {self.env!r}; choose one of {', '.join(ENVS)}")
        if not self.levels:
            raise ValueError("no levels given")
        for level in self.levels:
            make_level(level)
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        make_policy(self.policy, self.epsilon, self.seed)


def episode_seed(base_seed: int, index: int) -> int:
    """The environment seed of episode `index` of every level in a run with `base_seed`."""
    return derive_seed("episode", base_seed, index)


@dataclass
class _WorkerState:
    envs: dict = field(default_factory=dict)
    policy: object = None
    policy_key: tuple | None = None


_STATE = _WorkerState()  # per process: environments and the policy are built once and reused


def _run_chunk(task: tuple[dict, list[tuple[str, int]]]) -> list[dict]:
    config, chunk = task
    key = (config["policy"], config["epsilon"], config["seed"])
    if _STATE.policy_key != key:
        _STATE.policy = make_policy(*key)
        _STATE.policy_key = key
    out = []
    for level, index in chunk:
        env = _STATE.envs.get(level)
        if env is None:
            env = _STATE.envs[level] = BabyAITextEnv(level)
        out.append(run_episode(env, _STATE.policy, episode_seed(config["seed"], index)))
    return out


def _chunks(config: RolloutConfig) -> list[tuple[dict, list[tuple[str, int]]]]:
    jobs = [(level, i) for level in config.levels for i in range(config.episodes)]
    size = max(1, min(32, len(jobs) // (4 * config.workers)))
    plain = asdict(config)
    return [(plain, jobs[start:start + size]) for start in range(0, len(jobs), size)]


def collect(config: RolloutConfig, out_path: str | os.PathLike) -> dict:
    """Play every episode of `config` and write them to `out_path` (JSONL); a summary of the run."""
    from tqdm import tqdm

    config.check()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".partial")
    chunks = _chunks(config)
    total = config.episodes * len(config.levels)
    stats = {level: [0, 0.0, 0] for level in config.levels}  # episodes, successes, steps
    start = time.perf_counter()
    try:
        with open(tmp_path, "w") as handle, tqdm(total=total, unit="ep", desc="rollout",
                                                 disable=not config.progress) as bar:
            if config.workers == 1:
                _write(map(_run_chunk, chunks), handle, bar, stats)
            else:
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(min(config.workers, len(chunks))) as pool:
                    _write(pool.imap(_run_chunk, chunks), handle, bar, stats)
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {
        "out": str(out_path),
        "episodes": total,
        "seconds": round(seconds, 3),
        "episodes_per_s": round(total / seconds, 1) if seconds > 0 else None,
        "levels": {level: {"episodes": n, "success_rate": round(wins / n, 4), "mean_length": round(steps / n, 2)}
                   for level, (n, wins, steps) in stats.items()},
    }


def _write(results, handle, bar, stats: dict) -> None:
    for trajectories in results:
        for trajectory in trajectories:
            handle.write(json.dumps(trajectory, separators=(",", ":")) + "\n")
            entry = stats[trajectory["meta"]["level"]]
            entry[0] += 1
            entry[1] += trajectory["reward"]
            entry[2] += len(trajectory["steps"])
        bar.update(len(trajectories))
