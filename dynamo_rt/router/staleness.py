"""Notices a worker that serves requests but whose KV events never reach the router's index.

The KV-aware cost trusts the index: a worker whose events are lost (publishing switched off, a broken event
plane, an engine that never emits them) looks like it caches nothing, so every prompt with a cached prefix goes
to the workers that do publish, and the silent one idles while they queue. Such a worker is caught here by
what it fails to say: after it has finished the prefill of ``min_requests`` requests routed to it, each with
prompt blocks it did not hold (so it must have stored, and told of, new blocks), ``grace`` seconds pass without
one event batch from it reaching the index. Its events are then *stale*: the router logs it once, counts it
(``dynamo_router_kv_events_stale``), and chooses by load while any candidate is stale, until the worker is heard
from again. Pure bookkeeping; the :class:`~dynamo_rt.router.policy.Router` feeds it and asks it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MIN_REQUESTS = 2
GRACE = 2.0  # seconds: events are published as blocks are stored, before the first token leaves the worker
_MAX_OWED = 64  # requests remembered per worker (enough to decide; bounded when events never come)


@dataclass(slots=True)
class _Worker:
    heard: int  # the index's batch count for this worker when last looked at
    owed: dict[int, float] = field(default_factory=dict)  # request key -> end of its prefill (inf: not yet)
    stale: bool = False


class EventWatch:
    """Per worker of one pool: requests that should have produced KV events, and whether any did."""

    def __init__(self, heard: Callable[[str], int], *, min_requests: int = MIN_REQUESTS, grace: float = GRACE,
                 on_change: Callable[[str, bool], None] | None = None, pool: str = "") -> None:
        self._heard = heard  # worker -> event batches (and resyncs) the index applied from it
        self.min_requests = min_requests
        self.grace = grace
        self.on_change = on_change
        self.pool = pool
        self._workers: dict[str, _Worker] = {}

    def _state(self, worker: str) -> _Worker:
        heard = self._heard(worker)
        st = self._workers.get(worker)
        if st is None:
            st = self._workers[worker] = _Worker(heard)
        elif heard != st.heard:  # heard from since: whatever it owed is settled
            st.heard = heard
            st.owed.clear()
            if st.stale:
                st.stale = False
                log.info("KV events from worker %s (%s pool) arrive again: back to KV-aware routing", worker,
                         self.pool)
                if self.on_change is not None:
                    self.on_change(worker, False)
        return st

    def routed(self, worker: str, key: int) -> None:
        """A request with prompt blocks ``worker`` does not hold went there (``key``: the router's book)."""
        st = self._state(worker)
        if not st.stale and len(st.owed) < _MAX_OWED:
            st.owed[key] = math.inf

    def prefilled(self, worker: str, key: int, now: float) -> None:
        """The request's prefill is over (first token, or its end)."""
        st = self._workers.get(worker)
        if st is not None and st.owed.get(key) == math.inf:
            st.owed[key] = now

    def stale(self, worker: str, now: float) -> bool:
        st = self._state(worker)
        if st.stale or len(st.owed) < self.min_requests:
            return st.stale
        done = sorted(t for t in st.owed.values() if t <= now)
        if len(done) >= self.min_requests and now - done[self.min_requests - 1] >= self.grace:
            st.stale = True
            st.owed.clear()
            log.warning("worker %s (%s pool) finished %d prefills but no KV event from it reached the index in "
                        "%.1fs: its KV events are stale, routing by load while they are", worker, self.pool,
                        len(done), now - done[0])
            if self.on_change is not None:
                self.on_change(worker, True)
        return st.stale

    def stale_workers(self, now: float) -> list[str]:
        return sorted(w for w in list(self._workers) if self.stale(w, now))

    def forget(self, worker: str) -> None:
        st = self._workers.pop(worker, None)
        if st is not None and st.stale and self.on_change is not None:
            self.on_change(worker, False)
