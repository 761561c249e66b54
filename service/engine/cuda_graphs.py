"""CUDA graphs for the small fixed-shape scoring passes (no KV cache in; passes with a past stay eager, for the
reasons service/engine/backends/cuda_graphs.py gives with numbers).

Contract: `GraphRunner(model, buckets=[(B, T), ...], device).maybe_run(input_ids [b, t], flat_index [N])`
returns the promises `[N]` (float32, on the device; equal to `model.readout(model.hidden_states(ids)[0],
flat_index)`) when some bucket has B >= b and T >= t and N fits its readout buffer, and `None` otherwise,
so the caller runs the pass eagerly. It never raises for an unsupported shape, only for bad input.

How a pass runs in a graph:
- one graph per bucket, captured at construction, largest bucket first, all in one memory pool: the
  intermediates of a later (smaller) capture reuse the blocks the larger ones freed, so the pool costs
  about one largest pass plus the static buffers. Before each capture, warm-up passes on a side stream
  compile the Triton kernel and set up cuBLAS/SDPA workspaces; capture time and pool memory are logged.
- static buffers per bucket: ids `[B, T]`, a readout index `[R]` (R = B*T unless `max_readouts` caps it)
  and the promises `[R]`. A call right-pads its ids into the bucket (pad rows and columns; causal
  attention keeps real tokens blind to pads on the right, so no mask is needed, as in TorchRunner),
  remaps `flat_index` from the `[b, t]` layout to `[B, T]`, writes the first N index slots (the rest keep
  stale but in-range indices), replays, and returns a copy of the first N promises: the readout count
  is data-dependent, the graph always gathers R rows.
- replays are serialised by a lock on the caller's current stream; graphs sharing a pool must never run
  concurrently.
- `with_kv=True` also captures the KV the pass produces (a fresh DynamicCache in the graph);
  `maybe_run_with_kv` then returns `(promises, kv)` with kv per layer `(keys, values)` `[b, kv_heads, t, hd]`:
  views into the graph's static memory, valid until the next call on this runner (PrefixCache.insert
  clones what it keeps, so inserting right away is safe).

Off on the CPU: constructing it for a non-CUDA device (or without CUDA) gives a disabled runner whose
`maybe_run` always returns None. `emulate=True` runs the same static-buffer path eagerly without capture
(a testing aid, so the bucketing, padding and remapping are tested on the CPU). The emulation keeps graph
semantics: each bucket's outputs (promises and KV) live in buffers allocated once and overwritten by every
later run of that bucket, so a caller that holds a view across calls fails a CPU test as it would fail on
a GPU. A capture that fails
(an op that cannot be captured) disables the runner with a logged warning: the service stays eager.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [B, kv_heads, T, head_dim]
Bucket = tuple[int, int]  # (batch, length)


# -- bucket arithmetic (pure) -------------------------------------------------------------------------
def default_buckets(max_batch: int = 8, lengths: tuple[int, ...] = (64, 128, 256, 512)) -> list[Bucket]:
    """Powers of two batch sizes up to `max_batch`, crossed with `lengths`: the small passes worth capturing."""
    batches, b = [], 1
    while b <= max_batch:
        batches.append(b)
        b *= 2
    return [(b, t) for b in batches for t in lengths]


SERVING_BATCHES = (1, 2, 4, 8, 16)
SERVING_LENGTHS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # steps of 1.5x: at most 1.5x padding


def serving_buckets(max_tokens: int = 4096, batches: tuple[int, ...] = SERVING_BATCHES,
                    lengths: tuple[int, ...] = SERVING_LENGTHS) -> list[Bucket]:
    """The engine's buckets: lengths in steps of 1.5x up to 1024 (powers of two padded up to ~2x), batches up
    to 16, every bucket within `max_tokens` tokens. Each bucket keeps its KV output in static memory, so the
    sum of B*T over the buckets (~51k tokens here: ~0.6 GB for a 0.5B model, ~2.9 GB for a 7B one in bf16) is
    the graphs' standing cost."""
    return check_buckets([(b, t) for b in batches for t in lengths if b * t <= max_tokens])


def check_buckets(buckets) -> list[Bucket]:
    out = []
    for bucket in buckets:
        batch, length = (int(v) for v in bucket)
        if batch < 1 or length < 1:
            raise ValueError(f"bucket {tuple(bucket)}: batch and length must be >= 1")
        out.append((batch, length))
    return sorted(set(out), key=lambda bk: (bk[0] * bk[1], bk[1], bk[0]))


def pick_bucket(buckets: list[Bucket], batch: int, length: int) -> Bucket | None:
    """The bucket with the fewest padded tokens that holds [batch, length] (ties: shorter T); None if none."""
    fitting = [bk for bk in buckets if bk[0] >= batch and bk[1] >= length]
    return min(fitting, key=lambda bk: (bk[0] * bk[1], bk[1], bk[0])) if fitting else None


def pad_to_bucket(input_ids: torch.Tensor, bucket: Bucket, pad_id: int) -> torch.Tensor:
    """Right-pad ids [b, t] to [B, T] with pad_id (extra rows are all padding)."""
    batch, length = input_ids.shape
    out = torch.full(bucket, pad_id, dtype=input_ids.dtype, device=input_ids.device)  # [B, T]
    out[:batch, :length] = input_ids
    return out


def remap_flat_index(flat_index: torch.Tensor, length: int, bucket_length: int) -> torch.Tensor:
    """Flat positions in a [b, length] batch -> the same positions in a [B, bucket_length] batch."""
    return flat_index // length * bucket_length + flat_index % length


# -- the runner -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptureStats:
    bucket: Bucket
    readouts: int
    seconds: float  # warm-up + capture
    pool_bytes: int  # memory reserved by the shared pool after this capture (cumulative)


@dataclass
class _Graph:
    ids: torch.Tensor  # [B, T] static input
    index: torch.Tensor  # [R] static readout index
    out: torch.Tensor | None  # [R] static promises (None in emulation until the first run)
    kv: KV | None  # static KV of the pass (with_kv), [B, kv_heads, T, hd] per layer
    graph: "torch.cuda.CUDAGraph | None"


class GraphRunner:
    def __init__(self, model, buckets, device: torch.device | str, pad_id: int = 0, max_readouts: int | None = None,
                 warmup: int = 2, with_kv: bool = False, emulate: bool = False):
        self.model = model
        self.buckets = check_buckets(buckets)
        self.device = torch.device(device)
        self.pad_id = pad_id
        self.max_readouts = max_readouts
        self.warmup = warmup
        self.with_kv = with_kv
        self.emulate = emulate
        self.stats: list[CaptureStats] = []
        self.replays = 0
        self._graphs: dict[Bucket, _Graph] = {}
        self._lock = threading.Lock()
        self.disabled_reason = self._why_disabled()
        if self.disabled_reason is None:
            self._build()

    @property
    def _causal_only(self) -> dict | None:
        """The per-layer-type mask mapping transformers accepts in place of a mask: None for every full-attention
        layer, so SDPA runs with is_causal=True (FlashAttention) inside the graph as it does eagerly. Left to
        transformers, a capture counts as tracing in some releases and materialises a [B, 1, T, T] mask (another
        kernel, other rounding than eager). None (transformers decides) for models with other layer types."""
        types = getattr(getattr(self.model.backbone, "config", None), "layer_types", None)
        if not types or any(t != "full_attention" for t in types):
            return None
        return {"full_attention": None}

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def _why_disabled(self) -> str | None:
        if not self.buckets:
            return "no buckets"
        if self.emulate:
            return None
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device (got {self.device.type})"
        if not torch.cuda.is_available():
            return "CUDA graphs need a CUDA device (CUDA is not available)"
        return None

    def _readouts(self, bucket: Bucket) -> int:
        full = bucket[0] * bucket[1]
        return min(full, self.max_readouts) if self.max_readouts else full

    # -- the captured pass ----------------------------------------------------------------------------
    def _step(self, ids: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, KV | None]:
        mask = self._causal_only
        if not self.with_kv:
            hidden, _ = self.model.hidden_states(ids, attention_mask=mask)  # [B, T, H]
            return self.model.readout(hidden, index), None  # [R]
        from transformers import DynamicCache

        hidden, cache = self.model.hidden_states(ids, attention_mask=mask, past_key_values=DynamicCache())  # [B, T, H]
        return self.model.readout(hidden, index), [(layer.keys, layer.values) for layer in cache.layers]

    def eager(self, input_ids: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """The same pass without graphs or padding (the reference for replay == eager)."""
        with torch.inference_mode():
            return self._step(input_ids.to(self.device), flat_index.to(self.device))[0]

    def _build(self) -> None:
        # Largest first: later, smaller captures fit in the blocks the larger ones left in the shared pool.
        order = sorted(self.buckets, key=lambda bk: bk[0] * bk[1], reverse=True)
        if self.emulate:
            for bucket in order:
                self._graphs[bucket] = self._buffers(bucket)
            return
        pool = torch.cuda.graph_pool_handle()
        start_reserved = torch.cuda.memory_reserved(self.device)
        start = time.perf_counter()
        try:
            # Captures, side streams and the pool belong to self.device, not to whatever device is current.
            with torch.inference_mode(), torch.cuda.device(self.device):
                side = torch.cuda.Stream(self.device)  # one warm-up stream for every bucket: each holds memory
                for bucket in order:
                    self._capture(bucket, pool, start_reserved, side)
        except Exception as exc:  # eager stays correct; a capture failure must not take the service down
            self._graphs.clear()
            self.disabled_reason = f"capture failed ({type(exc).__name__}: {exc})"
            log.warning("cuda graphs: disabled, running eager: %s", self.disabled_reason)
            try:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            except RuntimeError:
                pass
            return
        pool_mib = (torch.cuda.memory_reserved(self.device) - start_reserved) / 2**20
        log.info("cuda graphs: captured %d buckets in %.2f s, %.1f MiB reserved (largest %s)",
                 len(order), time.perf_counter() - start, pool_mib, order[0])

    def _buffers(self, bucket: Bucket) -> _Graph:
        ids = torch.full(bucket, self.pad_id, dtype=torch.long, device=self.device)  # [B, T]
        index = torch.zeros(self._readouts(bucket), dtype=torch.long, device=self.device)  # [R]
        return _Graph(ids=ids, index=index, out=None, kv=None, graph=None)

    def _capture(self, bucket: Bucket, pool, start_reserved: int, side) -> None:
        t0 = time.perf_counter()
        static = self._buffers(bucket)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step(static.ids, static.index)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            static.out, static.kv = self._step(static.ids, static.index)  # [R], KV
        torch.cuda.synchronize(self.device)
        static.graph = graph
        self._graphs[bucket] = static
        stats = CaptureStats(bucket, static.index.numel(), time.perf_counter() - t0,
                             torch.cuda.memory_reserved(self.device) - start_reserved)
        self.stats.append(stats)
        log.info("cuda graphs: bucket %s (readouts %d) captured in %.3f s, pool %.1f MiB",
                 bucket, stats.readouts, stats.seconds, stats.pool_bytes / 2**20)

    def _emulate_replay(self, static: _Graph) -> None:
        """Run the pass eagerly and write its outputs into the bucket's static buffers, allocated on the first
        run and reused by every later one, as a replay overwrites the memory its capture assigned. A caller
        that keeps a view of the outputs past the next call on this runner sees them change, on the CPU too."""
        out, kv = self._step(static.ids, static.index)
        if static.out is None:
            static.out = out.clone()  # [R]
            static.kv = None if kv is None else [(k.clone(), v.clone()) for k, v in kv]
            return
        static.out.copy_(out)
        if kv is not None:
            for (k_static, v_static), (k, v) in zip(static.kv, kv):
                k_static.copy_(k)
                v_static.copy_(v)

    # -- replay -----------------------------------------------------------------------------------------
    def maybe_run(self, input_ids: torch.Tensor, flat_index) -> torch.Tensor | None:
        """Promises [N] from a graph replay, or None (disabled, no bucket fits, too many readouts)."""
        result = self._run(input_ids, flat_index)
        return None if result is None else result[0]

    def maybe_run_with_kv(self, input_ids: torch.Tensor, flat_index) -> tuple[torch.Tensor, KV] | None:
        """(promises [N], kv views [b, kv_heads, t, hd] per layer, valid until the next call), or None."""
        if not self.with_kv:
            raise RuntimeError("this GraphRunner was built without with_kv=True")
        return self._run(input_ids, flat_index)

    def _run(self, input_ids: torch.Tensor, flat_index):
        if not self.enabled:
            return None
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        bucket = pick_bucket(self.buckets, batch, length)
        if bucket is None:
            return None
        static = self._graphs[bucket]
        # Indices are checked on the host: an out-of-range gather inside a graph is a device fault.
        index = torch.as_tensor(flat_index, dtype=torch.long).cpu().reshape(-1)  # [N]
        n = index.numel()
        if n > static.index.numel():
            return None
        if n and (int(index.min()) < 0 or int(index.max()) >= batch * length):
            raise IndexError(f"flat_index outside the {batch}x{length} batch")
        index = remap_flat_index(index, length, bucket[1])
        with self._lock, torch.inference_mode():
            static.ids.fill_(self.pad_id)
            static.ids[:batch, :length].copy_(input_ids)
            static.index[:n].copy_(index)
            if static.graph is not None:
                with torch.cuda.device(self.device):
                    static.graph.replay()
            else:
                self._emulate_replay(static)
            self.replays += 1
            promises = static.out[:n].clone()  # the next replay overwrites static.out
            kv = None
            if static.kv is not None:
                kv = [(k[:batch, :, :length], v[:batch, :, :length]) for k, v in static.kv]
            return promises, kv
