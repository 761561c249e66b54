"""Torch runner: runs batches of score jobs through the PRM and returns promises at readouts.

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
value-head call. A pass runs on one of three backends, all the same function up to float rounding:

- `packed` (the default on a CPU for Qwen2 backbones, service.engine.packed): sequences concatenated, no
  padding, fused projections, attention per sequence;
- `padded`: the transformers forward on a right-padded [B, T] batch. Right padding needs no attention mask
  under causal attention: real tokens only attend to earlier, real tokens, and pad positions are never read;
- CUDA graphs (service.engine.cuda_graphs), tried first for padded passes without a past when a
  `GraphRunner` is given (on a GPU); shapes outside its buckets run padded.

The runner runs in the engine's worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from service.engine.packed import PackedQwen2, supports as packed_supports
from service.engine.cuda_graphs import GraphRunner
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
    shapes: list = field(default_factory=list)  # per pass: [sequences, tokens] (padded: [B, T]; packed: [B, N])


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


def plan_forwards(lengths: list[int], max_forward_tokens: int, packed: bool = False) -> list[list[int]]:
    """Group indices (sorted by length) into passes of at most `max_forward_tokens` tokens: padded size
    B * T_max, or with `packed` the sum of the lengths. A sequence longer than the budget gets a pass alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        # Sorted ascending, so the newest index sets the padded length of the group.
        size = total + lengths[i] if packed else (len(current) + 1) * lengths[i]
        if current and size > max_forward_tokens:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        groups.append(current)
    return groups


def _kv_of(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


class TorchRunner:
    def __init__(self, model: PRMModel, device: torch.device, pad_id: int = 0, max_forward_tokens: int = 8192,
                 cache: PrefixCache | None = None, marker_ids: tuple[int, ...] = (), backend: str = "auto",
                 graphs: GraphRunner | None = None):
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.max_forward_tokens = max_forward_tokens
        self.cache = cache if cache is not None else PrefixCache(0)
        self.marker_ids = np.array(sorted(marker_ids), dtype=np.int64)
        if backend not in ("auto", "packed", "padded"):
            raise ValueError(f"backend must be auto, packed or padded, not {backend!r}")
        if backend == "auto":
            backend = "packed" if device.type == "cpu" and packed_supports(model.backbone.config) else "padded"
        self.backend = backend
        self.packed = PackedQwen2(model.backbone) if backend == "packed" else None
        self.graphs = graphs if graphs is not None and graphs.enabled else None
        self.last_stats = BatchStats()
        self._stats = BatchStats()

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
        states = self._prefixes([(prefix, hits.get(prefix)) for prefix in groups])
        self._suffixes(list(zip(states, groups.values())), jobs, results)
        for state, members in zip(states, groups.values()):
            results[members[0]].computed_tokens += state.computed  # the shared prefix ran once
        for group in plan_forwards([len(jobs[i].ids) for i in plain], self.max_forward_tokens, self.packed is not None):
            slots = [plain[g] for g in group]
            self._plain([jobs[i] for i in slots], slots, results)
        self._stats.computed_tokens = sum(r.computed_tokens for r in results)
        self._stats.seconds = time.perf_counter() - start
        self.last_stats = self._stats
        return results  # type: ignore[return-value]

    # -- one pass ----------------------------------------------------------------------------------
    def _markers_of(self, ids) -> np.ndarray:
        """Positions of readout-marker tokens in ids."""
        if not self.marker_ids.size:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(np.isin(np.asarray(ids, dtype=np.int64), self.marker_ids))

    def _run(self, seqs: list, pasts: list[KV | None], keep_kv: bool, wanted: list[np.ndarray]):
        """Run sequences (token ids, seqs[b] continuing pasts[b] when not None) in one pass. The padded
        backend needs one past shared by all (the same object) or none. Returns the promises at `wanted[b]`
        (positions within seqs[b]) per sequence, and with `keep_kv` a function (b, n) -> the KV of
        pasts[b] + seqs[b][:n] per layer as [1, kv_heads, P + n, hd]."""
        lengths = [len(s) for s in seqs]
        self._stats.forwards += 1
        if self.packed is not None:
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            self._stats.padded_tokens += sum(lengths)
            self._stats.shapes.append([len(seqs), sum(lengths)])
            ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=self.device)  # [N]
            hidden, new_kv = self.packed.forward(ids, lengths, keep_kv=keep_kv, pasts=pasts)  # [N, H]
            kv_rows = None
            if keep_kv:
                def kv_rows(b: int, n: int) -> KV:
                    lo = int(offsets[b])
                    rows = [(k[lo:lo + n].transpose(0, 1).unsqueeze(0), v[lo:lo + n].transpose(0, 1).unsqueeze(0))
                            for k, v in new_kv]  # [1, kvh, n, hd]
                    if pasts[b] is None:
                        return rows
                    return [(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
                            for (pk, pv), (k, v) in zip(pasts[b], rows)]
            return self._readout(hidden, offsets, wanted), kv_rows
        past = pasts[0]
        if any(other is not past for other in pasts):
            raise ValueError("the padded backend runs sequences with one shared past per pass")
        length = max(lengths)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)  # [B, T]
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        self._stats.padded_tokens += ids.numel()
        self._stats.shapes.append(list(ids.shape))
        offsets = np.arange(len(seqs), dtype=np.int64) * length
        if past is None and self.graphs is not None and (self.graphs.with_kv or not keep_kv):
            flat = np.concatenate([offsets[b] + w for b, w in enumerate(wanted)]) if wanted else np.empty(0, int)
            out = (self.graphs.maybe_run_with_kv(ids.to(self.device), torch.from_numpy(flat)) if keep_kv
                   else self.graphs.maybe_run(ids.to(self.device), torch.from_numpy(flat)))
            if out is not None:
                promises, kv = out if keep_kv else (out, None)
                values = promises.float().cpu().numpy()
                return np.split(values, np.cumsum([len(w) for w in wanted])[:-1]), self._rows_of(kv, 0)
        cache = None
        if past is not None:
            past = [(k.expand(len(seqs), -1, -1, -1), v.expand(len(seqs), -1, -1, -1)) for k, v in past]
            cache = DynamicCache(ddp_cache_data=past)
        elif keep_kv:
            cache = DynamicCache()
        hidden, cache = self.model.hidden_states(ids.to(self.device), past_key_values=cache)  # [B, T, H]
        p = past[0][0].shape[2] if past is not None else 0
        kv = _kv_of(cache) if cache is not None and keep_kv else None
        return self._readout(hidden, offsets, wanted), self._rows_of(kv, p)

    @staticmethod
    def _rows_of(kv: KV | None, p: int):
        if kv is None:
            return None
        return lambda b, n: [(k[b:b + 1, :, :p + n], v[b:b + 1, :, :p + n]) for k, v in kv]

    def _readout(self, hidden: torch.Tensor, offsets: np.ndarray, wanted: list[np.ndarray]) -> list[np.ndarray]:
        """One value-head call for every wanted position; hidden [N, H] or [B, T, H] flattened by `offsets`."""
        counts = [len(w) for w in wanted]
        if not sum(counts):
            return [np.empty(0, dtype=np.float32) for _ in wanted]
        flat = torch.from_numpy(np.concatenate([offsets[b] + np.asarray(w, dtype=np.int64)
                                                for b, w in enumerate(wanted)])).to(self.device)
        values = self.model.readout(hidden, flat).float().cpu().numpy()
        return np.split(values, np.cumsum(counts)[:-1])

    @staticmethod
    def _marker_array(n: int, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan, dtype=np.float32)
        out[positions] = values
        return out

    # -- phases ----------------------------------------------------------------------------------
    def _prefixes(self, items: list[tuple[tuple[int, ...], Hit | None]]) -> list[_Prefix]:
        """The KV and marker promises of every shared prefix, continuing from its cached chain. The packed
        backend runs the uncached rests of all prefixes together (each against its own cached past)."""
        states: list[_Prefix | None] = [None] * len(items)
        todo = []  # (index, prefix, past, markers before, rest)
        for i, (prefix, hit) in enumerate(items):
            hit = hit if hit is not None else self.cache.lookup(prefix)
            past = hit.kv() if hit.tokens else None
            rest = prefix[hit.tokens:]
            if rest:
                todo.append((i, prefix, past, hit.markers(), rest))
            else:
                states[i] = _Prefix(past, hit.markers(), 0)
        if self.packed is not None:
            passes = plan_forwards([len(t[4]) for t in todo], self.max_forward_tokens, packed=True)
        else:
            passes = [[k] for k in range(len(todo))]
        for members in passes:
            batch = [todo[k] for k in sorted(members)]
            positions = [self._markers_of(rest) for *_, rest in batch]
            values, kv_rows = self._run([rest for *_, rest in batch], [t[2] for t in batch], keep_kv=True,
                                        wanted=positions)
            for b, (i, prefix, _, before, rest) in enumerate(batch):
                markers = np.concatenate([before, self._marker_array(len(rest), positions[b], values[b])])
                kv = kv_rows(b, len(rest))
                self.cache.insert(prefix, kv, markers)
                states[i] = _Prefix(kv, markers, len(rest))
        return states  # type: ignore[return-value]

    def _suffixes(self, groups: list[tuple[_Prefix, list[int]]], jobs: list[ScoreJob], results: list) -> None:
        """Every group's suffixes against its prefix KV. Readouts inside a prefix come from its marker promises.
        A group of one (an agent's grown history) also caches its whole sequence. The packed backend mixes
        groups in a pass (sequences of a group kept together: they share one attention call); the padded
        backend runs each group's passes separately."""
        items = []  # (state, job index, lone)
        for state, members in groups:
            lone = len(members) == 1 and self.cache.enabled
            items += [(state, i, lone) for i in members]
        lengths = [len(jobs[i].ids) - len(state.markers) for state, i, _ in items]
        if self.packed is not None:
            passes = plan_forwards(lengths, self.max_forward_tokens, packed=True)
        else:
            passes, start = [], 0
            for _, members in groups:
                passes += [[start + k for k in g]
                           for g in plan_forwards(lengths[start:start + len(members)], self.max_forward_tokens)]
                start += len(members)
        for members in passes:
            self._suffix_pass([items[k] for k in sorted(members)], jobs, results)

    def _suffix_pass(self, items: list[tuple[_Prefix, int, bool]], jobs: list[ScoreJob], results: list) -> None:
        seqs, inside, marks = [], [], []
        for state, i, lone in items:
            p, job = len(state.markers), jobs[i]
            seqs.append(job.ids[p:])
            inside.append(np.array([r - p for r in job.readouts if r >= p], dtype=np.int64))
            marks.append(self._markers_of(seqs[-1]) if lone else np.empty(0, dtype=np.int64))
        values, kv_rows = self._run(seqs, [state.kv for state, _, _ in items], keep_kv=any(t[2] for t in items),
                                    wanted=[np.concatenate([a, m]) for a, m in zip(inside, marks)])
        for b, (state, i, lone) in enumerate(items):
            job, p = jobs[i], len(state.markers)
            own = iter(values[b][: len(inside[b])])
            promises = np.array([next(own) if r >= p else state.markers[r] for r in job.readouts], dtype=np.float32)
            if np.isnan(promises).any():
                raise RuntimeError("a readout inside a shared prefix is not at a marker token")
            results[i] = JobResult(promises, len(seqs[b]))
            if lone:
                n = len(seqs[b])
                new = self._marker_array(n, marks[b], values[b][len(inside[b]):])
                self.cache.insert(job.ids, kv_rows(b, n), np.concatenate([state.markers, new]))

    def _plain(self, jobs: list[ScoreJob], slots: list[int], results: list) -> None:
        keep = self.cache.enabled
        readouts = [np.asarray(job.readouts, dtype=np.int64) for job in jobs]
        marks = [self._markers_of(job.ids) if keep else np.empty(0, dtype=np.int64) for job in jobs]
        values, kv_rows = self._run([job.ids for job in jobs], [None] * len(jobs), keep_kv=keep,
                                    wanted=[np.concatenate([r, m]) for r, m in zip(readouts, marks)])
        for b, (job, slot) in enumerate(zip(jobs, slots)):
            results[slot] = JobResult(values[b][: len(readouts[b])].astype(np.float32), len(job.ids))
            if keep:
                n = len(job.ids)
                self.cache.insert(job.ids, kv_rows(b, n), self._marker_array(n, marks[b], values[b][len(readouts[b]):]))
