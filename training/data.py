"""Trajectory data: the JSONL format, its validation, the data hash, initial-state groups and the split.

Format, one trajectory per line (blank lines are skipped, unknown fields are kept in `extra`):

    {"task": str, "steps": [{"observation": str, "action": str}, ...], "reward": float in [0, 1],
     "meta": {"env": ..., "level": ..., "seed": ..., "policy": ...}}

`load_jsonl` validates every line and raises `DataError("FILE:LINE: field: problem")` at the first bad
one, so a user can open the file at that line. `reward` is the sparse outcome r(u, tau) of the whole
trajectory; a trajectory counts as a success when reward > `success_above` (0 by default: BabyAI and the
synthetic tasks pay a positive reward only on success).

Initial-state groups (the target of V_0): the initial value V_0 is read at the end of (task, o_0) and is
trained toward the mean outcome of the trajectories sampled from the same initial state. Two trajectories
share an initial state when their meta names the same (env, level, seed) -- the environment rebuilds the
same start from them -- and, for data without a seed, when task and first observation are equal (the
exact text the V_0 readout sees). We group by initial state rather than by task string alone because in
BabyAI the same mission ("go to the red ball") appears with different layouts whose values differ.
A group of one is trained toward that trajectory's own outcome (an unbiased, noisier estimate).

The validation split is made by group, so no initial state (and no V_0 target) is shared between the
training and validation sets.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from model_store.render import Step, Trajectory

KNOWN_FIELDS = ("task", "steps", "reward", "meta")


class DataError(ValueError):
    """A problem with a training data file; the message starts with FILE:LINE."""


@dataclass(frozen=True)
class Record:
    task: str
    steps: tuple[Step, ...]
    reward: float
    meta: dict = field(default_factory=dict)
    line: int = 0
    extra: dict = field(default_factory=dict)

    def trajectory(self) -> Trajectory:
        return Trajectory(self.task, self.steps)

    @property
    def actions(self) -> list[str]:
        return [s.action for s in self.steps]

    def group_key(self) -> tuple:
        """The initial state this trajectory starts from (see the module docstring)."""
        if self.meta.get("seed") is not None:
            return ("seed", str(self.meta.get("env")), str(self.meta.get("level")), str(self.meta["seed"]))
        return ("state", self.task, self.steps[0].observation)

    def to_json(self) -> dict:
        return {"task": self.task, "steps": [{"observation": s.observation, "action": s.action} for s in self.steps],
                "reward": self.reward, "meta": dict(self.meta), **self.extra}


def _fail(where: str, message: str):
    raise DataError(f"{where}: {message}")


def parse_record(obj, where: str, line: int = 0) -> Record:
    """Validate one decoded JSON value; errors are prefixed with `where` (e.g. "data.jsonl:7")."""
    if not isinstance(obj, dict):
        _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    task = obj.get("task")
    if not isinstance(task, str) or not task.strip():
        _fail(where, "task: must be a non-empty string" if "task" in obj else "task: missing")
    steps = obj.get("steps")
    if not isinstance(steps, list):
        _fail(where, "steps: missing" if "steps" not in obj else "steps: must be a list")
    if not steps:
        _fail(where, "steps: a trajectory needs at least one step")
    parsed = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            _fail(where, f"steps.{i}: must be an object with observation and action")
        for key in ("observation", "action"):
            if key not in step:
                _fail(where, f"steps.{i}.{key}: missing")
            if not isinstance(step[key], str):
                _fail(where, f"steps.{i}.{key}: must be a string, got {type(step[key]).__name__}")
        parsed.append(Step(step["observation"], step["action"]))
    if "reward" not in obj:
        _fail(where, "reward: missing (the trajectory's outcome in [0, 1])")
    reward = obj["reward"]
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        _fail(where, f"reward: must be a number in [0, 1], got {reward!r}")
    if not 0.0 <= reward <= 1.0:
        _fail(where, f"reward: {reward} is outside [0, 1]")
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        _fail(where, f"meta: must be an object, got {type(meta).__name__}")
    extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    return Record(task, tuple(parsed), float(reward), meta, line, extra)


def data_files(path: Path | str) -> list[Path]:
    """A JSONL file, or the *.jsonl shards of a directory in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{path}: a directory without *.jsonl shards")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return [path]


def parse_line(line: str | bytes, where: str, line_no: int) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text ({exc.reason})") from None
    return parse_record(obj, where, line_no)


def load_jsonl(path: Path | str, limit: int | None = None) -> list[Record]:
    """Every trajectory of a JSONL file (or a directory of shards), validated. Raises DataError naming the file
    and line."""
    path = Path(path)
    records: list[Record] = []
    for file in data_files(path):
        with open(file, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                records.append(parse_line(line, f"{file}:{line_no}", line_no))
                if limit is not None and len(records) >= limit:
                    return records
    if not records:
        raise DataError(f"{path}: no trajectories (the file is empty)")
    return records


def write_jsonl(records: list[Record] | list[dict], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for r in records:
            out.write(json.dumps(r.to_json() if isinstance(r, Record) else r) + "\n")
    return path


def file_sha256(path: Path | str) -> str:
    """sha256 of a file, or of a directory's shards concatenated in name order."""
    digest = hashlib.sha256()
    for file in data_files(path):
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def initial_value_targets(records: list[Record], gamma: float = 1.0) -> list[float]:
    """For each record, the mean outcome of the records that share its initial state, each discounted to the
    initial state (gamma^n_steps * reward: with gamma < 1 the TD fixed point is V_0 = gamma * Q_0)."""
    totals: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for r in records:
        entry = totals[r.group_key()]
        entry[0] += r.reward * gamma ** len(r.steps)
        entry[1] += 1
    return [totals[r.group_key()][0] / totals[r.group_key()][1] for r in records]


def validation_groups(keys: set[tuple], val_fraction: float, seed: int = 0) -> set[tuple]:
    """The initial-state groups held out for validation (see split_by_group); deterministic for a seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = sorted(keys, key=repr)
    if val_fraction == 0.0 or len(keys) < 2:
        return set()
    random.Random(seed).shuffle(keys)
    n_val = min(len(keys) - 1, max(1, round(val_fraction * len(keys))))
    return set(keys[:n_val])


def split_by_group(records: list[Record], val_fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, validation): whole initial-state groups go to one side; deterministic for a seed.

    With at least two groups and val_fraction > 0, validation gets at least one group and training keeps at
    least one. The order of records inside each side is the file order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_keys = validation_groups({r.group_key() for r in records}, val_fraction, seed)
    train = [r for r in records if r.group_key() not in val_keys]
    val = [r for r in records if r.group_key() in val_keys]
    return train, val


def corpus_text(records: list[Record], max_lines: int = 200_000) -> str:
    """The distinct texts of the data (tasks, observations, actions), for training a tokenizer."""
    seen: dict[str, None] = {}
    for r in records:
        for text in (r.task, *(s.observation for s in r.steps), *(s.action for s in r.steps)):
            if text not in seen:
                seen[text] = None
                if len(seen) >= max_lines:
                    return "\n".join(seen)
    return "\n".join(seen)


def data_summary(records: list[Record], success_above: float = 0.0) -> dict:
    steps = [len(r.steps) for r in records]
    return {"n_trajectories": len(records), "n_steps": sum(steps),
            "success_rate": sum(r.reward > success_above for r in records) / len(records),
            "mean_reward": sum(r.reward for r in records) / len(records),
            "n_initial_states": len({r.group_key() for r in records})}
