"""Disaggregated prefill/decode with the KV cache handed over NIXL: real reference-engine worker processes,
real NIXL (UCX, CMA on this host), real etcd and NATS. Greedy fp32 on the tiny model.

That a request was handed over is read from the workers' own counters (``dynamo_worker_kv_*`` on their
/metrics): the decode worker counts one pull per handed-over request and a fallback for each prompt it had to
prefill itself; the prefill worker counts the pins released. Every block pulled is checked against the prefill
worker's CRC-32 (``--kv-verify-checksum``), so a transfer that moved wrong bytes cannot pass as a pull.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from dynamo_rt.discovery import DiscoveryView, Registry
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import Data, Final, GenerateRequest, SamplingParams, StopConditions, decode_load, encode
from dynamo_rt.transport import Transport, load_subject
from tests.conftest import arun
from tests.stack import Stack
from tests.workermetrics import KvCounts, kv_counts, metrics_port, wait_kv

MODEL = "dynamo-tiny"
LENGTHS = [3, 15, 16, 17, 32, 48, 100, 400]
THRESHOLD = 8  # the frontend's --disagg-threshold: shorter prompts are prefilled on the decode worker
KV_FLAGS = ("--metrics-port", "0", "--kv-verify-checksum")


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
    dis.add_worker("reference", "prefill", "--kv-cache-blocks", "1024", *KV_FLAGS)
    dis.add_worker("reference", "decode", "--kv-cache-blocks", "1024", *KV_FLAGS)
    dis.start_frontend("--router-mode", "kv", "--disagg-threshold", str(THRESHOLD))
    try:
        agg.wait_ready(1)
        dis.wait_ready(2)
        yield agg, dis
    finally:
        agg.stop()
        dis.stop()


def _ports(st: Stack) -> tuple[int, int]:
    """The metrics ports of the stack's (prefill, decode) workers."""
    (pre,) = [w for w in st.workers if "-prefill-" in w.name]
    (dec,) = [w for w in st.workers if "-decode-" in w.name]
    return metrics_port(pre.output), metrics_port(dec.output)


def _handed_over(st: Stack, before: tuple[KvCounts, KvCounts], n: int) -> KvCounts:
    """Asserts that exactly ``n`` more requests went prefill -> NIXL pull -> decode since ``before``: as many
    pulls (checksums verified), pins released and pull timings, no failure, no fallback, no pin expired."""
    pre_port, dec_port = _ports(st)
    pre0, dec0 = before
    dec = kv_counts(dec_port)
    pre = wait_kv(pre_port, lambda c: c.pins_released >= pre0.pins_released + n)
    assert dec.pulls - dec0.pulls == n, (dec0, dec)
    assert dec.pull_timings - dec0.pull_timings == n and (dec.pulled_bytes > dec0.pulled_bytes or n == 0)
    assert (dec.failures, dec.fallbacks) == (dec0.failures, dec0.fallbacks) == (0, 0), dec
    assert pre.pins_released - pre0.pins_released == n and pre.pins_expired == 0, pre
    return dec


def _block_bytes() -> int:
    """One KV block of the tiny model in fp32: layers x 16 tokens x (K, V) x KV heads x head dim x 4 bytes."""
    cfg = json.loads((ensure_tiny_model() / "config.json").read_text())
    return int(cfg["num_hidden_layers"] * 16 * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4)


def _counts(st: Stack) -> tuple[KvCounts, KvCounts]:
    pre_port, dec_port = _ports(st)
    return kv_counts(pre_port), kv_counts(dec_port)


def test_disagg_equals_agg_for_many_lengths(stacks: tuple[Stack, Stack]) -> None:
    agg, dis = stacks
    before = _counts(dis)
    for n in LENGTHS:
        p = prompt_ids(n, salt=n)  # nothing of it cached on the decode worker: all of it is uncached
        a, d = complete(agg, p), complete(dis, p)
        assert d["choices"][0]["text"] == a["choices"][0]["text"], n  # type: ignore[index]
        assert d["usage"]["completion_tokens"] == 12  # type: ignore[index]
    # Every prompt at or past the threshold was handed over NIXL; the 3-token one was prefilled on decode.
    dec = _handed_over(dis, before, sum(n >= THRESHOLD for n in LENGTHS))
    # What a pull moves: whole blocks of the pool.
    blocks = sum(-(-n // 16) for n in LENGTHS if n >= THRESHOLD)
    assert dec.pulled_bytes - before[1].pulled_bytes == blocks * _block_bytes()


def test_disagg_equals_agg_under_32_concurrent_requests(stacks: tuple[Stack, Stack]) -> None:
    agg, dis = stacks

    async def run(st: Stack) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*[
                c.post(st.url + "/v1/completions", json={"model": MODEL, "prompt": prompt_ids(20 + 13 * i, salt=i),
                                                         "max_tokens": 10, "temperature": 0}) for i in range(32)])
        return [r.json()["choices"][0]["text"] for r in rs]

    before = _counts(dis)
    assert arun(run(dis), 180) == arun(run(agg), 180)
    _handed_over(dis, before, 32)


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
    pre = st.add_worker("reference", "prefill", "--kv-cache-blocks", "256", *KV_FLAGS)
    dec = st.add_worker("reference", "decode", "--kv-cache-blocks", "256", *KV_FLAGS)
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
        # The decode worker counted it: one failed pull, one prompt prefilled locally, nothing pulled.
        c = kv_counts(metrics_port(dec.output))
        assert (c.pulls, c.failures, c.fallbacks, c.pull_timings) == (0, 1, 1, 0), c
    finally:
        st.stop()


def test_unclaimed_pin_is_freed_by_timeout(etcd_server: object, nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "dpin")  # type: ignore[attr-defined]
    pre = st.add_worker("reference", "prefill", "--kv-cache-blocks", "256", "--pin-timeout", "2", *KV_FLAGS)
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
        # The blocks were freed by the timeout (counted before the load that showed them free went out).
        c = kv_counts(metrics_port(pre.output))
        assert (c.pins_expired, c.pins_released) == (1, 0), c
    finally:
        st.stop()


def test_corrupted_block_is_caught_by_its_checksum_and_recomputed(etcd_server: object, nats_server: object) -> None:
    """The decode worker's test-only fault hook flips a byte of the first block it received in its next pull:
    the CRC-32 check catches it, the pull counts as failed, the prompt is prefilled locally and the answer is
    exact; the next pull is clean."""
    st = Stack(etcd_server.client_url, nats_server.url, "dcrc")  # type: ignore[attr-defined]
    pre = st.add_worker("reference", "prefill", "--kv-cache-blocks", "256", *KV_FLAGS)
    dec = st.add_worker("reference", "decode", "--kv-cache-blocks", "256", *KV_FLAGS, "--test-fault-kv-corrupt", "1")
    try:
        subjects = _wait_instances(etcd_server.client_url, "dcrc", {"prefill", "decode"})  # type: ignore[attr-defined]

        async def handed_over(t: Transport, rid: str, tokens: list[int]) -> tuple[list[int], list[int]]:
            """(tokens over prefill -> pull -> decode, tokens of the same request prefilled on decode first,
            so that what the pull brought cannot have leaked into the reference through the prefix cache)."""
            base = {"token_ids": tokens, "sampling": SamplingParams(temperature=0),
                    "stop": StopConditions(max_tokens=10, ignore_eos=True), "model": MODEL}
            local, _ = await _call(t, subjects["decode"], GenerateRequest(request_id=f"{rid}-l", **base))  # type: ignore[arg-type]
            _, pf = await _call(t, subjects["prefill"], GenerateRequest(request_id=f"{rid}-p", prefill_only=True,
                                                                         **base))  # type: ignore[arg-type]
            assert pf.kv_transfer is not None and len(pf.kv_transfer.opaque["block_crc32"]) == 5
            got, fin = await _call(t, subjects["decode"], GenerateRequest(
                request_id=f"{rid}-d", kv_transfer=pf.kv_transfer, **base))  # type: ignore[arg-type]
            assert fin.finish_reason == "length"
            return got, local

        async def main() -> list[tuple[list[int], list[int]]]:
            t = Transport(nats_server.url)  # type: ignore[attr-defined]
            await t.connect()
            try:
                return [await handed_over(t, "bad", prompt_ids(70, salt=31)),
                        await handed_over(t, "good", prompt_ids(70, salt=32))]
            finally:
                await t.close()

        bad, good = arun(main(), 90)
        assert bad[0] == bad[1] and len(bad[0]) == 10
        assert good[0] == good[1] and len(good[0]) == 10
        c = kv_counts(metrics_port(dec.output))
        assert (c.pulls, c.failures, c.fallbacks) == (1, 1, 1) and c.failure_reasons == {"checksum": 1}, c
        assert c.pulled_bytes == 5 * _block_bytes()
        p = wait_kv(metrics_port(pre.output), lambda c: c.pins_released >= 2)
        assert (p.pins_released, p.pins_expired) == (2, 0), p
    finally:
        st.stop()


def _wait_instances(etcd_url: str, ns: str, modes: set[str], timeout: float = 90) -> dict[str, str]:
    subjects: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while set(subjects) != modes and time.monotonic() < deadline:
        subjects = arun(_instances(etcd_url, ns), 30)
        time.sleep(0.3)
    assert set(subjects) == modes, subjects
    return subjects
