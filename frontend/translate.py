"""The chat path, in process, for the endpoints that are translations of it (/v1/responses, /v1/messages).

Those endpoints turn their request into a chat-completions body and run it through
:meth:`frontend.app.Frontend.prepare` and :mod:`frontend.serving` (so preprocessing, routing, disaggregation,
migration and the chat output post-processing are the chat path's own), then reshape the result: the chat
completion dict when not streamed, the chat chunk dicts (:func:`chat_chunks`, parsed back from the chat SSE
body) when streamed. :class:`EndpointResponse` runs it inside the ASGI call like the chat route does
(admission, client disconnect cancels the worker request), with the endpoint's own error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dynamo_rt import errors
from frontend import tenants
from frontend.app import OFFLOAD_BODY_BYTES, Frontend, cancel_on_disconnect, json_response
from frontend.serving import Prepared, complete, stream_response

log = logging.getLogger(__name__)

ErrorMapper = Callable[[errors.DynamoError], Response]


def tenant_of(request: Request) -> str | None:
    """The authenticated tenant :class:`~frontend.app.FastPath` put in the scope (None without API keys)."""
    tenant: str | None = request.scope.get(tenants.TENANT_SCOPE_KEY)
    return tenant


async def prepare_chat(fe: Frontend, chat: dict[str, Any], tenant: str | None = None) -> Prepared:
    """Validate, template and tokenize a chat body built by a translating endpoint (errors are the chat
    path's: a bad field is an InvalidRequest naming the chat field). ``tenant`` salts its block hashes."""
    body = orjson.dumps(chat)
    if len(body) > OFFLOAD_BODY_BYTES:
        return await fe.offload.run(fe.prepare, "chat", body, tenant)
    return fe.prepare("chat", body, tenant)


async def chat_result(fe: Frontend, p: Prepared) -> dict[str, Any]:
    """The non-streamed chat completion of ``p`` (one choice)."""
    return await complete(fe.engine, p)


def error_from_body(err: dict[str, Any]) -> errors.DynamoError:
    """The typed error of a chat SSE error event (its ``code`` is our ErrorCode word)."""
    exc = errors.from_wire(str(err.get("code") or "internal"), str(err.get("message") or "error"))
    exc.param = err.get("param")
    return exc


async def chat_chunks(fe: Frontend, p: Prepared) -> AsyncIterator[dict[str, Any]]:
    """The chat chunks of streamed ``p`` as dicts, ending at ``[DONE]``; a chat error event is raised as the
    DynamoError it carries. Parsing the chat SSE body (rather than hooking below it) keeps every chat output
    post-processing step (tool calls, reasoning) in the chunks this sees."""
    gen = stream_response(fe.engine, p)
    try:
        async for raw in gen:
            for frame in raw.split(b"\n\n"):
                if not frame.startswith(b"data: "):
                    continue
                data = frame[6:]
                if data == b"[DONE]":
                    return
                obj: dict[str, Any] = orjson.loads(data)
                if "error" in obj and "choices" not in obj:
                    raise error_from_body(obj["error"])
                yield obj
        raise errors.DynamoError("internal error: the chat stream ended without [DONE]")
    finally:
        await gen.aclose()  # type: ignore[attr-defined]


def body_schema(struct: type) -> dict[str, Any]:
    """``openapi_extra`` documenting a route's JSON body as ``struct``'s schema (/openapi.json, the fuzzers)."""
    import msgspec

    schema = msgspec.json.schema_components([struct])[1][struct.__name__]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One named SSE event (both endpoints name their events, unlike chat)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class EndpointResponse(Response):
    """Runs a translated request inside the ASGI call: admission first, then one JSON body (``run``) or an
    SSE body (``stream``); a client disconnect cancels it and with it the worker request.

    ``error`` maps a DynamoError to the endpoint's error response (before any byte is sent); a stream body
    ends itself with the endpoint's error event, and ``stream_error`` is what is sent when something escapes
    it (a bug) after the headers went out.
    """

    def __init__(self, fe: Frontend, endpoint: str, p: Prepared, error: ErrorMapper, *,
                 run: Callable[[], Awaitable[Any]] | None = None,
                 stream: Callable[[], AsyncIterator[bytes]] | None = None,
                 stream_error: Callable[[errors.DynamoError], bytes] | None = None) -> None:
        super().__init__(status_code=200)
        self.fe = fe
        self.endpoint = endpoint
        self.p = p
        self.error = error
        self.run = run
        self.stream = stream
        self.stream_error = stream_error
        self._disconnected = False

    def _count(self, status: int | str) -> None:
        self.fe.metrics.requests.labels(self.endpoint, str(status)).inc()

    def _gone(self) -> None:
        self._disconnected = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = cancel_on_disconnect(receive, self._gone)
        name = self.p.model.name
        gauge = self.fe.metrics.inflight.labels(name)
        t0 = time.perf_counter()
        try:
            try:
                async with self.fe.admit(self.endpoint, self.p):
                    gauge.inc()
                    try:
                        if self.stream is not None:
                            await self._send_stream(send, self.stream())
                        else:
                            await self._send_one(scope, receive, send)
                    finally:
                        gauge.dec()
                        self.fe.metrics.duration.labels(name).observe(time.perf_counter() - t0)
            except errors.DynamoError as exc:  # admission refused (counted by admit) before anything was sent
                await self.error(exc)(scope, receive, send)
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
            self.fe.metrics.disconnects.labels(name).inc()
            self._count(499)
        finally:
            watcher.cancel()

    async def _send_one(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.run is not None
        try:
            resp = json_response(await self.run())
        except errors.DynamoError as exc:
            resp = self.error(exc)
        except Exception as exc:  # a bug: still the endpoint's error shape
            log.exception("%s: unhandled error", self.endpoint)
            resp = self.error(errors.internal(exc))
        self._count(resp.status_code)
        await resp(scope, receive, send)

    async def _send_stream(self, send: Send, body: AsyncIterator[bytes]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        failure: errors.DynamoError | None = None
        try:
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            if self._disconnected:
                raise
            failure = errors.Unavailable("the frontend is shutting down; this stream was stopped")
            raise
        except Exception as exc:
            log.exception("%s: stream failed after its headers were sent", self.endpoint)
            failure = errors.internal(exc)
        finally:
            tail = self.stream_error(failure) if failure is not None and self.stream_error else b""
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            with contextlib.suppress(Exception):
                await body.aclose()  # type: ignore[attr-defined]
        self._count(200 if failure is None else failure.status)

