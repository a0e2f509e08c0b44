"""Frees a prefill worker's pinned prompt blocks when the request that owns them ends before a decode worker
took them over: a client that left while the prefill request was being sent, while it ran, while its answer
was on its way, or between the answer and the decode call.

Normally the decode worker releases the pin once its NIXL read is over (``workers.common.kv_handoff``); a pin
nobody releases is freed only by the prefill worker's pin timeout, a minute of KV memory lost per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import msgspec

from dynamo_rt import errors
from dynamo_rt.protocol import CancelRequest, Final, KvTransferParams, encode
from dynamo_rt.stream import ResponseStream
from dynamo_rt.transport import Transport, instance_subject

log = logging.getLogger(__name__)

_tasks: set[asyncio.Future[None]] = set()  # strong references until each is done
DRAIN_SECONDS = 5.0  # how long a stopped prefill's stream is still read for a final frame already sent


def release_pin(transport: Transport, namespace: str, params: KvTransferParams) -> None:
    """Ask the prefill worker named in ``params`` to free its pin, in the background (a release that fails
    is left to the pin timeout)."""
    if not params.pin_id or not params.instance_id:
        return

    async def send() -> None:
        subject = instance_subject(namespace, "backend", "release", params.instance_id)
        try:
            stream = await transport.call(subject, f"release-{params.pin_id}",
                                          msgspec.msgpack.encode(params.pin_id), timeout=10)
            async for _ in stream:
                pass
        except errors.DynamoError as exc:
            log.debug("releasing pin %s on %s failed: %s", params.pin_id, params.instance_id, exc)

    _spawn(send())


async def call_stoppable(transport: Transport, namespace: str, subject: str, request_id: str, payload: bytes,
                         timeout: float) -> ResponseStream:
    """``transport.call`` that a cancellation cannot orphan. A caller cancelled while the request is on its way
    may still have reached the worker, which would then generate to the end, or pin a prompt, for nobody: the
    stream exists before the request is sent, so such a request is stopped there (as by :func:`stop_prefill`).
    Publishing only buffers the request (no acknowledgement is awaited), so this is rare."""
    stream = await transport.open_stream(subject, request_id, timeout=timeout)
    try:
        await stream.send(payload)
    except asyncio.CancelledError:
        _spawn(_drain(stream, transport, namespace))
        raise
    return stream


def stop_prefill(stream: ResponseStream, transport: Transport, namespace: str) -> None:
    """End a remote prefill whose answer the caller will not read (it was cancelled, or failed): the worker is
    told to stop, and the stream is read on in the background for a little while, so a final frame that was
    already on its way has its pin released. No-op after the final frame."""
    if stream.done:
        return
    _spawn(_drain(stream, transport, namespace))


async def _drain(stream: ResponseStream, transport: Transport, namespace: str) -> None:
    with contextlib.suppress(Exception):  # the worker stops: nothing more comes, the timeout ends the wait
        await transport.publish(stream.subject + ".cancel", encode(CancelRequest(request_id=stream.request_id)))
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for frame in stream:
                if isinstance(frame, Final) and frame.kv_transfer is not None:
                    release_pin(transport, namespace, frame.kv_transfer)
    except (errors.DynamoError, TimeoutError):
        pass
    finally:
        await stream.cancel()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
