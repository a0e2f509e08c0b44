"""Chaos on a real stack under load: etcd and NATS restarted, hundreds of clients hanging up mid-stream,
prefill and decode workers SIGKILLed. Every request ends as a full answer or a clear OpenAI error, never a
hang; workers come back into discovery; KV blocks come back to their baseline. The last test is a short
run of bench/chaos.py (``--quick``) on the reference engine under ``dynamo-rt up``, with its invariants.

The times printed (time to recover) are figures for the report, not asserted.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dynamo_rt.local.services import EtcdServer, NatsServer
from tests.conftest import arun
from tests.reliability.helpers import (
    LoadRun,
    LoadWatch,
    Outcome,
    chat_body,
    health_instances,
    instance_ids,
    metric,
    start_stack,
    stream_chat,
    tally,
)
from tests.stack import Stack

FAST = ("mocker", "agg", "--speedup", "5")
NS = "chaos"


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


async def _pinned_requests_succeed(st: Stack, ids: set[str]) -> None:
    """One request pinned to each worker instance: each one answers (its NATS subscription is live)."""
    async with httpx.AsyncClient(timeout=20) as c:
        outs = await asyncio.gather(*(stream_chat(c, st.url, chat_body(f"pinned {iid}", 8,
                                                                        nvext={"backend_instance_id": iid}))
                                      for iid in sorted(ids)))
    assert all(o.completed and o.completion_tokens == 8 for o in outs), [o.kind() for o in outs]


async def _wait(predicate: object, timeout: float, step: float = 0.1) -> float | None:
    """Seconds until ``predicate()`` (run in a thread: it may block) holds, None if it never did."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await asyncio.to_thread(predicate):  # type: ignore[arg-type]
            return time.monotonic() - t0
        await asyncio.sleep(step)
    return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdServer, NatsServer]]:
    """A private etcd and nats-server: these tests stop, kill and wipe them."""
    d = tmp_path_factory.mktemp("chaos")
    with EtcdServer(d / "etcd") as etcd, NatsServer(d / "nats") as nats:
        yield etcd, nats


@pytest.fixture(scope="module")
def agg(servers: tuple[EtcdServer, NatsServer]) -> Iterator[tuple[Stack, set[str]]]:
    """Two aggregated mocker workers and a frontend on the private servers, shared by the tests below; each
    test leaves it whole again (all workers registered and serving)."""
    etcd, nats = servers
    st = Stack(etcd.client_url, nats.url, NS)
    try:
        start_stack(st, [FAST, FAST])
        ids = instance_ids(etcd, NS)
        assert len(ids) == 2
        yield st, ids
    finally:
        st.stop()


def test_etcd_restarted_and_wiped_during_load(servers: tuple[EtcdServer, NatsServer],
                                              agg: tuple[Stack, set[str]]) -> None:
    etcd, _ = servers
    st, ids = agg

    def all_back() -> bool:
        return instance_ids(etcd, NS) == ids and health_instances(st) == 2

    async def main() -> dict[str, Any]:
        figures: dict[str, Any] = {}
        async with LoadRun(st.url, clients=12, max_tokens=150) as load:
            await asyncio.sleep(1)
            # 1. etcd stopped for 2 s, then started on the same port with its data.
            t_stop = time.monotonic()
            await asyncio.to_thread(etcd.stop)
            await asyncio.sleep(2)
            await asyncio.to_thread(etcd.start)
            t_up = time.monotonic()
            back = await _wait(all_back, 20)
            figures["restart"] = {"down_s": round(t_up - t_stop, 2), "recover_s": _r(back),
                                  "during": tally(load.outcomes(t_stop, t_up))}
            await asyncio.sleep(0.5)
            # 2. etcd killed and started empty: the workers' leases are gone, they must register again.
            t_kill = time.monotonic()
            await asyncio.to_thread(etcd.kill)
            await asyncio.to_thread(etcd.wipe_data)
            await asyncio.to_thread(etcd.start)
            t_up2 = time.monotonic()
            back2 = await _wait(all_back, 30)
            figures["wipe"] = {"down_s": round(t_up2 - t_kill, 2), "recover_s": _r(back2),
                               "during": tally(load.outcomes(t_kill, t_up2 + (back2 or 0)))}
            t_after = time.monotonic()
            await asyncio.sleep(1)
        figures["all"] = tally(load.outcomes())
        figures["after_recovery"] = tally(load.outcomes(t_after))
        await _pinned_requests_succeed(st, ids)
        return figures

    figures = arun(main(), 120)
    print("etcd chaos:", figures)
    assert figures["restart"]["recover_s"] is not None and figures["wipe"]["recover_s"] is not None
    # NATS never went away and the frontend keeps its view of the workers while etcd is down, so no request
    # may fail while etcd merely restarts. After the wipe the model may be gone for a moment (a clear 503)
    # until the workers have registered again.
    assert set(figures["restart"]["during"]) == {"completed"}
    assert set(figures["after_recovery"]) == {"completed"}
    assert set(figures["all"]) <= {"completed", "error:503:service_unavailable"}, figures
    assert all(w.alive() for w in st.workers)


def test_nats_restarted_during_load(servers: tuple[EtcdServer, NatsServer], agg: tuple[Stack, set[str]]) -> None:
    etcd, nats = servers
    st, ids = agg

    async def probe_until_ok(timeout: float) -> float | None:
        """Seconds until a fresh short request succeeds."""
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=10) as c:
            while time.monotonic() - t0 < timeout:
                if (await stream_chat(c, st.url, chat_body("probe", 4), timeout=10)).completed:
                    return time.monotonic() - t0
                await asyncio.sleep(0.05)
        return None

    async def main() -> dict[str, Any]:
        figures: dict[str, Any] = {}
        async with LoadRun(st.url, clients=12, max_tokens=300, timeout=40) as load:
            await asyncio.sleep(1)
            t_stop = time.monotonic()
            await asyncio.to_thread(nats.stop)
            await asyncio.sleep(2)
            await asyncio.to_thread(nats.start)
            t_up = time.monotonic()
            figures["down_s"] = round(t_up - t_stop, 2)
            figures["new_request_ok_s"] = _r(await probe_until_ok(30))
            while load.completed_after(t_up) is None and time.monotonic() - t_up < 30:
                await asyncio.sleep(0.1)
            first = load.completed_after(t_up)
            figures["load_flowing_s"] = None if first is None else round(first - t_up, 2)
            t_after = time.monotonic() + 0.5
            await asyncio.sleep(2)
        figures["in_flight_at_stop"] = tally([o for t0, t1, o in load.records if t0 < t_stop < t1])
        figures["started_while_down"] = tally(load.outcomes(t_stop, t_up))
        figures["all"] = tally(load.outcomes())
        figures["after_recovery"] = tally(load.outcomes(t_after))
        figures["migrations"] = await asyncio.to_thread(metric, st, "dynamo_frontend_migrations_total")
        await _pinned_requests_succeed(st, ids)
        return figures

    figures = arun(main(), 120)
    print("NATS chaos:", figures)
    assert figures["new_request_ok_s"] is not None and figures["load_flowing_s"] is not None
    # In-flight streams either finish (moved to the other worker once NATS is back) or end with a clear 503
    # (an error body, or an SSE error event after the 200): no hang, no cut stream.
    assert set(figures["all"]) <= {"completed", "error:503:service_unavailable",
                                   "error:200:service_unavailable"}, figures
    assert set(figures["after_recovery"]) == {"completed"}
    assert instance_ids(etcd, NS) == ids and health_instances(st) == 2
    assert all(w.alive() for w in st.workers)


def test_500_clients_hang_up_mid_stream_kv_blocks_return_to_baseline(servers: tuple[EtcdServer, NatsServer],
                                                                     agg: tuple[Stack, set[str]]) -> None:
    _, nats = servers
    st, ids = agg

    async def main() -> dict[str, Any]:
        async with LoadWatch(nats.url, NS) as watch:
            idle = await watch.wait(lambda m: set(m) == ids and all(x.active_requests == 0 for x in m.values()), 10)
            assert idle, watch.latest
            baseline = {i: m.kv_blocks_used for i, m in watch.latest.items()}
            outcomes: list[Outcome] = []
            t0 = time.monotonic()
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=110)) as c:
                for wave in range(5):  # 500 clients, 100 at a time (2 cores)
                    # The first wave hangs up only once both workers have reported the blocks it holds (a
                    # report comes every second), so the check below starts from a real peak.
                    hold = asyncio.Event()
                    if wave > 0:
                        hold.set()
                    # Distinct prompts: each request holds KV blocks of its own until it is cancelled.
                    tasks = [asyncio.ensure_future(stream_chat(
                        c, st.url, chat_body(f"wave {wave} client {i} " * 8, 2000), close_after=3, timeout=20,
                        hold=hold)) for i in range(100)]
                    if wave == 0:
                        await watch.wait(lambda m: all(m[i].kv_blocks_used > baseline[i] for i in ids), 10)
                        hold.set()
                    outcomes += await asyncio.gather(*tasks)
            t_closed = time.monotonic()

            def released(m: dict[str, Any]) -> bool:
                fresh = time.time() - 1.5  # a report made after the last hang-up, not an old one
                return all(m[i].kv_blocks_used == baseline[i] and m[i].active_requests == 0 and m[i].ts > fresh
                           for i in ids)

            back = await watch.wait(released, 30)
            return {"outcomes": tally(outcomes), "baseline": baseline, "peak_seen": dict(watch.peak_used),
                    "back": back,
                    "final": {i: (m.kv_blocks_used, m.active_requests) for i, m in watch.latest.items()},
                    "open_read_close_s": round(t_closed - t0, 1),
                    "release_s": round(time.monotonic() - t_closed, 2),
                    "disconnects": await asyncio.to_thread(metric, st, "dynamo_frontend_client_disconnects_total"),
                    "inflight": await asyncio.to_thread(metric, st, "dynamo_frontend_inflight_requests")}

    figures = arun(main(), 150)
    print("500 disconnects:", figures)
    assert figures["outcomes"] == {"closed": 500}
    assert figures["back"], figures
    assert all(figures["peak_seen"][i] > figures["baseline"][i] for i in ids)  # both really held blocks
    assert figures["disconnects"] == 500 and figures["inflight"] == 0
    assert all(w.alive() for w in st.workers)


def test_prefill_and_decode_workers_sigkilled_mid_stream(etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    ns = "chaos-kill"
    st = Stack(etcd_server.client_url, nats_server.url, ns)
    # Prefill is made slow (0.5 ms a token: ~0.5 s for the 4 prompts a prefill worker gets at once), so a kill
    # lands while prompts are prefilling.
    prefill = ("mocker", "prefill", "--speedup", "1", "--prefill-ms-per-token", "0.5")
    decode = ("mocker", "decode", "--speedup", "5")
    try:
        start_stack(st, [decode, decode, prefill, prefill])
        procs = {mode: [w for w in st.workers if f"-{mode}-" in w.name] for mode in ("prefill", "decode")}
        assert [len(v) for v in procs.values()] == [2, 2]
        # Distinct prompts of ~250 tokens (well past the 64-token disaggregation threshold).
        prompt = " ".join(f"word{i}" for i in range(80))

        async def batch(tag: str, n: int, max_tokens: int, kill: object, at: float) -> list[Outcome]:
            async with httpx.AsyncClient(timeout=60) as c:
                tasks = [asyncio.ensure_future(stream_chat(c, st.url, chat_body(f"{tag} {i} {prompt}", max_tokens),
                                                           timeout=60)) for i in range(n)]
                await asyncio.sleep(at)
                kill.signal(signal.SIGKILL)  # type: ignore[attr-defined]
                return list(await asyncio.gather(*tasks))

        async def main() -> dict[str, object]:
            t0 = time.monotonic()
            a = await batch("prefill-kill", 8, 300, procs["prefill"][0], 0.25)
            t1 = time.monotonic()
            b = await batch("decode-kill", 8, 600, procs["decode"][0], 0.8)
            t2 = time.monotonic()
            return {"prefill_kill": tally(a), "decode_kill": tally(b),
                    "tokens": sorted({o.completion_tokens for o in a}) + sorted({o.completion_tokens for o in b}),
                    "prefill_kill_s": round(t1 - t0, 1),
                    "decode_kill_s": round(t2 - t1, 1),
                    "fallbacks": await asyncio.to_thread(metric, st, "dynamo_frontend_prefill_fallbacks_total"),
                    "migrations": await asyncio.to_thread(metric, st, "dynamo_frontend_migrations_total")}

        figures = arun(main(), 150)
        print("SIGKILL prefill/decode:", figures)
        assert figures["prefill_kill"] == {"completed": 8} and figures["decode_kill"] == {"completed": 8}
        assert figures["tokens"] == [300, 600]
        assert figures["fallbacks"] >= 1  # the killed prefill worker's requests were prefilled on decode
        assert figures["migrations"] >= 1  # the killed decode worker's streams moved to the other one
        assert not procs["prefill"][0].alive() and not procs["decode"][0].alive()
        assert procs["prefill"][1].alive() and procs["decode"][1].alive()
    finally:
        st.stop()


def test_kv_event_faults_drop_duplicate_and_reorder_seeded() -> None:
    """The test-only injector of the workers' KV event publisher: seeded, and each kind of fault happens."""
    from workers.common.kv_events import KvEventFaults

    assert KvEventFaults.from_env({}) is None
    f = KvEventFaults[int].from_env({"DYN_TEST_KV_EVENTS_FAULT": "drop=0.2,dup=0.2,reorder=0.2,seed=7"})
    assert f is not None
    sent = [b for i in range(200) for b in f.outgoing(i)]
    assert f.counts["drop"] > 10 and f.counts["dup"] > 10 and f.counts["reorder"] > 10, f.counts
    held = 1 if f._held is not None else 0  # a batch held back at the end has not gone out yet
    assert len(set(sent)) == 200 - f.counts["drop"] - held  # dropped batches only are missing
    assert len(sent) == len(set(sent)) + f.counts["dup"]
    pairs = list(itertools.pairwise(sent))
    assert sum(1 for a, b in pairs if b < a) == f.counts["reorder"] - held  # each held batch went out late
    assert any(a == b for a, b in pairs)  # duplicated: the same batch twice in a row
    g = KvEventFaults[int](0.2, 0.2, 0.2, seed=7)
    assert [b for i in range(200) for b in g.outgoing(i)] == sent  # same seed, same faults


def test_chaos_quick_on_the_reference_engine() -> None:
    """bench/chaos.py --quick: workers SIGKILLed and SIGSTOPped, etcd / NATS killed (``up`` restarts them),
    KV events dropped, duplicated and reordered; every request ends with a status and the fault-free text,
    blocks return to 0, the router's index equals the engines' blocks within 5 s."""
    import json
    import subprocess
    import sys

    from tests.stack import ROOT

    r = subprocess.run([sys.executable, "bench/chaos.py", "--quick", "--seed", "7"], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print({k: v for k, v in out.items() if k != "machine"})
    assert r.returncode == 0 and out["invariants_ok"], r.stdout[-4000:]
    assert out["silent"] == out["mismatched"] == out["block_leaks"] == out["index_diverged"] == 0
    assert out["baseline"] > 50 and out["ours"] == out["baseline"]
    assert sum(out["faults"].values()) >= 2 and out["kv_fault_workers"] >= 2, out
