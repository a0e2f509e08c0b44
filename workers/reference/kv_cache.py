"""The reference engine's paged KV cache: one block-major tensor pool and the block manager over it.

Place: owned by ``workers.reference.engine`` (all calls happen under the engine's lock); the model
(``workers.reference.model``) reads and writes the pool through flat row indices; a KV hand-off (NIXL, or
the in-process copy the tests use) moves whole blocks, each of which is ONE contiguous region of
``block_bytes`` bytes holding K and V of all layers for ``block_size`` positions:

    pool[num_blocks, num_layers, block_size, 2 (K, V), num_kv_heads, head_dim]

so a run of consecutive block ids is one descriptor. (K and V of one token are adjacent so a layer writes
and gathers both with one index op. K is stored in the model's RoPE pair order, see
``workers.reference.model._interleave_rows``: only our own engines read this pool.)

Prefix caching: a full block whose KV is computed is registered under its chained hash
(:mod:`dynamo_rt.kvhash`, the hash the router computes from prompts). Blocks are reference counted; an
unreferenced registered block stays cached (and matchable) on an LRU list until an allocation needs it,
which is when a ``removed`` event is emitted. Each registration emits a ``stored`` event. (With lower KV
tiers, :mod:`workers.reference.kvbm`, a registered block is also copied down before it can be evicted.)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

import torch

from dynamo_rt.protocol import KvEvent


class KvPool:
    """The KV tensor plus what a transfer agent needs to register it."""

    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: padded attention positions gather from the pool and are multiplied by a zero
        # weight; uninitialised memory may hold NaN bit patterns (0 * NaN = NaN).
        self.tensor = torch.zeros((num_blocks, num_layers, block_size, 2, num_kv_heads, head_dim),
                                  dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = self.tensor[0].numel() * self.tensor.element_size()
        self.device = self.tensor.device

    def data_ptr(self) -> int:
        return int(self.tensor.data_ptr())

    def block_addr(self, block_id: int) -> int:
        """Address of one block (all layers, K and V): what a transfer descriptor points at."""
        return self.data_ptr() + block_id * self.block_bytes

    def descriptor(self) -> dict[str, Any]:
        """The pool as :class:`dynamo_rt.protocol.NixlRecord` describes it (minus the agent fields)."""
        return {"memory": "VRAM" if self.device.type == "cuda" else "DRAM",
                "device_id": self.device.index or 0, "base_addr": self.data_ptr(),
                "block_bytes": self.block_bytes, "num_blocks": self.num_blocks, "layout": "block-major"}

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class BlockManager:
    """Free list, reference counts, hash -> block prefix cache with LRU eviction, and pending KV events.

    Not thread-safe: the engine calls it under its lock.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cache: dict[int, int] = {}  # block hash -> block id
        self.free: deque[int] = deque(range(num_blocks))  # unreferenced, not cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached; oldest first
        self.events: list[KvEvent] = []

    # ----------------------------------------------------------------------------------------- queries

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now (free + cached but unreferenced)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by a sequence or a pin."""
        return self.num_blocks - len(self.free) - len(self.evictable)

    def match(self, hashes: Iterable[int]) -> list[int]:
        """Longest run of cached blocks for a chain of hashes (not acquired)."""
        out: list[int] = []
        for h in hashes:
            b = self.cache.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_evictable_in(self, blocks: Iterable[int]) -> int:
        return sum(1 for b in blocks if self.ref[b] == 0)

    # ----------------------------------------------------------------------------------------- changes

    def acquire(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                self.evictable.pop(b, None)
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (referenced once). Evicts LRU cached blocks when the free list runs out.
        The caller checks :attr:`num_available` first."""
        if n > self.num_available:
            raise RuntimeError(f"allocate({n}) with {self.num_available} available")
        out: list[int] = []
        removed: list[int] = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                h = self.hash_of[b]
                if h is not None:
                    self.hash_of[b] = None
                    if self.cache.get(h) == b:
                        del self.cache[h]
                    removed.append(h)
            self.ref[b] = 1
            out.append(b)
        if removed:
            self.events.append(KvEvent(kind="removed", block_hashes=removed))
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference of each block. Released tail-first so a sequence's last blocks are evicted
        before its first ones (prefixes are the likelier hits)."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] < 0:
                raise RuntimeError(f"block {b} released twice")
            if self.ref[b] == 0:
                if self.hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def register(self, pairs: list[tuple[int, int]], parent: int | None) -> list[tuple[int, int]]:
        """Cache full computed blocks ``[(block, hash), ...]`` (consecutive in one sequence, the first one's
        parent hash is ``parent``). A hash already cached in another block keeps that block; this one stays
        private and is freed on release. Returns the pairs newly cached (what the lower KV tiers of
        :mod:`workers.reference.kvbm` offload)."""
        new: list[tuple[int, int]] = []
        run: list[int] = []
        run_parent = parent
        prev = parent
        for b, h in pairs:
            if h in self.cache or self.hash_of[b] is not None:
                if run:
                    self.events.append(KvEvent(kind="stored", block_hashes=run, parent_hash=run_parent))
                    run = []
            else:
                self.cache[h] = b
                self.hash_of[b] = h
                if not run:
                    run_parent = prev
                run.append(h)
                new.append((b, h))
            prev = h
        if run:
            self.events.append(KvEvent(kind="stored", block_hashes=run, parent_hash=run_parent))
        return new

    def take_events(self) -> list[KvEvent]:
        ev, self.events = self.events, []
        return ev

    def clear(self) -> None:
        """Forget every cached hash (engine stop)."""
        if self.cache:
            self.events.append(KvEvent(kind="cleared"))
        for b in list(self.evictable):
            self.free.append(b)
        self.evictable.clear()
        self.cache.clear()
        self.hash_of = [None] * self.num_blocks
