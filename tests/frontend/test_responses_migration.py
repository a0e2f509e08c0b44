"""/v1/responses and /v1/messages migrate like chat: a worker SIGKILLed mid-stream costs their clients nothing
(real etcd, NATS, two mocker workers and a frontend; the official SDKs as clients).

The translated endpoints run on the chat path in process, so a request on the killed worker resumes on the
other one and ends as an undisturbed one does: every token, the length finish, no error event.
"""

from __future__ import annotations

import asyncio
import signal

import anthropic
import openai

from tests.conftest import arun
from tests.stack import Stack

MODEL = "dynamo-tiny"
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


def test_worker_killed_mid_stream(etcd_server: object, nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "endpoints-mig")  # type: ignore[attr-defined]
    a = st.add_worker("mocker", "agg", "--speedup", "5", "--served-model-name", MODEL)
    b = st.add_worker("mocker", "agg", "--speedup", "5", "--served-model-name", MODEL)
    st.start_frontend("--migration-limit", "3")
    try:
        st.wait_ready(n_instances=2)
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
    finally:
        st.stop()
