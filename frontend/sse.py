"""SSE chunks: their byte templates (:class:`ChunkTemplates`, only the text delta serialized per chunk), and
writing them from plain function calls, the token path without a task wake-up per token.

A streamed token reaches the frontend as one NATS message. Handed to the response's task, it costs a task
wake-up and a walk back through the response's generators before ``await send(...)`` writes it. Instead, the
NATS parser's call detokenizes the frame and writes the chunk itself (:meth:`ResponseStream.set_consumer`,
:func:`frontend.serving.choice_events`), through :class:`DirectWriter`.

ASGI's ``send`` is a coroutine. uvicorn's (both of its HTTP implementations) finishes without suspending
unless the client's socket buffer is full (flow control): then it waits for the buffer to drain. So a write
runs the coroutine one step by hand: finished, the chunk is in the transport; suspended, a task finishes that
send and the writes after it queue behind it, going out as one chunk when it is done. Other servers' ``send``
may need a running task for every call, so the writer is used only under uvicorn (:func:`writer_for`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from frontend.serving import Prepared

# DYN_SSE_DIRECT=0 turns it off (every chunk then goes through the response's task: the slower path, kept as
# the fallback for other servers; the tests compare the two byte for byte).
ENABLED = os.environ.get("DYN_SSE_DIRECT", "1") != "0"
_SYNC_SEND_MODULES = ("uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.http.h11_impl")

# Chunks written at once / after a suspended send (flow control), since start: dynamo_frontend_sse_writes.
stats = {"direct": 0, "deferred": 0}


def writer_for(send: Callable[[Any], Awaitable[None]]) -> DirectWriter | None:
    """A writer for plain calls over a started response's ``send``: our own server's
    (:meth:`frontend.http1.Request.writer`, straight to the transport), a :class:`DirectWriter` when the
    server's ``send`` is known to finish without a task (uvicorn's); None otherwise (then the response's task
    writes every chunk)."""
    if not ENABLED:
        return None
    module = getattr(send, "__module__", None)
    if module == "frontend.http1":
        return send.__self__.writer()  # type: ignore[attr-defined,no-any-return]
    if module not in _SYNC_SEND_MODULES:
        return None
    return DirectWriter(send)


class DirectWriter:
    """Writes body chunks (``more_body``) of a started response from plain code, in order."""

    __slots__ = ("_backlog", "_send", "_task", "deferred", "direct")

    def __init__(self, send: Callable[[Any], Awaitable[None]]) -> None:
        self._send = send
        self._task: asyncio.Task[None] | None = None  # finishing a send that suspended, then the backlog
        self._backlog: list[bytes] = []
        self.direct = 0
        self.deferred = 0

    @property
    def busy(self) -> bool:
        """A send is in progress in the background: :meth:`drain` before sending anything else."""
        return self._task is not None

    def write(self, body: bytes) -> None:
        if self._task is not None:
            self._backlog.append(body)
            self.deferred += 1
            return
        coro: Any = self._send({"type": "http.response.body", "body": body, "more_body": True})
        try:
            waiting = coro.send(None)
        except StopIteration:
            self.direct += 1
            return
        self.deferred += 1
        self._task = asyncio.ensure_future(self._finish(coro, waiting))

    def write3(self, a: bytes, b: bytes, c: bytes) -> None:
        """``write(a + b + c)``."""
        self.write(a + b + c)

    async def _finish(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        try:
            await _Resume(coro, waiting)
            while self._backlog:
                body = b"".join(self._backlog)
                self._backlog.clear()
                await self._send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self._task = None

    async def drain(self) -> None:
        """Wait until every chunk written so far is handed to the server (raises what a send raised)."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    def close(self) -> None:
        """The response is over: add this writer's counts to :data:`stats`; a send still suspended is left to
        finish (or fail) on its own, its error retrieved."""
        stats["direct"] += self.direct
        stats["deferred"] += self.deferred
        self.direct = self.deferred = 0
        task = self._task
        if task is not None:
            task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class _Resume:
    """Awaiting it runs the rest of a coroutine that was stepped once by hand and is suspended on ``waiting``
    (what its first step yielded, normally a future): the task awaiting this takes that coroutine's place."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:  # thrown into the suspended coroutine, as await would
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration:
                    return


# ---------------------------------------------------------------------------------------------- chunks


def js(value: Any) -> bytes:
    """JSON of ``value`` (a text delta, or any object) safe for line-splitting SSE clients: U+0085, U+2028 and
    U+2029 are escaped (valid raw in JSON, but some clients split lines on them)."""
    out = orjson.dumps(value)
    if b"\xc2\x85" in out or b"\xe2\x80" in out:
        out = out.replace(b"\xc2\x85", b"\\u0085").replace(b"\xe2\x80\xa8", b"\\u2028").replace(
            b"\xe2\x80\xa9", b"\\u2029")
    return out


class ChunkTemplates:
    """Byte templates of one request's SSE chunks: only the text delta is serialized per chunk."""

    def __init__(self, p: Prepared) -> None:
        head = (
            b'data: {"id":"' + p.request_id.encode() + b'","object":"'
            + (b"chat.completion.chunk" if p.kind == "chat" else b"text_completion")
            + b'","created":' + str(p.created).encode() + b',"model":' + orjson.dumps(p.model.name)
            + b',"choices":[{"index":'
        )
        self.head = head
        self.usage_head = head.split(b',"choices":[')[0] + b',"choices":[],"usage":'
        self.chat = p.kind == "chat"

    def text_parts(self, index: int) -> tuple[bytes, bytes]:
        """What goes before and after the JSON string of a text delta without logprobs (the token path)."""
        head = self.head + str(index).encode()
        if self.chat:
            return head + b',"delta":{"content":', b'},"logprobs":null,"finish_reason":null}]}\n\n'
        return head + b',"text":', b',"logprobs":null,"finish_reason":null}]}\n\n'

    def content(self, index: int, text: str, logprobs: bytes | None = None, role: bool = False) -> bytes:
        lp = b"null" if logprobs is None else logprobs
        if self.chat:
            delta = b'{"role":"assistant","content":' if role else b'{"content":'
            return (self.head + str(index).encode() + b',"delta":' + delta + js(text)
                    + b'},"logprobs":' + lp + b',"finish_reason":null}]}\n\n')
        return (self.head + str(index).encode() + b',"text":' + js(text) + b',"logprobs":' + lp
                + b',"finish_reason":null}]}\n\n')

    def finish(self, index: int, reason: str) -> bytes:
        if self.chat:
            return (self.head + str(index).encode() + b',"delta":{},"logprobs":null,"finish_reason":"'
                    + reason.encode() + b'"}]}\n\n')
        return (self.head + str(index).encode() + b',"text":"","logprobs":null,"finish_reason":"'
                + reason.encode() + b'"}]}\n\n')

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self.usage_head + orjson.dumps(usage) + b"}\n\n"
