"""KvIndexer against a brute-force model, seq gaps and resync (with a real mocker), ApproxIndexer TTL."""

from __future__ import annotations

import asyncio
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import GenerateRequest, KvEvent, KvEvents, StopConditions
from dynamo_rt.router import TIERS, ApproxIndexer, KvIndexer
from workers.common.engine import ModelInfo
from workers.mocker import MockerEngine

WORKERS = ["w0", "w1", "w2", "w3"]
POOL = list(range(1, 13))  # few distinct hashes, so workers overlap often


class Model:
    """The brute-force truth: worker -> tier -> set of hashes."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, set[int]]] = {}

    def overlap(self, q: list[int], tiers: tuple[str, ...]) -> dict[str, int]:
        out: dict[str, int] = {}
        for w, by_tier in self.held.items():
            union = set().union(*(by_tier.get(t, set()) for t in tiers))
            n = 0
            for h in q:
                if h not in union:
                    break
                n += 1
            if n:
                out[w] = n
        return out


hashes_st = st.lists(st.sampled_from(POOL), max_size=6)
op_st = st.one_of(
    st.tuples(st.just("stored"), st.sampled_from(WORKERS), hashes_st, st.sampled_from(TIERS)),
    st.tuples(st.just("removed"), st.sampled_from(WORKERS), hashes_st, st.sampled_from(TIERS)),
    st.tuples(st.just("cleared"), st.sampled_from(WORKERS), st.just([]), st.just("primary")),
    st.tuples(st.just("remove_worker"), st.sampled_from(WORKERS), st.just([]), st.just("primary")),
    st.tuples(st.just("resync"), st.sampled_from(WORKERS), hashes_st, st.just("primary")),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, max_size=40), queries=st.lists(st.lists(st.sampled_from(POOL), max_size=8), max_size=6))
def test_indexer_matches_brute_force(ops: list[tuple[str, str, list[int], str]], queries: list[list[int]]) -> None:
    ix = KvIndexer()
    model = Model()
    seq: dict[str, int] = {}
    for kind, w, hs, tier in ops:
        if kind == "remove_worker":
            ix.remove_worker(w)
            model.held.pop(w, None)
            seq.pop(w, None)
        elif kind == "resync":
            ix.resync(w, hs, seq=seq.get(w, 0) - 1)
            model.held[w] = {"primary": set(hs)}
        else:
            s = seq.get(w, 0)
            seq[w] = s + 1
            assert ix.apply(KvEvents(instance_id=w, seq=s, events=[KvEvent(kind, hs, None, tier)]))
            by_tier = model.held.setdefault(w, {})
            if kind == "stored":
                by_tier.setdefault(tier, set()).update(hs)
            elif kind == "removed":
                by_tier.get(tier, set()).difference_update(hs)
            else:
                by_tier.clear()
        assert ix.pending_resyncs() == []
        for q in [*queries, POOL[:6]]:
            assert ix.find_matches(q) == model.overlap(q, ("primary",))
            assert ix.find_matches(q, ("primary", "host")) == model.overlap(q, ("primary", "host"))
    for w in WORKERS:
        for t in TIERS:
            assert ix.blocks(w, t) == model.held.get(w, {}).get(t, set())
    for q in queries:
        by_tier = ix.find_matches_by_tier(q)
        for w, counts in by_tier.items():
            assert counts == {
                t: model.overlap(q, TIERS[: k + 1]).get(w, 0) for k, t in enumerate(TIERS)
            }


def test_find_matches_counts_consecutive_prefix() -> None:
    ix = KvIndexer()
    ix.apply(KvEvents(instance_id="a", seq=0, events=[KvEvent("stored", [1, 2, 3, 5])]))
    ix.apply(KvEvents(instance_id="b", seq=0, events=[KvEvent("stored", [1, 2])]))
    ix.apply(KvEvents(instance_id="c", seq=0, events=[KvEvent("stored", [2, 3, 4])]))
    assert ix.find_matches([1, 2, 3, 4, 5]) == {"a": 3, "b": 2}
    assert ix.find_matches([2, 3, 4]) == {"a": 2, "b": 1, "c": 3}
    assert ix.find_matches([9, 1]) == {}
    assert ix.find_matches([]) == {}
    ix.apply(KvEvents(instance_id="a", seq=1, events=[KvEvent("removed", [2])]))
    assert ix.find_matches([1, 2, 3]) == {"a": 1, "b": 2}
    ix.remove_worker("b")
    assert ix.find_matches([1, 2, 3]) == {"a": 1}
    # A worker joining later reuses the freed bit and starts empty.
    ix.apply(KvEvents(instance_id="d", seq=0, events=[KvEvent("stored", [1])]))
    assert ix.find_matches([1, 2]) == {"a": 1, "d": 1}
    assert sorted(ix.workers()) == ["a", "c", "d"]


def test_seq_gap_duplicates_and_first_seq() -> None:
    ix = KvIndexer()
    ev = [KvEvent("stored", [1])]
    assert ix.apply(KvEvents(instance_id="a", seq=0, events=ev))
    assert ix.apply(KvEvents(instance_id="a", seq=1, events=ev))
    assert not ix.apply(KvEvents(instance_id="a", seq=1, events=ev))  # duplicate
    assert not ix.needs_resync("a") and ix.stale == 1
    assert ix.apply(KvEvents(instance_id="a", seq=3, events=[KvEvent("stored", [2])]))
    assert ix.needs_resync("a") and ix.pending_resyncs() == ["a"]
    assert ix.find_matches([1, 2]) == {"a": 2}  # a gap batch still applies
    # First heard of mid-stream: we missed its past.
    ix.apply(KvEvents(instance_id="b", seq=7, events=ev))
    assert ix.pending_resyncs() == ["a", "b"]
    ix.resync("b", [5, 6], seq=9)
    assert not ix.needs_resync("b") and ix.find_matches([5, 6]) == {"b": 2}
    assert not ix.apply(KvEvents(instance_id="b", seq=9, events=[KvEvent("cleared")]))  # in the snapshot
    assert ix.apply(KvEvents(instance_id="b", seq=10, events=[KvEvent("removed", [6])]))
    assert ix.find_matches([5, 6]) == {"b": 1} and not ix.needs_resync("b")
    # Resync without a seq: the next batch is the new baseline, whatever its seq.
    ix.resync("a", [1])
    assert ix.apply(KvEvents(instance_id="a", seq=42, events=[KvEvent("stored", [2])]))
    assert not ix.needs_resync("a")
    assert ix.apply(KvEvents(instance_id="a", seq=43, events=[]))
    assert ix.pending_resyncs() == []
    ix.mark_resync("c")
    assert ix.pending_resyncs() == ["c"]


def test_dropped_event_from_a_mocker_is_detected_and_resync_restores_the_index() -> None:
    """A real mocker's events are numbered; one batch is lost; resync from cached_block_hashes()."""

    async def main() -> None:
        eng = MockerEngine(ModelInfo(name="m", path="", context_length=4096, block_size=16),
                           speedup=0, num_blocks=60, vocab_size=500)
        ix = KvIndexer()
        counter = {"seq": 0, "drop": 3, "removed": 0}

        def sink(events: list[KvEvent]) -> None:
            counter["removed"] += sum(1 for e in events if e.kind == "removed")
            s = counter["seq"]
            counter["seq"] += 1
            if s == counter["drop"]:
                return  # lost on the wire
            ix.apply(KvEvents(instance_id="w", seq=s, events=events))

        rng = random.Random(5)

        async def traffic(n: int, tag: str) -> None:
            for i in range(n):
                prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(20, 120))]
                r = GenerateRequest(request_id=f"{tag}{i}", token_ids=prompt, stop=StopConditions(max_tokens=10))
                async for _ in eng.generate(r):
                    pass

        eng.set_kv_event_sink(sink)
        await eng.start()
        await traffic(5, "a")  # 5 requests of at most 8 blocks: no eviction yet
        assert counter["removed"] == 0
        assert ix.needs_resync("w")
        assert ix.blocks("w") < set(eng.cached_block_hashes())  # the lost batch's blocks are missing
        ix.resync("w", eng.cached_block_hashes(), seq=counter["seq"] - 1)
        assert ix.pending_resyncs() == []
        assert ix.blocks("w") == set(eng.cached_block_hashes())
        # It stays exact as events keep flowing, evictions included.
        await traffic(30, "b")
        assert counter["removed"] > 0
        assert ix.blocks("w") == set(eng.cached_block_hashes()) and not ix.needs_resync("w")
        await eng.stop()
        assert ix.blocks("w") == set()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_chained_hashes_from_kvhash() -> None:
    toks = list(range(100))
    hs = block_hashes(toks, 16)
    ix = KvIndexer()
    ix.apply(KvEvents(instance_id="a", seq=0, events=[KvEvent("stored", hs[:4])]))
    ix.apply(KvEvents(instance_id="a", seq=1, events=[KvEvent("stored", hs[4:5], hs[3])]))
    other = block_hashes(toks[:32] + [7] * 68, 16)
    assert ix.find_matches(hs) == {"a": 5}
    assert ix.find_matches(other) == {"a": 2}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_approx_indexer_ttl() -> None:
    clock = Clock()
    ax = ApproxIndexer(ttl_s=10.0, clock=clock)
    ax.record("a", [1, 2, 3])
    clock.t += 4
    ax.record("b", [1, 2])
    ax.record("a", [1])  # refreshes block 1 only
    assert ax.find_matches([1, 2, 3]) == {"a": 3, "b": 2}
    clock.t += 6.5  # a's blocks 2 and 3 are 10.5 s old
    assert ax.find_matches([1, 2, 3]) == {"a": 1, "b": 2}
    assert ax.num_blocks("a") == 1
    clock.t += 4  # b's and a's refreshed block 1 are 10.5 s old
    assert ax.find_matches([1, 2, 3]) == {}
    assert ax.num_blocks("a") == 0 and ax.num_blocks("b") == 0
    ax.record("c", [4, 5])
    ax.remove_worker("c")
    assert ax.find_matches([4]) == {}


def test_approx_indexer_capacity() -> None:
    clock = Clock()
    ax = ApproxIndexer(ttl_s=100.0, max_blocks_per_worker=4, clock=clock)
    ax.record("a", [1, 2, 3])
    ax.record("a", [10, 11, 12])
    assert ax.num_blocks("a") == 4
    assert ax.find_matches([1]) == {} and ax.find_matches([3]) == {"a": 1}
    assert ax.find_matches([10, 11, 12]) == {"a": 3}
