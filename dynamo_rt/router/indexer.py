"""Which KV blocks each worker holds: the index the KV-aware router scores prompts against.

:class:`KvIndexer` is fed by the workers' :class:`~dynamo_rt.protocol.KvEvents` (blocks stored / removed /
cleared, with a per-worker ``seq`` so a dropped message is noticed and the worker resynced).
:class:`ApproxIndexer` serves routers that get no events: it remembers the prefixes it routed to each
worker for a while. Both answer :meth:`find_matches` the same way, so the policy does not care which.

Block hashes are chained (:mod:`dynamo_rt.kvhash`): a hash names its whole prefix, so the index is a flat
map ``hash -> set of workers``, not a tree. The worker set is an ``int`` bitmask (one bit per worker),
which makes the prefix walk one dict lookup and one ``&`` per block: a 1k-block prompt against 100
workers costs a few hundred microseconds in pure Python.

Every block is also kept per tier (``primary`` = device memory, ``host``, ``disk``) so a later cost model
can weight blocks offloaded to a slower tier; :meth:`KvIndexer.find_matches` counts the tiers it is given
(primary only by default) and :meth:`KvIndexer.find_matches_by_tier` gives all the cumulative overlaps.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from dynamo_rt.protocol import KvEvent, KvEvents

log = logging.getLogger(__name__)

PRIMARY = "primary"
TIERS = ("primary", "host", "disk")  # fastest first


class PrefixIndex(Protocol):
    """What a routing policy needs from an index."""

    def find_matches(self, block_hashes: Sequence[int]) -> dict[str, int]: ...

    def on_routed(self, worker_id: str, block_hashes: Sequence[int]) -> None: ...

    def remove_worker(self, worker_id: str) -> None: ...


class KvIndexer:
    """Global index of the blocks each worker holds, fed by KV events.

    ``first_seq`` is the ``seq`` a worker's first :class:`KvEvents` carries; a worker first heard of with
    a later ``seq`` (the router started after it) is marked as needing a resync, as is any gap.
    """

    def __init__(self, *, first_seq: int = 0) -> None:
        self.first_seq = first_seq
        self._bit: dict[str, int] = {}  # worker -> its bit in the masks
        self._worker_at: list[str | None] = []  # bit -> worker
        self._free_bits: list[int] = []
        self._masks: dict[str, dict[int, int]] = {t: {} for t in TIERS}  # tier -> hash -> worker mask
        self._blocks: dict[str, dict[str, set[int]]] = {}  # worker -> tier -> hashes
        self._seq: dict[str, int] = {}
        self._resync: set[str] = set()
        self._accept_any: set[str] = set()  # resynced without a seq: take the next seq as it comes
        self.events_applied = 0
        self.gaps = 0
        self.stale = 0
        self._heard: dict[str, int] = {}  # worker -> batches applied + resyncs (what the router hears of it)

    # ------------------------------------------------------------------------------------ workers

    def _bit_of(self, worker_id: str) -> int:
        bit = self._bit.get(worker_id)
        if bit is None:
            if self._free_bits:
                bit = self._free_bits.pop()
                self._worker_at[bit] = worker_id
            else:
                bit = len(self._worker_at)
                self._worker_at.append(worker_id)
            self._bit[worker_id] = bit
            self._blocks[worker_id] = {}
        return bit

    def workers(self) -> list[str]:
        return list(self._bit)

    def num_blocks(self, worker_id: str, tier: str = PRIMARY) -> int:
        return len(self._blocks.get(worker_id, {}).get(tier, ()))

    def blocks(self, worker_id: str, tier: str = PRIMARY) -> set[int]:
        """A copy of the hashes ``worker_id`` holds in ``tier``."""
        return set(self._blocks.get(worker_id, {}).get(tier, ()))

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (it left discovery)."""
        bit = self._bit.pop(worker_id, None)
        if bit is None:
            return
        self._clear(worker_id, bit)
        del self._blocks[worker_id]
        self._worker_at[bit] = None
        self._free_bits.append(bit)
        self._seq.pop(worker_id, None)
        self._resync.discard(worker_id)
        self._accept_any.discard(worker_id)

    # ------------------------------------------------------------------------------------ events

    def apply(self, events: KvEvents) -> bool:
        """Apply one worker's batch of events. False if it was a duplicate or older than what we have.

        A batch after a gap is still applied (what it says is true) but the worker is marked for resync,
        since the missing batches may have stored or removed anything.
        """
        w = events.instance_id
        last = self._seq.get(w)
        if last is None:
            if w in self._accept_any:
                self._accept_any.discard(w)
            elif events.seq != self.first_seq:
                self._mark(w, f"first batch seq {events.seq}, expected {self.first_seq}")
        elif events.seq <= last:
            self.stale += 1
            return False
        elif events.seq != last + 1:
            self._mark(w, f"seq gap {last} -> {events.seq}")
        self._seq[w] = events.seq
        self._heard[w] = self._heard.get(w, 0) + 1
        bit = self._bit_of(w)
        for ev in events.events:
            self._apply_one(w, bit, ev)
        self.events_applied += len(events.events)
        return True

    def _mark(self, worker_id: str, why: str) -> None:
        self.gaps += 1
        if worker_id not in self._resync:
            log.info("KV index of worker %s needs a resync: %s", worker_id, why)
        self._resync.add(worker_id)

    def _apply_one(self, w: str, bit: int, ev: KvEvent) -> None:
        if ev.kind == "stored":
            self._store(w, bit, ev.block_hashes, ev.tier)
        elif ev.kind == "removed":
            self._remove(w, bit, ev.block_hashes, ev.tier)
        elif ev.kind == "cleared":
            # A worker that drops its cache drops every tier (an engine restart looks the same).
            self._clear(w, bit)
        else:
            log.warning("unknown KV event kind %r from worker %s", ev.kind, w)

    def _store(self, w: str, bit: int, hashes: Iterable[int], tier: str) -> None:
        held = self._blocks[w].setdefault(tier, set())
        masks = self._masks.setdefault(tier, {})
        flag = 1 << bit
        for h in hashes:
            if h not in held:
                held.add(h)
                masks[h] = masks.get(h, 0) | flag

    def _remove(self, w: str, bit: int, hashes: Iterable[int], tier: str) -> None:
        held = self._blocks[w].get(tier)
        if not held:
            return
        masks = self._masks[tier]
        keep = ~(1 << bit)
        for h in hashes:
            if h in held:
                held.discard(h)
                m = masks[h] & keep
                if m:
                    masks[h] = m
                else:
                    del masks[h]

    def _clear(self, w: str, bit: int) -> None:
        for tier, held in self._blocks[w].items():
            self._remove(w, bit, list(held), tier)
        self._blocks[w] = {}

    # ------------------------------------------------------------------------------------ resync

    def heard(self, worker_id: str) -> int:
        """Event batches and resyncs applied from ``worker_id`` so far (it stays across a worker's removal)."""
        return self._heard.get(worker_id, 0)

    def needs_resync(self, worker_id: str) -> bool:
        return worker_id in self._resync

    def pending_resyncs(self) -> list[str]:
        return sorted(self._resync)

    def mark_resync(self, worker_id: str) -> None:
        """Ask for a resync by hand (a worker discovered before any of its events arrived)."""
        self._resync.add(worker_id)

    def resync(
        self,
        worker_id: str,
        hashes: Iterable[int],
        *,
        seq: int | None = None,
        other_tiers: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """Replace everything known about ``worker_id`` with a snapshot (``hashes`` in the primary tier).

        ``seq`` is the last event batch the snapshot includes: later batches apply on top, earlier ones
        are dropped as stale. Without it, the next batch is accepted whatever its seq.
        """
        bit = self._bit_of(worker_id)
        self._heard[worker_id] = self._heard.get(worker_id, 0) + 1
        self._clear(worker_id, bit)
        self._store(worker_id, bit, hashes, PRIMARY)
        for tier, hs in (other_tiers or {}).items():
            self._store(worker_id, bit, hs, tier)
        if seq is None:
            # Unknown position in the stream: the next batch, whatever its seq, is the new baseline.
            self._seq.pop(worker_id, None)
            self._accept_any.add(worker_id)
        else:
            self._seq[worker_id] = seq
            self._accept_any.discard(worker_id)
        self._resync.discard(worker_id)

    # ------------------------------------------------------------------------------------ queries

    def find_matches(self, block_hashes: Sequence[int], tiers: Sequence[str] = (PRIMARY,)) -> dict[str, int]:
        """For each worker holding the first block: how many leading blocks of the prompt it holds.

        Workers with no overlap are left out. A block counts if it is held in any of ``tiers``.
        """
        if not block_hashes:
            return {}
        if len(tiers) == 1:
            masks = self._masks.get(tiers[0])
            if not masks:
                return {}
            return self._walk(block_hashes, masks.get)
        maps = [self._masks[t] for t in tiers if t in self._masks]

        def union(h: int) -> int:
            m = 0
            for mp in maps:
                m |= mp.get(h, 0)
            return m

        return self._walk(block_hashes, union)

    def _walk(self, block_hashes: Sequence[int], get: Callable[[int], int | None]) -> dict[str, int]:
        out: dict[str, int] = {}
        cur = get(block_hashes[0]) or 0
        if not cur:
            return out
        i = 1
        for h in block_hashes[1:]:
            m = get(h)
            if m is None:
                self._spread(cur, i, out)
                return out
            m &= cur
            if m != cur:
                self._spread(cur & ~m, i, out)
                if not m:
                    return out
                cur = m
            i += 1
        self._spread(cur, i, out)
        return out

    def _spread(self, mask: int, n: int, out: dict[str, int]) -> None:
        at = self._worker_at
        while mask:
            low = mask & -mask
            w = at[low.bit_length() - 1]
            if w is not None:
                out[w] = n
            mask ^= low

    def holds(self, worker_id: str, block_hash: int) -> bool:
        """Does ``worker_id`` hold ``block_hash`` in primary (device) memory?"""
        bit = self._bit.get(worker_id)
        return bit is not None and bool(self._masks[PRIMARY].get(block_hash, 0) >> bit & 1)

    def has_lower_tiers(self) -> bool:
        """Does any worker hold a block outside ``primary``? (If not, tier weights change nothing.)"""
        return any(self._masks.get(t) for t in TIERS[1:])

    def find_matches_by_tier(self, block_hashes: Sequence[int]) -> dict[str, dict[str, int]]:
        """Per worker, the prefix held in ``primary``, in ``primary``+``host``, and in all tiers.

        For a cost model that weights offloaded blocks: the blocks only a lower tier adds are the
        difference between two cumulative counts. A tier nobody holds anything in costs no walk.
        """
        out: dict[str, dict[str, int]] = {}
        for k in range(len(TIERS)):
            if k > 0 and not self._masks.get(TIERS[k]):
                for counts in out.values():  # the union is the previous one: so are the counts
                    counts[TIERS[k]] = counts[TIERS[k - 1]]
                continue
            for w, n in self.find_matches(block_hashes, TIERS[: k + 1]).items():
                out.setdefault(w, {t: 0 for t in TIERS})[TIERS[k]] = n
        return out

    def on_routed(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        """Events tell us what the worker really caches; routing alone changes nothing."""


class ApproxIndexer:
    """A prefix index without events: each routed prompt is assumed cached on its worker for ``ttl_s``.

    ``max_blocks_per_worker`` bounds the memory (oldest entries go first), roughly the worker's pool.
    ``clock`` is injectable so expiry is testable without sleeping.
    """

    def __init__(
        self,
        ttl_s: float = 120.0,
        *,
        max_blocks_per_worker: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_blocks_per_worker = max_blocks_per_worker
        self._clock = clock
        self._index = KvIndexer()
        # (worker, hash) -> expiry. With one TTL for all, refreshing = move to end keeps it sorted.
        self._expiry: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._count: dict[str, int] = {}

    def record(self, worker_id: str, block_hashes: Sequence[int], now: float | None = None) -> None:
        """Remember that ``worker_id`` will hold ``block_hashes`` (it was just routed this prompt)."""
        t = self._clock() if now is None else now
        self._expire(t)
        bit = self._index._bit_of(worker_id)
        fresh: list[int] = []
        exp = t + self.ttl_s
        for h in block_hashes:
            key = (worker_id, h)
            if key in self._expiry:
                self._expiry.move_to_end(key)
            else:
                fresh.append(h)
            self._expiry[key] = exp
        if fresh:
            self._index._store(worker_id, bit, fresh, PRIMARY)
            self._count[worker_id] = self._count.get(worker_id, 0) + len(fresh)
        cap = self.max_blocks_per_worker
        if cap is not None and self._count[worker_id] > cap:
            self._trim(worker_id, bit, cap)

    def _trim(self, worker_id: str, bit: int, cap: int) -> None:
        drop: list[int] = []
        excess = self._count[worker_id] - cap
        for key in self._expiry:
            if key[0] == worker_id:
                drop.append(key[1])
                if len(drop) == excess:
                    break
        for h in drop:
            del self._expiry[(worker_id, h)]
        self._index._remove(worker_id, bit, drop, PRIMARY)
        self._count[worker_id] -= len(drop)

    def _expire(self, now: float) -> None:
        gone: dict[str, list[int]] = {}
        while self._expiry:
            key, exp = next(iter(self._expiry.items()))
            if exp > now:
                break
            self._expiry.popitem(last=False)
            gone.setdefault(key[0], []).append(key[1])
        for w, hs in gone.items():
            bit = self._index._bit.get(w)
            if bit is not None:
                self._index._remove(w, bit, hs, PRIMARY)
                self._count[w] -= len(hs)

    def on_routed(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        self.record(worker_id, block_hashes)

    def find_matches(self, block_hashes: Sequence[int], now: float | None = None) -> dict[str, int]:
        self._expire(self._clock() if now is None else now)
        return self._index.find_matches(block_hashes)

    def remove_worker(self, worker_id: str) -> None:
        self._index.remove_worker(worker_id)
        self._count.pop(worker_id, None)
        for key in [k for k in self._expiry if k[0] == worker_id]:
            del self._expiry[key]

    def num_blocks(self, worker_id: str) -> int:
        return self._count.get(worker_id, 0)
