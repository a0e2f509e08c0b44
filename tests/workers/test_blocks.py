"""The shared KV block manager (workers.common.blocks), alone: allocation, prefix hits, LRU eviction order,
the exact KV event sequence, pins, and the return to baseline. No torch, no engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import KvEvent
from workers.common.blocks import BlockManager

H = block_hashes(list(range(16 * 8)), 16)  # a chain of 8 block hashes
G = block_hashes(list(range(1000, 1000 + 16 * 4)), 16)  # another chain of 4


def ev(bm: BlockManager) -> list[tuple[str, list[int], int | None]]:
    return [(e.kind, e.block_hashes, e.parent_hash) for e in bm.take_events()]


def test_imports_no_torch() -> None:
    code = "import sys, workers.common.blocks; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_allocate_release_baseline() -> None:
    bm = BlockManager(8)
    a = bm.allocate(3)
    b = bm.allocate(2)
    assert a == [0, 1, 2] and b == [3, 4]
    assert (bm.num_used, bm.num_available) == (5, 3)
    bm.release(a)
    bm.release(b)
    assert (bm.num_used, bm.num_available) == (0, 8)
    # Unregistered blocks go back to the free list tail, the sequence's tail first.
    assert list(bm.free) == [5, 6, 7, 2, 1, 0, 4, 3]
    assert bm.take_events() == []
    with pytest.raises(RuntimeError, match="released twice"):
        bm.release([0])
    with pytest.raises(RuntimeError, match="allocate"):
        BlockManager(2).allocate(3)


def test_register_emits_stored_runs_and_prefix_hit() -> None:
    bm = BlockManager(8)
    blocks = bm.allocate(5)
    new = bm.register(list(zip(blocks[:3], H[:3], strict=True)), None)
    assert new == list(zip(blocks[:3], H[:3], strict=True))
    assert bm.register([(blocks[3], H[3])], H[2]) == [(blocks[3], H[3])]
    assert ev(bm) == [("stored", H[:3], None), ("stored", [H[3]], H[2])]
    assert bm.match(H) == blocks[:4]
    bm.release(blocks)
    # Cached, unreferenced blocks are still matchable and count as available.
    assert bm.num_used == 0 and bm.num_available == 8 and len(bm.evictable) == 4
    hit = bm.match(H[:6])
    assert hit == blocks[:4] and bm.num_evictable_in(hit) == 4
    bm.acquire(hit)
    assert bm.num_used == 4 and bm.num_evictable_in(hit) == 0
    assert sorted(bm.cached_hashes()) == sorted(H[:4])


def test_twin_block_stays_private_and_splits_the_run() -> None:
    bm = BlockManager(12)
    first = bm.allocate(2)
    bm.register(list(zip(first, H[:2], strict=True)), None)
    bm.take_events()
    # A second sequence computed the same two blocks itself, then a third one of its own.
    twin = bm.allocate(3)
    new = bm.register(list(zip(twin, H[:3], strict=True)), None)
    assert new == [(twin[2], H[2])]
    assert ev(bm) == [("stored", [H[2]], H[1])]
    assert bm.cache[H[0]] == first[0]
    bm.release(twin)  # the private twins go back to the free list, the registered block to evictable
    assert twin[0] in bm.free and twin[1] in bm.free and list(bm.evictable) == [twin[2]]
    # A twin in the middle ends one run; the next run names its true parent.
    c = bm.allocate(2)
    bm.register([(c[0], G[1])], G[0])
    bm.take_events()
    d = bm.allocate(4)
    bm.register(list(zip(d, G, strict=True)), None)
    assert ev(bm) == [("stored", [G[0]], None), ("stored", [G[2], G[3]], G[1])]


def test_eviction_is_lru_tail_first_with_one_removed_event_per_allocation() -> None:
    bm = BlockManager(6)
    a = bm.allocate(3)
    bm.register(list(zip(a, H[:3], strict=True)), None)
    b = bm.allocate(3)
    bm.register(list(zip(b, G[:3], strict=True)), None)
    bm.take_events()
    bm.release(a)  # evictable order: a2, a1, a0
    bm.release(b)  # then b2, b1, b0
    assert list(bm.free) == []
    got = bm.allocate(4)
    assert got == [a[2], a[1], a[0], b[2]]
    assert ev(bm) == [("removed", [H[2], H[1], H[0], G[2]], None)]
    assert bm.match(G) == b[:2] and bm.match(H) == []
    # A hit refreshes nothing by itself; acquiring takes it off the LRU list, releasing puts it last.
    bm.acquire([b[0]])
    bm.release([b[0]])
    assert list(bm.evictable) == [b[1], b[0]]
    assert bm.allocate(1) == [b[1]]
    assert ev(bm) == [("removed", [G[1]], None)]
    # Allocations served from the free list alone emit nothing.
    bm.release(got)
    assert bm.allocate(2) == [b[2], a[0]] and bm.take_events() == []


def test_pins_hold_blocks_until_unpinned_or_expired() -> None:
    bm = BlockManager(8)
    blocks = bm.allocate(3)
    bm.register(list(zip(blocks, H[:3], strict=True)), None)
    p1 = bm.pin(blocks, deadline=10.0)
    p2 = bm.pin(bm.allocate(2), deadline=5.0)
    assert bm.num_used == 5 and len(bm.pins) == 2 and bm.next_pin_deadline() == 5.0
    assert bm.expire_pins(4.9) == []
    assert bm.expire_pins(5.0) == [p2]
    assert bm.num_used == 3 and bm.next_pin_deadline() == 10.0
    assert bm.unpin(p1) is True and bm.unpin(p1) is False and bm.unpin(p2) is False
    assert bm.num_used == 0 and bm.next_pin_deadline() is None
    assert sorted(bm.cached_hashes()) == sorted(H[:3])  # unpinned blocks stay cached
    bm.pin(bm.allocate(1), deadline=1.0)
    bm.unpin_all()
    assert bm.num_used == 0 and not bm.pins


def test_cancel_mid_sequence_and_clear_return_to_baseline() -> None:
    bm = BlockManager(10)
    # Sequence 1 computed 4 blocks; sequence 2 hits its first 2 and is cancelled after one more block.
    s1 = bm.allocate(5)
    bm.register(list(zip(s1[:4], H[:4], strict=True)), None)
    hit = bm.match(H[:4][:2])
    bm.acquire(hit)
    s2 = hit + bm.allocate(2)
    bm.register([(s2[2], G[0])], None)
    bm.release(s2)  # cancelled
    bm.release(s1)  # finished
    assert bm.num_used == 0 and bm.num_available == 10
    assert ev(bm) == [("stored", H[:4], None), ("stored", [G[0]], None)]
    bm.clear()
    assert bm.take_events() == [KvEvent(kind="cleared")]
    assert bm.cache == {} and not bm.evictable and len(bm.free) == 10 and bm.num_available == 10
    assert all(h is None for h in bm.hash_of)
    bm.clear()
    assert bm.take_events() == []  # nothing cached: nothing to say
