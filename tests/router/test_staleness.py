"""The KV router's watch on workers whose KV events never arrive (dynamo_rt/router/staleness.py): a worker that
finishes prefills of prompts it did not hold, and is not heard from, makes the kv mode choose by load, visibly
(reason, gauge, counter), until its events arrive again."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import KvEvent, KvEvents
from dynamo_rt.router import KvIndexer, Router, RouterMetrics

PROMPT = list(range(100, 164))  # 4 full blocks of 16


def _router() -> tuple[Router, KvIndexer, CollectorRegistry]:
    reg = CollectorRegistry()
    ix = KvIndexer()
    r = Router("kv", indexer=ix, metrics=RouterMetrics(reg), seed=1)
    assert r.events is not None
    r.events.grace = 0.05
    return r, ix, reg


def _serve(r: Router, worker: str, prompt: list[int]) -> None:
    d = r.select(["a", "b"], prompt, {}, pinned=worker)
    r.on_first_token(worker, d.key)
    r.on_request_finished(worker, d.request_blocks, d.key)


def test_silent_worker_turns_stale_and_routing_falls_back_to_load() -> None:
    r, ix, reg = _router()
    # Worker a publishes: it holds the prompt's prefix, so kv routing sends the prompt there.
    ix.apply(KvEvents(instance_id="a", seq=0, events=[KvEvent(kind="stored",
                                                              block_hashes=block_hashes(PROMPT, 16))]))
    assert {r.select(["a", "b"], PROMPT, {}).worker_id for _ in range(8)} == {"a"}
    # Worker b serves two prompts it did not hold and says nothing.
    _serve(r, "b", [7] * 40)
    assert r.stale_workers() == []  # one request is not enough to call it silent
    _serve(r, "b", [8] * 40)
    assert r.stale_workers() == []  # nor before the grace period has passed
    time.sleep(0.06)
    assert r.stale_workers() == ["b"]
    assert reg.get_sample_value("dynamo_router_kv_events_stale", {"pool": "agg", "worker": "b"}) == 1
    decisions = [r.select(["a", "b"], PROMPT, {}) for _ in range(40)]
    for d in decisions:
        assert d.reason == "kv-events-stale"
        r.on_request_finished(d.worker_id, d.request_blocks, d.key)
    chosen = [d.worker_id for d in decisions]
    assert 10 <= chosen.count("b") <= 30, chosen  # spread by load (ties at random), not all to a
    assert reg.get_sample_value("dynamo_router_kv_stale_fallbacks_total", {"pool": "agg"}) == 40
    # b's events arrive: it recovers, the prefix routes to where it is cached again.
    ix.apply(KvEvents(instance_id="b", seq=0, events=[KvEvent(kind="stored", block_hashes=[1])]))
    assert r.stale_workers() == []
    assert reg.get_sample_value("dynamo_router_kv_events_stale", {"pool": "agg", "worker": "b"}) == 0
    d = r.select(["a", "b"], PROMPT, {})
    assert (d.worker_id, d.reason) == ("a", "kv")


def test_a_worker_that_publishes_is_never_stale() -> None:
    r, ix, _ = _router()
    for seq in range(6):
        prompt = [seq + 1] * 40
        d = r.select(["a", "b"], prompt, {}, pinned="b")
        ix.apply(KvEvents(instance_id="b", seq=seq, events=[KvEvent(kind="stored",
                                                                    block_hashes=block_hashes(prompt, 16))]))
        r.on_first_token("b", d.key)
        r.on_request_finished("b", d.request_blocks, d.key)
        time.sleep(0.03)
    time.sleep(0.06)
    assert r.stale_workers() == []
    # Fully cached prompts owe no events either.
    for _ in range(3):
        _serve(r, "b", [1] * 32)
    time.sleep(0.06)
    assert r.stale_workers() == []
