"""Frees a prefill worker's pinned prompt blocks when the request that owns them ends before a decode worker
took them over (a client that left between the prefill's answer and the decode call).

Normally the decode worker releases the pin once its NIXL read is over (``workers.common.kv_handoff``); a pin
nobody releases is freed only by the prefill worker's pin timeout, a minute of KV memory lost per request.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from dynamo_rt import errors
from dynamo_rt.protocol import Final, KvTransferParams
from dynamo_rt.transport import ResponseStream, Transport, instance_subject

log = logging.getLogger(__name__)

_tasks: set[asyncio.Task[None]] = set()  # strong references until each release is sent


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

    task = asyncio.ensure_future(send())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def stop_prefill(stream: ResponseStream, transport: Transport, namespace: str) -> None:
    """End a remote prefill whose answer the caller will not read (it was cancelled, or failed): the worker is
    told to stop, and a final frame that already arrived unread has its pin released. (A final frame still in
    flight when the cancel goes out is the one case left to the pin timeout.) No-op after the final frame."""
    try:
        while stream.pending_frames():
            frame = await stream.__anext__()
            if isinstance(frame, Final) and frame.kv_transfer is not None:
                release_pin(transport, namespace, frame.kv_transfer)
    except (errors.DynamoError, StopAsyncIteration):
        pass
    await stream.cancel()
