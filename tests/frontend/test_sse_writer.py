"""frontend.sse.DirectWriter under a real uvicorn server and real sockets: chunks written from plain code go
out at once while the client reads, and when it stops reading (uvicorn's flow control makes ``send`` wait)
the writes queue behind the waiting send and still arrive complete and in order."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import uvicorn

from dynamo_rt.local.services import free_port
from frontend import sse

CHUNK = 4096
CHUNKS = 2000  # 8 MB: more than loopback's socket buffers (~3 MB here) and uvicorn's 64 KiB write buffer


def _body(i: int) -> bytes:
    return (b"%06d" % i) * (CHUNK // 6) + b"\n"


async def _serve(port: int, seen: dict[str, Any]) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        w = sse.writer_for(send)
        assert w is not None
        for i in range(CHUNKS):  # all from plain code, as the NATS frame callback writes
            w.write(_body(i))
        seen["busy_after_writes"] = w.busy
        await w.drain()
        seen["direct"], seen["deferred"] = w.direct, w.deferred
        w.close()
        await send({"type": "http.response.body", "body": b"end\n", "more_body": False})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", http="httptools",
                                           log_config=None, access_log=False))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task


def _get(port: int, pause: float) -> bytes:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    time.sleep(pause)
    buf = bytearray()
    while chunk := s.recv(1 << 20):
        buf += chunk
    s.close()
    return bytes(buf)


def _dechunk(raw: bytes) -> bytes:
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    out = bytearray()
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += rest[:size]
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]


def test_writes_wait_behind_a_paused_send_and_arrive_in_order() -> None:
    async def main() -> None:
        port = free_port()
        seen: dict[str, Any] = {}
        server, task = await _serve(port, seen)
        try:
            raw = await asyncio.to_thread(_get, port, 1.0)  # reads nothing for a second
        finally:
            server.should_exit = True
            await task
        assert _dechunk(raw) == b"".join(_body(i) for i in range(CHUNKS)) + b"end\n"
        assert seen["busy_after_writes"] is True  # the server's send did wait: the deferred path ran
        assert seen["direct"] > 0 and seen["deferred"] > 0 and seen["direct"] + seen["deferred"] == CHUNKS

    asyncio.run(main())


def test_writer_only_under_servers_whose_send_finishes_without_a_task() -> None:
    async def other_send(message: Any) -> None:
        await asyncio.sleep(0)

    assert sse.writer_for(other_send) is None
