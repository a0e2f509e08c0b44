"""Request migration: a worker SIGKILLed mid-stream costs the client nothing (real processes)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx

from tests.conftest import arun
from tests.stack import Stack


async def _stream(url: str, body: dict[str, object]) -> tuple[str, list[dict[str, object]]]:
    events: list[dict[str, object]] = []
    text = ""
    async with httpx.AsyncClient(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            events.append(ev)
            if ev["choices"]:
                text += ev["choices"][0]["delta"].get("content") or ""
    return text, events


def test_agg_worker_killed_mid_stream_requests_complete(etcd_server: object, nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "mig")  # type: ignore[attr-defined]
    a = st.add_worker("mocker", "agg", "--speedup", "5")
    b = st.add_worker("mocker", "agg", "--speedup", "5")
    st.start_frontend("--migration-limit", "3")
    try:
        st.wait_ready(n_instances=2)
        n_tokens = 1500  # ~3 s per request at speedup 5

        async def main() -> list[tuple[str, list[dict[str, object]]]]:
            body = {"model": "dynamo-tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": n_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            tasks = [asyncio.ensure_future(_stream(st.url, {**body, "messages": [
                {"role": "user", "content": f"request {i}"}]})) for i in range(6)]
            await asyncio.sleep(0.8)
            a.signal(signal.SIGKILL)  # half of the requests run there
            t0 = time.monotonic()
            out = await asyncio.gather(*tasks)
            print(f"all requests done {time.monotonic() - t0:.1f}s after the kill")
            return out

        results = arun(main(), 90)
        for _text, events in results:
            usage = events[-1]["usage"]
            assert usage["completion_tokens"] == n_tokens  # type: ignore[index]
            finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
            assert [f for f in finishes if f] == ["length"]
        assert b.alive()
        assert st.metric("dynamo_frontend_migrations_total") >= 1
    finally:
        st.stop()


def test_seeded_penalised_requests_migrate_and_equal_a_fault_free_run(etcd_server: object,
                                                                      nats_server: object) -> None:
    """Seeded, penalised requests used to end with "cannot be moved to another worker"; now the new worker
    gets ``output_offset`` and continues the same outputs (the mocker's are a function of the prompt before
    the offset and the position), so each stream equals the same request's fault-free run."""
    st = Stack(etcd_server.client_url, nats_server.url, "mig2")  # type: ignore[attr-defined]
    a = st.add_worker("mocker", "agg", "--speedup", "5")
    st.add_worker("mocker", "agg", "--speedup", "5")
    st.start_frontend("--migration-limit", "3")
    try:
        st.wait_ready(n_instances=2)

        def body(i: int) -> dict[str, object]:
            return {"model": "dynamo-tiny", "messages": [{"role": "user", "content": f"r{i}"}], "max_tokens": 1500,
                    "temperature": 0.8, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.2,
                    "logprobs": True, "stream": True, "stream_options": {"include_usage": True}}

        def lps(events: list[dict[str, object]]) -> list[object]:
            return [c for e in events if e["choices"] and e["choices"][0].get("logprobs")  # type: ignore[index]
                    for c in e["choices"][0]["logprobs"]["content"]]  # type: ignore[index]

        async def main() -> tuple[list[tuple[str, list[dict[str, object]]]], ...]:
            clean = await asyncio.gather(*(_stream(st.url, body(i)) for i in range(4)))
            tasks = [asyncio.ensure_future(_stream(st.url, body(i))) for i in range(4)]
            await asyncio.sleep(0.8)
            a.signal(signal.SIGKILL)
            return clean, await asyncio.gather(*tasks)

        clean, faulted = arun(main(), 90)
        for (text0, ev0), (text1, ev1) in zip(clean, faulted, strict=True):
            assert ev1[-1]["usage"]["completion_tokens"] == 1500  # type: ignore[index]
            assert text1 == text0
            assert lps(ev1) == lps(ev0) and len(lps(ev0)) == 1500
        assert st.metric("dynamo_frontend_migrations_total") >= 1
    finally:
        st.stop()


def test_stalled_only_worker_is_retried_not_503(etcd_server: object, nats_server: object) -> None:
    """The only worker stalls (SIGSTOP) past the frontend's idle timeout but keeps its lease: the frontend
    gives up on that stream, and with every worker excluded it retries the same worker instead of answering
    503; after SIGCONT the request completes with all its tokens."""
    st = Stack(etcd_server.client_url, nats_server.url, "mig3")  # type: ignore[attr-defined]
    a = st.add_worker("mocker", "agg", "--speedup", "5")
    st.start_frontend("--migration-limit", "3")
    try:
        st.wait_ready(n_instances=1)
        n_tokens = 1500

        async def main() -> tuple[str, list[dict[str, object]]]:
            body = {"model": "dynamo-tiny", "messages": [{"role": "user", "content": "stall"}],
                    "max_tokens": n_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            task = asyncio.ensure_future(_stream(st.url, body))
            await asyncio.sleep(0.8)
            a.signal(signal.SIGSTOP)
            await asyncio.sleep(6.5)  # > the 5 s idle timeout, < the 10 s lease
            a.signal(signal.SIGCONT)
            return await task

        _text, events = arun(main(), 90)
        usage = events[-1]["usage"]
        assert usage["completion_tokens"] == n_tokens  # type: ignore[index]
        assert a.alive()
        assert st.metric("dynamo_frontend_migrations_total") >= 1
    finally:
        st.stop()
