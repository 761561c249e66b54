"""Torch runner: plans the forward passes of a batch of score jobs; a backend (service.engine.backends)
executes each pass.

A `ScoreJob` is token ids, readout positions, and `prefix_len`, a hint that ids[:prefix_len] is shared with
other jobs (a rerank's task, a beam's history). `run_batch`:

1. groups jobs by shared prefix; each prefix is computed once, continuing from its longest cached block
   chain in the prefix cache, and its whole blocks are cached;
2. a job with no shared prefix whose ids start with a cached chain (an agent re-sending a grown history)
   becomes a group of one over that chain;
3. runs each group's suffixes batched against the prefix KV; readouts inside the prefix are read from the
   promises stored at marker positions;
4. runs the remaining jobs in passes of at most `max_forward_tokens` and caches their blocks.

Every pass asks for the promises it needs (readouts, plus marker positions when the KV is cached) in one
`ForwardPass`. The runner decides what to compute and what the cache supplies; the backend only executes
(packed, padded, CUDA graphs: all the same function up to float rounding). The results come back as
`BatchResults`, carrying the batch's `BatchStats`. The runner runs in the engine's worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from model_store.modeling import PRMModel
from service.engine.backends import KV, ForwardPass, PassOutput, make_backend
from service.engine.cuda_graphs import GraphRunner
from service.engine.prefix_cache import Hit, PrefixCache
from service.engine.types import BatchResults, BatchStats, JobResult, ScoreJob

__all__ = ["BatchResults", "BatchStats", "JobResult", "ScoreJob", "TorchRunner", "plan_forwards"]


@dataclass
class _Prefix:
    kv: KV | None  # [1, kv_heads, P, hd] per layer; None when P == 0
    markers: np.ndarray  # [P] promise at marker positions, NaN elsewhere
    computed: int


@dataclass
class _PrefixTodo:
    index: int  # into the batch's prefix list
    prefix: tuple[int, ...]
    past: KV | None  # the cached chain it continues
    markers_before: np.ndarray  # marker promises of the cached chain
    rest: tuple[int, ...]  # the uncached tokens to compute


@dataclass
class _SuffixItem:
    state: _Prefix
    job: int  # index into the batch
    lone: bool  # a group of one: its whole sequence is cached too


def plan_forwards(lengths: list[int], max_forward_tokens: int, packed: bool = False, past: int = 0,
                  past_once: bool | None = None) -> list[list[int]]:
    """Group indices (sorted by length) into passes of at most `max_forward_tokens` tokens: padded size
    B * T_max, or with `packed` the sum of the lengths; plus the keys of the past P every sequence continues.
    A backend that attends the past once (`past_once`, the default with `packed`) counts P once; one that
    attends B copies of it (transformers' cache) counts B x P. A sequence longer than the budget gets a pass
    alone."""
    if past_once is None:
        past_once = packed
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        # Sorted ascending, so the newest index sets the padded length of the group.
        rows = len(current) + 1
        tokens = total + lengths[i] if packed else rows * lengths[i]
        size = tokens + (past if past_once else rows * past)
        if current and size > max_forward_tokens:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        groups.append(current)
    return groups


class TorchRunner:
    def __init__(self, model: PRMModel, device: torch.device, pad_id: int = 0, max_forward_tokens: int = 8192,
                 cache: PrefixCache | None = None, marker_ids: tuple[int, ...] | None = (), backend: str = "auto",
                 graphs: GraphRunner | None = None):
        self.model = model
        self.device = device
        self.max_forward_tokens = max_forward_tokens
        self.cache = cache if cache is not None else PrefixCache(0)
        # None: a readout can sit on any token (a native template whose V_0 follows user text), so a cached
        # prefix keeps the promise of every position.
        self.every_position = marker_ids is None
        self.marker_ids = np.array(sorted(marker_ids or ()), dtype=np.int64)
        self.executor = make_backend(backend, model, device, pad_id, graphs)
        self.backend = self.executor.name
        self.graphs = getattr(self.executor, "graphs", None)
        self._stats = BatchStats()

    # -- entry point -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run_batch(self, jobs: list[ScoreJob]) -> BatchResults:
        start = time.perf_counter()
        self._stats = stats = BatchStats(jobs=len(jobs), tokens=sum(len(j.ids) for j in jobs))
        cache_before = (self.cache.stats.hits, self.cache.stats.misses, self.cache.stats.evicted_blocks)
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
        states = self._prefixes([(prefix, hits.get(prefix)) for prefix in groups])
        self._suffixes(list(zip(states, groups.values())), jobs, results)
        for state, members in zip(states, groups.values()):
            results[members[0]].computed_tokens += state.computed  # the shared prefix ran once
        for group in plan_forwards([len(jobs[i].ids) for i in plain], self.max_forward_tokens, self.executor.packs):
            slots = [plain[g] for g in group]
            self._plain([jobs[i] for i in slots], slots, results)
        stats.computed_tokens = sum(r.computed_tokens for r in results)
        stats.seconds = time.perf_counter() - start
        cache = self.cache.stats
        stats.cache_hits = cache.hits - cache_before[0]
        stats.cache_misses = cache.misses - cache_before[1]
        stats.cache_evictions = cache.evicted_blocks - cache_before[2]
        return BatchResults(results, stats)  # type: ignore[arg-type]

    # -- one pass ----------------------------------------------------------------------------------
    def _markers_of(self, ids) -> np.ndarray:
        """Positions of readout-marker tokens in ids."""
        if self.every_position:
            return np.arange(len(ids), dtype=np.int64)
        if not self.marker_ids.size:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(np.isin(np.asarray(ids, dtype=np.int64), self.marker_ids))

    def _run(self, fwd: ForwardPass) -> PassOutput:
        out = self.executor.run(fwd)
        self._stats.forwards += 1
        self._stats.padded_tokens += out.slots
        self._stats.shapes.append(out.shape)
        return out

    @staticmethod
    def _marker_array(n: int, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan, dtype=np.float32)
        out[positions] = values
        return out

    # -- phases ----------------------------------------------------------------------------------
    def _prefixes(self, items: list[tuple[tuple[int, ...], Hit | None]]) -> list[_Prefix]:
        """The KV and marker promises of every shared prefix, continuing from its cached chain. A packing
        backend runs the uncached rests of all prefixes together (each against its own cached past)."""
        states: list[_Prefix | None] = [None] * len(items)
        todo: list[_PrefixTodo] = []
        for i, (prefix, hit) in enumerate(items):
            hit = hit if hit is not None else self.cache.lookup(prefix)
            past = hit.kv() if hit.tokens else None
            rest = prefix[hit.tokens:]
            if rest:
                todo.append(_PrefixTodo(i, prefix, past, hit.markers(), rest))
            else:
                states[i] = _Prefix(past, hit.markers(), 0)
        if self.executor.packs:
            passes = plan_forwards([len(t.rest) for t in todo], self.max_forward_tokens, packed=True)
        else:
            passes = [[k] for k in range(len(todo))]
        for members in passes:
            batch = [todo[k] for k in sorted(members)]
            positions = [self._markers_of(t.rest) for t in batch]
            out = self._run(ForwardPass([t.rest for t in batch], [t.past for t in batch], positions, keep_kv=True))
            for b, t in enumerate(batch):
                markers = np.concatenate([t.markers_before,
                                          self._marker_array(len(t.rest), positions[b], out.promises[b])])
                kv = out.kv(b, len(t.rest))
                self.cache.insert(t.prefix, kv, markers)
                states[t.index] = _Prefix(kv, markers, len(t.rest))
        return states  # type: ignore[return-value]

    def _suffixes(self, groups: list[tuple[_Prefix, list[int]]], jobs: list[ScoreJob], results: list) -> None:
        """Every group's suffixes against its prefix KV. Readouts inside a prefix come from its marker promises.
        A group of one (an agent's grown history) also caches its whole sequence. A packing backend mixes
        groups in a pass (sequences of a group kept together: they share one attention call); otherwise each
        group's passes run separately."""
        items: list[_SuffixItem] = []
        for state, members in groups:
            lone = len(members) == 1 and self.cache.enabled
            items += [_SuffixItem(state, i, lone) for i in members]
        lengths = [len(jobs[it.job].ids) - len(it.state.markers) for it in items]
        if self.executor.packs:
            passes = plan_forwards(lengths, self.max_forward_tokens, packed=True)
        else:
            passes, start = [], 0
            for state, members in groups:
                passes += [[start + k for k in g]
                           for g in plan_forwards(lengths[start:start + len(members)], self.max_forward_tokens,
                                                  past=len(state.markers),
                                                  past_once=self.executor.attends_past_once)]
                start += len(members)
        for members in passes:
            self._suffix_pass([items[k] for k in sorted(members)], jobs, results)

    def _suffix_pass(self, items: list[_SuffixItem], jobs: list[ScoreJob], results: list) -> None:
        seqs, inside, marks = [], [], []
        for it in items:
            p, job = len(it.state.markers), jobs[it.job]
            seqs.append(job.ids[p:])
            inside.append(np.array([r - p for r in job.readouts if r >= p], dtype=np.int64))
            marks.append(self._markers_of(seqs[-1]) if it.lone else np.empty(0, dtype=np.int64))
        out = self._run(ForwardPass(seqs, [it.state.kv for it in items],
                                    [np.concatenate([a, m]) for a, m in zip(inside, marks)],
                                    keep_kv=any(it.lone for it in items)))
        for b, it in enumerate(items):
            job, state = jobs[it.job], it.state
            p = len(state.markers)
            own = iter(out.promises[b][: len(inside[b])])
            promises = np.array([next(own) if r >= p else state.markers[r] for r in job.readouts], dtype=np.float32)
            if np.isnan(promises).any():
                raise RuntimeError("a readout inside a shared prefix is not at a marker token")
            results[it.job] = JobResult(promises, len(seqs[b]))
            if it.lone:
                n = len(seqs[b])
                new = self._marker_array(n, marks[b], out.promises[b][len(inside[b]):])
                self.cache.insert(job.ids, out.kv(b, n), np.concatenate([state.markers, new]))

    def _plain(self, jobs: list[ScoreJob], slots: list[int], results: list) -> None:
        keep = self.cache.enabled
        readouts = [np.asarray(job.readouts, dtype=np.int64) for job in jobs]
        marks = [self._markers_of(job.ids) if keep else np.empty(0, dtype=np.int64) for job in jobs]
        out = self._run(ForwardPass([job.ids for job in jobs], [None] * len(jobs),
                                    [np.concatenate([r, m]) for r, m in zip(readouts, marks)], keep_kv=keep))
        for b, (job, slot) in enumerate(zip(jobs, slots)):
            values = out.promises[b]
            results[slot] = JobResult(values[: len(readouts[b])].astype(np.float32), len(job.ids))
            if keep:
                n = len(job.ids)
                self.cache.insert(job.ids, out.kv(b, n), self._marker_array(n, marks[b], values[len(readouts[b]):]))
