"""The worker runtime: what every engine worker does around its engine.

* publishes the model's tokenizer files to the NATS object store and the model card to etcd, so the
  frontend needs no model volume;
* serves ``generate`` (and ``release`` / ``kv_blocks`` for disaggregation and router resync) on its
  instance subjects;
* publishes KV events and load metrics on the event plane;
* exposes Prometheus metrics;
* on SIGTERM leaves discovery first, lets in-flight requests finish (bounded), then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynamo_rt import errors, faults
from dynamo_rt.chat_formats import parsers_for_model_dir
from dynamo_rt.discovery import Registry
from dynamo_rt.protocol import (
    Data,
    Final,
    InstanceRecord,
    KvEvent,
    KvEvents,
    LoadMetrics,
    Mode,
    ModelCard,
    decode_generate,
    encode,
)
from dynamo_rt.transport import (
    Endpoint,
    RequestContext,
    Transport,
    instance_subject,
    kv_events_subject,
    load_subject,
)
from workers.common.engine import AdvertisesInstance, CountsPins, Engine, NamedInstance, OwnsKvPool, TieredCache
from workers.common.kv_events import KvEventFaults
from workers.common.kv_handoff import KvHandoff
from workers.common.live_gauges import watch_engine

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
COMPONENT = "backend"
CANARY = faults.EXEMPT_PREFIX  # the frontend's health canary (frontend/health.py) is told how its KV hand-off went
LOAD_INTERVAL = 1.0
KV_TAIL_BATCHES = 3  # empty KV event batches after a burst: a trailing loss shows as a seq gap within seconds


def models_bucket(namespace: str) -> str:
    return f"{namespace}-models"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("dynamo_worker_requests", "Requests handled", ["model", "outcome"], registry=r)
        self.active = Gauge("dynamo_worker_active_requests", "Requests in flight", ["model"], registry=r)
        self.kv_used = Gauge("dynamo_worker_kv_blocks_used", "KV blocks in use", ["model"], registry=r)
        self.kv_total = Gauge("dynamo_worker_kv_blocks_total", "KV blocks in the pool", ["model"], registry=r)
        self.output_tokens = Counter("dynamo_worker_output_tokens", "Tokens generated", ["model"], registry=r)
        self.cached_tokens = Counter("dynamo_worker_cached_prompt_tokens", "Prompt tokens served from cache",
                                     ["model"], registry=r)
        self.prompt_tokens = Counter("dynamo_worker_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.ttft = Histogram("dynamo_worker_time_to_first_token_seconds", "Worker-side TTFT", ["model"],
                              registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        # Disaggregation (our NIXL hand-off, workers.common.kv_handoff). Decode side: a request that carried
        # KV transfer parameters ends as one pull or one fallback (its prompt recomputed here).
        self.kv_pulls = Counter("dynamo_worker_kv_pulls", "Prompt KV pulled from a prefill worker over NIXL",
                                ["model"], registry=r)
        self.kv_pulled_bytes = Counter("dynamo_worker_kv_pulled_bytes", "Bytes of KV pulled over NIXL", ["model"],
                                       registry=r)
        self.kv_pull_failures = Counter("dynamo_worker_kv_pull_failures",
                                        "Pulls that failed (read error, prefill worker gone, checksum mismatch)",
                                        ["model", "reason"], registry=r)
        self.kv_fallbacks = Counter("dynamo_worker_kv_local_prefill_fallbacks",
                                    "Decode requests with KV transfer parameters whose prompt was prefilled locally "
                                    "(the pull failed or could not be tried)", ["model"], registry=r)
        self.kv_pull_seconds = Histogram("dynamo_worker_kv_pull_seconds",
                                         "NIXL read time of one request's prompt blocks (successful pulls)", ["model"],
                                         registry=r, buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                                                              0.05, 0.1, 0.25, 1))
        # Prefill side: every pin ends released by its decode worker or expired (pin timeout).
        self.kv_pins_released = Counter("dynamo_worker_kv_pins_released",
                                        "Pinned prompt blocks released by a decode worker", ["model"], registry=r)
        self.kv_pins_expired = Counter("dynamo_worker_kv_pins_expired",
                                       "Pinned prompt blocks freed by the pin timeout (never released)", ["model"],
                                       registry=r)


class WorkerRuntime:
    def __init__(
        self,
        engine: Engine,
        *,
        engine_name: str,
        mode: Mode,
        registry: Registry,
        transport: Transport,
        metrics: WorkerMetrics | None = None,
        extra: dict[str, Any] | None = None,
        kv_verify_checksum: bool = False,
        fault_corrupt_pulls: int = 0,
    ) -> None:
        self.engine = engine
        self.engine_name = engine_name
        self.mode = mode
        self.registry = registry
        self.transport = transport
        self.ns = registry.namespace
        self.instance_id = registry.instance_id
        self.metrics = metrics or WorkerMetrics()
        self.extra = extra or {}
        self.kv_verify_checksum = kv_verify_checksum
        self.fault_corrupt_pulls = fault_corrupt_pulls  # test-only fault hook (KvHandoff)
        self._pins_expired = 0  # the engine's count, last copied to the metrics
        self._endpoints: list[Endpoint] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._kv_seq = 0
        self._kv_pending: list[KvEvent] = []
        self._kv_flush_scheduled = False
        self._kv_faults: KvEventFaults[bytes] | None = KvEventFaults.from_env()
        self._kv_tail = 0  # empty KV event batches still to send after the last real one
        self._draining = False
        self._bg: set[asyncio.Future[None]] = set()
        self.kv: KvHandoff | None = None
        self.subject = instance_subject(self.ns, COMPONENT, "generate", self.instance_id)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        info = self.engine.info
        if isinstance(self.engine, NamedInstance):
            self.engine.instance_id = self.instance_id  # engines that fill KvTransferParams.instance_id
        files = await self._publish_tokenizer()
        digest = hashlib.sha256(b"".join(k.encode() + v.encode() for k, v in sorted(files.items()))).hexdigest()
        self._endpoints.append(await self.transport.serve(self.subject, self._generate, self._dropped))
        self._endpoints.append(await self.transport.serve(
            instance_subject(self.ns, COMPONENT, "release", self.instance_id), self._release))
        self._endpoints.append(await self.transport.serve(
            instance_subject(self.ns, COMPONENT, "kv_blocks", self.instance_id), self._kv_blocks))
        self.engine.set_kv_event_sink(self._on_kv_events)
        engine = self.engine
        if self.mode in (Mode.PREFILL, Mode.DECODE) and KvHandoff.supported(engine):
            try:
                self.kv = KvHandoff(engine, self.registry, metrics=self.metrics, model=info.name,
                                    release=self._release_remote, verify_checksum=self.kv_verify_checksum,
                                    fault_corrupt_pulls=self.fault_corrupt_pulls)
                await self.kv.start()
            except errors.DynamoError as exc:
                log.warning("NIXL KV hand-off unavailable (%s): decode requests will prefill locally", exc)
                self.kv = None
        rec = InstanceRecord(
            instance_id=self.instance_id, namespace=self.ns, component=COMPONENT, endpoint="generate",
            subject=self.subject, mode=self.mode, engine=self.engine_name, model=info.name,
            kv_block_size=info.block_size, max_context=info.context_length, host=socket.gethostname(),
            pid=os.getpid(), extra=self._instance_extra(),
        )
        tool_parser, reasoning_parser = parsers_for_model_dir(info.path)  # what its chat template writes
        card = ModelCard(
            name=info.name, context_length=info.context_length, kv_block_size=info.block_size,
            tokenizer_bucket=models_bucket(self.ns), tokenizer_files=files, tokenizer_digest=digest,
            eos_token_ids=list(info.eos_token_ids), bos_token_id=info.bos_token_id, created=int(time.time()),
            tool_call_parser=tool_parser, reasoning_parser=reasoning_parser,
        )
        # Model card before the instance: a frontend that sees the instance can always find the tokenizer.
        await self.registry.register_model(card)
        await self.registry.register_instance(rec)
        self._tasks.append(asyncio.create_task(self._publish_load_loop(), name="load-publisher"))
        watch_engine(self.metrics, self.engine)
        log.info("worker %s serving model %r (%s, mode %s) on %s", self.instance_id, info.name,
                 self.engine_name, self.mode.value, self.subject)

    def _instance_extra(self) -> dict[str, Any]:
        """The record's ``extra``: the engine's own fields (an SGLang prefill worker's bootstrap address), then
        the caller's."""
        own = self.engine.instance_extra if isinstance(self.engine, AdvertisesInstance) else {}
        return {**own, **self.extra}

    async def stop(self, *, grace: float = 30.0) -> None:
        """Leave discovery, let in-flight requests finish for up to ``grace`` seconds, then stop."""
        self._draining = True
        with contextlib.suppress(Exception):
            await self.registry.close(revoke=True)
        deadline = time.monotonic() + grace
        while self.inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for ep in self._endpoints:
            await ep.close(cancel_inflight=True)
        self._endpoints.clear()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.engine.set_kv_event_sink(None)
        if self.kv is not None:
            self.kv.close()
        await self.engine.stop()

    def inflight(self) -> int:
        return sum(len(ep.active) for ep in self._endpoints[:1])

    # ------------------------------------------------------------------ tokenizer files

    async def _publish_tokenizer(self) -> dict[str, str]:
        path = self.engine.info.path
        out: dict[str, str] = {}
        if not path:
            return out
        root = Path(path)
        bucket = models_bucket(self.ns)
        for fname in TOKENIZER_FILES:
            f = root / fname
            if not f.is_file():
                continue
            data = f.read_bytes()
            name = f"{hashlib.sha256(data).hexdigest()[:24]}-{fname}"
            await self.transport.put_object(bucket, name, data)
            out[fname] = name
        return out

    # ------------------------------------------------------------------ endpoints

    def _dropped(self, payload: bytes) -> None:
        """A request cancelled before its handler ran (it and its cancel arrived together): a decode request
        still names the prefill worker's pin, which no pull will release now."""
        with contextlib.suppress(Exception):
            kv = decode_generate(payload).kv_transfer
            if kv is not None and kv.pin_id and kv.instance_id:
                self._release_remote(kv.instance_id, kv.pin_id)

    async def _generate(self, payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        if self._draining:
            raise errors.Unavailable("worker is shutting down")
        req = decode_generate(payload)
        model = self.engine.info.name
        m = self.metrics
        m.active.labels(model).inc()
        t0 = time.monotonic()
        first = True
        prompt_tokens = len(req.token_ids)
        cached = 0
        produced = 0
        outcome = "error"
        outs = self.engine.generate(req)
        kv = req.kv_transfer
        # A decode request whose prompt KV our NIXL loader pulls: it ends as one pull or one local prefill
        # (fallback), and the loader releases the prefill worker's pin when its read is over.
        # (Our engines always set a pin id: it is how the loader's outcome is found again.)
        pulls = (kv is not None and bool(kv.pin_id) and kv.first_token >= 0 and not req.prefill_only
                 and self.mode is Mode.DECODE and isinstance(self.engine, OwnsKvPool))
        pinned = ""  # a prefill-only request's pin, until its final frame is out: freed here if it never is
        try:
            async for out in outs:
                if first:
                    first = False
                    if kv is not None and kv.pin_id and not pulls:
                        # Engines with their own hand-off have the blocks before their first token: free the pin.
                        self._release_remote(kv.instance_id, kv.pin_id)
                        kv = None
                    m.ttft.labels(model).observe(time.monotonic() - t0)
                    if out.prompt_tokens:
                        prompt_tokens = out.prompt_tokens
                    cached = out.cached_tokens
                produced += len(out.token_ids)
                if out.token_ids:
                    yield Data(seq=0, token_ids=out.token_ids, logprobs=out.logprobs)
                    if faults.enabled and produced > 1 and not req.prefill_only:  # past the first token
                        await faults.hit("worker.decoding", req.request_id)
                if out.finish_reason is not None:
                    outcome = "ok"
                    if out.kv_transfer is not None and not out.kv_transfer.instance_id:
                        out.kv_transfer.instance_id = self.instance_id  # where decode pulls from
                    if out.kv_transfer is not None and self.kv is not None:
                        self.kv.add_checksums(out.kv_transfer)
                    pinned = out.kv_transfer.pin_id if out.kv_transfer is not None else ""
                    if faults.enabled and pinned:
                        await faults.hit("worker.remote_prefill", req.request_id)
                    if pulls and kv is not None and self.kv is not None and req.request_id.startswith(CANARY):
                        yield Data(seq=0, token_ids=[], payload=msgspec.msgpack.encode(  # how the hand-off went
                            {"kv_pull": self.kv.outcome(kv.pin_id) or "not_tried"}))
                    yield Final(seq=0, finish_reason=out.finish_reason, prompt_tokens=prompt_tokens,
                                completion_tokens=produced, cached_tokens=cached, kv_transfer=out.kv_transfer)
                    pinned = ""
                    return
            outcome = "ok"
            yield Final(seq=0, finish_reason="length", prompt_tokens=prompt_tokens,
                        completion_tokens=produced, cached_tokens=cached)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if isinstance(outs, AsyncGenerator):  # run its finally blocks now, not at GC
                await outs.aclose()
            if pinned:  # no decode worker will ever hear of this pin
                await self.engine.release_pin(pinned)
            tried = self.kv.take_outcome(kv.pin_id) if pulls and kv is not None and self.kv is not None else None
            if kv is not None and kv.pin_id and tried is None:
                self._release_remote(kv.instance_id, kv.pin_id)
            if pulls and tried is None and outcome == "ok" and produced > 1:
                # The engine computed the prompt without trying a pull (no NIXL here, or parameters that do
                # not match the prompt); a failed pull was counted by the loader.
                m.kv_fallbacks.labels(model).inc()
            m.active.labels(model).dec()
            m.requests.labels(model, outcome).inc()
            m.output_tokens.labels(model).inc(produced)
            m.prompt_tokens.labels(model).inc(prompt_tokens)
            m.cached_tokens.labels(model).inc(cached)

    def _release_remote(self, instance_id: str, pin_id: str) -> None:
        async def release() -> None:
            subject = instance_subject(self.ns, COMPONENT, "release", instance_id)
            try:
                stream = await self.transport.call(subject, f"release-{pin_id}",
                                                   msgspec.msgpack.encode(pin_id), timeout=10)
                async for _ in stream:
                    pass
            except errors.DynamoError as exc:  # the prefill side frees it by timeout anyway
                log.debug("releasing pin %s on %s failed: %s", pin_id, instance_id, exc)

        task = asyncio.ensure_future(release())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _release(self, payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        pin_id = msgspec.msgpack.decode(payload, type=str)
        ok = await self.engine.release_pin(pin_id)
        if ok:
            self.metrics.kv_pins_released.labels(self.engine.info.name).inc()
        yield Final(seq=0, finish_reason="stop" if ok else None)

    async def _kv_blocks(self, payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        # Flush queued events first so the snapshot and the event sequence agree.
        self._flush_kv_events()
        hashes = self.engine.cached_block_hashes()
        # seq: the last batch this snapshot includes (-1: none yet)
        snap: dict[str, Any] = {"seq": self._kv_seq - 1, "hashes": hashes}
        if isinstance(self.engine, TieredCache):
            snap["tiers"] = self.engine.cached_block_hashes_by_tier()  # lower tiers (host / disk)
        yield Data(seq=0, token_ids=[], payload=encode(snap))
        yield Final(seq=0, finish_reason="stop")

    # ------------------------------------------------------------------ events

    def _on_kv_events(self, events: list[KvEvent]) -> None:
        if faults.enabled and faults.dropped("worker.kv_events"):
            return
        # Coalesce every event of one loop iteration into one message.
        self._kv_pending.extend(events)
        if not self._kv_flush_scheduled:
            self._kv_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_kv_events)

    def _flush_kv_events(self, tail: bool = False) -> None:
        self._kv_flush_scheduled = False
        if not (self._kv_pending or tail) or not self.transport.connected:
            return
        msg = KvEvents(instance_id=self.instance_id, seq=self._kv_seq, events=self._kv_pending)
        self._kv_seq += 1
        self._kv_pending = []
        # After the last real batch, a few empty ones (one per load report): a batch lost at the end of a burst
        # has no later batch whose seq would show the router the gap; these do, and it resyncs.
        self._kv_tail = self._kv_tail - 1 if tail else KV_TAIL_BATCHES
        subject = kv_events_subject(self.ns, self.engine.info.name)
        for data in self._kv_faults.outgoing(encode(msg)) if self._kv_faults else [encode(msg)]:  # test-only faults
            task = asyncio.ensure_future(self.transport.publish(subject, data))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def load_metrics(self) -> LoadMetrics:
        ld = self.engine.load()
        return LoadMetrics(
            instance_id=self.instance_id, mode=self.mode.value, active_requests=ld.active_requests,
            waiting_requests=ld.waiting_requests, kv_blocks_used=ld.kv_blocks_used,
            kv_blocks_total=ld.kv_blocks_total, active_decode_blocks=ld.active_decode_blocks, ts=time.time(),
        )

    async def _publish_load_loop(self) -> None:
        subject = load_subject(self.ns, self.engine.info.name)
        model = self.engine.info.name
        while True:
            lm = self.load_metrics()
            if isinstance(self.engine, CountsPins):  # before the load goes out: blocks freed are counted
                expired = self.engine.pins_expired
                if expired > self._pins_expired:
                    self.metrics.kv_pins_expired.labels(model).inc(expired - self._pins_expired)
                self._pins_expired = expired
            self.metrics.kv_used.labels(model).set(lm.kv_blocks_used)
            self.metrics.kv_total.labels(model).set(lm.kv_blocks_total)
            if self.transport.connected:
                with contextlib.suppress(errors.DynamoError):
                    await self.transport.publish(subject, encode(lm))
            if self._kv_tail > 0 and not self._kv_pending:
                self._flush_kv_events(tail=True)
            await asyncio.sleep(LOAD_INTERVAL)
