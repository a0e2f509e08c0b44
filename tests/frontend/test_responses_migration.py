"""/v1/responses and /v1/messages share the chat path's request lifetime: a client that leaves mid-stream
cancels the worker request, and a worker SIGKILLed mid-stream costs their clients nothing (real etcd, NATS,
two mocker workers and a frontend; the official SDKs as clients).

The translated endpoints run on the chat path in process, so a request on the killed worker resumes on the
other one and ends as an undisturbed one does: every token, the length finish, no error event.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from dynamo_rt.protocol import decode_load
from dynamo_rt.transport import Transport, load_subject
from tests.conftest import arun
from tests.stack import Stack

MODEL = "dynamo-tiny"
NS = "endpoints-mig"
N_TOKENS = 1500  # ~3 s per request at speedup 5: long enough to be cut by the kill


async def _responses(url: str, prompt: str, started: asyncio.Queue[str]) -> tuple[str, str, int]:
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=90)
    text, status, out_tokens = "", "", 0
    async for e in await c.responses.create(model=MODEL, input=prompt, max_output_tokens=N_TOKENS,
                                            temperature=0, stream=True):
        assert e.type not in ("error", "response.failed"), e
        if e.type == "response.output_text.delta":
            if not text:
                started.put_nowait(prompt)
            text += e.delta
        elif e.type in ("response.completed", "response.incomplete"):
            status = e.response.status or ""
            assert e.response.usage is not None
            out_tokens = e.response.usage.output_tokens
    return text, status, out_tokens


async def _messages(url: str, prompt: str, started: asyncio.Queue[str]) -> tuple[str, str, int]:
    c = anthropic.AsyncAnthropic(base_url=url, api_key="none", max_retries=0, timeout=90)
    text = ""
    async with c.messages.stream(model=MODEL, max_tokens=N_TOKENS,
                                 messages=[{"role": "user", "content": prompt}]) as s:
        async for piece in s.text_stream:
            if not text:
                started.put_nowait(prompt)
            text += piece
        final = await s.get_final_message()
    return text, final.stop_reason or "", final.usage.output_tokens


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, NS)  # type: ignore[attr-defined]
    st.add_worker("mocker", "agg", "--speedup", "5", "--served-model-name", MODEL)
    st.add_worker("mocker", "agg", "--speedup", "5", "--served-model-name", MODEL)
    st.start_frontend("--migration-limit", "3")
    try:
        st.wait_ready(n_instances=2)
        yield st
    finally:
        st.stop()


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/responses", {"model": MODEL, "input": "go", "max_output_tokens": 3000, "stream": True}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 3000, "stream": True,
                      "messages": [{"role": "user", "content": "go"}]}),
])
def test_client_disconnect_cancels_worker_request(stack: Stack, nats_server: object, path: str,
                                                  body: dict[str, object]) -> None:
    before = stack.metric("dynamo_frontend_client_disconnects_total")

    async def main() -> None:
        t = Transport(nats_server.url)  # type: ignore[attr-defined]
        await t.connect()
        active: dict[str, int] = {}

        def on_load(data: bytes, subject: str) -> None:
            lm = decode_load(data)
            active[lm.instance_id] = lm.active_requests

        await t.subscribe(load_subject(NS, MODEL), on_load)
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("POST", stack.url + path, json=body) as r:
                    assert r.status_code == 200
                    lines = r.aiter_lines()  # held: dropping it would close the connection at once
                    for _ in range(12):
                        await lines.__anext__()
                    deadline = time.monotonic() + 5
                    while not any(active.values()) and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    assert any(active.values()), "the request should be running on a worker"
                # Closed here: the client went away mid-stream (3000 tokens take ~6 s).
            deadline = time.monotonic() + 10
            while any(active.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert not any(active.values()), f"worker still running the request: {active}"
        finally:
            await t.close()

    arun(main(), 60)
    assert stack.metric("dynamo_frontend_client_disconnects_total") == before + 1
    assert stack.metric("dynamo_frontend_inflight_requests") == 0


def test_worker_killed_mid_stream(stack: Stack) -> None:
    """Last in this module: it kills one of the two workers."""
    st = stack
    a, b = st.workers
    prompts = [f"request {i}" for i in range(4)]

    async def main() -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
        started: asyncio.Queue[str] = asyncio.Queue()
        rs = [asyncio.ensure_future(_responses(st.url, p, started)) for p in prompts]
        ms = [asyncio.ensure_future(_messages(st.url, p, started)) for p in prompts]
        for _ in range(len(rs) + len(ms)):  # every stream is under way: the kill cuts them mid-stream
            await started.get()
        a.signal(signal.SIGKILL)  # about half of the requests run there
        return list(await asyncio.gather(*rs)), list(await asyncio.gather(*ms))

    responses, messages = arun(main(), 120)
    assert st.metric("dynamo_frontend_migrations_total") >= 1
    assert b.alive()
    for text, status, out_tokens in responses:
        assert status == "incomplete" and out_tokens == N_TOKENS and text
    for text, reason, out_tokens in messages:
        assert reason == "max_tokens" and out_tokens == N_TOKENS and text
