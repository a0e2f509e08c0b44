"""Overload and limits on a real stack: a bounded queue per model (429 + Retry-After past it), per-request
deadlines, body-size and prompt-length limits. Every refusal is an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import arun
from tests.reliability.helpers import MODEL, Outcome, chat_body, start_stack, stream_chat, tally
from tests.stack import Stack

CONCURRENCY = 2
QUEUE = 2
DEADLINE = 6.0  # --request-timeout
SHORT = 1000  # tokens: ~2 s at --speedup 5; a queued one ends ~4 s after it arrived, inside the deadline
LONG = 3800  # tokens: ~7.6 s at --speedup 5, past it


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "overload")  # type: ignore[attr-defined]
    try:
        start_stack(st, [("mocker", "agg", "--speedup", "5")],
                    ["--max-concurrency", str(CONCURRENCY), "--max-queue", str(QUEUE),
                     "--request-timeout", str(DEADLINE), "--max-body-bytes", "65536"])
        yield st
    finally:
        st.stop()


def test_overload_gets_429_with_retry_after_and_accepted_requests_complete(stack: Stack) -> None:
    n = 12

    async def queued_gauge(c: httpx.AsyncClient) -> float:
        text = (await c.get(stack.url + "/metrics")).text
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("dynamo_frontend_queued_requests{"))

    async def main() -> tuple[list[Outcome], Outcome, float, float]:
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(timeout=30, limits=limits) as c:
            # Half streaming, half not: admission is the same for both.
            tasks = [asyncio.ensure_future(stream_chat(c, stack.url, chat_body(f"burst {i}", SHORT,
                                                                              stream=i % 2 == 0)))
                     for i in range(n)]
            seen = 0.0  # the queue gauge while the first two run (bounded: they take ~2 s)
            for _ in range(30):
                seen = await queued_gauge(c)
                if seen == QUEUE:
                    break
                await asyncio.sleep(0.05)
            burst = await asyncio.gather(*tasks)
            after = await stream_chat(c, stack.url, chat_body("after the burst", 16))
            return list(burst), after, seen, await queued_gauge(c)

    burst, after, queued_seen, queued_after = arun(main(), 90)
    print("overload outcomes:", tally(burst), "latencies of accepted:",
          sorted(round(o.latency, 2) for o in burst if o.completed))
    # All 12 arrive while the first two run (~2 s each): 2 run, 2 wait, 8 are refused at once.
    assert tally(burst) == {"completed": CONCURRENCY + QUEUE, "error:429:rate_limit_error": n - CONCURRENCY - QUEUE}
    for o in burst:
        if o.status == 429:
            assert o.headers["retry-after"] == "1"
            assert o.error is not None and o.error["code"] == "overloaded" and o.error["param"] is None
            assert o.error["message"] == (f"model '{MODEL}' is over capacity: {CONCURRENCY} running and "
                                          f"{QUEUE} queued; retry later")
        else:  # accepted: the whole answer, not a deadline error
            assert (o.finish_reason, o.completion_tokens) == ("length", SHORT)
    # The queue shows in /metrics while it is full, and slots and queue places were all given back.
    assert (queued_seen, queued_after) == (QUEUE, 0)
    assert after.completed and after.completion_tokens == 16


def test_request_past_its_deadline_ends_with_a_timeout_error(stack: Stack) -> None:
    async def main() -> tuple[Outcome, Outcome]:
        async with httpx.AsyncClient(timeout=30) as c:
            streamed, unary = await asyncio.gather(
                stream_chat(c, stack.url, chat_body("long streamed", LONG)),
                stream_chat(c, stack.url, chat_body("long unary", LONG, stream=False)))
        return streamed, unary

    streamed, unary = arun(main(), 60)
    print(f"deadline {DEADLINE}s: streamed ended after {streamed.latency:.2f}s with {streamed.chunks} chunks, "
          f"unary after {unary.latency:.2f}s")
    # Streaming: the 200 went out with the first token, so the deadline is an SSE error event, then [DONE].
    assert streamed.status == 200 and streamed.done and streamed.finish_reason is None
    assert streamed.error is not None and streamed.error["type"] == "timeout" and streamed.error["code"] == "timeout"
    assert 0 < streamed.chunks < LONG
    # Non-streaming: a 504 with the OpenAI body.
    assert unary.status == 504 and unary.error is not None
    assert (unary.error["type"], unary.error["code"]) == ("timeout", "timeout")


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """Status line + headers, and the body (by its Content-Length), from a raw socket (its timeout bounds it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(ln.split(b":", 1)[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the response body"
        body += chunk
    return head, body


def test_body_and_prompt_limits(stack: Stack) -> None:
    def post(path: str, body: object) -> httpx.Response:
        return httpx.post(stack.url + path, content=json.dumps(body), timeout=30,
                          headers={"content-type": "application/json"})

    big = chat_body("x" * 70_000, 4, stream=False)
    r = post("/v1/chat/completions", big)
    assert r.status_code == 413
    assert r.json() == {"error": {"message": f"request body of {len(json.dumps(big))} bytes is over the limit "
                                             "of 65536", "type": "invalid_request_error", "param": None,
                                  "code": "request_too_large"}}
    # A body declared far too big is refused before it is read (not buffered first: that would let one
    # client fill the frontend's memory). The answer must come while the client is still sending.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\ncontent-type: application/json\r\n"
                     b"content-length: 10000000000\r\n\r\n" + b" " * 100_000)
        head, body = _read_response(sock)
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body)["error"]["message"] == "request body of 10000000000 bytes is over the limit of 65536"
    # Without a Content-Length (chunked), the limit holds while reading.
    r = httpx.post(stack.url + "/v1/chat/completions", content=(b"x" * 10_000 for _ in range(10)), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A prompt longer than the model's context, and one that fits but leaves no room for max_tokens.
    r = post("/v1/completions", {"model": MODEL, "prompt": [100 + i % 500 for i in range(4100)], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post("/v1/completions", {"model": MODEL, "prompt": [100 + i % 500 for i in range(4000)],
                                 "max_tokens": 200})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("context_length_exceeded", "max_tokens")
    # Right under the limits the same shapes are served.
    r = post("/v1/completions", {"model": MODEL, "prompt": [100 + i % 500 for i in range(4000)], "max_tokens": 96})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 96
