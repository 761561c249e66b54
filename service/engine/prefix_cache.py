"""Cross-request prefix cache: KV of recently computed prefixes in a byte-bounded LRU of token-id blocks.

Ids are cut into blocks of `block_size` tokens; block i is keyed by a chain hash of every token up to its end,
so a longer request finds its longest cached prefix block by block. An entry stores its tokens and its
parent's key (a hash collision can never serve wrong KV), the keys and values of its positions for every
layer in one tensor ([layers, 2, kv_heads, block, head_dim]), and the promise at every readout-marker
position in it (NaN elsewhere):
a readout that falls inside a cached prefix (a beam's last step, the initial state) is served from there.

Eviction is least-recently-used by bytes. A lookup touches a chain from its deepest block up to its root, so
ancestors are always more recent than descendants and eviction never orphans the middle of a chain.
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
    kv: torch.Tensor  # [layers, 2 (keys, values), kv_heads, block, head_dim]
    markers: np.ndarray  # [block] float32 promise at marker positions, NaN elsewhere
    nbytes: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    inserted_blocks: int = 0
    evicted_blocks: int = 0


@dataclass
class Hit:
    tokens: int
    blocks: list[Block] = field(default_factory=list)

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) as [1, kv_heads, tokens, head_dim], ready for a DynamicCache."""
        whole = torch.cat([b.kv for b in self.blocks], dim=3)  # [L, 2, kvh, tokens, hd]: one copy
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
        hit = Hit(0)
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
            self.stats.hit_tokens += hit.tokens
        else:
            self.stats.misses += 1
        return hit

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
        if new:
            lo, hi = new[0][0] * bs, (new[-1][0] + 1) * bs
            span = torch.stack([torch.stack((k[row, :, lo:hi], v[row, :, lo:hi])) for k, v in kv])  # [L,2,kvh,S,hd]
            for i, key, parent, tokens in new:
                part = span[:, :, :, i * bs - lo:(i + 1) * bs - lo].clone()  # its own storage: evictable alone
                block_markers = np.array(markers[i * bs:(i + 1) * bs], dtype=np.float32)
                nbytes = part.numel() * part.element_size() + block_markers.nbytes
                self._blocks[key] = Block(parent, tokens, part, block_markers, nbytes)
                self.bytes += nbytes
        added = len(new)
        self.stats.inserted_blocks += added
        if chain:
            self._touch([k for k in chain if k in self._blocks])
        self._evict()
        return added

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.bytes -= block.nbytes
            self.stats.evicted_blocks += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
