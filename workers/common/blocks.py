"""The KV block manager both our engines use: which block ids are free, referenced, cached or pinned.

Place: the reference engine (``workers.reference.engine``, over its torch pool
:class:`workers.reference.kv_cache.KvPool`) and the mocker (``workers.mocker.scheduler``, no tensor
at all) each own one and drive it from their scheduler; so the router and planner benches, which run on
mockers, see exactly the KV events a real engine emits. Pure Python, no torch; not thread-safe (the
reference engine calls it under its lock, the mocker from its event loop).

A block id is in one of three states:

  * free: unreferenced, holds nothing anyone can match; allocations take these first (FIFO);
  * referenced (``ref[b] > 0``): a running sequence, a pin or a tier copy holds it;
  * evictable: unreferenced but registered in the prefix cache, still matchable; an allocation that runs
    out of free blocks takes the least recently released one and emits ``removed`` for its hash.

Prefix caching: a full block whose KV is computed is registered under its chained hash
(:mod:`dynamo_rt.kvhash`, the hash the router computes from prompts), which emits ``stored`` with the
parent hash of each consecutive run. A sequence releases its blocks tail first, so under pressure a
prefix loses its tail before its head (heads are the likelier hits).

Pins: a prefill worker in disaggregated serving keeps a finished prompt's blocks referenced under a pin id
until the decode worker has read them (``release_pin``) or the pin's deadline passes.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from dynamo_rt.protocol import KvEvent


@dataclass(slots=True)
class Pin:
    blocks: list[int]
    deadline: float  # in the clock of whoever passed it (the engine's monotonic or loop time)


class BlockManager:
    """Free list, reference counts, hash -> block prefix cache with LRU eviction, pins and pending KV
    events (drained by :meth:`take_events`)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cache: dict[int, int] = {}  # block hash -> block id
        self.free: deque[int] = deque(range(num_blocks))  # unreferenced, not cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached; oldest first
        self.pins: dict[str, Pin] = {}
        self.pins_expired = 0  # pins freed by their deadline (counted by whoever expires them)
        self.events: list[KvEvent] = []

    # ----------------------------------------------------------------------------------------- queries

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now (free + cached but unreferenced)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by a sequence, a pin or a tier copy."""
        return self.num_blocks - len(self.free) - len(self.evictable)

    def match(self, hashes: Iterable[int]) -> list[int]:
        """Longest run of cached blocks for a chain of hashes (not acquired)."""
        out: list[int] = []
        cache = self.cache
        for h in hashes:
            b = cache.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_evictable_in(self, blocks: Iterable[int]) -> int:
        """How many of ``blocks`` (a match) are unreferenced: acquiring them takes them off the available
        count, so an admission needs ``num_available - num_evictable_in(hit)`` room for its new blocks."""
        ref = self.ref
        return sum(1 for b in blocks if ref[b] == 0)

    def cached_hashes(self) -> list[int]:
        """Every hash a router may match here (referenced or evictable), for a resync."""
        return list(self.cache)

    # ----------------------------------------------------------------------------------------- changes

    def acquire(self, blocks: Iterable[int]) -> None:
        """One more reference on each block (a prefix hit, a tier copy)."""
        ref = self.ref
        for b in blocks:
            if ref[b] == 0:
                self.evictable.pop(b, None)
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (referenced once). Evicts LRU cached blocks when the free list runs out,
        emitting one ``removed`` event for the call. The caller checks :attr:`num_available` first."""
        if n > self.num_available:
            raise RuntimeError(f"allocate({n}) with {self.num_available} available")
        ref, free = self.ref, self.free
        if n <= len(free):
            out = [free.popleft() for _ in range(n)]
            for b in out:
                ref[b] = 1
            return out
        out = []
        removed: list[int] = []
        for _ in range(n):
            if free:
                b = free.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                h = self.hash_of[b]
                if h is not None:
                    self.hash_of[b] = None
                    if self.cache.get(h) == b:
                        del self.cache[h]
                    removed.append(h)
            ref[b] = 1
            out.append(b)
        if removed:
            self.events.append(KvEvent(kind="removed", block_hashes=removed))
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference of each block, tail first (see the module docstring)."""
        ref, hash_of = self.ref, self.hash_of
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] < 0:
                raise RuntimeError(f"block {b} released twice")
            if ref[b] == 0:
                if hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def register(self, pairs: list[tuple[int, int]], parent: int | None) -> list[tuple[int, int]]:
        """Cache full computed blocks ``[(block, hash), ...]`` (consecutive in one sequence, the first one's
        parent hash is ``parent``, None at the root). A hash already cached in another block keeps that
        block; this one stays private and is freed on release. Returns the pairs newly cached (what the
        lower KV tiers of :mod:`workers.reference.kvbm` offload)."""
        new: list[tuple[int, int]] = []
        run: list[int] = []
        run_parent = parent
        prev = parent
        cache, hash_of = self.cache, self.hash_of
        for b, h in pairs:
            if h in cache or hash_of[b] is not None:
                if run:
                    self.events.append(KvEvent(kind="stored", block_hashes=run, parent_hash=run_parent))
                    run = []
            else:
                cache[h] = b
                hash_of[b] = h
                if not run:
                    run_parent = prev
                run.append(h)
                new.append((b, h))
            prev = h
        if run:
            self.events.append(KvEvent(kind="stored", block_hashes=run, parent_hash=run_parent))
        return new

    # ----------------------------------------------------------------------------------------- pins

    def pin(self, blocks: list[int], deadline: float) -> str:
        """Keep ``blocks`` referenced under a new pin id; the caller hands its references over."""
        pin_id = uuid.uuid4().hex
        self.pins[pin_id] = Pin(blocks, deadline)
        return pin_id

    def unpin(self, pin_id: str) -> bool:
        """Release a pin's blocks; False if it is unknown (released already, or expired)."""
        pin = self.pins.pop(pin_id, None)
        if pin is None:
            return False
        self.release(pin.blocks)
        return True

    def expire_pins(self, now: float) -> list[str]:
        """Release every pin whose deadline is at or before ``now``; returns their ids."""
        gone = [p for p, pin in self.pins.items() if pin.deadline <= now]
        for p in gone:
            self.release(self.pins.pop(p).blocks)
        self.pins_expired += len(gone)
        return gone

    def next_pin_deadline(self) -> float | None:
        return min((p.deadline for p in self.pins.values()), default=None)

    def unpin_all(self) -> None:
        for pin in self.pins.values():
            self.release(pin.blocks)
        self.pins.clear()

    # ----------------------------------------------------------------------------------------- events

    def take_events(self) -> list[KvEvent]:
        ev, self.events = self.events, []
        return ev

    def clear(self) -> None:
        """Forget every cached hash (engine stop): one ``cleared`` event if anything was cached."""
        if self.cache:
            self.events.append(KvEvent(kind="cleared"))
        for b in list(self.evictable):
            self.free.append(b)
        self.evictable.clear()
        self.cache.clear()
        self.hash_of = [None] * self.num_blocks
