"""Cross-request prefix cache: KV of recently computed prefixes in a byte-bounded LRU of token-id blocks.

Ids are cut into blocks of `block_size` tokens; block i is keyed by a chain hash of every token up to its end,
so a longer request finds its longest cached prefix block by block. An entry stores its tokens and its
parent's key (a hash collision can never serve wrong KV), the keys and values of its positions for every
layer (one slot of the slab, below), and the promise at every readout-marker position in it (NaN elsewhere):
a readout that falls inside a cached prefix (a beam's last step, the initial state) is served from there.

Memory: the KV of every block lives in one slab, [slots, layers, 2 (keys, values), kv_heads, block, head_dim],
with as many slots as `max_bytes` holds, allocated at the first insert (on a CPU its pages become resident as
slots are first written). Eviction hands a slot back for the next insert instead of freeing a tensor: blocks
live for minutes while a pass's activations live for milliseconds, and with one allocation per block the two
interleaved in the C heap, whose free gaps then grew the process's memory long after the cache was full
(bench/SOAK.md). The slab keeps the bound exact and the heap free of long-lived blocks.

Eviction is least-recently-used by bytes. A lookup touches a chain from its deepest block up to its root, so
ancestors are always more recent than descendants and eviction never orphans the middle of a chain. A `Hit`
reads its slots: call `kv()` before the next insert (which may reuse them; a stale hit raises).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Block:
    parent: int | None
    tokens: tuple[int, ...]
    slot: int  # row of the slab holding this block's KV
    generation: int  # the slot's generation when this block was written (a stale hit is detected)
    markers: np.ndarray  # [block] float32 promise at marker positions, NaN elsewhere
    nbytes: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evicted_blocks: int = 0


@dataclass
class Hit:
    tokens: int
    blocks: list[Block] = field(default_factory=list)
    cache: "PrefixCache | None" = None

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) as [1, kv_heads, tokens, head_dim], ready for a DynamicCache."""
        slab, generations = self.cache._slab, self.cache._generations
        if any(generations[b.slot] != b.generation for b in self.blocks):
            raise RuntimeError("a prefix-cache hit was read after its slots were reused; read it before inserting")
        whole = torch.cat([slab[b.slot] for b in self.blocks], dim=3)  # [L, 2, kvh, tokens, hd]: one copy
        return [(layer[0].unsqueeze(0), layer[1].unsqueeze(0)) for layer in whole]

    def markers(self) -> np.ndarray:
        if not self.blocks:
            return np.empty(0, dtype=np.float32)
        return np.concatenate([b.markers for b in self.blocks])


class PrefixCache:
    def __init__(self, max_bytes: int, block_size: int = 32):
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        self._slab: torch.Tensor | None = None  # [slots, L, 2, kvh, block, hd], made by the first insert
        self._generations = np.zeros(0, dtype=np.int64)  # per slot, bumped when the slot is written
        self._free: list[int] = []  # slots not holding a block (popped from the end: low slots first)
        self._block_bytes = 0
        self.bytes = 0
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, ids, n_blocks: int):
        bs, parent = self.block_size, None
        for i in range(n_blocks):
            tokens = tuple(ids[i * bs:(i + 1) * bs])
            key = hash((parent, tokens))
            yield key, parent, tokens
            parent = key

    def _touch(self, keys: list[int]) -> None:
        for key in reversed(keys):  # root last: ancestors stay more recent than descendants
            self._blocks.move_to_end(key)

    def lookup(self, ids, max_tokens: int | None = None) -> Hit:
        """The longest cached prefix of `ids` (whole blocks, at most `max_tokens` tokens)."""
        limit = len(ids) if max_tokens is None else min(len(ids), max_tokens)
        hit = Hit(0, cache=self)
        if not self.enabled:
            return hit
        keys = []
        for key, parent, tokens in self._keys(ids, limit // self.block_size):
            block = self._blocks.get(key)
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            keys.append(key)
            hit.blocks.append(block)
        hit.tokens = len(hit.blocks) * self.block_size
        self._touch(keys)
        if hit.tokens:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
        return hit

    def _make_slab(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        kv_bytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        self._block_bytes = kv_bytes + self.block_size * 4  # + the float32 markers
        slots = self.max_bytes // self._block_bytes
        # Zeroed, not empty: the whole bounded buffer is resident from the first insert, so the process's memory
        # does not creep up while the cache fills (on a slow machine that took minutes and read as growth in
        # bench/SOAK.md); the cost is committing max_bytes at once, which the cache would reach anyway.
        self._slab = torch.zeros((slots, *shape), dtype=dtype, device=device)  # [slots, L, 2, kvh, block, hd]
        self._generations = np.zeros(slots, dtype=np.int64)
        self._free = list(range(slots - 1, -1, -1))

    def _take_slot(self, chain: set[int]) -> int | None:
        """A free slot, else the least recently used block's (never one of the chain being inserted)."""
        if self._free:
            return self._free.pop()
        if not self._blocks or next(iter(self._blocks)) in chain:
            return None  # everything cached belongs to this chain: its deeper blocks are not cached
        _, block = self._blocks.popitem(last=False)
        self.bytes -= block.nbytes
        self.stats.evicted_blocks += 1
        return block.slot

    def insert(self, ids, kv: list[tuple[torch.Tensor, torch.Tensor]], markers: np.ndarray, row: int = 0) -> int:
        """Store the whole blocks of ids[:len(markers)] not yet cached. `kv` per layer [B, kv_heads, T, hd]
        from position 0 (row `row` is this sequence); `markers` [T] as in `Block`. Returns new blocks."""
        if not self.enabled:
            return 0
        bs = self.block_size
        n_blocks = len(markers) // bs
        chain, new = [], []
        for i, (key, parent, tokens) in enumerate(self._keys(ids, n_blocks)):
            chain.append(key)
            if key not in self._blocks:
                new.append((i, key, parent, tokens))
        self._touch([k for k in chain if k in self._blocks])  # the cached part is not evicted for the rest
        added = 0
        if new:
            shape = (len(kv), 2, kv[0][0].shape[1], bs, kv[0][0].shape[3])  # [L, 2, kvh, block, hd]
            if self._slab is None:
                self._make_slab(shape, kv[0][0].dtype, kv[0][0].device)
            elif tuple(self._slab.shape[1:]) != shape:
                raise ValueError(f"KV blocks of shape {shape} do not fit this cache's {tuple(self._slab.shape[1:])}")
            lo, hi = new[0][0] * bs, (new[-1][0] + 1) * bs
            span = torch.stack([torch.stack((k[row, :, lo:hi], v[row, :, lo:hi])) for k, v in kv])  # [L,2,kvh,S,hd]
            protected = set(chain)
            for i, key, parent, tokens in new:
                slot = self._take_slot(protected)
                if slot is None:
                    break  # a chain longer than the cache: its root side stays cached
                self._slab[slot].copy_(span[:, :, :, i * bs - lo:(i + 1) * bs - lo])
                self._generations[slot] += 1
                block_markers = np.array(markers[i * bs:(i + 1) * bs], dtype=np.float32)
                self._blocks[key] = Block(parent, tokens, slot, int(self._generations[slot]), block_markers,
                                          self._block_bytes)
                self.bytes += self._block_bytes
                added += 1
            self._touch([k for k in chain if k in self._blocks])
        return added
