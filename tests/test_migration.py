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


def test_seeded_sampling_is_not_migrated_and_fails_cleanly(etcd_server: object, nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "mig2")  # type: ignore[attr-defined]
    a = st.add_worker("mocker", "agg", "--speedup", "5")
    st.add_worker("mocker", "agg", "--speedup", "5")
    st.start_frontend()
    try:
        st.wait_ready(n_instances=2)

        async def one(i: int) -> list[str]:
            body = {"model": "dynamo-tiny", "messages": [{"role": "user", "content": f"r{i}"}], "max_tokens": 1500,
                    "temperature": 0.8, "seed": 7, "stream": True}
            lines = []
            async with httpx.AsyncClient(timeout=60) as c, c.stream("POST", st.url + "/v1/chat/completions",
                                                                   json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
            return lines

        async def main() -> list[list[str]]:
            tasks = [asyncio.ensure_future(one(i)) for i in range(4)]
            await asyncio.sleep(0.8)
            a.signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

        results = arun(main(), 60)
        errors = [json.loads(ls[-2])["error"] for ls in results if '"error"' in ls[-2]]
        assert errors, "requests on the killed worker must end with an error event"
        for e in errors:
            assert e["type"] == "service_unavailable"
            assert "cannot be moved to another worker because it samples with a seed" in e["message"]
        assert all(ls[-1] == "[DONE]" for ls in results)
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
