"""Data at scale: trajectories read from disk when a batch needs them, and the global batches of an epoch.

`DataIndex.scan(path)` reads a JSONL file (or a directory of *.jsonl shards, in name order) once, validating
every line as `load_jsonl` does, and keeps per trajectory only its byte offset, line, reward and initial-state
group: ~100 bytes whatever the trajectory's length, so a data set far larger than memory can be indexed.
The split by initial state and the V_0 targets come from the index with the same rules as the in-memory path
(`data.validation_groups`, per-side group means). `StreamingExamples` renders the training trajectories a
second time to learn their token lengths (for --max-seq-len and token-budget batches), keeps the lengths, and
re-reads and re-renders a trajectory each time a batch takes it. The validation side is rendered into memory
(every process evaluates all of it at each evaluation).

`plan_batches` is the one definition of an epoch's global batches, used with both kinds of data: a
permutation seeded by (seed, epoch), cut every `batch_size` trajectories or, with `batch_tokens`, as soon as
a batch holds that many real tokens (and at least one trajectory per process). A final batch with fewer
trajectories than processes is dropped. Same seed, same batches: streaming changes memory, not the run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from training.data import DataError, Record, data_files, parse_line, validation_groups


def plan_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int, seed: int, epoch: int,
                 world: int = 1) -> list[list[int]]:
    """The global batches of one epoch as lists of example indices (module docstring)."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    if batch_tokens <= 0:
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        batches, current, tokens = [], [], 0
        for i in order:
            current.append(i)
            tokens += lengths[i]
            if tokens >= batch_tokens and len(current) >= world:
                batches.append(current)
                current, tokens = [], 0
        if current:
            batches.append(current)
    return [b for b in batches if len(b) >= world]


@dataclass(frozen=True)
class Entry:
    file: int
    offset: int
    line: int
    reward: float
    group: int  # index into DataIndex.groups
    n_steps: int


class DataIndex:
    """Where every trajectory of a data set is, and the few numbers the split and the targets need."""

    def __init__(self, files: list[Path], entries: list[Entry], groups: list[tuple], n_steps: int):
        self.files, self.entries, self.groups, self.n_steps = files, entries, groups, n_steps

    @classmethod
    def scan(cls, path: Path | str) -> "DataIndex":
        files = data_files(path)
        entries: list[Entry] = []
        group_ids: dict[tuple, int] = {}
        n_steps = 0
        for f, file in enumerate(files):
            with open(file, "rb") as handle:
                offset, line_no = 0, 0
                for raw in handle:
                    line_no += 1
                    if raw.strip():
                        record = parse_line(raw, f"{file}:{line_no}", line_no)
                        group = group_ids.setdefault(record.group_key(), len(group_ids))
                        entries.append(Entry(f, offset, line_no, record.reward, group, len(record.steps)))
                        n_steps += len(record.steps)
                    offset += len(raw)
        if not entries:
            raise DataError(f"{path}: no trajectories (the file is empty)")
        return cls(files, entries, list(group_ids), n_steps)

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, i: int) -> Record:
        entry = self.entries[i]
        file = self.files[entry.file]
        with open(file, "rb") as handle:
            handle.seek(entry.offset)
            return parse_line(handle.readline(), f"{file}:{entry.line}", entry.line)

    def records(self, indices: Sequence[int]) -> Iterator[Record]:
        for i in indices:
            yield self.record(i)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """(train, validation) indices in file order; the same groups as `data.split_by_group`."""
        held_out = validation_groups(set(self.groups), val_fraction, seed)
        val_ids = {g for g, key in enumerate(self.groups) if key in held_out}
        train = [i for i, e in enumerate(self.entries) if e.group not in val_ids]
        val = [i for i, e in enumerate(self.entries) if e.group in val_ids]
        return train, val

    def initial_targets(self, indices: Sequence[int], gamma: float = 1.0) -> dict[int, float]:
        """V_0 target of each index: the mean discounted reward of its initial-state group within `indices`
        (as `data.initial_value_targets`)."""
        totals: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
        for i in indices:
            entry = self.entries[i]
            totals[entry.group][0] += entry.reward * gamma ** entry.n_steps
            totals[entry.group][1] += 1
        return {i: totals[self.entries[i].group][0] / totals[self.entries[i].group][1] for i in indices}

    def summary(self, indices: Sequence[int] | None = None, success_above: float = 0.0) -> dict:
        """The fields of `data.data_summary` (n_steps only for the whole index: it is counted at scan time)."""
        entries = self.entries if indices is None else [self.entries[i] for i in indices]
        out = {"n_trajectories": len(entries),
               "success_rate": sum(e.reward > success_above for e in entries) / max(1, len(entries)),
               "mean_reward": sum(e.reward for e in entries) / max(1, len(entries)),
               "n_initial_states": len({e.group for e in entries})}
        if indices is None:
            out["n_steps"] = self.n_steps
        return out


class StreamingExamples(Sequence):
    """Training examples rendered on demand from a `DataIndex` (the `Example`s of `trainer.make_examples`)."""

    def __init__(self, index: DataIndex, indices: Sequence[int], renderer, max_seq_len: int, gamma: float = 1.0):
        self.index, self.renderer = index, renderer
        self.targets = index.initial_targets(indices, gamma)
        self.kept: list[int] = []
        self.lengths: list[int] = []
        self.skipped: list[int] = []  # lines longer than max_seq_len tokens
        for i, record in zip(indices, index.records(indices)):
            length = len(renderer.render(record.trajectory()).ids)
            if length > max_seq_len:
                self.skipped.append(record.line)
            else:
                self.kept.append(i)
                self.lengths.append(length)

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, position: int):
        from training.trainer import Example

        i = self.kept[position]
        record = self.index.record(i)
        rendered = self.renderer.render(record.trajectory())
        return Example(rendered.ids, rendered.readouts, record.reward, self.targets[i], None, record.line)

    def materialize(self) -> list:
        """Every example in memory (the validation side)."""
        return [self[p] for p in range(len(self))]
