"""Following a prefix of etcd across reconnects: the engine of :meth:`Registry.watch_prefix`.

:func:`follow` reads the prefix, yields it, then follows the watch stream from the revision it read. When the
stream breaks (etcd restarted, network cut, watch cancelled) it reads the prefix again and yields the
difference from what it had delivered, or a ``reset`` and the full state when etcd no longer holds the
history it followed (:func:`_history_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from dynamo_rt.discovery.etcd import unauthenticated
from dynamo_rt.discovery.keys import WatchEvent
from dynamo_rt.errors import DiscoveryError

if TYPE_CHECKING:
    from dynamo_rt.discovery.registry import Registry

log = logging.getLogger("dynamo_rt.discovery")

MIN_BACKOFF = 0.05
MAX_BACKOFF = 1.0  # reconnect quickly after an etcd restart: a retry per second costs nothing


async def follow(reg: Registry, prefix: str, *, sync_marks: bool = False) -> AsyncGenerator[WatchEvent, None]:
    """See :meth:`Registry.watch_prefix`."""
    reg._client()  # fail now, not by retrying forever, when the registry is not started
    known: dict[str, tuple[bytes, int]] = {}  # key -> (value, mod revision) as delivered
    last_rev = 0  # every event under the prefix up to this revision has been delivered
    cluster_id: int | None = None
    must_reset = False
    backoff = MIN_BACKOFF  # between failed reads
    rewatch_backoff = MIN_BACKOFF  # between watches that etcd cancelled or broke
    failing = False
    while not reg.closed:
        # 1. (Re)read the whole prefix.
        try:
            snap = await reg._range(prefix)
        except DiscoveryError as exc:
            if reg.closed:
                return
            if not failing:
                log.warning("watch %s: etcd unreachable, retrying: %s", prefix, exc)
            failing = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            continue
        if failing:
            log.info("watch %s: etcd reachable again, resynchronising", prefix)
        failing = False
        backoff = MIN_BACKOFF
        batch: list[WatchEvent] = []
        if cluster_id is None:
            batch = [WatchEvent("put", k, v) for k, (v, _) in snap.kvs.items()]
        else:
            lost = must_reset or _history_lost(known, last_rev, cluster_id, snap.kvs, snap.revision,
                                               snap.cluster_id)
            if lost:
                log.warning("watch %s: etcd lost the watched history (restart without data or "
                            "compaction); rebuilding from %d keys", prefix, len(snap.kvs))  # fmt: skip
                batch = [WatchEvent("reset", prefix)]
                batch += [WatchEvent("put", k, v) for k, (v, _) in snap.kvs.items()]
            else:
                batch = _diff(known, snap.kvs)
        known, last_rev, cluster_id, must_reset = snap.kvs, snap.revision, snap.cluster_id, False
        if sync_marks:
            batch.append(WatchEvent("synced", prefix))
        # Back to back, no await in between: a consumer that handles events synchronously never exposes a
        # half-built state.
        for ev in batch:
            yield ev
        del batch

        # 2. Follow changes from the revision just read.
        try:
            async with contextlib.aclosing(reg._client().watch(prefix, last_rev + 1)) as stream:
                async for wr in stream:
                    if wr.canceled or wr.compact_revision:
                        must_reset = wr.compact_revision > 0
                        log.info("watch %s cancelled by etcd (compacted at %d): %s",
                                 prefix, wr.compact_revision, wr.cancel_reason)  # fmt: skip
                        break
                    if wr.events:
                        rewatch_backoff = MIN_BACKOFF
                    for k, v, mod in wr.events:
                        last_rev = max(last_rev, mod)
                        if v is None:
                            if known.pop(k, None) is not None:
                                yield WatchEvent("delete", k)
                        else:
                            known[k] = (v, mod)
                            yield WatchEvent("put", k, v)
        except DiscoveryError as exc:
            if reg.closed:
                return
            if unauthenticated(exc) and reg.has_credentials:
                with contextlib.suppress(DiscoveryError):
                    await reg._authenticate()
            log.warning("watch %s interrupted, resynchronising: %s", prefix, exc)
        if reg.closed:
            return
        # Cancelled or failed: back off, so a watch etcd keeps refusing does not spin.
        await asyncio.sleep(rewatch_backoff)
        rewatch_backoff = min(rewatch_backoff * 2, MAX_BACKOFF)


def _history_lost(
    known: dict[str, tuple[bytes, int]], last_rev: int, cluster_id: int,
    snap: dict[str, tuple[bytes, int]], rev: int, snap_cluster_id: int,
) -> bool:  # fmt: skip
    """Whether the etcd we reconnected to no longer holds the history we followed."""
    if snap_cluster_id != cluster_id or rev < last_rev:
        return True  # a new cluster (our EtcdServer uses a fresh token per data dir), or a rewound one
    # Every key last written at or before ``last_rev`` must be one we saw at that very revision; a key
    # that is not means the history was rewritten (an empty etcd whose revision has already passed ours).
    for k, (_, mod) in snap.items():
        if mod <= last_rev and known.get(k, (b"", -1))[1] != mod:
            return True
    return False


def _diff(known: dict[str, tuple[bytes, int]], snap: dict[str, tuple[bytes, int]]) -> list[WatchEvent]:
    out = [WatchEvent("delete", k) for k in known if k not in snap]
    out += [WatchEvent("put", k, v) for k, (v, mod) in snap.items() if known.get(k, (b"", -1))[1] != mod]
    return out
