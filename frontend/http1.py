"""The frontend's HTTP/1.1 server: a lean ASGI server (http scope only) on httptools and asyncio transports.

Why not uvicorn: on the token path every SSE chunk is one ASGI ``send`` (a dict, a coroutine, uvicorn's state
checks, a ``b"".join``) and every request carries uvicorn's per-connection and per-cycle objects plus a
task that waits on ``receive`` for the client's disconnect. The floor measured on a 2-core box
(``bench/_http_floor.py``) is 34-36 us per SSE event and 0.14 ms per request written straight to the
transport, against 42-48 us and 0.24-0.35 ms through uvicorn's ``send``. This server keeps ASGI for every
route (FastAPI serves all but the two completion routes) and adds two shortcuts that the frontend uses when
it finds them (:func:`frontend.sse.writer_for`, :func:`frontend.app.cancel_on_disconnect`):

- :meth:`Request.writer`: a body writer that frames a chunk and hands it to the transport in a plain call;
- :meth:`Request.on_disconnect`: a callback when the client goes away, instead of a task blocked on ``receive``.

HTTP: keep-alive (5 s idle), pipelining (answered in order), chunked and ``Content-Length`` request bodies,
``Expect: 100-continue``, HEAD, HTTP/1.0 (close-delimited bodies); a malformed request or oversized header block
gets the OpenAI-style JSON error (400 / 431) and the connection is closed. Flow control both ways: reading
pauses while a request body waits to be consumed; ``send`` waits while the client's socket is full (the writer
queues in the transport's buffer, bounded by the response itself). ``--http-server uvicorn`` (frontend.main)
serves the same app with uvicorn instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import httptools
import orjson

log = logging.getLogger(__name__)

KEEP_ALIVE = 5.0  # seconds an idle connection is kept open
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; past it: 431
BODY_HIGH_WATER = 64 * 1024  # unconsumed request body bytes before reading pauses

_REASONS = {200: b"OK", 204: b"No Content", 307: b"Temporary Redirect", 400: b"Bad Request", 401: b"Unauthorized",
            403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 413: b"Content Too Large",
            422: b"Unprocessable Content", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            499: b"Client Closed Request", 500: b"Internal Server Error", 503: b"Service Unavailable",
            504: b"Gateway Timeout"}
_date = [0, b""]  # second, b"date: ...\r\n": one header line formatted per second, not per response


def _date_line() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date[1]  # type: ignore[return-value]


def _error_bytes(status: int, message: str, close: bool = True) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": status}})
    return (b"HTTP/1.1 %d %b\r\n%bcontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b"
            % (status, _REASONS.get(status, b""), _date_line(), len(body),
               b"connection: close\r\n" if close else b"", body))


class Request:
    """One request/response cycle on a connection: its ASGI ``receive`` and ``send``."""

    __slots__ = ("_body", "_body_done", "_chunked", "_conn", "_continue", "_head", "_head_out", "_listeners",
                 "_reported", "_started", "_unsent", "_waiters", "complete", "keep_alive", "scope", "task")

    def __init__(self, conn: _Connection, scope: dict[str, Any], keep_alive: bool, expect_continue: bool) -> None:
        self._conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self._continue = expect_continue  # "100 Continue" still owed when the app first reads the body
        self._head = scope["method"] == "HEAD"
        self._body: collections.deque[bytes] = collections.deque()
        self._body_done = False  # the parser saw the body's end
        self._reported = False  # ... and receive() said so
        self._waiters: list[asyncio.Future[None]] = []  # receive() calls waiting for body or disconnect
        self._started = False
        self._head_out: bytes | None = None  # the response's status line and headers, not written yet
        self._chunked = False
        self._unsent = 0  # bytes of a declared Content-Length not written yet
        self.complete = False  # the response's last byte is written
        self._listeners: list[Callable[[], None]] | None = None
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ from the connection

    def _feed(self, data: bytes) -> None:
        self._body.append(data)
        self._wake()

    def _end_body(self) -> None:
        self._body_done = True
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
            self._waiters.clear()

    def _disconnected(self) -> None:
        self._wake()
        listeners, self._listeners = self._listeners, None
        for cb in listeners or ():
            try:
                cb()
            except Exception:
                log.exception("disconnect callback failed")

    # ------------------------------------------------------------------ ASGI

    async def receive(self) -> dict[str, Any]:
        conn = self._conn
        while True:
            if self._body:
                body = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                conn.resume_reading()
                self._reported = self._body_done
                return {"type": "http.request", "body": body, "more_body": not self._body_done}
            if self._body_done and not self._reported:
                self._reported = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if conn.closed or self.complete:
                return {"type": "http.disconnect"}
            if not self._body_done:
                if self._continue:
                    self._continue = False
                    conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                conn.resume_reading()
            # else: the body was read; what comes next is the client's disconnect (or the response's end)
            w = conn.server.loop.create_future()
            self._waiters.append(w)
            await w

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        conn = self._conn
        if kind == "http.response.body":
            if not self._started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body after the response's end")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if conn.closed:
                pass
            elif self._head:
                if not more and self._head_out is not None:
                    self._write(b"")
            elif self._chunked:
                if more:
                    if body:
                        self._write(b"%x\r\n%b\r\n" % (len(body), body))
                else:
                    self._write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n")
            elif body or not more:
                self._write(body)
                self._unsent -= len(body)
            if not more:
                self.complete = True
                if self._unsent and not self._head:  # not the Content-Length it declared: the framing is lost
                    self.keep_alive = False
                conn.response_done(self)
            elif conn.write_paused:
                await conn.drain()
        elif kind == "http.response.start":
            if self._started:
                raise RuntimeError("http.response.start sent twice")
            self._started = True
            status = message["status"]
            out = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"")), _date_line()]
            length = False
            for name, value in message.get("headers", ()):
                lname = name.lower()
                if lname == b"content-length":
                    length = True
                    self._unsent = int(value) if value.isdigit() else -1
                elif lname == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
                    continue
                elif lname == b"transfer-encoding":
                    continue
                out += (name, b": ", value, b"\r\n")
            if length or status in (204, 304) or status < 200:
                pass
            elif self.scope["http_version"] == "1.0":
                self.keep_alive = False  # the body ends where the connection does
            else:
                self._chunked = not self._head
                if self._chunked:
                    out.append(b"transfer-encoding: chunked\r\n")
            if not self.keep_alive:
                out.append(b"connection: close\r\n")
            out.append(b"\r\n")
            # The head goes out with the first body bytes when they follow in this turn of the event loop
            # (an SSE stream's role chunk, a JSON body): one write, one syscall less per request.
            self._head_out = b"".join(out)
            conn.server.loop.call_soon(self._flush_head)
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r}")

    def _write(self, data: bytes) -> None:
        head = self._head_out
        if head is not None:
            self._head_out = None
            data = head + data
        self._conn.transport.write(data)

    def _flush_head(self) -> None:
        if self._head_out is not None and not self._conn.closed:
            self._write(b"")

    # ------------------------------------------------------------------ shortcuts for the frontend

    def writer(self) -> Writer | None:
        """A plain-call body writer for a started chunked response (None otherwise: use ``send``)."""
        if not self._started or not self._chunked or self.complete:
            return None
        return Writer(self)

    def on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (once) when the client goes away before the response ends; returns a function that
        takes the registration back."""
        if self._conn.closed:
            asyncio.get_running_loop().call_soon(callback)
            return _noop
        if self._listeners is None:
            self._listeners = []
        self._listeners.append(callback)
        listeners = self._listeners

        def remove() -> None:
            with contextlib.suppress(ValueError):
                listeners.remove(callback)

        return remove


def _noop() -> None:
    pass


class Writer:
    """:class:`frontend.sse.DirectWriter`'s interface over :class:`Request`: a chunk goes to the transport in
    the caller's call. When the client's socket is full it still goes to the transport's buffer (counted as
    ``deferred``; the response's own ``send`` then waits for the buffer to drain), so nothing queues here."""

    __slots__ = ("_req", "deferred", "direct")

    busy = False  # never a send in progress behind the writer's back

    def __init__(self, req: Request) -> None:
        self._req = req
        self.direct = 0
        self.deferred = 0

    def write(self, body: bytes) -> None:
        if body:  # an empty chunk would end a chunked body
            self.write3(body, b"", b"")

    def write3(self, a: bytes, b: bytes, c: bytes) -> None:
        """``write(a + b + c)``, framed in one step."""
        req = self._req
        conn = req._conn
        if conn.closed or req.complete:
            return
        req._write(b"%x\r\n%b%b%b\r\n" % (len(a) + len(b) + len(c), a, b, c))
        if conn.write_paused:
            self.deferred += 1
        else:
            self.direct += 1

    async def drain(self) -> None:
        conn = self._req._conn
        if conn.write_paused and not conn.closed:
            await conn.drain()

    def close(self) -> None:
        from frontend import sse

        sse.stats["direct"] += self.direct
        sse.stats["deferred"] += self.deferred
        self.direct = self.deferred = 0


class _Connection(asyncio.Protocol):
    __slots__ = ("_drain_waiters", "_header_bytes", "_headers", "_idle", "_parsing", "_peer", "_pipeline",
                 "_reading_paused", "_url", "closed", "current", "parser", "server", "transport", "write_paused")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self.current: Request | None = None  # the request being answered
        self._pipeline: collections.deque[Request] = collections.deque()  # parsed, waiting their turn
        self._parsing: Request | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._idle: asyncio.TimerHandle | None = None
        self._peer: Any = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._peer = transport.get_extra_info("peername")
        self.server.connections.add(self)
        self._idle = self.server.loop.call_later(KEEP_ALIVE, self._idle_close)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade (h2c, websocket) is ignored: the request is answered over HTTP/1.1
        except httptools.HttpParserError as exc:  # our callbacks' exceptions come wrapped in it
            if isinstance(exc.__context__, _UpgradeWithBody):
                self._reject(400, "protocol upgrade is not supported on a request with a body")
            elif isinstance(exc.__context__, _TooLarge) or self._header_bytes > MAX_HEADER_BYTES:
                self._reject(431, f"the request's header block is over the limit of {MAX_HEADER_BYTES} bytes")
            else:
                self._reject(400, f"invalid HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()
        req = self.current
        if req is not None and not req.complete:
            req._disconnected()
        for r in self._pipeline:
            r._disconnected()
        self._pipeline.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    async def drain(self) -> None:
        w = self.server.loop.create_future()
        self._drain_waiters.append(w)
        await w

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._url = b""
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = httptools.parse_url(self._url)
        version = parser.get_http_version()
        raw_path = url.path
        sock = self.server
        scope = {"type": "http", "asgi": _ASGI, "http_version": version, "server": sock.address,
                 "client": self._peer, "scheme": "http",
                 "method": parser.get_method().decode("ascii"), "root_path": "",
                 "path": unquote(raw_path.decode("ascii")) if b"%" in raw_path else raw_path.decode("ascii"),
                 "raw_path": raw_path, "query_string": url.query or b"", "headers": self._headers, "state": {},
                 "extensions": {}}
        expect = False
        for n, v in self._headers:
            if n == b"expect":
                expect = v.lower() == b"100-continue"
            elif n == b"upgrade" and parser.should_upgrade() and any(
                    (h == b"content-length" and x.strip() != b"0") or h == b"transfer-encoding"
                    for h, x in self._headers):
                # The parser hands what follows an Upgrade request's head over as upgrade data: its body
                # would never reach the app.
                raise _UpgradeWithBody
        req = Request(self, scope, parser.should_keep_alive() and not self.server.stopping, expect)
        self._parsing = req
        if self.current is None:
            self._start(req)
        else:
            self._pipeline.append(req)
            self.pause_reading()  # no more until the requests before it are answered

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is None:
            return
        req._feed(body)
        if req is self.current and sum(map(len, req._body)) > BODY_HIGH_WATER:
            self.pause_reading()

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        if req is not None:
            req._end_body()

    # ------------------------------------------------------------------ requests

    def _start(self, req: Request) -> None:
        self.current = req
        req.task = self.server.loop.create_task(self._run(req))
        self.server.tasks.add(req.task)
        req.task.add_done_callback(self.server.tasks.discard)

    async def _run(self, req: Request) -> None:
        try:
            await self.server.app(req.scope, req.receive, req.send)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("unhandled error in the ASGI app")
            if not req._started and not self.closed:
                self.transport.write(_error_bytes(500, "internal error"))
            if not req.complete:
                req.complete = True
                self._close()
            if not isinstance(exc, Exception):
                raise
        else:
            if not req.complete:  # the app returned without ending its response
                req.complete = True
                if not req._started and not self.closed:
                    self.transport.write(_error_bytes(500, "internal error: no response"))
                self._close()

    def response_done(self, req: Request) -> None:
        """The last byte of ``req``'s response is written: the next pipelined request, or idle, or close."""
        if self.current is not req:
            return
        self.current = None
        req._listeners = None
        req._wake()  # a receive() waiting for the disconnect: the response is over
        if self.closed:
            return
        if not req.keep_alive or not req._body_done:  # an unread body would be parsed as the next request
            self._close()
            return
        if self._pipeline:
            self._start(self._pipeline.popleft())
            return
        if self.server.stopping:
            self._close()
            return
        self.resume_reading()
        self._idle = self.server.loop.call_later(KEEP_ALIVE, self._idle_close)

    def _idle_close(self) -> None:
        if self.current is None and not self._pipeline:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.transport.close()
            self.closed = True

    def _reject(self, status: int, message: str) -> None:
        if not self.closed:
            if self.current is None or not self.current._started:
                self.transport.write(_error_bytes(status, message))
            self._close()

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        # Not while requests wait behind the current one: the next is read when they are answered.
        if self._reading_paused and not self.closed and not self._pipeline:
            self._reading_paused = False
            self.transport.resume_reading()


class _TooLarge(Exception):
    pass


class _UpgradeWithBody(Exception):
    pass


_ASGI = {"version": "3.0", "spec_version": "2.4"}


class Server:
    """Serves an ASGI app on listening sockets until :meth:`shutdown`."""

    def __init__(self, app: Any, backlog: int = 4096) -> None:
        self.app = app
        self.backlog = backlog
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.address: tuple[str, int] | None = None
        self.loop = asyncio.get_running_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._stopped = asyncio.Event()

    async def start(self, sock: Any) -> None:
        srv = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=self.backlog)
        self._servers.append(srv)
        self.address = sock.getsockname()[:2]

    async def shutdown(self, grace: float = 1.0) -> None:
        """Stop accepting, close idle connections, give requests in flight ``grace`` seconds, then cancel them
        (the frontend's responses turn that into an error event and ``[DONE]``) and close every connection."""
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            if conn.current is None and not conn._pipeline:
                conn._close()
        deadline = self.loop.time() + grace
        while self.tasks and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5.0)
        for conn in list(self.connections):
            conn._close()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()
