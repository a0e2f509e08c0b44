"""The frontend's view of served models: discovery records -> ready models with tokenizers and routers.

A model becomes servable when its first worker registers and its tokenizer files have been fetched from
the NATS object store (so the frontend needs no model volume); it disappears when its last worker leaves.
Its card and tokenizer are kept then (``dormant``), so that with ``--worker-wait-timeout`` a request for it
can still be prepared and wait for a worker to register (a pool the planner scaled to zero).
Workers of each mode (agg / prefill / decode) form separate pools, each routed on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dynamo_rt import errors
from dynamo_rt.discovery import DiscoveryView
from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import InstanceRecord, LoadMetrics, Mode, ModelCard, decode_kv_events, decode_load
from dynamo_rt.router import KvIndexer, Router, RouterMetrics
from dynamo_rt.transport import Transport, kv_events_subject, load_subject
from frontend.preprocess import Preprocessor

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    card: ModelCard
    pre: Preprocessor
    created: int
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    loads: dict[str, LoadMetrics] = field(default_factory=dict)
    routers: dict[str, Router] = field(default_factory=dict)  # pool ("agg" / "prefill" / "decode") -> Router
    indexer: KvIndexer | None = None
    inflight: int = 0

    def pool(self, mode: str) -> list[str]:
        return [iid for iid, r in self.instances.items() if r.mode == mode]

    def hashes(self, prompt: Sequence[int], cache_salt: str = "") -> list[int]:
        """The router's block hashes of ``prompt``: the workers' own, tenant salt included."""
        return block_hashes(prompt, self.card.kv_block_size, cache_salt=cache_salt)

    @property
    def has_decode_pool(self) -> bool:
        """Requests go to agg workers, or to decode workers (which prefill locally without prefill workers)."""
        return any(r.mode in (Mode.AGG, Mode.DECODE) for r in self.instances.values())


class ModelManager:
    def __init__(self, view: DiscoveryView, transport: Transport, *, router_mode: str = "round-robin",
                 router_kwargs: dict[str, Any] | None = None, router_metrics: RouterMetrics | None = None) -> None:
        self.view = view
        self.router_metrics = router_metrics
        self.transport = transport
        self.router_mode = router_mode
        self.router_kwargs = router_kwargs or {}
        self.models: dict[str, ServedModel] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._pre_cache: dict[str, Preprocessor] = {}  # tokenizer digest -> preprocessor
        self._subscribed: set[str] = set()
        self._changed = asyncio.Event()
        self.departed: set[str] = set()  # models whose last worker left: 503, not 404
        # The departed models' cards and tokenizers, so a request for one can be prepared and then wait for a
        # worker to register (scale from zero).
        self.dormant: dict[str, ServedModel] = {}
        self._resync_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.view.add_listener(self._on_change)
        self._sync()
        self._resync_task = asyncio.create_task(self._resync_loop(), name="kv-resync")

    async def close(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
        for t in self._loading.values():
            t.cancel()
        await asyncio.gather(*self._loading.values(), return_exceptions=True)

    async def _resync_loop(self) -> None:
        """Workers whose KV event stream has a gap (or that we first heard mid-stream) are asked for their
        whole block list, so the index is exact again."""
        import msgspec

        from dynamo_rt.transport import instance_subject

        while True:
            await asyncio.sleep(0.5)
            for sm in list(self.models.values()):
                if sm.indexer is None:
                    continue
                for iid in sm.indexer.pending_resyncs():
                    if iid not in sm.instances:
                        sm.indexer.remove_worker(iid)
                        continue
                    subject = instance_subject(self.view.namespace, "backend", "kv_blocks", iid)
                    try:
                        rid = f"resync-{iid}-{uuid.uuid4().hex[:12]}"  # unique: several frontends resync at once
                        stream = await self.transport.call(subject, rid, b"", timeout=10)
                        async for frame in stream:
                            payload = getattr(frame, "payload", b"")
                            if payload:
                                snap = msgspec.msgpack.decode(payload)
                                sm.indexer.resync(iid, snap["hashes"], seq=snap["seq"],
                                                  other_tiers=snap.get("tiers"))
                        log.info("resynced KV index of worker %s (model %r)", iid, sm.name)
                    except errors.DynamoError as exc:
                        log.warning("KV resync of %s failed: %s", iid, exc)
    # ------------------------------------------------------------------ discovery -> models

    def _on_change(self, kind: str, key: str, record: object | None) -> None:
        self._sync()

    def _sync(self) -> None:
        instances = self.view.instances()
        cards = self.view.models()
        by_model: dict[str, dict[str, InstanceRecord]] = {}
        for iid, rec in instances.items():
            by_model.setdefault(rec.model, {})[iid] = rec
        for name, insts in by_model.items():
            sm = self.models.get(name)
            if sm is not None:
                if sm.indexer is not None:
                    for iid in insts.keys() - sm.instances.keys():
                        sm.indexer.mark_resync(iid)  # events it sent before we knew it were dropped
                sm.instances = insts
                for iid in list(sm.loads):
                    if iid not in insts:
                        sm.loads.pop(iid, None)
                        if sm.indexer is not None:
                            sm.indexer.remove_worker(iid)
                continue
            model_cards = cards.get(name) or {}
            if not model_cards or name in self._loading:
                continue
            card = next(iter(model_cards.values()))
            self._loading[name] = asyncio.ensure_future(self._load(name, card))
        for name in list(self.models):
            if name not in by_model:
                log.info("model %r has no workers left; removing it", name)
                gone = self.models.pop(name)
                gone.instances, gone.loads = {}, {}
                self.dormant[name] = gone
                self.departed.add(name)
        self.departed -= set(by_model)
        for name in self.models:
            self.dormant.pop(name, None)
        self._changed.set()

    async def _load(self, name: str, card: ModelCard) -> None:
        delay = 0.5
        try:
            while True:
                try:
                    await self._load_once(name, card)
                    return
                except Exception as exc:
                    log.warning("could not load model %r (%s); retrying in %.1fs", name, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    cards = self.view.models().get(name)
                    if not cards:
                        return  # its workers left meanwhile
                    card = next(iter(cards.values()))
        finally:
            self._loading.pop(name, None)
            self._sync()

    async def _load_once(self, name: str, card: ModelCard) -> None:
        pre = self._pre_cache.get(card.tokenizer_digest)
        if pre is None:
            files: dict[str, bytes] = {}
            for fname, obj in card.tokenizer_files.items():
                files[fname] = await self.transport.get_object(card.tokenizer_bucket, obj)
            pre = await asyncio.to_thread(Preprocessor.from_files, files)
            self._pre_cache[card.tokenizer_digest] = pre
        sm = ServedModel(name=name, card=card, pre=pre, created=card.created or int(time.time()))
        sm.indexer = KvIndexer()
        for pool in ("agg", "prefill", "decode"):
            sm.routers[pool] = Router(self.router_mode, indexer=sm.indexer, block_size=card.kv_block_size,  # type: ignore[arg-type]
                                      metrics=self.router_metrics, pool=pool, **self.router_kwargs)
        await self._subscribe_events(name)
        self.models[name] = sm
        log.info("model %r ready (context %d, block %d)", name, card.context_length, card.kv_block_size)

    async def _subscribe_events(self, name: str) -> None:
        if name in self._subscribed:
            return
        ns = self.view.namespace

        def on_load(data: bytes, subject: str) -> None:
            sm = self.models.get(name)
            if sm is None:
                return
            with contextlib.suppress(Exception):
                lm = decode_load(data)
                if lm.instance_id in sm.instances:
                    sm.loads[lm.instance_id] = lm

        def on_kv(data: bytes, subject: str) -> None:
            sm = self.models.get(name)
            if sm is None or sm.indexer is None:
                return
            with contextlib.suppress(Exception):
                ev = decode_kv_events(data)
                if ev.instance_id in sm.instances:
                    sm.indexer.apply(ev)

        await self.transport.subscribe(load_subject(ns, name), on_load)
        await self.transport.subscribe(kv_events_subject(ns, name), on_kv)
        self._subscribed.add(name)

    # ------------------------------------------------------------------ queries

    def get(self, name: str, *, waiting_ok: bool = False) -> ServedModel:
        """The served model ``name``. With ``waiting_ok`` a known model without a ready worker (its last
        worker left, or only prefill workers are up) is returned too, for a request that will wait for one
        (:meth:`wait_for_worker`)."""
        sm = self.models.get(name)
        if waiting_ok and (sm is None or not sm.has_decode_pool):
            found = sm or self.dormant.get(name)
            if found is not None:
                return found
        if sm is None:
            if name in self._loading:
                raise errors.Unavailable(f"model {name!r} is loading, retry shortly")
            if name in self.departed:
                raise errors.Unavailable(f"model {name!r} has no ready worker")
            raise errors.NotFound(f"The model `{name}` does not exist.", param="model")
        if not sm.has_decode_pool:
            raise errors.Unavailable(f"model {name!r} has no ready worker")
        return sm

    async def wait_for_worker(self, name: str, timeout: float) -> ServedModel:
        """Wait until model ``name`` has a worker that takes requests (agg or decode) and return its live
        :class:`ServedModel`; :class:`~dynamo_rt.errors.Unavailable` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            sm = self.models.get(name)
            if sm is not None and sm.has_decode_pool:
                return sm
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.Unavailable(f"model {name!r} has no ready worker (waited {timeout:g}s for one)")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def ready(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.has_decode_pool]

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no model became ready")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
