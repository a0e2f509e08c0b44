"""The decoded, in-memory view of one namespace (:class:`DiscoveryView`): what the frontend and routers
read on every request.

One :meth:`Registry.watch_prefix` of ``/{ns}/`` keeps it current; values are decoded into the
:mod:`dynamo_rt.protocol` records by key kind (:mod:`.keys` has the layout). A model is listed while at least
one of its instances is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec

from dynamo_rt.discovery.keys import WatchEvent
from dynamo_rt.discovery.registry import Registry
from dynamo_rt.errors import DiscoveryError
from dynamo_rt.protocol import InstanceRecord, ModelCard, NixlRecord

log = logging.getLogger("dynamo_rt.discovery")

Listener = Callable[[str, str, object | None], None]
_instance_dec = msgspec.json.Decoder(InstanceRecord)
_model_dec = msgspec.json.Decoder(ModelCard)
_nixl_dec = msgspec.json.Decoder(NixlRecord)


class DiscoveryView:
    """In-memory view of ``/{ns}/`` kept current by one watch (the frontend and routers read it).

    Reads are plain dict look-ups on the event loop; a malformed value is logged and skipped. Listeners
    get ``(kind, key, record)``: on ``put`` the new record, on ``delete`` the record that left.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._prefix = f"/{registry.namespace}/"
        self._records: dict[str, object] = {}  # etcd key -> decoded record
        self._instances: dict[tuple[str, str], dict[str, InstanceRecord]] = {}
        self._models: dict[str, dict[str, ModelCard]] = {}
        self._nixl: dict[str, NixlRecord] = {}
        self._listeners: list[Listener] = []
        self._before_reset: dict[str, object] | None = None
        self._loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.resets = 0  # times the watch rebuilt the view from scratch (tests, metrics)
        self._error: BaseException | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Start watching; return once the initial state is loaded (DiscoveryError if it cannot be)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"discovery-view-{self._registry.namespace}")
        loaded = asyncio.ensure_future(self._loaded.wait())
        await asyncio.wait({loaded, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if loaded.done():
            return
        loaded.cancel()
        ended = self._task.done()
        await self.close()
        if ended:
            raise DiscoveryError(f"discovery view of {self._prefix} could not start: {self._error}")
        raise DiscoveryError(f"discovery view of {self._prefix} not loaded after {timeout:.0f} s")

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            async for ev in self._registry.watch_prefix(self._prefix, sync_marks=True):
                self._apply(ev)
        except asyncio.CancelledError:
            raise
        except DiscoveryError as exc:
            self._error = exc
            log.error("discovery view of %s stopped: %s", self._prefix, exc)
        except Exception as exc:
            self._error = exc
            log.exception("discovery view of %s stopped", self._prefix)

    # -- reads
    def instances(self, component: str = "backend", endpoint: str = "generate") -> dict[str, InstanceRecord]:
        return dict(self._instances.get((component, endpoint), {}))

    def models(self) -> dict[str, dict[str, ModelCard]]:
        return {name: dict(cards) for name, cards in self._models.items()}

    def nixl(self, instance_id: str) -> NixlRecord | None:
        return self._nixl.get(instance_id)

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def namespace(self) -> str:
        return self._registry.namespace

    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    async def wait_for(self, predicate: Callable[[DiscoveryView], bool], timeout: float) -> None:
        """Return once ``predicate(self)`` holds; raise TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    # -- updates
    def _apply(self, ev: WatchEvent) -> None:
        if ev.kind == "put":
            self._put(ev.key, ev.value)
        elif ev.kind == "delete":
            self._delete(ev.key, notify=True)
        elif ev.kind == "reset":
            self.resets += 1
            self._before_reset = dict(self._records)
            for k in list(self._records):
                self._delete(k, notify=False)
        elif ev.kind == "synced":
            before, self._before_reset = self._before_reset, None
            if before:
                for k, rec in before.items():
                    if k not in self._records:
                        self._notify("delete", k, rec)
            self._loaded.set()
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _parse_key(self, key: str) -> tuple[str, str, str, str] | None:
        """key -> (kind, a, b, instance_id) for the three record kinds, else None."""
        if not key.startswith(self._prefix):
            return None
        parts = key[len(self._prefix) :].split("/")
        if parts[0] == "instances" and len(parts) == 4 and all(parts[1:]):
            return "instance", parts[1], parts[2], parts[3]
        if parts[0] == "models" and len(parts) >= 3 and all(parts[1:]):
            return "model", "/".join(parts[1:-1]), "", parts[-1]  # model names may contain "/"
        if parts[0] == "nixl" and len(parts) == 2 and parts[1]:
            return "nixl", "", "", parts[1]
        return None

    def _put(self, key: str, value: bytes) -> None:
        parsed = self._parse_key(key)
        if parsed is None:
            return  # not one of ours (other tools may share the namespace)
        kind, a, b, iid = parsed
        rec: InstanceRecord | ModelCard | NixlRecord
        try:
            if kind == "instance":
                rec = _instance_dec.decode(value)
            elif kind == "model":
                rec = _model_dec.decode(value)
            else:
                rec = _nixl_dec.decode(value)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("discovery: skipping malformed value under %s: %s", key, exc)
            self._delete(key, notify=True)  # whatever it held before is no longer true
            return
        self._records[key] = rec
        if isinstance(rec, InstanceRecord):
            self._instances.setdefault((a, b), {})[iid] = rec
        elif isinstance(rec, ModelCard):
            self._models.setdefault(a, {})[iid] = rec
        else:
            self._nixl[iid] = rec
        if self._before_reset is not None and self._before_reset.get(key) == rec:
            return  # rebuilt after a reset, unchanged: listeners already know it
        self._notify("put", key, rec)

    def _delete(self, key: str, *, notify: bool) -> None:
        rec = self._records.pop(key, None)
        if rec is None:
            return
        parsed = self._parse_key(key)
        assert parsed is not None
        kind, a, b, iid = parsed
        if kind == "instance":
            group = self._instances.get((a, b), {})
            group.pop(iid, None)
            if not group:
                self._instances.pop((a, b), None)
        elif kind == "model":
            cards = self._models.get(a, {})
            cards.pop(iid, None)
            if not cards:
                self._models.pop(a, None)  # the model leaves with its last instance
        else:
            self._nixl.pop(iid, None)
        if notify:
            self._notify("delete", key, rec)

    def _notify(self, kind: str, key: str, rec: object | None) -> None:
        for cb in list(self._listeners):
            try:
                cb(kind, key, rec)
            except Exception:
                log.exception("discovery listener %r failed on %s %s", cb, kind, key)
