"""The caller's side of one request on the NATS request plane (:mod:`dynamo_rt.transport` sends it)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dynamo_rt import errors
from dynamo_rt.protocol import CancelRequest, Data, Error, Final, Heartbeat, RequestEnvelope, decode_frame, encode

if TYPE_CHECKING:
    from dynamo_rt.transport import Transport

IDLE_TIMEOUT = 5.0  # seconds without any frame after which the caller gives up on a worker
ACK_TIMEOUT = 3.0  # seconds for a worker's first frame (or heartbeat): it acknowledges the request


class _Raised:
    """An exception a frame consumer raised inside the NATS parser's call: re-raised by the stream's reader."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_INTERRUPT = object()  # a consumer ended the stream early (a stop string): the reader's iteration stops


class ResponseStream:
    """The caller's side of one request: an async iterator of :class:`Data` then one :class:`Final`.

    Raises a typed :class:`~dynamo_rt.errors.DynamoError` on an error frame, on a worker that went quiet
    (``idle_timeout``; ``first_timeout`` before its first frame), on nobody serving the subject, on a sequence
    gap, and past the deadline. ``cancel()`` tells the worker to stop.

    Frames are decoded where NATS hands them over. With a ``consumer`` set (:meth:`set_consumer`), the
    :class:`Data` frames that arrive in order while nothing is queued go straight to it, in that same call,
    and never wake the reader: the reader then sees only the final frame, errors and whatever arrived while
    something was queued. Heartbeats that arrive in order are dropped there too.
    """

    def __init__(self, transport: Transport, subject: str, request_id: str, deadline: float,
                 idle_timeout: float, first_timeout: float = ACK_TIMEOUT) -> None:
        self.transport = transport
        self.subject = subject
        self.request_id = request_id
        self.deadline = deadline
        self.idle_timeout = idle_timeout
        self.first_timeout = first_timeout
        # Decoded frames or an error: a deque and one waiter future rather than an asyncio.Queue, so a frame
        # costs an append and, only when the reader sleeps, one set_result.
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._inbox: str | None = None
        self._expected = 0
        self._done = False
        self._last_rx = time.monotonic()
        self._watchdog: asyncio.TimerHandle | None = None
        self._consumer: Callable[[Data], None] | None = None
        self.answered = False  # a frame (or heartbeat) came: the worker has the request
        self.undelivered = False  # NATS answered that nobody serves the subject: no worker saw the request

    def set_consumer(self, consumer: Callable[[Data], None] | None) -> None:
        """Hand in-order data frames to ``consumer`` as they arrive (see the class doc). Whatever it raises
        ends the stream: the reader re-raises it. It may call :meth:`interrupt` to end the iteration."""
        self._consumer = consumer

    def interrupt(self) -> None:
        """End the reader's iteration early (StopAsyncIteration), without an error; the stream stays open
        until :meth:`cancel`."""
        self._consumer = None
        self._put(_INTERRUPT)

    async def send(self, payload: bytes) -> None:
        """Publish the request, with this stream's inbox as the reply subject (no acknowledgement round trip)."""
        env = RequestEnvelope(request_id=self.request_id, reply_to=self._inbox or "", deadline=self.deadline,
                              payload=payload, frames_to=self.transport._frames_subject)
        try:
            await self.transport.publish(self.subject, encode(env), reply=self._inbox or "")
        except errors.TransportError:
            self._close_sub()
            self._done = True
            raise
        self._last_rx = time.monotonic()
        self._arm()

    def _push(self, data: bytes) -> None:
        """One frame's bytes, from the NATS parser."""
        if not data:  # an acknowledgement from a worker that still sends one
            self._last_rx = time.monotonic()
            self.answered = True
            return
        try:
            frame = decode_frame(data)
        except Exception as exc:
            self._put(errors.Unavailable(f"undecodable response frame from {self.subject}: {exc}"))
            return
        self._deliver(frame)

    def _deliver(self, frame: Data | Final | Error | Heartbeat) -> None:
        """One decoded frame (alone or out of a batch), from the NATS parser."""
        self._last_rx = time.monotonic()
        self.answered = True
        if self._done:
            return
        if not self._items and frame.seq == self._expected:
            kind = type(frame)
            if kind is Heartbeat:
                self._expected += 1
                return
            c = self._consumer
            if c is not None and kind is Data:
                self._expected += 1
                try:
                    c(frame)  # type: ignore[arg-type]
                except Exception as exc:
                    self._consumer = None
                    self._put(_Raised(exc))
                return
        self._put(frame)

    def _no_responders(self) -> None:
        self.undelivered = True
        self._put(errors.Unavailable(f"no worker is serving {self.subject}"))

    def _put(self, item: Any) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(self.idle_timeout / 2, 1.0) if self.answered else min(self.first_timeout / 2, 1.0)
        self._watchdog = loop.call_later(period, self._check)

    def _check(self) -> None:
        if self._done:
            return
        now = time.monotonic()
        if not self.answered and now - self._last_rx > self.first_timeout:
            self._put(errors.Unavailable(
                f"worker on {self.subject} did not acknowledge the request within {self.first_timeout:g}s"))
            return
        if now - self._last_rx > self.idle_timeout:
            self._put(errors.Unavailable(
                f"worker on {self.subject} stopped responding (no frame for {self.idle_timeout:.1f}s)"))
            return
        if time.time() > self.deadline:
            self._put(errors.DeadlineExceeded("request deadline exceeded"))
            return
        self._arm()

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Data | Final:
        while True:
            if self._done:
                raise StopAsyncIteration
            item = self._items.popleft() if self._items else await self._get()
            kind = type(item)
            if kind is Data or kind is Final or kind is Error or kind is Heartbeat:
                if item.seq != self._expected:
                    await self._finish(cancel=True)
                    raise errors.Unavailable(
                        f"response stream from {self.subject} lost frames (expected #{self._expected}, "
                        f"got #{item.seq})")
                self._expected += 1
                if kind is Data:
                    return item  # type: ignore[no-any-return]
                if kind is Final:
                    await self._finish(cancel=False)
                    return item  # type: ignore[no-any-return]
                if kind is Error:
                    await self._finish(cancel=False)
                    raise errors.from_wire(item.code, item.message)
                continue  # Heartbeat: keep waiting
            if item is _INTERRUPT:
                raise StopAsyncIteration
            await self._finish(cancel=not self.undelivered)
            raise item.exc if kind is _Raised else item

    def pending_frames(self) -> int:
        return len(self._items)

    @property
    def done(self) -> bool:
        """The final frame (or an error) was read, or the stream was cancelled."""
        return self._done

    def _close_sub(self) -> None:
        if self._inbox is not None:
            self.transport._streams.pop(self._inbox, None)
            self._inbox = None

    async def _finish(self, *, cancel: bool) -> None:
        if self._done:
            return
        self._done = True
        self._consumer = None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._close_sub()
        if cancel:
            await self._send_cancel()

    async def _send_cancel(self) -> None:
        with contextlib.suppress(Exception):
            await self.transport.publish(self.subject + ".cancel", encode(CancelRequest(request_id=self.request_id)))

    async def cancel(self) -> None:
        """Stop the request on the worker (client disconnect); idempotent."""
        await self._finish(cancel=True)

    async def aclose(self) -> None:
        await self.cancel()
