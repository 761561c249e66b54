"""Torch runner: runs batches of score jobs through the PRM and returns promises at readouts.

A `ScoreJob` is token ids plus readout positions. `run_batch` sorts jobs by length, splits them into
forward passes whose padded size stays under `max_forward_tokens`, and right-pads each pass. Right
padding needs no attention mask under causal attention: real tokens only ever attend to earlier, real
tokens, and pad positions are never read out. This runs in the engine's worker thread, never on the
event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from service.engine.prm import PRMModel


@dataclass(frozen=True)
class ScoreJob:
    ids: tuple[int, ...]
    readouts: tuple[int, ...]


@dataclass
class BatchStats:
    jobs: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on a GPU; fp32 on a CPU, where bf16 without hardware support is ~100x slower.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def plan_forwards(lengths: list[int], max_forward_tokens: int) -> list[list[int]]:
    """Group job indices (sorted by length) into passes with padded size B * T_max <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newest job sets the padded length of the group.
        if current and (len(current) + 1) * lengths[i] > max_forward_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


class TorchRunner:
    def __init__(self, model: PRMModel, device: torch.device, pad_id: int = 0, max_forward_tokens: int = 8192):
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.max_forward_tokens = max_forward_tokens
        self.last_stats = BatchStats()

    @torch.inference_mode()
    def run_batch(self, jobs: list[ScoreJob]) -> list[np.ndarray]:
        start = time.perf_counter()
        stats = BatchStats(jobs=len(jobs), tokens=sum(len(j.ids) for j in jobs))
        results: list[np.ndarray | None] = [None] * len(jobs)
        for group in plan_forwards([len(j.ids) for j in jobs], self.max_forward_tokens):
            outputs = self._forward([jobs[i] for i in group])
            stats.forwards += 1
            stats.padded_tokens += len(group) * max(len(jobs[i].ids) for i in group)
            for i, out in zip(group, outputs):
                results[i] = out
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return results  # type: ignore[return-value]

    def _forward(self, jobs: list[ScoreJob]) -> list[np.ndarray]:
        batch, length = len(jobs), max(len(j.ids) for j in jobs)
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long)  # [B, T]
        flat: list[int] = []
        for b, job in enumerate(jobs):
            ids[b, : len(job.ids)] = torch.tensor(job.ids, dtype=torch.long)
            flat.extend(b * length + r for r in job.readouts)
        flat_index = torch.tensor(flat, dtype=torch.long, device=self.device)  # [N]
        promises = self.model(ids.to(self.device), None, flat_index).float().cpu().numpy()  # [N]
        splits = np.cumsum([len(j.readouts) for j in jobs])[:-1]
        return np.split(promises, splits)
