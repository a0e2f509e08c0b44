"""The SGLang engine adapter: ``sglang.Engine`` in the worker process, translated to our Engine protocol.

Place: built by ``workers.sglang.flags.build_engine``; the worker runtime serves it like any engine. SGLang is
imported in :meth:`SglangEngine.start` (through ``engine_factory``), so this module imports without it and the
contract tests drive it with a stand-in engine object. API followed: SGLang 0.5.23 (the PyPI wheel's
``sglang/srt/entrypoints/engine.py``; the same names since 0.4.x): ``Engine(**server_args)`` with
``skip_tokenizer_init=True``, ``await Engine.async_generate(input_ids=..., sampling_params={...}, stream=True,
rid=..., return_logprob=..., top_logprobs_num=..., bootstrap_host=..., bootstrap_port=..., bootstrap_room=...)``
yielding dicts ``{"output_ids": [...], "meta_info": {"finish_reason": {"type": ...} | None, "prompt_tokens",
"cached_tokens", "output_token_logprobs": [(logprob, id, text)], "output_top_logprobs": [...]}}``
(cumulative unless the engine runs with ``incremental_streaming_output``), ``Engine.shutdown()``.

Disaggregation with SGLang's own hand-off (DESIGN "Disaggregated prefill / decode" point 4): a prefill worker
runs SGLang with ``disaggregation_mode=prefill`` and a bootstrap server; the prefill and the decode request of
one prompt carry the same ``bootstrap_host`` / ``bootstrap_port`` / ``bootstrap_room``, and SGLang pairs them:
the prefill request waits until the decode request has reserved its KV slots, then pushes the KV (NIXL). So
the two requests must run at the same time. Our frontend calls the prefill worker first and hands its final
``kv_transfer`` to the decode worker; to fit that, the prefill side *answers at once*: it picks the room,
starts the SGLang request in the background and returns ``KvTransferParams.opaque = {bootstrap_host,
bootstrap_port, bootstrap_room}`` without waiting, and the decode request that follows joins the room. (A
frontend that assigns the room itself and sends both at once, as SGLang's router does, passes the room in the
prefill request's ``kv_transfer.opaque``; then the prefill side streams normally.) The decode side outputs the
whole answer, first token included (SGLang sends it along with the KV). An SGLang decode worker cannot prefill
by itself: without bootstrap parameters it fails the request (no local fallback as with vLLM).

KV events: SGLang publishes vLLM-shaped ``BlockStored`` / ``BlockRemoved`` events over ZMQ
(``kv_events_config``); :class:`workers.common.kv_events.ZmqEventSubscriber` maps them to our block hashes.
Load: SGLang's load snapshots (``tokenizer_manager.get_loads()``, 0.5.2x) when present, else our own count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from dynamo_rt import errors
from dynamo_rt.protocol import GenerateRequest, KvTransferParams, TokenLogprob
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo
from workers.common.kv_events import KvHashMap, ZmqEventSubscriber
from workers.common.model_info import model_info_from_dir
from workers.common.net import local_address
from workers.common.structured import sglang_structured, str_keys

log = logging.getLogger(__name__)

BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
# How long a prefill request started by an early hand-off may wait for its decode partner and finish.
HANDOFF_TIMEOUT = 600.0
LOAD_POLL_INTERVAL = 1.0


def _sglang_engine(**kwargs: Any) -> Any:
    import sglang

    return sglang.Engine(**kwargs)


def _sglang_batch_decoder() -> Callable[[bytes], Any]:
    import msgspec
    from sglang.srt.disaggregation.kv_events import KVEventBatch

    return msgspec.msgpack.Decoder(type=KVEventBatch).decode


class SglangEngine:
    """One ``sglang.Engine`` serving one model in agg, prefill or decode mode."""

    def __init__(self, *, model_path: str, served_model_name: str | None, mode: str, engine_kwargs: dict[str, Any],
                 bootstrap_host: str | None = None, kv_events: bool = True,
                 engine_factory: Callable[..., Any] = _sglang_engine,
                 event_decoder: Callable[[], Callable[[bytes], Any]] = _sglang_batch_decoder) -> None:
        self.mode = mode
        self.engine_kwargs = dict(engine_kwargs)
        self.kv_events = kv_events
        self.info: ModelInfo = model_info_from_dir(Path(model_path), served_model_name,
                                                   int(engine_kwargs.get("page_size") or 16))
        if engine_kwargs.get("context_length"):
            self.info.context_length = int(engine_kwargs["context_length"])
        self.bootstrap_host = bootstrap_host or local_address()
        self.bootstrap_port = int(engine_kwargs.get("disaggregation_bootstrap_port") or 8998)
        self.instance_id = ""  # set by the runtime; goes into KvTransferParams.instance_id
        self._factory = engine_factory
        self._event_decoder = event_decoder
        self._engine: Any = None
        self._incremental = False
        self._sink: KvEventSink | None = None
        self._events: ZmqEventSubscriber | None = None
        self._active: dict[str, int] = {}  # request id -> tokens it holds KV for
        self._handoffs: set[asyncio.Task[None]] = set()  # prefill requests answered early
        self._loads: list[Any] = []
        self._load_task: asyncio.Task[None] | None = None

    @property
    def instance_extra(self) -> dict[str, Any]:
        """For ``InstanceRecord.extra``: where a prefill worker's bootstrap server listens."""
        if self.mode != "prefill":
            return {}
        return {"bootstrap_host": self.bootstrap_host, "bootstrap_port": self.bootstrap_port}

    # ------------------------------------------------------------------ lifecycle

    def _server_kwargs(self) -> dict[str, Any]:
        kw = dict(self.engine_kwargs)
        if self.mode == "prefill":
            kw.setdefault("host", "0.0.0.0")  # the bootstrap server binds here; decode workers are elsewhere
        if self._events is not None and "kv_events_config" not in kw:
            kw["kv_events_config"] = json.dumps({"publisher": "zmq", "endpoint": self._events.endpoint,
                                                 "topic": "kv"})
        return kw

    async def start(self) -> None:
        if self.kv_events:
            self._events = ZmqEventSubscriber(KvHashMap(self.info.block_size),
                                              int(self.engine_kwargs.get("dp_size") or 1))
            self._events.bind()
        kw = self._server_kwargs()
        try:
            # Off the event loop: loading takes minutes and etcd keep-alives must go on. SGLang binds its
            # request loop to the serving loop on the first request.
            self._engine = await asyncio.to_thread(self._factory, **kw)
        except ValueError as exc:
            if "main thread" not in str(exc):
                raise
            self._engine = self._factory(**kw)  # an SGLang that installs signal handlers: main thread only
        sa = getattr(self._engine, "server_args", None)
        self._incremental = bool(getattr(sa, "incremental_streaming_output", False))
        page = getattr(sa, "page_size", None)
        if isinstance(page, int) and page > 0:
            self.info.block_size = page
        ctx = getattr(sa, "context_length", None)
        if isinstance(ctx, int) and ctx > 0:
            self.info.context_length = ctx
        if self._events is not None:
            self._events.hash_map.block_size = self.info.block_size
            self._events.start(self._event_decoder(), lambda: self._sink)  # the engine is imported by now
        tm = getattr(self._engine, "tokenizer_manager", None)
        if tm is not None and hasattr(tm, "get_loads"):
            self._load_task = asyncio.create_task(self._poll_loads(tm), name="sglang-loads")
        log.info("SGLang engine ready: %s (%s), page size %d, context %d%s", self.info.name, self.mode,
                 self.info.block_size, self.info.context_length,
                 f", bootstrap {self.bootstrap_host}:{self.bootstrap_port}" if self.mode == "prefill" else "")

    async def stop(self) -> None:
        for t in [*self._handoffs, *([self._load_task] if self._load_task else [])]:
            t.cancel()
        await asyncio.gather(*self._handoffs, *([self._load_task] if self._load_task else []),
                             return_exceptions=True)
        self._handoffs.clear()
        self._load_task = None
        if self._events is not None:
            await self._events.close()
        if self._engine is not None:
            eng, self._engine = self._engine, None
            await asyncio.to_thread(eng.shutdown)

    def run_headless(self) -> None:
        """Nodes of rank > 0 of a multi-node instance: SGLang's ``Engine`` on such a node only runs its
        schedulers for the leader and blocks (0.5.23 ``_launch_subprocesses``); it serves no requests."""
        self._factory(**self._server_kwargs())

    # ------------------------------------------------------------------ requests

    def _sampling(self, request: GenerateRequest) -> dict[str, Any]:
        s, stop = request.sampling, request.stop
        params: dict[str, Any] = {
            "max_new_tokens": stop.max_tokens, "min_new_tokens": min(stop.min_tokens, stop.max_tokens),
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k if s.top_k > 0 else -1,
            "min_p": s.min_p, "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "repetition_penalty": s.repetition_penalty, "ignore_eos": stop.ignore_eos,
        }
        if stop.stop_token_ids:
            params["stop_token_ids"] = list(stop.stop_token_ids)
        if s.seed is not None:
            params["sampling_seed"] = s.seed
        if s.guided is not None:
            params.update(sglang_structured(s.guided))
        if s.logit_bias:
            params["logit_bias"] = str_keys(s.logit_bias)
        return params

    def _call(self, request: GenerateRequest, bootstrap: dict[str, Any] | None) -> Any:
        kw: dict[str, Any] = {"input_ids": list(request.token_ids), "sampling_params": self._sampling(request),
                              "stream": True, "rid": request.request_id}
        if request.sampling.logprobs is not None:
            kw.update(return_logprob=True, top_logprobs_num=request.sampling.logprobs)
        if bootstrap is not None:
            kw.update({k: bootstrap[k] for k in BOOTSTRAP_KEYS})
        return self._engine.async_generate(**kw)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        if self._engine is None:
            raise errors.Unavailable("SGLang engine is not running")
        kt = request.kv_transfer
        given = dict(kt.opaque) if kt is not None and all(k in kt.opaque for k in BOOTSTRAP_KEYS) else None
        if self.mode == "decode" and given is None:
            raise errors.Unavailable("an SGLang decode worker needs a prefill worker's bootstrap host/port/room "
                                     "(it cannot prefill by itself)")
        if self.mode == "prefill" and given is None:
            # Early hand-off: SGLang's prefill request only completes once the decode request has joined the
            # room, which the frontend sends after this answer.
            handoff = {"bootstrap_host": self.bootstrap_host, "bootstrap_port": self.bootstrap_port,
                       "bootstrap_room": secrets.randbits(63)}
            task = asyncio.create_task(self._drive_handoff(request, handoff),
                                       name=f"sglang-prefill-{request.request_id}")
            self._handoffs.add(task)
            task.add_done_callback(self._handoffs.discard)
            yield EngineOutput(token_ids=[], finish_reason="length", prompt_tokens=len(request.token_ids),
                               kv_transfer=KvTransferParams(instance_id=self.instance_id,
                                                            num_tokens=len(request.token_ids), opaque=handoff))
            return
        last: EngineOutput | None = None
        stream = self._stream(request, given)
        try:
            async for eo in stream:
                if eo.finish_reason is not None and request.prefill_only and given is not None:
                    eo.kv_transfer = KvTransferParams(instance_id=self.instance_id,
                                                      num_tokens=len(request.token_ids),
                                                      first_token=eo.token_ids[0] if eo.token_ids else -1,
                                                      opaque=given)
                last = eo
                yield eo
        finally:
            await stream.aclose()  # an early close of ours must reach SGLang (abort) now, not at GC
        if last is None:
            raise errors.Unavailable(f"SGLang gave no output for request {request.request_id}")

    async def _drive_handoff(self, request: GenerateRequest, handoff: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(HANDOFF_TIMEOUT):
                async for _ in self._stream(request, handoff):
                    pass
        except (errors.DynamoError, TimeoutError) as exc:
            log.warning("SGLang prefill of %s (room %s) failed: %s", request.request_id,
                        handoff["bootstrap_room"], exc)

    async def _stream(self, request: GenerateRequest, bootstrap: dict[str, Any] | None
                      ) -> AsyncGenerator[EngineOutput, None]:
        rid = request.request_id
        self._active[rid] = len(request.token_ids)
        seen = lp_seen = 0
        first = True
        finished = False
        gen: Any = None
        try:
            gen = await self._call(request, bootstrap)
            async for out in gen:
                meta = out.get("meta_info") or {}
                ids = list(out.get("output_ids") or [])
                new = ids if self._incremental else ids[seen:]
                seen = seen + len(new) if self._incremental else len(ids)
                eo = EngineOutput(token_ids=[int(t) for t in new])
                if request.sampling.logprobs is not None:
                    eo.logprobs, lp_seen = _logprobs(meta, lp_seen, self._incremental)
                if first:
                    first = False
                    eo.prompt_tokens = int(meta.get("prompt_tokens") or len(request.token_ids))
                    eo.cached_tokens = int(meta.get("cached_tokens") or 0)
                self._active[rid] += len(eo.token_ids)
                reason = meta.get("finish_reason")
                if reason is not None:
                    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
                    if kind not in ("stop", "length"):
                        msg = reason.get("message", kind) if isinstance(reason, dict) else kind
                        raise errors.Unavailable(f"SGLang ended request {rid}: {msg}")
                    eo.finish_reason = kind
                    finished = True
                yield eo
                if finished:
                    return
        except (errors.DynamoError, asyncio.CancelledError, GeneratorExit):
            raise
        except ValueError as exc:  # SGLang's request validation (prompt too long, bad sampling params)
            raise errors.InvalidRequest(str(exc)) from exc
        except Exception as exc:
            raise errors.DynamoError(f"SGLang failed the request: {type(exc).__name__}: {exc}") from exc
        finally:
            self._active.pop(rid, None)
            if gen is not None:
                with contextlib.suppress(Exception):
                    await gen.aclose()
            if not finished and self._engine is not None:
                # Closing the stream aborts the request in SGLang 0.5.2x; older versions need the explicit call.
                tm = getattr(self._engine, "tokenizer_manager", None)
                if tm is not None and hasattr(tm, "abort_request"):
                    with contextlib.suppress(Exception):
                        tm.abort_request(rid)

    # ------------------------------------------------------------------ load, events, pins

    async def _poll_loads(self, tm: Any) -> None:
        while True:
            try:
                self._loads = list(await tm.get_loads())
            except Exception as exc:  # load reporting is best effort: fall back to our own counts
                log.debug("SGLang get_loads failed: %s", exc)
                self._loads = []
            await asyncio.sleep(LOAD_POLL_INTERVAL)

    def load(self) -> EngineLoad:
        bs = self.info.block_size
        ld = EngineLoad(active_requests=len(self._active),
                        active_decode_blocks=sum(-(-n // bs) for n in self._active.values()))
        if self._loads:
            ld.waiting_requests = sum(int(getattr(s, "num_waiting_reqs", 0)) for s in self._loads)
            ld.kv_blocks_used = sum(int(getattr(s, "num_used_tokens", 0)) for s in self._loads) // bs
            ld.kv_blocks_total = sum(int(getattr(s, "max_total_num_tokens", 0)) for s in self._loads) // bs
        return ld

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return self._events.hash_map.cached() if self._events is not None else []

    async def release_pin(self, pin_id: str) -> bool:
        return False  # SGLang frees the prefill side's KV once it is sent


def _logprobs(meta: dict[str, Any], seen: int, incremental: bool) -> tuple[list[TokenLogprob] | None, int]:
    """SGLang's ``output_token_logprobs`` / ``output_top_logprobs`` (``(logprob, token_id, text)`` tuples) past
    ``seen`` -> ours, and the new count."""
    toks = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    start = 0 if incremental else seen
    out: list[TokenLogprob] = []
    for i in range(start, len(toks)):
        lp, tid = toks[i][0], toks[i][1]
        top = tops[i] if i < len(tops) and tops[i] else []
        out.append(TokenLogprob(int(tid), float(lp), [(int(t[1]), float(t[0])) for t in top]))
    return (out or None), (seen + len(out) if incremental else len(toks))
