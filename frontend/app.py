"""The OpenAI-compatible HTTP API (FastAPI for the surface, raw ASGI responses on the token path).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /v1/models/{id}/ready`` and ``GET /health`` (frontend/health.py), ``GET /live``,
``GET /metrics``, ``/openapi.json``, ``/docs``; ``/v1/responses`` (:mod:`frontend.responses`) and ``/v1/messages``
(:mod:`frontend.messages`) translate onto chat.
Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` produced by one
mapper (:func:`error_response`), the same words in streaming (an SSE error event) and non-streaming
(``/v1/messages`` answers in Anthropic's shape instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dynamo_rt import errors, faults
from frontend import chat_output, offload, sse, tenants
from frontend import openai_protocol as op
from frontend.health import HealthMonitor
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager, ServedModel
from frontend.serving import (
    DONE,
    Dispatcher,
    Prepared,
    complete,
    error_body,
    error_event,
    new_request_id,
    stream_response,
)

log = logging.getLogger(__name__)


@dataclass
class FrontendConfig:
    max_body_bytes: int = 8 * 1024 * 1024
    max_concurrency: int = 0  # per model; 0 = unlimited
    max_queue: int = 1024  # per model, requests waiting for a slot beyond max_concurrency
    queue_timeout: float = 30.0
    request_timeout: float = 600.0
    keys: tenants.KeyRing | None = None  # API key -> tenant (--api-key / --api-keys-file); None: no auth
    worker_wait_timeout: float = 0.0  # > 0: a request for a model with no ready worker waits this long for one
    response_ttl: float = 24 * 3600.0  # seconds a stored /v1/responses response lives (NATS KV bucket TTL)
    tool_call_parser: str | None = None  # overrides the model card's (frontend/parsers/ names)
    reasoning_parser: str | None = None
    prepare_threads: int = 0  # threads preparing long requests (frontend/offload.py); 0: cpu_count - 1, 1..4
    prepare_nice: int = offload.DEFAULT_NICE  # added to those threads' nice value


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: errors.DynamoError) -> Response:
    headers = None
    if isinstance(exc, errors.Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    return json_response(error_body(exc), exc.status, headers)


class _Admission:
    """Per-model concurrency limit with a bounded queue; past the queue -> 429 + Retry-After."""

    def __init__(self, cfg: FrontendConfig, queued: Gauge | None = None) -> None:
        self.cfg = cfg
        self.sems: dict[str, asyncio.Semaphore] = {}
        self.waiting: dict[str, int] = {}
        self.queued = queued  # the dynamo_frontend_queued_requests gauge, per model

    @contextlib.asynccontextmanager
    async def slot(self, model: str, deadline: float = float("inf")) -> AsyncIterator[None]:
        if self.cfg.max_concurrency <= 0:
            yield
            return
        sem = self.sems.get(model)
        if sem is None:
            sem = self.sems[model] = asyncio.Semaphore(self.cfg.max_concurrency)
        if sem.locked():
            if self.waiting.get(model, 0) >= self.cfg.max_queue:
                raise errors.Overloaded(f"model {model!r} is over capacity: {self.cfg.max_concurrency} running "
                                        f"and {self.cfg.max_queue} queued; retry later", retry_after=1.0)
            self.waiting[model] = self.waiting.get(model, 0) + 1
            if self.queued is not None:
                self.queued.labels(model).inc()
            wait = min(self.cfg.queue_timeout, deadline - time.time())
            try:
                if faults.enabled:
                    await faults.hit("frontend.queued")
                await asyncio.wait_for(sem.acquire(), max(0.0, wait))
            except TimeoutError:
                if time.time() >= deadline:
                    raise errors.DeadlineExceeded("request deadline exceeded while queued") from None
                raise errors.Overloaded(f"model {model!r}: no slot within {self.cfg.queue_timeout:.0f}s",
                                        retry_after=2.0) from None
            finally:
                self.waiting[model] -= 1
                if self.queued is not None:
                    self.queued.labels(model).dec()
        else:
            await sem.acquire()
        try:
            yield
        finally:
            sem.release()


def cancel_on_disconnect(receive: Receive, gone: Callable[[], None]) -> Any:
    """Watch for the client's disconnect; then call ``gone`` and cancel the calling task (the response in
    progress). Call ``.cancel()`` on the returned object when the response ends. Our own server
    (:mod:`frontend.http1`) calls back on disconnect; under another server a task waits on ``receive``."""
    task = asyncio.current_task()

    def lost() -> None:
        gone()
        if task is not None:
            task.cancel()

    register = getattr(getattr(receive, "__self__", None), "on_disconnect", None)
    if register is not None:
        return _Unregister(register(lost))

    async def watch() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                lost()
                return

    return asyncio.ensure_future(watch())


class _Unregister:
    __slots__ = ("cancel",)

    def __init__(self, cancel: Callable[[], None]) -> None:
        self.cancel = cancel


class OpenAIResponse(Response):
    """Runs a request inside the ASGI call, so a client disconnect cancels it (and the worker's request).

    Streaming: SSE body from an async iterator of bytes. Non-streaming: one JSON body from a coroutine.
    """

    def __init__(self, run: Callable[[], Awaitable[Any]] | None = None,
                 stream: Callable[[sse.DirectWriter | None], AsyncIterator[bytes]] | None = None,
                 on_disconnect: Callable[[], None] | None = None,
                 admission: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None,
                 on_stream_start: Callable[[], None] | None = None,
                 on_stream_end: Callable[[bool], None] | None = None) -> None:
        super().__init__(status_code=200)
        self._on_stream_start = on_stream_start
        self._on_stream_end = on_stream_end
        self._run = run
        self._stream = stream
        self._on_disconnect = on_disconnect
        self._admission = admission
        self._disconnected = False  # the client went away (its disconnect cancelled this response)

    def _gone(self) -> None:
        self._disconnected = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = cancel_on_disconnect(receive, self._gone)
        try:
            try:
                adm = self._admission() if self._admission else contextlib.nullcontext()
                async with adm:
                    if self._stream is not None:
                        await self._send_stream(send, self._stream)
                    else:
                        assert self._run is not None
                        try:
                            body = await self._run()
                            resp = json_response(body)
                        except errors.DynamoError as exc:
                            resp = error_response(exc)
                        except Exception as exc:  # a bug: still the one error shape, not the server's own 500
                            log.exception("unhandled error")
                            resp = error_response(errors.internal(exc))
                        await resp(scope, receive, send)
            except errors.DynamoError as exc:  # admission refused before anything was sent
                await error_response(exc)(scope, receive, send)
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
            if self._on_disconnect:
                self._on_disconnect()
        finally:
            watcher.cancel()

    async def _send_stream(self, send: Send,
                           make_body: Callable[[sse.DirectWriter | None], AsyncIterator[bytes]]) -> None:
        """Send the SSE body. Once the headers are out, every stream ends with a finish_reason or an error
        event, then ``[DONE]``: the body generator maps the errors it knows; what escapes it (a bug, a
        cancellation by the server rather than the client) is turned into an error event here. The body may
        also write chunks through a :class:`frontend.sse.DirectWriter` (the token path); what it yields
        goes out after those."""
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        direct = sse.writer_for(send)
        body = make_body(direct)
        if self._on_stream_start is not None:
            self._on_stream_start()
        ended = ok = False
        failure: errors.DynamoError | None = None
        cancelled: asyncio.CancelledError | None = None
        try:
            try:
                async for chunk in body:
                    # The chunk ending in [DONE] is the last one: it goes out with the end of the body, one write.
                    ended = chunk.endswith(DONE)
                    if direct is not None and direct.busy:
                        await direct.drain()
                    await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                    if ended:
                        break
                ok = True
                if not ended:
                    failure = errors.DynamoError("internal error: the stream ended without a finish reason")
            except asyncio.CancelledError as exc:
                if self._disconnected:
                    raise  # nobody is reading
                # Cancelled by the server (uvicorn past its graceful-shutdown timeout), not by the client.
                cancelled = exc
                failure = errors.Unavailable("the frontend is shutting down; this stream was stopped")
            except Exception as exc:
                log.exception("stream failed after its headers were sent")
                failure = errors.internal(exc)
            if not ended:
                # Before the body's clean-up below, which may wait on NATS while the server stops.
                tail = error_event(failure) + DONE if failure is not None else DONE
                with contextlib.suppress(Exception):
                    if direct is not None and direct.busy:
                        await direct.drain()
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            with contextlib.suppress(Exception):
                await body.aclose()  # type: ignore[attr-defined]
            if direct is not None:
                direct.close()
            if self._on_stream_end is not None:
                self._on_stream_end(ok)
        if cancelled is not None:
            raise cancelled


class Frontend:
    def __init__(self, manager: ModelManager, engine: Dispatcher, metrics: FrontendMetrics,
                 cfg: FrontendConfig) -> None:
        self.manager = manager
        self.engine = engine
        self.metrics = metrics
        self.cfg = cfg
        self.admission = _Admission(cfg, metrics.queued)
        self.health = HealthMonitor(manager, engine, metrics)  # frontend.main configures and starts its canary
        self.offload = offload.Offload(cfg.prepare_threads, cfg.prepare_nice)

    # ------------------------------------------------------------------ request preparation

    def prepare(self, kind: str, body: bytes, tenant: str | None = None, arrived: float = 0.0) -> Prepared:
        """A request body -> :class:`Prepared` (errors are DynamoErrors with their status). ``arrived``:
        ``time.perf_counter()`` when the request arrived (default: now)."""
        arrived = arrived or time.perf_counter()
        if len(body) > self.cfg.max_body_bytes:
            raise errors.DynamoError(f"request body of {len(body)} bytes is over the limit of "
                                     f"{self.cfg.max_body_bytes}", code=errors.ErrorCode.TOO_LARGE)
        req: Any = op.parse_chat(body) if kind == "chat" else op.parse_completion(body)
        sm: ServedModel = self.manager.get(req.model, waiting_ok=self.cfg.worker_wait_timeout > 0)
        pre = sm.pre
        salt = tenants.cache_salt(tenant, tenants.check_client_salt(req.cache_salt))
        prompt_texts: list[str] = []
        if kind == "chat":
            prompts: list[Sequence[int]] = [pre.encode_chat_ids(
                op.template_messages(req), req.add_generation_prompt, req.tools, req.chat_template_kwargs,
                cache_salt=salt)]
        else:
            prompts = []
            for item in op.prompts(req):
                if isinstance(item, str):
                    prompt_texts.append(item)
                    prompts.append(array("i", pre.encode_prompt(item)))
                else:
                    pre.check_token_ids(item)
                    prompt_texts.append(pre.decode(item, skip_special_tokens=False))
                    prompts.append(array("i", item))
        ctx = sm.card.context_length
        max_tokens = max(op.resolve_max_tokens(req, len(pr), ctx) for pr in prompts)
        sampling, stop, stop_strings = op.to_sampling(req)
        if sampling.logit_bias:
            pre.check_token_ids(list(sampling.logit_bias), param="logit_bias")  # the worker checks too
        stop.max_tokens = max_tokens
        nvext = req.nvext
        pinned = None
        if nvext is not None and nvext.backend_instance_id is not None:
            b = nvext.backend_instance_id
            pinned = f"{b:016x}" if isinstance(b, int) else str(b)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        output = chat_output.plan(req, sm.card, self.cfg.tool_call_parser, self.cfg.reasoning_parser,
                                  self.metrics) if kind == "chat" else None
        mm = self.metrics.model(sm.name)
        for pr in prompts:
            mm.input_tokens.inc(len(pr))
        mm.model_requests.inc()
        return Prepared(arrived=arrived, kind=kind, model=sm, prompts=prompts, sampling=sampling, stop=stop,
                        stop_strings=stop_strings, n=req.n, stream=req.stream, include_usage=include_usage,
                        logprobs=sampling.logprobs, pinned=pinned, request_id=new_request_id(kind),
                        created=int(time.time()), echo=bool(getattr(req, "echo", False)),
                        prompt_texts=prompt_texts, include_stop_str=req.include_stop_str_in_output,
                        skip_special_tokens=req.skip_special_tokens and not (output and output.keep_special_tokens),
                        deadline=time.time() + self.cfg.request_timeout, cache_salt=salt, output=output)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is known to be over the limit: by its Content-Length
        before a byte is read, else while reading, so an oversized body is never buffered whole."""
        limit = self.cfg.max_body_bytes
        for name, value in request.scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    raise errors.DynamoError(f"request body of {int(value)} bytes is over the limit of {limit}",
                                             code=errors.ErrorCode.TOO_LARGE)
                break
        cached = getattr(request, "_body", None)  # read already (starlette caches it)
        if cached is not None:
            return bytes(cached)
        # ASGI receive() directly: the body is usually one message (no async generator, no Headers object).
        receive = request.receive
        body = b""
        parts: list[bytes] | None = None
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                raise ClientDisconnect()
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise errors.DynamoError(f"request body of more than {limit} bytes is over the limit of "
                                             f"{limit}", code=errors.ErrorCode.TOO_LARGE)
                if not body:
                    body = chunk
                else:
                    if parts is None:
                        parts = [body]
                    parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts) if parts is not None else bytes(body)

    async def handle(self, kind: str, request: Request) -> Response:
        endpoint = "chat" if kind == "chat" else "completions"
        t0 = time.perf_counter()
        try:
            body = await self.read_body(request)
            if faults.enabled:
                await faults.hit("frontend.tokenizing")
            # A long prompt takes milliseconds to render and tokenize (3.7 ms for 3.2k tokens): off the event
            # loop, on a few niced threads (frontend/offload.py), so the streams in flight keep flowing.
            tenant = request.scope.get(tenants.TENANT_SCOPE_KEY)
            p = await self.offload.run(self.prepare, kind, body, tenant, t0) if len(body) > OFFLOAD_BODY_BYTES \
                else self.prepare(kind, body, tenant, t0)
        except errors.DynamoError as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return error_response(exc)
        name = p.model.name
        mm = self.metrics.model(name)
        gauge = mm.inflight

        def disconnected() -> None:
            self.metrics.disconnects.labels(name).inc()
            self.metrics.requests.labels(endpoint, "499").inc()

        if p.stream:
            def stream_end(ok: bool) -> None:
                if ok:
                    self.metrics.request_done(endpoint, "200")
                gauge.dec()
                mm.duration.observe(time.perf_counter() - t0)

            # No wrapping generator: each SSE chunk crosses one async-generator frame less.
            return OpenAIResponse(stream=lambda direct: stream_response(self.engine, p, direct),
                                  on_disconnect=disconnected,
                                  admission=lambda: self.admit(endpoint, p), on_stream_start=gauge.inc,
                                  on_stream_end=stream_end)

        async def run() -> Any:
            gauge.inc()
            try:
                out = await complete(self.engine, p)
                self.metrics.requests.labels(endpoint, "200").inc()
                return out
            except errors.DynamoError as exc:
                self.metrics.requests.labels(endpoint, str(exc.status)).inc()
                raise
            except Exception:
                self.metrics.requests.labels(endpoint, "500").inc()
                raise
            finally:
                gauge.dec()
                self.metrics.duration.labels(name).observe(time.perf_counter() - t0)

        return OpenAIResponse(run=run, on_disconnect=disconnected, admission=lambda: self.admit(endpoint, p))

    @contextlib.asynccontextmanager
    async def admit(self, endpoint: str, p: Prepared) -> AsyncIterator[None]:
        """Before a byte of the response is sent: wait for a worker if the model has none (scale from zero),
        then for a concurrency slot. A refusal here is a plain JSON error (503 / 429 / 504), counted."""
        admitted = False
        try:
            if not p.model.has_decode_pool:
                await self._await_worker(p)
            async with self.admission.slot(p.model.name, p.deadline):
                admitted = True
                yield
        except errors.DynamoError as exc:
            if not admitted:
                self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            raise

    async def _await_worker(self, p: Prepared) -> None:
        """Park the request until a worker of its model registers. The gauge is the planner's signal to
        bring a pool back from zero; past ``worker_wait_timeout`` (or the request's deadline) it is a 503."""
        wait = min(self.cfg.worker_wait_timeout, p.deadline - time.time())
        if wait <= 0:
            raise errors.Unavailable(f"model {p.model.name!r} has no ready worker")
        gauge = self.metrics.awaiting_worker.labels(p.model.name)
        gauge.inc()
        try:
            p.model = await self.manager.wait_for_worker(p.model.name, wait)
        finally:
            gauge.dec()

    # ------------------------------------------------------------------ models / health

    def model_obj(self, sm: ServedModel) -> dict[str, Any]:
        return {"id": sm.name, "object": "model", "created": sm.created, "owned_by": "dynamo-rt",
                "max_model_len": sm.card.context_length}


# Request bodies over this size are parsed, templated and tokenized in a worker thread (a thread hop costs
# ~0.1 ms; a body this size takes about 1 ms and up).
OFFLOAD_BODY_BYTES = 8192
_FAST_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_OPEN_PATHS = frozenset({"/live", "/health", "/metrics"})  # probes and scrapes need no API key


class FastPath:
    """The ASGI entry point: the two completion routes go straight to :meth:`Frontend.handle`, skipping
    FastAPI's routing and middleware stack, which otherwise wraps every ``send`` (every SSE chunk) in three
    closures; every other route is FastAPI's. With API keys configured it authenticates every request first
    (one place, no middleware on the token path) and leaves the tenant in the scope for :meth:`Frontend.handle`."""

    def __init__(self, fe: Frontend, app: FastAPI) -> None:
        self.fe = fe
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _FAST_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        keys = self.fe.cfg.keys
        if keys is not None and scope["type"] == "http" and scope.get("path") not in _OPEN_PATHS:
            tenant = keys.authenticate(scope["headers"])
            if tenant is None:
                bad = errors.Unauthorized("invalid or missing API key")
                if scope.get("path") == "/v1/messages":  # Anthropic's clients read Anthropic's error shape
                    from frontend import messages

                    await messages.error_response(bad)(scope, receive, send)
                else:
                    await error_response(bad)(scope, receive, send)
                return
            scope[tenants.TENANT_SCOPE_KEY] = tenant
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            resp = await self.fe.handle(kind, Request(scope, receive))
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            self.fe.metrics.requests.labels(kind if kind == "chat" else "completions", "499").inc()
            return
        except Exception as exc:  # the same mapping as the app's catch-all handler
            log.exception("unhandled error")
            resp = error_response(errors.internal(exc))
        await resp(scope, receive, send)


def build_asgi(fe: Frontend) -> FastPath:
    """What uvicorn serves: :class:`FastPath` in front of :func:`build_app`."""
    return FastPath(fe, build_app(fe))


def build_app(fe: Frontend) -> FastAPI:
    from frontend import messages, responses  # they build on this module
    from frontend.response_store import ResponseStore

    app = FastAPI(title="dynamo-rt", version="0.1.0",
                  description="OpenAI-compatible API of the dynamo-rt disaggregated serving runtime")
    schemas = op.openapi_schemas()

    def body_spec(name: str) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"}}}}}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
            spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(errors.DynamoError)
    async def _dyn(_: Request, exc: errors.DynamoError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: errors.ErrorCode.NOT_FOUND, 413: errors.ErrorCode.TOO_LARGE}.get(
            exc.status_code, errors.ErrorCode.INVALID_REQUEST)
        e = errors.DynamoError(str(exc.detail), code=code)
        r = json_response(error_body(e), exc.status_code)
        return r

    @app.exception_handler(RequestValidationError)
    async def _val(_: Request, exc: RequestValidationError) -> Response:
        return error_response(errors.InvalidRequest(str(exc.errors())))

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(errors.internal(exc))

    @app.post("/v1/chat/completions", openapi_extra=body_spec("ChatCompletionRequest"))
    async def chat(request: Request) -> Response:
        return await fe.handle("chat", request)

    @app.post("/v1/completions", openapi_extra=body_spec("CompletionRequest"))
    async def completions(request: Request) -> Response:
        return await fe.handle("completion", request)

    responses.attach(app, fe, ResponseStore(fe.engine.transport, fe.manager.view.namespace, fe.cfg.response_ttl))
    messages.attach(app, fe)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [fe.model_obj(m) for m in fe.manager.ready()]})

    @app.get("/v1/models/{model_id:path}/ready")
    async def model_ready(model_id: str, canary: bool = False) -> Response:
        if canary and model_id in fe.manager.models:
            await fe.health.check(model_id)
        return json_response(*reversed(fe.health.ready(model_id)))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        for m in fe.manager.ready():
            if m.name == model_id:
                return json_response(fe.model_obj(m))
        raise errors.NotFound(f"The model `{model_id}` does not exist.", param="model")

    @app.get("/live")
    async def live() -> Response:
        return json_response({"status": "live"})

    @app.get("/health")
    async def health(canary: bool = False) -> Response:
        if canary:
            await fe.health.check()
        return json_response(*reversed(fe.health.health()))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(fe.metrics.registry), media_type="text/plain; version=0.0.4")

    return app
