"""Routing policies: kv cost, ties, temperature, the in-flight book (shared blocks, pending prefill), pinning,
the simple modes, metrics."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from dynamo_rt.errors import InvalidRequest, NotFound, Unavailable
from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import GenerateRequest, KvEvent, KvEvents, LoadMetrics, StopConditions
from dynamo_rt.router import ActiveRequests, ApproxIndexer, KvIndexer, Router, RouterEvents, RouterMetrics
from workers.common.engine import ModelInfo
from workers.mocker import MockerEngine

BS = 16
PROMPT = list(range(1000, 1000 + 10 * BS + 5))  # 10 full blocks + 5 tokens: 11 request blocks
HASHES = block_hashes(PROMPT, BS)


def index(**held: int) -> KvIndexer:
    """Worker -> number of leading prompt blocks it holds."""
    ix = KvIndexer()
    for w, n in held.items():
        ix.apply(KvEvents(instance_id=w, seq=0, events=[KvEvent("stored", HASHES[:n])]))
    return ix


def load(w: str, decode_blocks: int = 0, active: int = 0, waiting: int = 0, used: int = 0,
         total: int = 100) -> LoadMetrics:
    return LoadMetrics(instance_id=w, active_requests=active, waiting_requests=waiting, kv_blocks_used=used,
                       kv_blocks_total=total, active_decode_blocks=decode_blocks)


def test_kv_picks_the_lowest_cost() -> None:
    # cost = uncached blocks + active blocks + the request's own 11 new blocks (nothing is active yet).
    r = Router("kv", indexer=index(a=8, b=2), seed=0)
    d = r.select(["a", "b", "c"], PROMPT, {}, track=False)
    assert (d.worker_id, d.overlap_blocks, d.cost, d.reason, d.request_blocks, d.key) == ("a", 8, 14.0, "kv", 11, 0)
    assert r.costs(["a", "b", "c"], PROMPT, {}) == {"a": (14.0, 8), "b": (20.0, 2), "c": (22.0, 0)}
    # Load counts against overlap: a's 7 reported active blocks make b (9 + 0 + 11) cheaper than a
    # (3 + 7 + 11 = 21). (A router that never tracked a request scores by the reports.)
    loads = {"a": load("a", decode_blocks=7), "b": load("b")}
    d = r.select(["a", "b", "c"], PROMPT, loads, track=False)
    assert (d.worker_id, d.cost) == ("b", 20.0)
    # The weight scales the uncached blocks: with weight 3, a costs 9 + 7 + 11 = 27, b 27 + 11, c 33 + 11.
    r3 = Router("kv", indexer=index(a=8, b=2), overlap_weight=3.0, seed=0)
    d = r3.select(["a", "b", "c"], PROMPT, loads, track=False)
    assert (d.worker_id, d.cost) == ("a", 27.0)
    # Only listed workers are considered (the other pool's workers share the index).
    assert r.select(["b", "c"], PROMPT, {}, track=False).worker_id == "b"
    # Precomputed hashes give the same decision.
    assert r.select(["a", "b"], PROMPT, {}, block_hashes=HASHES, track=False).worker_id == "a"


def test_load_breaks_overlap_ties_and_equal_costs_are_random() -> None:
    r = Router("kv", indexer=index(a=5, b=5), seed=1)
    loads = {"a": load("a", decode_blocks=3), "b": load("b", decode_blocks=2)}
    assert {r.select(["a", "b"], PROMPT, loads, track=False).worker_id for _ in range(50)} == {"b"}
    tie = Counter(r.select(["a", "b", "c"], PROMPT, {}, track=False).worker_id for _ in range(300))
    assert set(tie) == {"a", "b"} and min(tie.values()) > 100


def test_temperature_samples_by_softmax() -> None:
    # Costs a: 1 (10 cached), b: 11 (none). T = 10 / ln 4 makes a four times as likely as b.
    ix = index(a=10)
    cold = Router("kv", indexer=ix, seed=3)
    assert {cold.select(["a", "b"], PROMPT, {}, track=False).worker_id for _ in range(100)} == {"a"}
    warm = Router("kv", indexer=ix, temperature=10 / math.log(4), seed=3)
    picks = [warm.select(["a", "b"], PROMPT, {}, track=False) for _ in range(2000)]
    n_a = sum(1 for d in picks if d.worker_id == "a")
    assert 1450 <= n_a <= 1750  # expectation 1600; the seed fixes the outcome
    assert {d.reason for d in picks} == {"kv-sampled"}


def test_in_flight_tracking_spreads_a_burst() -> None:
    r = Router("kv", seed=4)
    workers = ["a", "b", "c"]
    picks = [r.select(workers, PROMPT, {}) for _ in range(6)]
    assert Counter(d.worker_id for d in picks) == {"a": 2, "b": 2, "c": 2}
    assert r.in_flight("a") == (2, 22)
    # Same prompt twice on a: 10 shared full blocks and 2 partial ones active, 22 blocks of prefill pending
    # (no first token yet).
    assert (r.active_blocks("a", {}), r.pending_prefill("a")) == (12, 22)
    for d in picks:
        r.on_request_finished(d.worker_id, d.request_blocks, d.key)
    assert [r.in_flight(w) for w in workers] == [(0, 0)] * 3
    assert [(r.active_blocks(w, {}), r.pending_prefill(w)) for w in workers] == [(0, 0)] * 3
    # A router that tracks scores by its book, not by the once-a-second reports (they lag a burst); one
    # that never tracked a request uses the reports.
    r.on_request_started("a", 50)
    assert r.active_blocks("a", {"a": load("a", decode_blocks=80)}) == 50
    assert Router("kv").active_blocks("a", {"a": load("a", decode_blocks=80)}) == 80
    r.remove_worker("a")
    assert r.in_flight("a") == (0, 0)
    r.on_request_finished("a", 50)  # a late finish for a removed worker is ignored
    assert r.in_flight("a") == (0, 0)


SYSTEM = list(range(5000, 5000 + 8 * BS))  # a shared system prompt of 8 blocks


def chat(u: int) -> list[int]:
    """A chat on SYSTEM: 2 blocks of its own and 5 tokens (11 request blocks, 10 full)."""
    return SYSTEM + [100 + u] * (2 * BS + 5)


def test_shared_prefix_blocks_count_once() -> None:
    # a caches the system prompt and runs two chats on it (no prefill pending): 8 shared + 2 x 2 own full
    # blocks + 2 partial ones = 14 distinct active blocks, not 2 x 11 = 22.
    ix = KvIndexer()
    ix.apply(KvEvents(instance_id="a", seq=0, events=[KvEvent("stored", block_hashes(SYSTEM, BS))]))
    r = Router("kv", indexer=ix, seed=0)
    for u in (1, 2):
        r.on_request_started("a", 11, block_hashes=block_hashes(chat(u), BS))
    assert (r.active_blocks("a", {}), r.in_flight("a")) == (14, (2, 22))
    # A third chat: a = 3 uncached + 14 active + 3 new (its system blocks are active already) = 20;
    # b = 11 uncached + 0 + 11 new = 22. Counted per request (3 + 22 + 3 = 28) it would leave for b.
    assert r.costs(["a", "b"], chat(3), {}) == {"a": (20.0, 8), "b": (22.0, 0)}
    d = r.select(["a", "b"], chat(3), {})
    assert (d.worker_id, d.cost) == ("a", 20.0)
    # Booked: 17 distinct blocks and 3 pending prefill; the fourth chat costs a 3 + 3 + 17 + 3 = 26: b.
    assert (r.active_blocks("a", {}), r.pending_prefill("a")) == (17, 3)
    assert r.select(["a", "b"], chat(4), {}, track=False).worker_id == "b"
    r.on_first_token("a", d.key)
    assert r.costs(["a"], chat(4), {}) == {"a": (23.0, 8)}
    # Finishing without a key takes the oldest request of that size; the blocks it shared stay active.
    r.on_request_finished("a", 11)
    assert (r.active_blocks("a", {}), r.in_flight("a")) == (14, (2, 22))


def test_pending_prefill_ends_at_first_token_or_stored_last_block() -> None:
    ix = KvIndexer()
    r = Router("kv", indexer=ix, seed=0)
    hashes = block_hashes(PROMPT, BS)
    key = r.on_request_started("a", 11, block_hashes=hashes, prefill_blocks=11)
    other = [7] * (10 * BS + 5)  # no overlap with PROMPT
    # a: 11 uncached + 11 pending + 11 active + 11 new = 44; b: 11 + 0 + 0 + 11 = 22.
    assert r.costs(["a", "b"], other, {}) == {"a": (44.0, 0), "b": (22.0, 0)}
    r.on_first_token("a", key)
    assert r.pending_prefill("a") == 0 and r.costs(["a"], other, {}) == {"a": (33.0, 0)}
    # Without a first-token call, the worker storing the prompt's last full block ends the prefill; an
    # earlier block does not.
    key2 = r.on_request_started("a", 11, block_hashes=hashes, prefill_blocks=11)
    ix.apply(KvEvents(instance_id="a", seq=0, events=[KvEvent("stored", hashes[:9])]))
    assert r.pending_prefill("a") == 11
    ix.apply(KvEvents(instance_id="a", seq=1, events=[KvEvent("stored", hashes[9:], hashes[8])]))
    assert r.pending_prefill("a") == 0
    # A prompt with no full block has no block to wait for: its first token (or its end) ends it.
    key3 = r.on_request_started("a", 1, prefill_blocks=1)
    assert r.pending_prefill("a") == 1
    r.on_request_finished("a", 1, key3)
    r.on_request_finished("a", 11, key)
    r.on_request_finished("a", 11, key2)
    assert (r.active_blocks("a", {}), r.pending_prefill("a"), r.in_flight("a")) == (0, 0, (0, 0))


def test_active_requests_book() -> None:
    book = ActiveRequests()
    h1 = block_hashes(chat(1), BS)
    h2 = block_hashes(chat(2), BS)
    k1 = book.add("a", h1, 11, 3)
    assert book.new_blocks("a", h1, 11) == 1  # its full blocks are active; a partial one is never shared
    assert book.new_blocks("a", h2, 11) == 3  # shares the 8 system blocks, adds 2 full + 1 partial
    assert book.new_blocks("a", h2[:8], 8) == 0
    assert book.new_blocks("b", h2, 11) == 11
    k2 = book.add("a", h2, 11)
    assert (book.active_blocks("a"), book.total_blocks("a"), book.requests("a")) == (14, 22, 2)
    assert book.pending_prefill("a") == 3 and book.oldest("a", 11) == k1 and book.oldest("a", 5) is None
    assert book.finish(k1) and not book.finish(k1)
    assert (book.active_blocks("a"), book.pending_prefill("a"), book.oldest("a", 11)) == (11, 0, k2)
    book.first_token(k2)  # no prefill pending: nothing changes
    book.remove_worker("a")
    assert (book.active_blocks("a"), book.requests("a"), book.finish(k2)) == (0, 0, False)
    assert book.tracked == 2


def test_round_robin_random_least_loaded() -> None:
    rr = Router("round-robin")
    assert [rr.select(["c", "a", "b"], PROMPT, {}).worker_id for _ in range(6)] == ["a", "b", "c"] * 2
    rnd = Router("random", seed=5)
    assert set(Counter(rnd.select(["a", "b", "c"], PROMPT, {}).worker_id for _ in range(300))) == {"a", "b", "c"}
    ll = Router("least-loaded", seed=6)
    loads = {"a": load("a", active=3), "b": load("b", active=1, waiting=1, used=50),
             "c": load("c", active=2, used=10)}
    d = ll.select(["a", "b", "c"], PROMPT, loads, track=False)
    assert (d.worker_id, d.cost, d.reason) == ("c", 2.0, "least-loaded")  # equal requests: lower KV usage
    # Without reports, the router's own in-flight count spreads requests.
    seq = [ll.select(["a", "b"], PROMPT, {}).worker_id for _ in range(4)]
    assert Counter(seq) == {"a": 2, "b": 2}


def test_pinned_worker() -> None:
    r = Router("kv", indexer=index(a=4), seed=0)
    d = r.select(["a", "b"], PROMPT, {}, pinned="b")
    assert (d.worker_id, d.reason, d.overlap_blocks) == ("b", "pinned", 0)
    assert r.select(["a", "b"], PROMPT, {}, pinned="a").overlap_blocks == 4
    # Pinned requests are booked like routed ones: all 11 blocks to compute on b, 11 - 4 on a.
    assert (r.pending_prefill("a"), r.pending_prefill("b"), r.in_flight("b")) == (7, 11, (1, 11))
    rr = Router("round-robin")
    rr.select(["a"], PROMPT, {})
    assert (rr.in_flight("a"), rr.pending_prefill("a"), rr.active_blocks("a", {})) == ((1, 11), 0, 11)
    with pytest.raises(NotFound) as ei:
        r.select(["a", "b"], PROMPT, {}, pinned="zz")
    assert ei.value.param == "nvext.backend_instance_id" and ei.value.status == 404
    with pytest.raises(Unavailable):
        r.select([], PROMPT, {})
    with pytest.raises(InvalidRequest):
        Router("fastest")  # type: ignore[arg-type]


def test_approx_indexer_router_follows_its_own_decisions() -> None:
    now = [0.0]
    ax = ApproxIndexer(ttl_s=30, clock=lambda: now[0])
    r = Router("kv", indexer=ax, seed=7)
    first = r.select(["a", "b", "c"], PROMPT, {}, track=False)
    assert first.overlap_blocks == 0
    again = r.select(["a", "b", "c"], [*PROMPT, 1, 2, 3], {}, track=False)
    assert again.worker_id == first.worker_id and again.overlap_blocks == 10
    now[0] = 31.0
    assert r.select(["a", "b", "c"], PROMPT, {}, track=False).overlap_blocks == 0


def test_metrics_use_the_given_registry() -> None:
    reg = CollectorRegistry()
    m = RouterMetrics(reg)
    r = Router("kv", indexer=index(a=10), metrics=m, pool="decode", seed=0)
    for _ in range(3):
        r.select(["a", "b"], PROMPT, {}, track=False)
    assert reg.get_sample_value("dynamo_router_decisions_total", {"pool": "decode", "worker": "a"}) == 3
    assert reg.get_sample_value("dynamo_router_overlap_blocks_sum", {"pool": "decode"}) == 30
    assert reg.get_sample_value("dynamo_router_overhead_seconds_count", {"pool": "decode"}) == 3
    # Two pools share one metrics object.
    Router("round-robin", metrics=m, pool="prefill").select(["p"], PROMPT, {})
    assert reg.get_sample_value("dynamo_router_decisions_total", {"pool": "prefill", "worker": "p"}) == 1
    r.remove_worker("a")
    assert reg.get_sample_value("dynamo_router_decisions_total", {"pool": "decode", "worker": "a"}) is None
    # Nothing went to the process-wide default registry.
    assert prometheus_client.REGISTRY.get_sample_value("dynamo_router_decisions_total",
                                                       {"pool": "decode", "worker": "a"}) is None


def test_router_events_decode_and_load_ttl() -> None:
    from dynamo_rt.protocol import encode

    now = [0.0]
    ev = RouterEvents(load_ttl_s=5, clock=lambda: now[0])
    assert ev.on_kv_events(encode(KvEvents(instance_id="a", seq=0, events=[KvEvent("stored", HASHES[:3])])))
    assert not ev.on_kv_events(b"\xc1garbage") and ev.malformed == 1
    assert ev.indexer.find_matches(HASHES) == {"a": 3}
    assert ev.on_load(encode(load("a", decode_blocks=4)))
    assert not ev.on_load(b"\x00") and ev.malformed == 2
    assert ev.loads() == {"a": load("a", decode_blocks=4)}
    now[0] = 6.0
    assert ev.loads() == {}
    ev.on_kv_events(KvEvents(instance_id="b", seq=5, events=[]))
    assert ev.pending_resyncs() == ["b"]
    ev.resync("b", HASHES[:1], seq=5)
    assert ev.pending_resyncs() == [] and ev.indexer.find_matches(HASHES) == {"a": 3, "b": 1}
    ev.remove_worker("a")
    assert ev.indexer.find_matches(HASHES) == {"b": 1}


def test_kv_routing_over_real_mockers() -> None:
    """Two mockers publish events into one index; a repeated prefix goes to the worker that cached it."""

    async def main() -> None:
        info = ModelInfo(name="m", path="", context_length=4096, block_size=BS)
        engines = {w: MockerEngine(info, speedup=0, vocab_size=5000, num_blocks=200) for w in ("w1", "w2")}
        events = RouterEvents()
        for w, e in engines.items():
            e.set_kv_event_sink(events.sink(w))
            await e.start()
        router = Router("kv", indexer=events.indexer, seed=8)
        system = [7] * 64  # a shared system prompt of 4 blocks
        loads = {w: _load(w, e) for w, e in engines.items()}
        # A burst of six conversations before any event: in-flight counting spreads them 3 / 3.
        placed = {u: router.select(list(engines), system + [100 + u] * 40, loads) for u in range(6)}
        assert Counter(d.worker_id for d in placed.values()) == {"w1": 3, "w2": 3}
        assert sum(router.pending_prefill(w) for w in engines) == 6 * 7  # 7 uncached blocks each
        for u, d in placed.items():
            r = GenerateRequest(request_id=str(u), token_ids=system + [100 + u] * 40,
                                stop=StopConditions(max_tokens=4))
            _ = [o async for o in engines[d.worker_id].generate(r)]
            # The engine's "stored" event for the prompt's last full block ended the prefill in the book.
            assert router.pending_prefill(d.worker_id) == sum(
                p.request_blocks for v, p in placed.items() if v > u and p.worker_id == d.worker_id)
            router.on_request_finished(d.worker_id, d.request_blocks, d.key)
        # Each conversation's next turn goes where its prefix is, and the engine confirms the hit.
        for u in range(6):
            prompt = system + [100 + u] * 40 + [9] * 20
            d = router.select(list(engines), prompt, {w: _load(w, e) for w, e in engines.items()})
            assert d.worker_id == placed[u].worker_id and d.overlap_blocks == 6
            r = GenerateRequest(request_id=f"t{u}", token_ids=prompt, stop=StopConditions(max_tokens=4))
            outs = [o async for o in engines[d.worker_id].generate(r)]
            assert outs[0].cached_tokens == 16 * d.overlap_blocks
            router.on_request_finished(d.worker_id, d.request_blocks)
        for e in engines.values():
            await e.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def _load(w: str, e: MockerEngine) -> LoadMetrics:
    ld = e.load()
    return LoadMetrics(instance_id=w, active_requests=ld.active_requests, waiting_requests=ld.waiting_requests,
                       kv_blocks_used=ld.kv_blocks_used, kv_blocks_total=ld.kv_blocks_total,
                       active_decode_blocks=ld.active_decode_blocks)
