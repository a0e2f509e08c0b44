"""The router's side of the event plane: KV events into the index, load reports into a table.

The frontend subscribes to ``{ns}.kv_events.{model}`` and ``{ns}.load.{model}`` and hands each message's
bytes to :meth:`RouterEvents.on_kv_events` / :meth:`RouterEvents.on_load`; it asks
:meth:`RouterEvents.pending_resyncs` which workers lost events and answers with
:meth:`RouterEvents.resync` (the worker's ``cached_block_hashes()``). A malformed message is logged and
dropped here; decoding errors never reach the subscriber.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import msgspec

from dynamo_rt.protocol import KvEvent, KvEvents, LoadMetrics, decode_kv_events, decode_load
from dynamo_rt.router.indexer import KvIndexer

log = logging.getLogger(__name__)


class RouterEvents:
    """Consumes KV events and load reports for one model (shared by its prefill and decode routers).

    Load reports older than ``load_ttl_s`` are dropped from :meth:`loads`, so a worker that went silent
    is scored by what the router itself routed to it.
    """

    def __init__(
        self,
        indexer: KvIndexer | None = None,
        *,
        load_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.indexer = indexer if indexer is not None else KvIndexer()
        self.load_ttl_s = load_ttl_s
        self._clock = clock
        self._loads: dict[str, tuple[float, LoadMetrics]] = {}
        self.malformed = 0

    def sink(self, instance_id: str) -> Callable[[list[KvEvent]], None]:
        """An engine's KV event sink feeding this index directly, numbering the batches as a worker's
        runtime does (in-process wiring: the policy benchmark, tests)."""
        seq = 0

        def apply(events: list[KvEvent]) -> None:
            nonlocal seq
            self.on_kv_events(KvEvents(instance_id=instance_id, seq=seq, events=events))
            seq += 1

        return apply

    def on_kv_events(self, data: bytes | KvEvents) -> bool:
        """Apply one KV event batch; False if it was malformed or stale."""
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                data = decode_kv_events(bytes(data))
            except msgspec.DecodeError as e:
                self.malformed += 1
                log.warning("dropping a malformed KV event message: %s", e)
                return False
        return self.indexer.apply(data)

    def on_load(self, data: bytes | LoadMetrics) -> bool:
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                data = decode_load(bytes(data))
            except msgspec.DecodeError as e:
                self.malformed += 1
                log.warning("dropping a malformed load message: %s", e)
                return False
        self._loads[data.instance_id] = (self._clock(), data)
        return True

    def loads(self) -> dict[str, LoadMetrics]:
        """The latest fresh load report of each worker."""
        now = self._clock()
        stale = [w for w, (t, _) in self._loads.items() if now - t > self.load_ttl_s]
        for w in stale:
            del self._loads[w]
        return {w: lm for w, (_, lm) in self._loads.items()}

    def pending_resyncs(self) -> list[str]:
        return self.indexer.pending_resyncs()

    def resync(self, worker_id: str, hashes: Iterable[int], *, seq: int | None = None,
               other_tiers: Mapping[str, Iterable[int]] | None = None) -> None:
        self.indexer.resync(worker_id, hashes, seq=seq, other_tiers=other_tiers)

    def remove_worker(self, worker_id: str) -> None:
        self.indexer.remove_worker(worker_id)
        self._loads.pop(worker_id, None)
