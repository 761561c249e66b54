"""Torch runner: runs batches of score jobs through the PRM and returns promises at readouts.

A `ScoreJob` is token ids, readout positions, and `prefix_len`, a hint that ids[:prefix_len] is shared with
other jobs (a rerank's task, a beam's history). `run_batch`:

1. groups jobs by shared prefix; each prefix is computed once (batch 1), continuing from its longest
   cached block chain in the prefix cache, and its whole blocks are cached;
2. a job with no shared prefix whose ids start with a cached chain (an agent re-sending a grown history)
   becomes a group of one over that chain;
3. runs each group's suffixes batched against the prefix KV (expanded along the batch); readouts inside the
   prefix are read from the promises stored at marker positions;
4. runs the remaining jobs as plain right-padded batches (sorted by length, padded size per pass under
   `max_forward_tokens`) and caches their blocks.

Right padding needs no attention mask under causal attention: real tokens only attend to earlier, real
tokens, and pad positions are never read. The runner runs in the engine's worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from service.engine.prefix_cache import Hit, PrefixCache
from service.engine.prm import PRMModel

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [B, kv_heads, T, head_dim]


@dataclass(frozen=True)
class ScoreJob:
    ids: tuple[int, ...]
    readouts: tuple[int, ...]
    prefix_len: int = 0


@dataclass
class JobResult:
    promises: np.ndarray  # [len(readouts)]
    computed_tokens: int


@dataclass
class BatchStats:
    jobs: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    padded_tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0


@dataclass
class _Prefix:
    kv: KV | None  # [1, kv_heads, P, hd] per layer; None when P == 0
    markers: np.ndarray  # [P] promise at marker positions, NaN elsewhere
    computed: int


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
    """Group indices (sorted by length) into passes with padded size B * T_max <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newest index sets the padded length of the group.
        if current and (len(current) + 1) * lengths[i] > max_forward_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _kv_of(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


class TorchRunner:
    def __init__(self, model: PRMModel, device: torch.device, pad_id: int = 0, max_forward_tokens: int = 8192,
                 cache: PrefixCache | None = None, marker_ids: tuple[int, ...] = ()):
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.max_forward_tokens = max_forward_tokens
        self.cache = cache if cache is not None else PrefixCache(0)
        self.marker_ids = torch.tensor(sorted(marker_ids), dtype=torch.long)
        self.last_stats = BatchStats()

    # -- entry point -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run_batch(self, jobs: list[ScoreJob]) -> list[JobResult]:
        start = time.perf_counter()
        self._stats = BatchStats(jobs=len(jobs), tokens=sum(len(j.ids) for j in jobs))
        results: list[JobResult | None] = [None] * len(jobs)
        groups: dict[tuple[int, ...], list[int]] = {}
        hits: dict[tuple[int, ...], Hit] = {}
        plain: list[int] = []
        for i, job in enumerate(jobs):
            if job.prefix_len > 0:
                groups.setdefault(job.ids[: job.prefix_len], []).append(i)
                continue
            hit = self.cache.lookup(job.ids, max_tokens=len(job.ids) - 1) if self.cache.enabled else Hit(0)
            if hit.tokens:
                prefix = job.ids[: hit.tokens]
                groups.setdefault(prefix, []).append(i)
                hits[prefix] = hit
            else:
                plain.append(i)
        for prefix, members in groups.items():
            state = self._prefix(prefix, hits.get(prefix))
            self._suffixes(state, [jobs[i] for i in members], members, results)
            results[members[0]].computed_tokens += state.computed  # the shared prefix ran once
        for group in plan_forwards([len(jobs[i].ids) for i in plain], self.max_forward_tokens):
            slots = [plain[g] for g in group]
            self._plain([jobs[i] for i in slots], slots, results)
        self._stats.computed_tokens = sum(r.computed_tokens for r in results)
        self._stats.seconds = time.perf_counter() - start
        self.last_stats = self._stats
        return results  # type: ignore[return-value]

    # -- phases ----------------------------------------------------------------------------------
    def _marker_values(self, ids: torch.Tensor, hidden: torch.Tensor) -> np.ndarray:
        """Promises at marker positions of one sequence (ids [S], hidden [S, H]); NaN elsewhere."""
        values = np.full(ids.shape[0], np.nan, dtype=np.float32)
        if self.marker_ids.numel():
            positions = torch.nonzero(torch.isin(ids.cpu(), self.marker_ids)).flatten()
            if positions.numel():
                values[positions.numpy()] = self.model.readout(hidden, positions.to(hidden.device)).float().cpu().numpy()
        return values

    def _forward(self, ids: torch.Tensor, past: KV | None, keep_kv: bool):
        """Hidden states [B, S, H], and the full KV (past + these tokens) when `keep_kv` or continuing."""
        cache = None
        if past is not None:
            cache = DynamicCache(ddp_cache_data=past)
        elif keep_kv:
            cache = DynamicCache()
        self._stats.forwards += 1
        self._stats.padded_tokens += ids.numel()
        hidden, cache = self.model.hidden_states(ids.to(self.device), past_key_values=cache)
        return hidden, (_kv_of(cache) if cache is not None else None)

    def _prefix(self, prefix: tuple[int, ...], hit: Hit | None) -> _Prefix:
        hit = hit if hit is not None else self.cache.lookup(prefix)
        past = hit.kv() if hit.tokens else None
        markers = hit.markers()
        rest = prefix[hit.tokens:]
        if not rest:
            return _Prefix(past, markers, 0)
        ids = torch.tensor([rest], dtype=torch.long)  # [1, R]
        hidden, kv = self._forward(ids, past, keep_kv=True)  # [1, R, H]
        markers = np.concatenate([markers, self._marker_values(ids[0], hidden[0])])
        self.cache.insert(prefix, kv, markers)
        return _Prefix(kv, markers, len(rest))

    def _suffixes(self, state: _Prefix, jobs: list[ScoreJob], slots: list[int], results: list) -> None:
        p = len(state.markers)
        for group in plan_forwards([len(j.ids) - p for j in jobs], self.max_forward_tokens):
            batch = [jobs[g] for g in group]
            length = max(len(j.ids) for j in batch) - p
            ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)  # [B, S]
            for b, job in enumerate(batch):
                ids[b, : len(job.ids) - p] = torch.tensor(job.ids[p:], dtype=torch.long)
            past = None
            if state.kv is not None:
                past = [(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1)) for k, v in state.kv]
            hidden, kv = self._forward(ids, past, keep_kv=self.cache.enabled)  # [B, S, H]
            flat = [b * length + r - p for b, job in enumerate(batch) for r in job.readouts if r >= p]
            values = iter(self.model.readout(hidden, torch.tensor(flat, dtype=torch.long, device=self.device))
                          .float().cpu().numpy())
            for b, (job, g) in enumerate(zip(batch, group)):
                promises = np.array([next(values) if r >= p else state.markers[r] for r in job.readouts],
                                    dtype=np.float32)
                if np.isnan(promises).any():
                    raise RuntimeError("a readout inside a shared prefix is not at a marker token")
                results[slots[g]] = JobResult(promises, len(job.ids) - p)
                if len(jobs) == 1 and self.cache.enabled:  # a lone sequence: cache its grown history too
                    n = len(job.ids) - p
                    markers = np.concatenate([state.markers, self._marker_values(ids[b, :n], hidden[b, :n])])
                    self.cache.insert(job.ids, kv, markers, row=b)

    def _plain(self, jobs: list[ScoreJob], slots: list[int], results: list) -> None:
        length = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), length), self.pad_id, dtype=torch.long)  # [B, T]
        for b, job in enumerate(jobs):
            ids[b, : len(job.ids)] = torch.tensor(job.ids, dtype=torch.long)
        hidden, kv = self._forward(ids, None, keep_kv=self.cache.enabled)  # [B, T, H]
        flat = torch.tensor([b * length + r for b, job in enumerate(jobs) for r in job.readouts],
                            dtype=torch.long, device=self.device)  # [N]
        promises = self.model.readout(hidden, flat).float().cpu().numpy()
        splits = np.split(promises, np.cumsum([len(j.readouts) for j in jobs])[:-1])
        for b, (job, slot, out) in enumerate(zip(jobs, slots, splits)):
            results[slot] = JobResult(out, len(job.ids))
            if kv is not None:
                n = len(job.ids)
                self.cache.insert(job.ids, kv, self._marker_values(ids[b, :n], hidden[b, :n]), row=b)
