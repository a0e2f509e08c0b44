"""frontend/http1.py, the builtin HTTP/1.1 server, over real loopback sockets: exact bytes of what it answers
(keep-alive, pipelining, chunked and 100-continue request bodies, HEAD, HTTP/1.0, malformed and oversized
requests), the client's disconnect reaching the response, a client that stops reading, and shutdown ending a
stream with its tail. (The whole frontend runs on it in every other frontend test; the same streams under
uvicorn: tests/frontend/test_sse_direct.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from frontend import http1, sse
from frontend.app import cancel_on_disconnect
from tests.conftest import arun

DATE = re.compile(rb"date: [^\r]+\r\n")


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with method, path, query and body (two body messages, so the response is chunked)."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] == "/boom":
        raise RuntimeError("boom")
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] == "/sized":
        out = b"sized " + body
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"%b %b?%b " % (scope["method"].encode(),
                scope["path"].encode(), scope["query_string"]), "more_body": True})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[tuple[http1.Server, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = http1.Server(app)
    await server.start(sock)
    try:
        yield server, sock.getsockname()[1]
    finally:
        await server.shutdown(grace=0.5)


async def exchange(port: int, data: bytes, *, then: bytes = b"") -> bytes:
    """Send ``data`` (then ``then``), read until the server closes; the date header removed."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    if then:
        await asyncio.sleep(0.05)
        w.write(then)
    out = await asyncio.wait_for(r.read(), 10)
    w.close()
    return DATE.sub(b"", out)


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n"


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    arun(_keep_alive_and_pipelined_requests_are_answered_in_order(), 90)


async def _keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async with serving(echo) as (_, port):
        got = await exchange(port, b"POST /a%20b?x=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\nabc"
                                   b"GET /second HTTP/1.1\r\nhost: h\r\n\r\n",
                             then=b"GET /third HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
    assert got == (OK + b"\r\n" + chunked(b"POST /a b?x=1 ", b"abc")
                   + OK + b"\r\n" + chunked(b"GET /second? ")
                   + OK + b"connection: close\r\n\r\n" + chunked(b"GET /third? "))


def test_chunked_body_and_expect_100_continue() -> None:
    arun(_chunked_body_and_expect_100_continue(), 90)


async def _chunked_body_and_expect_100_continue() -> None:
    async with serving(echo) as (_, port):
        got = await exchange(port, b"POST /c HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\nconnection: close"
                                   b"\r\n\r\n" + chunked(b"hello ", b"world"))
        assert got == OK + b"connection: close\r\n\r\n" + chunked(b"POST /c? ", b"hello world")
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /e HTTP/1.1\r\nhost: h\r\nexpect: 100-continue\r\ncontent-length: 4\r\nconnection: close"
                b"\r\n\r\n")
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b"body")
        assert DATE.sub(b"", await asyncio.wait_for(r.read(), 5)) == (
            OK + b"connection: close\r\n\r\n" + chunked(b"POST /e? ", b"body"))
        w.close()


def test_head_sized_bodies_and_http10() -> None:
    arun(_head_sized_bodies_and_http10(), 90)


async def _head_sized_bodies_and_http10() -> None:
    async with serving(echo) as (_, port):
        assert await exchange(port, b"HEAD /x HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n") == (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n")
        assert await exchange(port, b"POST /sized HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\nconnection: close"
                                    b"\r\n\r\nab") == (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\nconnection: close\r\n\r\nsized ab")
        # HTTP/1.0 has no chunked encoding: the body ends where the connection does
        assert await exchange(port, b"GET /old HTTP/1.0\r\n\r\n") == (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nGET /old? ")


def error(status: int, reason: bytes, message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": status}})
    return (b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
            % (status, reason, len(body), body))


def test_a_body_shorter_than_its_content_length_closes_the_connection() -> None:
    arun(_a_body_shorter_than_its_content_length_closes_the_connection(), 30)


async def _a_body_shorter_than_its_content_length_closes_the_connection() -> None:
    async def short(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"abc"})

    async with serving(short) as (_, port):
        # keep-alive asked for, and a second request behind it: the framing is broken, so neither happens
        got = await exchange(port, b"GET /a HTTP/1.1\r\nhost: h\r\n\r\nGET /b HTTP/1.1\r\nhost: h\r\n\r\n")
    assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"  # then closed: /b is not answered


def test_malformed_and_oversized_requests_get_json_errors_and_a_close() -> None:
    arun(_malformed_and_oversized_requests_get_json_errors_and_a_close(), 90)


async def _malformed_and_oversized_requests_get_json_errors_and_a_close() -> None:
    async with serving(echo) as (_, port):
        assert await exchange(port, b"NOT HTTP AT ALL\r\n\r\n") == error(
            400, b"Bad Request", "invalid HTTP request: Invalid method encountered")
        big = b"GET / HTTP/1.1\r\nhost: h\r\nx-big: " + b"a" * (http1.MAX_HEADER_BYTES + 10) + b"\r\n\r\n"
        assert await exchange(port, big) == error(
            431, b"Request Header Fields Too Large",
            f"the request's header block is over the limit of {http1.MAX_HEADER_BYTES} bytes")
        # an app that fails before answering: a 500 in the same shape (the server's own catch-all)
        assert await exchange(port, b"GET /boom HTTP/1.1\r\nhost: h\r\n\r\n") == error(
            500, b"Internal Server Error", "internal error")


def test_idle_keep_alive_connections_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    arun(_idle_keep_alive_connections_are_closed(monkeypatch), 90)


async def _idle_keep_alive_connections_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "KEEP_ALIVE", 0.2)
    async with serving(echo) as (server, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /k HTTP/1.1\r\nhost: h\r\n\r\n")
        got = await asyncio.wait_for(r.read(), 5)  # returns when the server closes the idle connection
        assert DATE.sub(b"", got) == OK + b"\r\n" + chunked(b"GET /k? ")
        assert not server.connections
        w.close()


def test_the_clients_disconnect_reaches_the_response_without_a_watcher_task() -> None:
    arun(_the_clients_disconnect_reaches_the_response_without_a_watcher_task(), 90)


async def _the_clients_disconnect_reaches_the_response_without_a_watcher_task() -> None:
    seen: dict[str, Any] = {}
    started = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        watcher = cancel_on_disconnect(receive, lambda: seen.setdefault("gone", True))
        seen["watcher"] = type(watcher).__name__
        await send({"type": "http.response.start", "status": 200, "headers": []})
        w = sse.writer_for(send)
        assert w is not None
        w.write(b"data: 1\n\n")
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise
        finally:
            watcher.cancel()

    async with serving(app) as (server, port):
        tasks_before = len(asyncio.all_tasks())
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /s HTTP/1.1\r\nhost: h\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        assert len(asyncio.all_tasks()) == tasks_before + 1  # the request's task, nothing watching receive()
        head = await asyncio.wait_for(r.readuntil(b"data: 1\n\n\r\n"), 5)
        assert head.endswith(b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        w.close()
        for _ in range(200):
            if not server.tasks:
                break
            await asyncio.sleep(0.01)
        assert seen == {"watcher": "_Unregister", "gone": True, "cancelled": True}
        assert not server.tasks and not server.connections


def test_a_client_that_stops_reading_gets_every_chunk_in_order() -> None:
    arun(_a_client_that_stops_reading_gets_every_chunk_in_order(), 90)


async def _a_client_that_stops_reading_gets_every_chunk_in_order() -> None:
    """Writes from plain code while the client reads nothing: they pile up in the transport (counted as
    deferred once it is over its high-water mark), the response's end waits for the drain, all arrive."""
    n, size = 2000, 4096  # 8 MB: more than loopback's socket buffers
    seen: dict[str, int] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        w = sse.writer_for(send)
        assert w is not None and not w.busy
        for i in range(n):
            w.write((b"%06d" % i) * (size // 6) + b"\n")
        seen["direct"], seen["deferred"] = w.direct, w.deferred
        await w.drain()
        w.close()
        await send({"type": "http.response.body", "body": b"end\n"})

    async with serving(app) as (_, port):
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        w.write(b"GET / HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        await asyncio.sleep(0.3)  # not reading
        raw = await asyncio.wait_for(r.read(), 30)
        w.close()
    _, _, body = raw.partition(b"\r\n\r\n")
    out = bytearray()
    while True:
        line, _, body = body.partition(b"\r\n")
        length = int(line, 16)
        if not length:
            break
        out += body[:length]
        body = body[length + 2:]
    want = b"".join((b"%06d" % i) * (size // 6) + b"\n" for i in range(n)) + b"end\n"
    assert bytes(out) == want
    assert seen["direct"] + seen["deferred"] == n and seen["deferred"] > 0


def test_shutdown_cancels_a_stream_in_flight_which_still_ends_with_its_tail() -> None:
    arun(_shutdown_cancels_a_stream_in_flight_which_still_ends_with_its_tail(), 90)


async def _shutdown_cancels_a_stream_in_flight_which_still_ends_with_its_tail() -> None:
    started = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await send({"type": "http.response.body", "body": b"data: error\n\ndata: [DONE]\n\n"})
            raise

    async with serving(app) as (server, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(server.shutdown(grace=0.1), 10)
        got = DATE.sub(b"", await asyncio.wait_for(r.read(), 5))
        w.close()
        assert got == (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                       + chunked(b"data: first\n\n", b"data: error\n\ndata: [DONE]\n\n"))
        with pytest.raises(OSError):  # the listening socket is closed
            await asyncio.open_connection("127.0.0.1", port)


def test_an_upgrade_request_is_answered_over_http11_unless_it_has_a_body() -> None:
    arun(_an_upgrade_request_is_answered_over_http11(), 30)


async def _an_upgrade_request_is_answered_over_http11() -> None:
    async with serving(echo) as (_, port):
        got = await exchange(port, b"GET /u HTTP/1.1\r\nhost: h\r\nconnection: Upgrade, HTTP2-Settings\r\n"
                                   b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
                             then=b"GET /after HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        assert got == (OK + b"\r\n" + chunked(b"GET /u? ") + OK + b"connection: close\r\n\r\n"
                       + chunked(b"GET /after? "))
        # The parser would hand an Upgrade request's body over as upgrade data: refused, not answered bodiless
        got = await exchange(port, b"POST /u HTTP/1.1\r\nhost: h\r\nconnection: Upgrade\r\nupgrade: h2c\r\n"
                                   b"content-length: 3\r\n\r\nabc")
        assert got == error(400, b"Bad Request", "protocol upgrade is not supported on a request with a body")
