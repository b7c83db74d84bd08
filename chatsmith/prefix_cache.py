"""Prefix caching: keys and values of token blocks that earlier requests computed, copied into the slot of a new
request that starts with the same tokens. The web UI and OpenAI clients resend the whole conversation every turn, so
without it every turn prefills the whole conversation again.

    prefix = PrefixCache(cache, max_tokens=4096)   # blocks of 16 tokens; their memory is allocated on first use
    n = prefix.load(prompt_ids, slot)              # the longest cached prefix -> the slot; cache.lengths[slot] = n
    ...                                            # prefill prompt_ids[n:]
    prefix.store(token_ids, slot)                  # keep the slot's full blocks (token_ids: what the slot holds)

How (block hashing as vLLM's kv_cache_manager does; SGLang's radix tree is the token-level alternative):
- A sequence is cut into blocks of `block_size` tokens at fixed positions. A block's key is (its parent block's id,
  its tokens), so one key stands for the whole prefix up to it and matches only when every earlier token matches
  too. Keys are compared by value in a dict, never by a hash alone, so a hit is exact. Only full blocks are cached.
- A lookup leaves at least one prompt token to prefill (the logits of the last position are needed), as vLLM does.
- Copies, not shared pages: a slot's keys stay contiguous for attention, so a hit costs one copy of its blocks into
  the slot (memory speed, against a prefill's matmuls) and a store one copy of the new blocks out of it.
- Bounded: at most max_tokens // block_size blocks. When full, the least recently used block that has no cached
  children is evicted (leaves first, as SGLang's radix tree does, so every cached block stays reachable from the
  root). A lookup or store touches its chain from the leaf up, so a shared root stays the most recent.
- Exact only for the weights that computed the blocks: `clear()` when they change (the engine checks the model's
  weights key before each lookup).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kvcache import KVCache

_ROOT = -1  # the parent id of a sequence's first block


@dataclass
class _Block:
    uid: int  # unique for the cache's lifetime: children name their parent by it
    index: int  # row in the pool
    parent: tuple | None  # the parent block's key (None for a first block)
    children: int = 0  # cached blocks whose parent this is


class PrefixCache:
    """Full blocks of earlier sequences' keys and values, keyed by their prefix, evicted LRU, leaves first."""

    def __init__(self, cache: KVCache, max_tokens: int, block_size: int = 16):
        if block_size < 1 or max_tokens < 0:
            raise ValueError(f"block_size must be >= 1 and max_tokens >= 0, not {block_size} and {max_tokens}")
        self.cache, self.block_size = cache, block_size
        self.capacity = max_tokens // block_size  # blocks
        self.key: object = None  # what the cached blocks were computed with (the engine's weights key)
        self._pool: torch.Tensor | None = None  # (capacity, n_layer, 2, n_kv_head, block_size, head_dim)
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._free: list[int] = list(range(self.capacity))
        self._uids = itertools.count()
        self.lookups = self.hit_tokens = 0  # counters, for tests and metrics

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self._free = list(range(self.capacity))

    def _chain(self, ids: Sequence[int], n_blocks: int) -> list[tuple[tuple, _Block | None]]:
        """(key, cached block or None) of the first n_blocks blocks of ids, stopping after the first miss."""
        bs, parent, chain = self.block_size, _ROOT, []
        for j in range(n_blocks):
            key = (parent, tuple(ids[j * bs:(j + 1) * bs]))
            block = self._blocks.get(key)
            chain.append((key, block))
            if block is None:
                break
            parent = block.uid
        return chain

    def _touch(self, keys: list[tuple]) -> None:
        for key in reversed(keys):  # leaf first: the root ends up the most recently used
            self._blocks.move_to_end(key)

    def _slot_blocks(self, slot: int, n_blocks: int) -> torch.Tensor:
        """The slot's first n_blocks blocks as a view (n_layer, 2, n_kv_head, n_blocks, block_size, head_dim)."""
        kv = self.cache.kv[:, slot, :, :, :n_blocks * self.block_size]  # (L, 2, K, n * bs, D)
        return kv.unflatten(3, (n_blocks, self.block_size))

    def load(self, ids: Sequence[int], slot: int) -> int:
        """Copy the longest cached prefix of ids (whole blocks, at least one token left over) into the empty `slot`;
        set its length and return the number of tokens restored (0 on a miss)."""
        self.lookups += 1
        chain = self._chain(ids, (len(ids) - 1) // self.block_size)
        hits = [(key, block) for key, block in chain if block is not None]
        if not hits:
            return 0
        self._touch([key for key, _ in hits])
        rows = torch.tensor([block.index for _, block in hits], device=self._pool.device)
        self._slot_blocks(slot, len(hits)).copy_(self._pool[rows].permute(1, 2, 3, 0, 4, 5))
        n = len(hits) * self.block_size
        self.cache.lengths[slot] = n
        self.hit_tokens += n
        return n

    def store(self, ids: Sequence[int], slot: int) -> None:
        """Keep the full blocks of ids, whose keys and values `slot` holds at positions 0..len(ids)-1; blocks already
        cached are only touched. Stops early when nothing can be evicted (capacity 0)."""
        n_blocks = min(len(ids), self.cache.lengths[slot]) // self.block_size
        if n_blocks == 0 or self.capacity == 0:
            return
        bs, parent, keys, new = self.block_size, None, [], []  # new: (block number, pool row)
        for j in range(n_blocks):
            key = (_ROOT if parent is None else self._blocks[parent].uid, tuple(ids[j * bs:(j + 1) * bs]))
            if key not in self._blocks:
                if parent is not None:
                    self._blocks[parent].children += 1  # first, so that making room cannot evict the parent
                index = self._allocate()
                if index is None:
                    if parent is not None:
                        self._blocks[parent].children -= 1
                    break
                self._blocks[key] = _Block(next(self._uids), index, parent)
                new.append((j, index))
            keys.append(key)
            parent = key
        self._touch(keys)
        if new:
            if self._pool is None:
                L, _, _, K, _, D = self.cache.kv.shape
                self._pool = torch.empty((self.capacity, L, 2, K, bs, D), dtype=self.cache.kv.dtype,
                                         device=self.cache.kv.device)
            js = torch.tensor([j for j, _ in new], device=self._pool.device)
            rows = torch.tensor([i for _, i in new], device=self._pool.device)
            self._pool[rows] = self._slot_blocks(slot, n_blocks)[:, :, :, js].permute(3, 0, 1, 2, 4, 5)

    def _allocate(self) -> int | None:
        """A free pool row, evicting the least recently used leaf block when none is free."""
        if self._free:
            return self._free.pop()
        victim = next((key for key, block in self._blocks.items() if block.children == 0), None)
        if victim is None:
            return None
        block = self._blocks.pop(victim)
        if block.parent is not None:
            self._blocks[block.parent].children -= 1
        return block.index
