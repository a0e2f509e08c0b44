"""The NATS request plane: serve an endpoint on an instance subject, call one instance, stream responses.

The ONLY module that imports ``nats``. Wire shapes live in :mod:`dynamo_rt.protocol`.

Call flow (one request)::

    caller                                   worker (serves ``{ns}.{component}.{endpoint}.{iid}``)
    PUB subject RequestEnvelope, reply=inbox ▶ no subscriber: the server's 503 status message to ``inbox``
                                              handler task streams Data* Final | Error to ``inbox``,
                                              a Heartbeat when it has been quiet for a while
    PUB subject.cancel CancelRequest ───────▶ handler task cancelled (caller went away)

There is no separate acknowledgement round trip: the request is published with the stream's own inbox as its
reply subject, so "nobody serves this subject" comes back as NATS's no-responders status on that inbox, and
"the worker has it" is its first frame or heartbeat (``first_timeout``, 3 s; the worker heartbeats a request
that has been quiet for 1 s, prefill or queueing included). A worker that still acknowledges (an older
caller's ``nc.request`` reply subject) is answered as before. A killed worker is noticed by the caller when
neither frames nor heartbeats arrive for ``idle_timeout`` seconds; a request past its deadline ends with
:class:`~dynamo_rt.errors.DeadlineExceeded`. Frames carry a
sequence number, so a gap (frames lost across a NATS reconnect) ends the stream with an error instead of
silently dropping tokens.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dynamo_rt import errors
from dynamo_rt.protocol import (
    CancelRequest,
    Data,
    Error,
    Final,
    Heartbeat,
    RequestEnvelope,
    decode_cancel,
    decode_envelope,
    decode_frame_batch,
    encode,
)
from dynamo_rt.stream import ACK_TIMEOUT, IDLE_TIMEOUT, ResponseStream

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0  # seconds of quiet after which a worker sends a Heartbeat
BATCH_FRAMES_MAX = 128  # frames per FrameBatch message (a few KB: well under NATS's max payload)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    deadline: float
    subject: str


Handler = Callable[[bytes, RequestContext], AsyncGenerator[Data | Final, None]]


def _nats_error(exc: BaseException, what: str) -> errors.TransportError:
    return errors.TransportError(f"{what}: NATS error {type(exc).__name__}: {exc}")


@dataclass(slots=True)
class _Active:
    reply_to: str
    last_sent: float
    seq: int = 0
    task: asyncio.Task[None] | None = None  # set right after the entry is booked
    frames_to: str = ""  # the caller's batch subject (RequestEnvelope.frames_to); "" = a message per frame
    payload: bytes = b""  # the request, for ``on_dropped`` should it be cancelled before its handler ran
    started: bool = False  # the handler task has begun (a task cancelled before that never runs a line)


class Endpoint:
    """A served endpoint (one subject). Tracks the handler task of every in-flight request."""

    def __init__(self, transport: Transport, subject: str, handler: Handler,
                 on_dropped: Callable[[bytes], None] | None = None) -> None:
        self.transport = transport
        self.subject = subject
        self.handler = handler
        # Called with a request's payload when it is cancelled before its handler started: the handler's own
        # clean-up (its finally blocks) never runs then, so what the request holds elsewhere is freed here.
        self.on_dropped = on_dropped
        self.active: dict[str, _Active] = {}
        # Frames waiting for the end of this event-loop turn, per caller batch subject (see _send).
        self._batches: dict[str, list[tuple[str, Data | Final | Error | Heartbeat]]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.frames_batched = 0  # frames sent inside a FrameBatch message
        self.batches_sent = 0  # FrameBatch messages (each holds 2 or more frames)
        self.dropped_unstarted = 0  # requests cancelled before their handler began (on_dropped called)
        self._subs: list[Subscription] = []
        self._hb_task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        nc = self.transport.nc
        self._subs.append(await nc.subscribe(self.subject, cb=self._on_request, pending_msgs_limit=-1,
                                             pending_bytes_limit=-1))
        self._subs.append(await nc.subscribe(self.subject + ".cancel", cb=self._on_cancel))
        self._hb_task = asyncio.create_task(self._heartbeats(), name=f"heartbeats:{self.subject}")
        await nc.flush()

    async def _on_request(self, msg: Msg) -> None:
        try:
            env = decode_envelope(msg.data)
        except Exception as exc:  # a malformed request must not kill the endpoint
            log.warning("dropping malformed request on %s: %s", self.subject, exc)
            return
        if msg.reply and msg.reply != env.reply_to:  # an older caller's request() waits for an acknowledgement
            await self.transport.nc.publish(msg.reply, b"")
        if env.request_id in self.active:
            # Two callers reusing one request id would share one cancel subject and one book entry: refuse the
            # second with a typed error rather than let the first's end drop the second's entry.
            await self.transport.nc.publish(env.reply_to, encode(Error(
                seq=0, code=str(errors.ErrorCode.INVALID_REQUEST),
                message=f"request id {env.request_id!r} is already in flight on this worker")))
            return
        ctx = RequestContext(request_id=env.request_id, deadline=env.deadline, subject=self.subject)
        act = _Active(reply_to=env.reply_to, last_sent=time.monotonic(), frames_to=env.frames_to,
                      payload=env.payload)
        self.active[env.request_id] = act
        act.task = asyncio.create_task(self._run(env, ctx, act), name=f"req:{env.request_id}")

    async def _publish_batch(self, nc: NatsClient, subject: str,
                             frames: list[tuple[str, Data | Final | Error | Heartbeat]]) -> None:
        try:
            data = encode(frames) if len(frames) > 1 else b""
            if len(frames) == 1 or len(data) > nc.max_payload:  # alone (or too big): to each own inbox
                for reply_to, frame in frames:
                    await nc.publish(reply_to, encode(frame))
                return
            await nc.publish(subject, data)
            self.batches_sent += 1
            self.frames_batched += len(frames)
        except Exception as exc:  # the callers see the gap (sequence numbers) or the silence
            log.warning("sending %d response frames to %s failed: %s", len(frames), subject, exc)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            req: CancelRequest = decode_cancel(msg.data)
        except Exception:
            return
        act = self.active.get(req.request_id)
        if act is not None and act.task is not None:
            log.debug("cancel %s", req.request_id)
            act.task.cancel()
            if not act.started:  # the request and its cancel came together: the handler will never run
                del self.active[req.request_id]
                self.dropped_unstarted += 1
                if self.on_dropped is not None:
                    try:
                        self.on_dropped(act.payload)
                    except Exception:
                        log.exception("on_dropped failed for %s", req.request_id)

    async def _send(self, act: _Active, frame: Data | Final | Error | Heartbeat) -> None:
        frame.seq = act.seq
        act.seq += 1
        act.last_sent = time.monotonic()
        if not act.frames_to:
            await self.transport.nc.publish(act.reply_to, encode(frame))
            return
        # An engine step wakes every request's handler in one event-loop turn: their frames to one caller
        # leave together at the start of the next turn, one NATS message (no timer, no added wait).
        batch = self._batches.get(act.frames_to)
        if batch is None:
            batch = self._batches[act.frames_to] = []
        batch.append((act.reply_to, frame))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        nc = self.transport.nc
        try:
            # One flusher at a time, until nothing is left: a frame queued while a publish waited goes after it.
            while self._batches:
                batches, self._batches = self._batches, {}
                for subject, frames in batches.items():
                    for i in range(0, len(frames), BATCH_FRAMES_MAX):
                        await self._publish_batch(nc, subject, frames[i:i + BATCH_FRAMES_MAX])
        finally:
            self._flusher = None

    async def _run(self, env: RequestEnvelope, ctx: RequestContext, act: _Active) -> None:
        act.started = True
        try:
            remaining = env.deadline - time.time()
            if remaining <= 0:
                raise errors.DeadlineExceeded("request deadline passed before it started")
            async with asyncio.timeout(remaining):
                agen = self.handler(env.payload, ctx)
                try:
                    async for frame in agen:
                        await self._send(act, frame)
                finally:
                    await agen.aclose()
        except asyncio.CancelledError:
            # The caller cancelled (or we are shutting down): nothing more to say.
            pass
        except TimeoutError:
            await self._send_error(act, errors.ErrorCode.TIMEOUT, "request deadline exceeded on the worker")
        except errors.DynamoError as exc:
            await self._send_error(act, exc.code, exc.message)
        except Exception as exc:
            log.exception("handler failed for %s", env.request_id)
            await self._send_error(act, errors.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            if self.active.get(env.request_id) is act:
                del self.active[env.request_id]

    async def _send_error(self, act: _Active, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            await self._send(act, Error(seq=0, code=str(code), message=message))

    async def _heartbeats(self) -> None:
        while not self._closed:
            await asyncio.sleep(HEARTBEAT_INTERVAL / 2)
            now = time.monotonic()
            for act in list(self.active.values()):
                if now - act.last_sent >= HEARTBEAT_INTERVAL:
                    with contextlib.suppress(Exception):
                        await self._send(act, Heartbeat(seq=0))

    async def close(self, *, cancel_inflight: bool = True) -> None:
        self._closed = True
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._hb_task is not None:
            self._hb_task.cancel()
        if cancel_inflight:
            tasks = [a.task for a in self.active.values() if a.task is not None]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        if self._flusher is not None:  # frames already produced still go out
            await asyncio.gather(self._flusher, return_exceptions=True)


@dataclass
class NatsOptions:
    servers: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    name: str = "dynamo-rt"
    extra: dict[str, Any] = field(default_factory=dict)


class Transport:
    """One NATS connection per process: serving, calling, events and the object store."""

    def __init__(self, opts: NatsOptions | str) -> None:
        self.opts = NatsOptions(servers=opts) if isinstance(opts, str) else opts
        self._nc: NatsClient | None = None
        self._endpoints: list[Endpoint] = []
        self._event_subs: list[Subscription] = []
        # Response streams share one wildcard inbox subscription: no SUB/UNSUB and no subscription task per
        # request, and one task wake-up hands out every frame that one socket read brought in.
        self._streams: dict[str, ResponseStream] = {}
        self._mux_prefix: str | None = None
        self._mux_sub: Subscription | None = None
        self._mux_seq = 0
        self.mux_frames_direct = 0  # response messages handed to their stream by the parser's call
        self.mux_frames_queued = 0  # ... by nats-py's subscription task (the fallback)
        self.mux_batched_frames = 0  # frames that came inside FrameBatch messages
        # Workers may batch this process's response frames (RequestEnvelope.frames_to); DYN_NATS_BATCH_FRAMES=0
        # asks them for one message per frame.
        self.batch_frames = os.environ.get("DYN_NATS_BATCH_FRAMES", "1") != "0"
        self._frames_subject = ""
        self.disconnects = 0
        self._closing = False
        self._obj_lock = asyncio.Lock()
        self._connect_error: Exception | None = None

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise errors.TransportError("NATS is not connected")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self, *, timeout: float = 10.0) -> None:
        o = self.opts
        kwargs: dict[str, Any] = {
            "servers": [s.strip() for s in o.servers.split(",") if s.strip()],
            "name": o.name,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "connect_timeout": 2,
            "allow_reconnect": True,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "disconnected_cb": self._on_disconnect,
            "reconnected_cb": self._on_reconnect,
            "error_cb": self._on_error,
            "closed_cb": self._on_closed,
            "pending_size": 64 * 1024 * 1024,
        }
        if o.user:
            kwargs["user"] = o.user
            kwargs["password"] = o.password or ""
        if o.token:
            kwargs["token"] = o.token
        if o.creds:
            try:
                check_creds_file(o.creds)
            except errors.TransportError as exc:
                raise errors.TransportError(f"connecting to {redact_servers(o.servers)}: {exc}") from None
            kwargs["user_credentials"] = o.creds
        if o.ca or o.cert:
            import ssl

            ctx = ssl.create_default_context(cafile=o.ca)
            if o.cert:
                ctx.load_cert_chain(o.cert, o.key)
            kwargs["tls"] = ctx
        kwargs.update(o.extra)
        # nats-py retries a failed first connect forever when reconnects are unlimited (server down, bad
        # credentials, TLS refused), so the bound is ours; the last failure it reported names the cause.
        self._connect_error = None
        nc = NatsClient()
        try:
            await asyncio.wait_for(nc.connect(**kwargs), timeout)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise _nats_error(self._connect_error or exc, f"connecting to {redact_servers(o.servers)}") from None
        self._nc = nc
        url = nc.connected_url
        log.info("connected to NATS %s", f"{url.hostname}:{url.port}" if url else redact_servers(o.servers))

    async def _on_disconnect(self) -> None:
        if self._closing or self._nc is None:  # closing, or a first connect that failed
            return
        self.disconnects += 1
        log.warning("NATS disconnected; reconnecting")

    async def _on_reconnect(self) -> None:
        log.info("NATS reconnected")

    async def _on_error(self, exc: Exception) -> None:
        # During a first connect keep the server's own words ("Authorization Violation") over the socket
        # error that follows them when it hangs up.
        if self._nc is None and not (isinstance(exc, OSError) and self._connect_error is not None):
            self._connect_error = exc
        log.debug("NATS error: %s", exc)

    async def _on_closed(self) -> None:
        log.debug("NATS connection closed")

    async def close(self) -> None:
        self._closing = True
        for ep in self._endpoints:
            await ep.close()
        self._endpoints.clear()
        if self._nc is not None:
            nc, self._nc = self._nc, None
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    # ------------------------------------------------------------------ request plane

    async def serve(self, subject: str, handler: Handler,
                    on_dropped: Callable[[bytes], None] | None = None) -> Endpoint:
        ep = Endpoint(self, subject, handler, on_dropped)
        try:
            await ep.start()
        except (nats.errors.Error, OSError) as exc:
            raise _nats_error(exc, f"serving {subject}") from None
        self._endpoints.append(ep)
        return ep

    async def _mux_subscribe(self) -> None:
        prefix = self.nc.new_inbox() + "."
        sub = await self.nc.subscribe(prefix + "*", cb=self._on_mux_msg, pending_msgs_limit=-1,
                                      pending_bytes_limit=-1)
        if self._mux_sub is not None:  # two first calls raced: keep one
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            return
        self._mux_sub, self._mux_prefix = sub, prefix
        if self.batch_frames:
            self._frames_subject = prefix + _FRAMES_TOKEN
        self._direct_mux_delivery(sub)

    async def _on_mux_msg(self, msg: Msg) -> None:
        self.mux_frames_queued += 1
        if msg.subject == self._frames_subject:
            self._on_batch(msg.data)
            return
        stream = self._streams.get(msg.subject)
        if stream is not None:
            if msg.headers and msg.headers.get("Status") == "503":
                stream._no_responders()
            else:
                stream._push(msg.data)

    def _on_batch(self, data: bytes) -> None:
        try:
            batch = decode_frame_batch(data)
        except Exception as exc:  # the streams it was for see a sequence gap or go quiet
            log.warning("dropping an undecodable batch of response frames: %s", exc)
            return
        self.mux_batched_frames += len(batch)
        streams = self._streams
        for inbox, frame in batch:
            stream = streams.get(inbox)
            if stream is not None:
                stream._deliver(frame)

    def _direct_mux_delivery(self, sub: Subscription) -> None:
        """Hand response frames to their stream straight from the protocol parser.

        nats-py delivers a message by building a ``Msg``, queueing it on the subscription and waking the
        subscription's task, which awaits the callback: per frame (per token) that is a second task switch and
        a few objects. For the inbox subscription the parser's call is answered here instead, with the frame's
        bytes pushed to its stream in the same step; anything else (other subscriptions, messages with
        headers) takes nats-py's own path, and so does everything if this nats-py has no ``_process_msg`` to
        wrap (the callback above then still delivers). ``mux_frames_direct`` / ``mux_frames_queued`` count
        which path frames took.
        """
        nc = self.nc
        original = getattr(nc, "_process_msg", None)
        sid = getattr(sub, "_id", None)
        if original is None or not isinstance(sid, int) or getattr(original, "_dynamo_direct", False):
            return
        streams = self._streams
        frames_subject = self._frames_subject.encode()

        async def process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None,
                              ) -> None:  # fmt: skip
            if msg_sid != sid or (headers and not headers.startswith(_NO_RESPONDERS)):
                await original(msg_sid, subject, reply, data, headers)
                return
            self.mux_frames_direct += 1
            if subject == frames_subject:
                self._on_batch(data)
                return
            stream = streams.get(subject.decode())
            if stream is not None:
                if headers:
                    stream._no_responders()
                else:
                    stream._push(data)

        process_msg._dynamo_direct = True  # type: ignore[attr-defined]
        nc._process_msg = process_msg  # type: ignore[method-assign,assignment]

    async def open_stream(self, subject: str, request_id: str, *, timeout: float = 600.0,
                          first_timeout: float = ACK_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT) -> ResponseStream:
        """A response stream for a request to ``subject``, registered on the shared inbox, not yet sent
        (:meth:`ResponseStream.send`): a caller cancelled while sending still holds the stream to stop."""
        if not self.connected:
            raise errors.TransportError("NATS is not connected")
        if self._mux_sub is None:
            try:
                await self._mux_subscribe()
            except (nats.errors.Error, OSError) as exc:
                raise _nats_error(exc, "subscribing to the response inbox") from None
        stream = ResponseStream(self, subject, request_id, time.time() + timeout, idle_timeout, first_timeout)
        self._mux_seq += 1
        inbox = stream._inbox = f"{self._mux_prefix}{self._mux_seq:x}"
        self._streams[inbox] = stream
        return stream

    async def call(self, subject: str, request_id: str, payload: bytes, *, timeout: float = 600.0,
                   ack_timeout: float = ACK_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT) -> ResponseStream:
        """Send ``payload`` to the instance serving ``subject``; returns the response stream.

        Raises :class:`~dynamo_rt.errors.Unavailable` at once when NATS is down; nobody serving the subject
        is the stream's first error (NATS's no-responders answer, a round trip later), a worker that takes the
        request but never answers its ``ack_timeout`` later.
        """
        stream = await self.open_stream(subject, request_id, timeout=timeout, first_timeout=ack_timeout,
                                        idle_timeout=idle_timeout)
        await stream.send(payload)
        return stream

    # ------------------------------------------------------------------ events

    async def publish(self, subject: str, data: bytes, *, reply: str = "") -> None:
        try:
            await self.nc.publish(subject, data, reply=reply)
        except (nats.errors.Error, OSError) as exc:
            raise _nats_error(exc, f"publishing to {subject}") from None

    async def subscribe(self, subject: str, cb: Callable[[bytes, str], Awaitable[None] | None]) -> None:
        async def _cb(msg: Msg) -> None:
            r = cb(msg.data, msg.subject)
            if r is not None:
                await r

        try:
            self._event_subs.append(await self.nc.subscribe(subject, cb=_cb, pending_msgs_limit=-1,
                                                            pending_bytes_limit=-1))
        except (nats.errors.Error, OSError) as exc:
            raise _nats_error(exc, f"subscribing to {subject}") from None

    async def flush(self, timeout: float = 5.0) -> None:
        try:
            await self.nc.flush(timeout=int(max(1, timeout)))
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise _nats_error(exc, "flush") from None

    # ------------------------------------------------------------------ object store

    async def put_object(self, bucket: str, name: str, data: bytes) -> None:
        """Store ``data`` unless an object of that name and size is there already.

        Names are content-addressed by the callers, so an existing object is the same bytes; not rewriting
        it matters: a rewrite purges the old chunks while another process may be reading them.
        """
        async with self._obj_lock:
            try:
                js = self.nc.jetstream()
                try:
                    obs = await js.object_store(bucket)
                except nats.js.errors.BucketNotFoundError:
                    obs = await js.create_object_store(bucket)
                try:
                    info = await obs.get_info(name)
                    if info.size == len(data) and not info.deleted:
                        return
                except (nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError):
                    pass
                await obs.put(name, data)
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                raise _nats_error(exc, f"storing {bucket}/{name}") from None

    async def get_object(self, bucket: str, name: str, *, timeout: float = 10.0) -> bytes:
        try:
            js = self.nc.jetstream()
            obs = await js.object_store(bucket)
            res = await asyncio.wait_for(obs.get(name), timeout)
        except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError,
                nats.js.errors.ObjectNotFoundError):
            raise errors.NotFound(f"object {bucket}/{name} not found") from None
        except TimeoutError:
            raise errors.TransportError(f"fetching {bucket}/{name} timed out after {timeout:.0f}s") from None
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            raise _nats_error(exc, f"fetching {bucket}/{name}") from None
        return bytes(res.data or b"")


_NO_RESPONDERS = b"NATS/1.0 503"  # the status line of NATS's no-responders answer
_FRAMES_TOKEN = "frames"  # the batch subject's last token under the response inbox (per-stream tokens are hex)


def check_creds_file(path: str) -> None:
    """Check a NATS ``.creds`` file (user JWT + user nkey seed) before it is used; raise
    :class:`~dynamo_rt.errors.TransportError` naming the problem, never the file's contents.

    nats-py reads the file lazily at every (re)connect: a missing file or a missing ``nkeys`` package then
    surfaces only as a connect failure retried until the timeout, and a file without a JWT block makes its
    reader loop forever on the event loop. So the file is read once here, with the reader's own rules (the
    line after each BEGIN marker), and the seed is checked to be the key of the JWT's user.
    """
    what = f"NATS credentials file {path}"
    try:
        import nkeys
    except ImportError:
        raise errors.TransportError(f"{what}: the 'nkeys' package is needed to use it (pip install nkeys)") from None
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise errors.TransportError(f"{what}: not found") from None
    except IsADirectoryError:
        raise errors.TransportError(f"{what}: is a directory") from None
    except OSError as exc:
        raise errors.TransportError(f"{what}: cannot be read ({exc.strerror})") from None

    def block(marker: bytes) -> bytes:
        for i, line in enumerate(lines[:-1]):
            if marker in line:
                return lines[i + 1].strip()
        return b""

    jwt = block(b"BEGIN NATS USER JWT")
    if jwt.count(b".") != 2:
        raise errors.TransportError(f"{what}: no user JWT (a -----BEGIN NATS USER JWT----- block)")
    seed = block(b"BEGIN USER NKEY SEED")
    if not seed:
        raise errors.TransportError(f"{what}: no user nkey seed (a -----BEGIN USER NKEY SEED----- block)")
    if not seed.startswith(b"SU"):
        raise errors.TransportError(f"{what}: its nkey seed is not a user seed")
    try:
        public_key = nkeys.from_seed(bytearray(seed)).public_key.decode()
    except Exception:  # nkeys raises its own errors and binascii / ValueError for bad base32
        raise errors.TransportError(f"{what}: its nkey seed is malformed") from None
    try:
        part = jwt.split(b".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4)))
        subject, expires = claims["sub"], int(claims.get("exp") or 0)
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):  # not base64 / JSON / an object
        raise errors.TransportError(f"{what}: its user JWT is malformed") from None
    if subject != public_key:
        raise errors.TransportError(f"{what}: its nkey seed is not the key of its JWT's user {subject}")
    if expires and expires <= time.time():
        raise errors.TransportError(f"{what}: its user JWT expired at "
                                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expires))}")


def redact_servers(servers: str) -> str:
    """NATS server URLs with any ``user:password@`` / ``token@`` part replaced, for logs and errors."""
    import re

    return re.sub(r"(\w+://)[^@/,]+@", r"\1***@", servers)


def instance_subject(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"{namespace}.{component}.{endpoint}.{instance_id}"


def kv_events_subject(namespace: str, model: str) -> str:
    return f"{namespace}.kv_events.{_token(model)}"


def load_subject(namespace: str, model: str) -> str:
    return f"{namespace}.load.{_token(model)}"


def _token(name: str) -> str:
    """A NATS subject token for a model name (dots and spaces would split or break the subject)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
