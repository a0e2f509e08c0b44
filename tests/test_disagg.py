"""Disaggregated prefill/decode with the KV cache handed over NIXL: real reference-engine worker processes,
real NIXL (UCX, CMA on this host), real etcd and NATS. Greedy fp32 on the tiny model."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from dynamo_rt.discovery import DiscoveryView, Registry
from dynamo_rt.protocol import Data, Final, GenerateRequest, SamplingParams, StopConditions, decode_load, encode
from dynamo_rt.transport import Transport, load_subject
from tests.conftest import arun
from tests.stack import Stack

MODEL = "dynamo-tiny"
LENGTHS = [3, 15, 16, 17, 32, 48, 100, 400]


def prompt_ids(n: int, salt: int = 0) -> list[int]:
    return [7 + (i * 31 + salt * 17) % 2000 for i in range(n)]


def complete(st: Stack, prompt: list[int], max_tokens: int = 12) -> dict[str, object]:
    r = httpx.post(st.url + "/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def stacks(etcd_server: object, nats_server: object) -> Iterator[tuple[Stack, Stack]]:
    agg = Stack(etcd_server.client_url, nats_server.url, "dagg")  # type: ignore[attr-defined]
    agg.add_worker("reference", "agg", "--kv-cache-blocks", "1024")
    agg.start_frontend()
    dis = Stack(etcd_server.client_url, nats_server.url, "ddis")  # type: ignore[attr-defined]
    dis.add_worker("reference", "prefill", "--kv-cache-blocks", "1024")
    dis.add_worker("reference", "decode", "--kv-cache-blocks", "1024")
    dis.start_frontend("--router-mode", "kv", "--disagg-threshold", "8")
    try:
        agg.wait_ready(1)
        dis.wait_ready(2)
        yield agg, dis
    finally:
        agg.stop()
        dis.stop()


def _fallbacks(st: Stack) -> float:
    for line in httpx.get(st.url + "/metrics").text.splitlines():
        if line.startswith("dynamo_frontend_prefill_fallbacks_total"):
            return float(line.split()[-1])
    return 0.0


def test_disagg_equals_agg_for_many_lengths(stacks: tuple[Stack, Stack]) -> None:
    agg, dis = stacks
    for n in LENGTHS:
        p = prompt_ids(n)
        a, d = complete(agg, p), complete(dis, p)
        assert d["choices"][0]["text"] == a["choices"][0]["text"], n  # type: ignore[index]
        assert d["usage"]["completion_tokens"] == 12  # type: ignore[index]
    assert _fallbacks(dis) == 0, "every request should have been handed over NIXL"


def test_disagg_equals_agg_under_32_concurrent_requests(stacks: tuple[Stack, Stack]) -> None:
    agg, dis = stacks

    async def run(st: Stack) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*[
                c.post(st.url + "/v1/completions", json={"model": MODEL, "prompt": prompt_ids(20 + 13 * i, salt=i),
                                                         "max_tokens": 10, "temperature": 0}) for i in range(32)])
        return [r.json()["choices"][0]["text"] for r in rs]

    assert arun(run(dis), 180) == arun(run(agg), 180)
    assert _fallbacks(dis) == 0


def test_prefix_cache_hit_on_decode_side(stacks: tuple[Stack, Stack]) -> None:
    agg, dis = stacks
    p = prompt_ids(100, salt=99)
    first = complete(dis, p)
    time.sleep(0.3)  # the decode worker's KV events reach the router
    again = complete(dis, p)
    assert again["choices"][0]["text"] == first["choices"][0]["text"] == complete(agg, p)["choices"][0]["text"]  # type: ignore[index]
    # The pulled blocks are cached on the decode worker: the repeat prefills locally from its cache.
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 96  # type: ignore[index]


async def _used_blocks(nats_url: str, ns: str, seconds: float) -> dict[str, int]:
    t = Transport(nats_url)
    await t.connect()
    used: dict[str, int] = {}

    def on_load(data: bytes, subject: str) -> None:
        lm = decode_load(data)
        used[lm.instance_id] = lm.kv_blocks_used

    await t.subscribe(load_subject(ns, MODEL), on_load)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (len(used) < 2 or any(used.values())):
        await asyncio.sleep(0.2)
    await t.close()
    return used


def test_blocks_return_to_baseline_after_load_and_cancellations(stacks: tuple[Stack, Stack],
                                                               nats_server: object) -> None:
    _, dis = stacks

    async def cancel_some() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            for i in range(6):
                async with c.stream("POST", dis.url + "/v1/completions", json={
                        "model": MODEL, "prompt": prompt_ids(60, salt=200 + i), "max_tokens": 400,
                        "stream": True}) as r:
                    lines = r.aiter_lines()
                    for _ in range(3):
                        await lines.__anext__()
                # closed mid-stream

    arun(cancel_some(), 60)
    used = arun(_used_blocks(nats_server.url, "ddis", 15), 30)  # type: ignore[attr-defined]
    assert len(used) == 2 and all(v == 0 for v in used.values()), used


async def _instances(etcd_url: str, ns: str) -> dict[str, str]:
    reg = Registry(etcd_url, ns)
    await reg.start()
    view = DiscoveryView(reg)
    await view.start()
    out = {r.mode.value: r.subject for r in view.instances().values()}
    await view.close()
    await reg.close()
    return out


async def _call(t: Transport, subject: str, req: GenerateRequest) -> tuple[list[int], Final]:
    stream = await t.call(subject, req.request_id, encode(req), timeout=60)
    ids: list[int] = []
    async for frame in stream:
        if isinstance(frame, Data):
            ids.extend(frame.token_ids)
        else:
            return ids, frame
    raise AssertionError("no final frame")


def test_prefill_killed_between_prefill_and_pull_completes_locally(etcd_server: object,
                                                                   nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "dkill")  # type: ignore[attr-defined]
    pre = st.add_worker("reference", "prefill", "--kv-cache-blocks", "256")
    st.add_worker("reference", "decode", "--kv-cache-blocks", "256")
    try:
        subjects: dict[str, str] = {}
        deadline = time.monotonic() + 90
        while len(subjects) < 2 and time.monotonic() < deadline:
            subjects = arun(_instances(etcd_server.client_url, "dkill"), 30)  # type: ignore[attr-defined]
            time.sleep(0.3)
        assert set(subjects) == {"prefill", "decode"}

        async def main() -> tuple[list[int], list[int], float]:
            t = Transport(nats_server.url)  # type: ignore[attr-defined]
            await t.connect()
            try:
                tokens = prompt_ids(70, salt=5)
                base = {"token_ids": tokens, "sampling": SamplingParams(temperature=0),
                        "stop": StopConditions(max_tokens=10), "model": MODEL}
                _, pf = await _call(t, subjects["prefill"], GenerateRequest(request_id="p1", prefill_only=True,
                                                                             **base))  # type: ignore[arg-type]
                assert pf.kv_transfer is not None and pf.kv_transfer.block_ids
                pre.signal(signal.SIGKILL)  # the prefill worker dies holding the pinned blocks
                pre.proc.wait()
                t0 = time.monotonic()
                got, fin = await _call(t, subjects["decode"], GenerateRequest(
                    request_id="d1", kv_transfer=pf.kv_transfer, **base))  # type: ignore[arg-type]
                took = time.monotonic() - t0
                local, _ = await _call(t, subjects["decode"], GenerateRequest(request_id="d2", **base))  # type: ignore[arg-type]
                assert fin.finish_reason == "length"
                return got, local, took
            finally:
                await t.close()

        got, local, took = arun(main(), 90)
        assert got == local and len(got) == 10
        assert took < 10, f"the failed pull must fail fast, took {took:.1f}s"
    finally:
        st.stop()


def test_unclaimed_pin_is_freed_by_timeout(etcd_server: object, nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "dpin")  # type: ignore[attr-defined]
    st.add_worker("reference", "prefill", "--kv-cache-blocks", "256", "--pin-timeout", "2")
    try:
        subjects: dict[str, str] = {}
        deadline = time.monotonic() + 90
        while not subjects and time.monotonic() < deadline:
            subjects = arun(_instances(etcd_server.client_url, "dpin"), 30)  # type: ignore[attr-defined]
            time.sleep(0.3)

        async def main() -> tuple[int, int]:
            t = Transport(nats_server.url)  # type: ignore[attr-defined]
            await t.connect()
            used: list[int] = []
            await t.subscribe(load_subject("dpin", MODEL), lambda d, s: used.append(decode_load(d).kv_blocks_used))
            try:
                _, pf = await _call(t, subjects["prefill"], GenerateRequest(
                    request_id="p", token_ids=prompt_ids(64), sampling=SamplingParams(temperature=0),
                    stop=StopConditions(max_tokens=5), model=MODEL, prefill_only=True))
                assert pf.kv_transfer is not None
                pinned = len(pf.kv_transfer.block_ids)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 1.5 and not (used and used[-1] > 0):
                    await asyncio.sleep(0.1)
                held = used[-1] if used else -1
                t0 = time.monotonic()
                while time.monotonic() - t0 < 8 and (not used or used[-1] != 0):
                    await asyncio.sleep(0.2)
                assert used and used[-1] == 0, used
                return pinned, held
            finally:
                await t.close()

        pinned, held = arun(main(), 60)
        assert pinned == 4 and held == 4
    finally:
        st.stop()
