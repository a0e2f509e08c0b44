"""Routing policies: which worker instance serves a request.

A :class:`Router` routes one pool (the aggregated workers, or the prefill pool, or the decode pool: a
disaggregated deployment has two routers). Modes:

* ``round-robin`` / ``random``: ignore load and cache;
* ``least-loaded``: fewest requests (running + waiting), then lowest KV usage;
* ``kv``: cost = ``overlap_weight`` × (prompt blocks not cached on the worker + prefill blocks still
  pending there) + the worker's active blocks with this request's; lowest cost wins, ties broken at
  random, or with ``temperature`` > 0 a softmax sample over ``-cost / temperature``.

KV tiers: a worker may hold prompt blocks in a lower tier (host memory, disk; ``KvEvent.tier``), which it
loads instead of recomputing. Such a block counts as partly cached: a *hit weight* ``w`` (``host_hit_weight``,
``disk_hit_weight``, in [0, 1]) says what fraction of a primary hit's saving it is worth, so a host-cached
block costs ``1 - w`` of an uncached block. With the prompt's leading blocks held ``p`` in primary, ``ph``
in primary or host and ``pd`` in any tier (prefix counts, :meth:`KvIndexer.find_matches_by_tier`):

    cached = p + host_hit_weight × (ph - p) + disk_hit_weight × (pd - ph)
    cost   = overlap_weight × (prompt blocks - cached + pending prefill blocks)
             + active blocks + new blocks

With the defaults 0.5 / 0.25 a host-cached block costs half an uncached one and a disk-cached block three
quarters: a worker holding the prefix in a lower tier still beats one that must recompute it, and loses to
one holding it in primary. Weights of 0 ignore the lower tiers (one index walk instead of three).

The load terms come from the router's own book of the requests it routed and has not seen finish
(:mod:`.active`; :meth:`Router.select` adds, :meth:`Router.on_first_token` and
:meth:`Router.on_request_finished` take away), since the workers' :class:`~dynamo_rt.protocol.LoadMetrics`
come only about once a second and a burst between two reports would all go to the worker that looked
idlest:

* *pending prefill blocks*: the uncached prompt blocks of the worker's requests that have no first token
  yet: work queued ahead of this prompt's own prefill, so it weighs like it (``overlap_weight``);
* *active blocks*: the distinct KV blocks its running requests hold (a prefix shared by several requests
  counts once, as in the engine's paged cache);
* *new blocks*: the blocks this request would add to them (its blocks not already active there).

Counting shared prefixes once matters: with per-request counts, a worker running four chats on one
system prompt looks four system prompts busy and the fifth chat goes to a cold worker, which must then
compute (and cache) that system prompt again. A router that has never tracked a request (``track=False``
callers) uses the workers' reported ``active_decode_blocks`` instead of the book. Several frontends do not
see each other's requests; each balances its own.

A request pinned to an instance (``nvext.backend_instance_id``) goes there.

KV events that never arrive: a worker that finishes prefills of prompts it did not hold but whose events do not
reach the index (:mod:`.staleness`) makes the ``kv`` mode choose as ``least-loaded`` does while it is among the
candidates (decision reason ``kv-events-stale``, counted in ``dynamo_router_kv_stale_fallbacks``), instead of
sending every cached prefix to the workers that publish.

The transport (NATS subscriptions, discovery) is wired by the frontend; this module is pure logic.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynamo_rt.errors import InvalidRequest, NotFound, Unavailable
from dynamo_rt.kvhash import block_hashes as compute_block_hashes
from dynamo_rt.protocol import LoadMetrics
from dynamo_rt.router.active import ActiveRequests
from dynamo_rt.router.indexer import PRIMARY, KvIndexer, PrefixIndex
from dynamo_rt.router.staleness import EventWatch

RouterMode = Literal["round-robin", "random", "least-loaded", "kv"]
ROUTER_MODES: tuple[str, ...] = get_args(RouterMode)

_OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, float("inf"))
_OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, float("inf"))


class RouterMetrics:
    """The router's Prometheus metrics, registered into ``registry`` (none: not exported).

    One instance per registry, shared by the routers of all pools (the ``pool`` label tells them apart):
    registering the same names twice into one registry is an error.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, prefix: str = "dynamo_router") -> None:
        self.decisions = Counter(
            f"{prefix}_decisions", "Routing decisions per worker", ("pool", "worker"), registry=registry
        )
        self.overlap_blocks = Histogram(
            f"{prefix}_overlap_blocks", "Prompt blocks already cached on the chosen worker", ("pool",),
            buckets=_OVERLAP_BUCKETS, registry=registry,
        )
        self.overhead = Histogram(
            f"{prefix}_overhead_seconds", "Time spent choosing a worker (hashing included)", ("pool",),
            buckets=_OVERHEAD_BUCKETS, registry=registry,
        )
        self.kv_events_stale = Gauge(
            f"{prefix}_kv_events_stale", "1 while a worker serves requests but its KV events do not arrive",
            ("pool", "worker"), registry=registry,
        )
        self.kv_stale_fallbacks = Counter(
            f"{prefix}_kv_stale_fallbacks", "kv-mode decisions made by load because a candidate's KV events are "
            "stale", ("pool",), registry=registry,
        )
        # Label children resolved once (``labels()`` takes a lock and builds a tuple: three per decision).
        self._decided: dict[tuple[str, str], Any] = {}
        self._per_pool: dict[str, tuple[Any, Any]] = {}

    def decided(self, pool: str, worker_id: str, overlap_blocks: int, seconds: float) -> None:
        """One routing decision: counted for its worker, its overlap and its time observed for its pool."""
        c = self._decided.get((pool, worker_id))
        if c is None:
            c = self._decided[pool, worker_id] = self.decisions.labels(pool, worker_id)
        c.inc()
        hists = self._per_pool.get(pool)
        if hists is None:
            hists = self._per_pool[pool] = (self.overlap_blocks.labels(pool), self.overhead.labels(pool))
        hists[0].observe(overlap_blocks)
        hists[1].observe(seconds)

    def forget_worker(self, pool: str, worker_id: str) -> None:
        self._decided.pop((pool, worker_id), None)
        for metric in (self.decisions, self.kv_events_stale):
            try:
                metric.remove(pool, worker_id)
            except KeyError:
                pass


@dataclass(slots=True, frozen=True)
class RouteDecision:
    worker_id: str
    overlap_blocks: int  # leading prompt blocks the worker holds, in any KV tier (kv mode; 0 otherwise)
    cost: float  # kv: the cost formula; least-loaded: requests; others: 0
    reason: str  # the mode, "pinned", or "kv-sampled" when temperature picked it
    request_blocks: int = 0  # the prompt's blocks (full and partial)
    key: int = 0  # the request in the router's book (0: not tracked); give it to on_first_token / _finished


class Router:
    """Chooses a worker for each request of one pool; see the module docstring."""

    def __init__(
        self,
        mode: RouterMode,
        *,
        indexer: PrefixIndex | None = None,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        block_size: int = 16,
        seed: int | None = None,
        metrics: RouterMetrics | None = None,
        pool: str = "agg",
        host_hit_weight: float = 0.5,
        disk_hit_weight: float = 0.25,
    ) -> None:
        if mode not in ROUTER_MODES:
            raise InvalidRequest(f"unknown router mode {mode!r}; one of {', '.join(ROUTER_MODES)}")
        if block_size <= 0:
            raise InvalidRequest("block_size must be > 0")
        if temperature < 0 or overlap_weight < 0:
            raise InvalidRequest("temperature and overlap_weight must be >= 0")
        for name, w in (("host_hit_weight", host_hit_weight), ("disk_hit_weight", disk_hit_weight)):
            if not 0.0 <= w <= 1.0:
                raise InvalidRequest(f"{name} must be in [0, 1] (the fraction of a primary hit it is worth)")
        self.mode = mode
        self.indexer: PrefixIndex = indexer if indexer is not None else KvIndexer()
        self.overlap_weight = overlap_weight
        self.host_hit_weight = host_hit_weight
        self.disk_hit_weight = disk_hit_weight
        self.temperature = temperature
        self.block_size = block_size
        self.metrics = metrics
        self.pool = pool
        self._rng = random.Random(seed)
        self._rr = 0
        self.active = ActiveRequests()
        # An event-fed index tells when a prompt's last block is stored, i.e. its prefill is over.
        self._holds = self.indexer.holds if isinstance(self.indexer, KvIndexer) else None
        # Workers whose events do not arrive (kv mode with an event-fed index only).
        self.events: EventWatch | None = None
        if mode == "kv" and isinstance(self.indexer, KvIndexer):
            self.events = EventWatch(self.indexer.heard, on_change=self._stale_changed, pool=pool)

    def _stale_changed(self, worker_id: str, stale: bool) -> None:
        if self.metrics is not None:
            self.metrics.kv_events_stale.labels(self.pool, worker_id).set(1 if stale else 0)

    def _any_stale(self, workers: Sequence[str]) -> bool:
        ev = self.events
        if ev is None:
            return False
        now = time.monotonic()
        return any(ev.stale(w, now) for w in workers)

    def stale_workers(self) -> list[str]:
        """Workers whose KV events are stale now (see :mod:`.staleness`)."""
        return self.events.stale_workers(time.monotonic()) if self.events is not None else []

    # --------------------------------------------------------------------------------- in-flight

    def on_request_started(self, worker_id: str, blocks: int, *, block_hashes: Sequence[int] = (),
                           prefill_blocks: int = 0) -> int:
        """Book a request on ``worker_id`` (what :meth:`select` does with ``track``); returns its key."""
        return self.active.add(worker_id, block_hashes, blocks, prefill_blocks)

    def on_first_token(self, worker_id: str, key: int) -> None:
        """The request's first token came: its prompt no longer counts as pending prefill."""
        self.active.first_token(key)
        if self.events is not None:
            self.events.prefilled(worker_id, key, time.monotonic())

    def on_request_finished(self, worker_id: str, blocks: int, key: int | None = None) -> None:
        """The request ended. Without its ``key``, the oldest request of ``blocks`` blocks on the worker
        is taken for it (same-sized requests on one worker are interchangeable for the counts but for
        which blocks they share)."""
        if key is None:
            key = self.active.oldest(worker_id, blocks)
        if key is not None:
            self.active.finish(key)
            if self.events is not None:
                self.events.prefilled(worker_id, key, time.monotonic())

    def in_flight(self, worker_id: str) -> tuple[int, int]:
        """(requests, blocks) this router has routed to ``worker_id`` and not yet seen finish; blocks counted
        per request (see :meth:`active_blocks` for the distinct ones)."""
        return self.active.requests(worker_id), self.active.total_blocks(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        self.active.remove_worker(worker_id)
        self.indexer.remove_worker(worker_id)
        if self.events is not None:
            self.events.forget(worker_id)
        if self.metrics is not None:
            self.metrics.forget_worker(self.pool, worker_id)

    # --------------------------------------------------------------------------------- selection

    def select(
        self,
        workers: Sequence[str],
        token_ids: Sequence[int],
        loads: Mapping[str, LoadMetrics],
        pinned: str | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
        track: bool = True,
    ) -> RouteDecision:
        """Pick a worker among ``workers`` for a prompt.

        ``block_hashes`` may be passed when the caller already hashed the prompt with this block size
        (hashing costs ~1 µs per block, more than the index walk). With ``track`` the request is booked on
        the chosen worker (``decision.key``); call :meth:`on_first_token` when its first token arrives and
        :meth:`on_request_finished` when it ends.
        """
        t0 = time.perf_counter()
        if not workers:
            raise Unavailable("no worker instance is available")
        request_blocks = -(-len(token_ids) // self.block_size)
        hashes: Sequence[int] = ()
        prefill = 0  # blocks the worker must compute: only the kv mode scores (and so books) them
        if pinned is not None:
            if pinned not in workers:
                raise NotFound(f"backend instance {pinned!r} is not serving this model",
                               param="nvext.backend_instance_id")
            overlap = 0
            if self.mode == "kv":
                hashes = self._hashes(token_ids, block_hashes)
                cached, overlap = self.overlaps(hashes).get(pinned, (0.0, 0)) if hashes else (0.0, 0)
                prefill = request_blocks - math.floor(cached)
            d = RouteDecision(pinned, overlap, 0.0, "pinned", request_blocks)
        elif self.mode == "kv" and self._any_stale(workers):
            # The index cannot be trusted for every candidate: choose by load, visibly.
            hashes = self._hashes(token_ids, block_hashes)
            ll = self._select_least_loaded(workers, loads, request_blocks)
            d, prefill = RouteDecision(ll.worker_id, 0, ll.cost, "kv-events-stale", request_blocks), request_blocks
            if self.metrics is not None:
                self.metrics.kv_stale_fallbacks.labels(self.pool).inc()
        elif self.mode == "kv":
            hashes = self._hashes(token_ids, block_hashes)
            d, prefill = self._select_kv(workers, hashes, loads, request_blocks)
        elif self.mode == "least-loaded":
            d = self._select_least_loaded(workers, loads, request_blocks)
        elif self.mode == "round-robin":
            ordered = sorted(workers)
            d = RouteDecision(ordered[self._rr % len(ordered)], 0, 0.0, "round-robin", request_blocks)
            self._rr += 1
        else:
            d = RouteDecision(self._rng.choice(list(workers)), 0, 0.0, "random", request_blocks)
        if track:
            key = self.active.add(d.worker_id, hashes, request_blocks, prefill)
            d = RouteDecision(d.worker_id, d.overlap_blocks, d.cost, d.reason, request_blocks, key)
            if self.events is not None and len(hashes) > d.overlap_blocks:  # it must store (and tell of) blocks
                self.events.routed(d.worker_id, key)
        if self.metrics is not None:
            self.metrics.decided(self.pool, d.worker_id, d.overlap_blocks, time.perf_counter() - t0)
        return d

    def _hashes(self, token_ids: Sequence[int], given: Sequence[int] | None) -> Sequence[int]:
        return given if given is not None else compute_block_hashes(token_ids, self.block_size)

    def active_blocks(self, worker_id: str, loads: Mapping[str, LoadMetrics]) -> int:
        """The worker's active KV blocks: the router's book (distinct blocks of the requests it routed
        there), or, for a router that never tracked a request, the worker's last report."""
        if self.active.tracked:
            return self.active.active_blocks(worker_id)
        lm = loads.get(worker_id)
        return lm.active_decode_blocks if lm is not None else 0

    def pending_prefill(self, worker_id: str) -> int:
        """Uncached prompt blocks of the worker's booked requests that have no first token yet."""
        return self.active.pending_prefill(worker_id, self._holds)

    def costs(
        self,
        workers: Sequence[str],
        token_ids: Sequence[int],
        loads: Mapping[str, LoadMetrics],
        *,
        block_hashes: Sequence[int] | None = None,
    ) -> dict[str, tuple[float, int]]:
        """Per worker: (kv cost, overlap blocks in any tier). What ``kv`` mode minimises."""
        hashes = self._hashes(token_ids, block_hashes)
        request_blocks = -(-len(token_ids) // self.block_size)
        return {w: (c, ov) for w, (c, ov, _) in self._costs(workers, hashes, loads, request_blocks).items()}

    def _costs(
        self, workers: Sequence[str], hashes: Sequence[int], loads: Mapping[str, LoadMetrics], request_blocks: int
    ) -> dict[str, tuple[float, int, int]]:
        """Per worker: (cost, overlap blocks in any tier, prefill blocks the request would need there)."""
        overlaps = self.overlaps(hashes) if hashes else {}
        w = self.overlap_weight
        active = self.active
        out: dict[str, tuple[float, int, int]] = {}
        for wid in workers:
            cached, ov = overlaps.get(wid, (0.0, 0))
            prefill = request_blocks - math.floor(cached)
            queued = self.pending_prefill(wid)
            load = self.active_blocks(wid, loads) + active.new_blocks(wid, hashes, request_blocks)
            out[wid] = (w * (request_blocks - cached + queued) + load, ov, prefill)
        return out

    def overlaps(self, hashes: Sequence[int]) -> dict[str, tuple[float, int]]:
        """Per worker with any overlap: (weighted cached blocks, leading blocks held in any tier); see the
        module docstring. Indexes without tiers (:class:`ApproxIndexer`) count primary hits only."""
        ix = self.indexer
        if not isinstance(ix, KvIndexer) or not ix.has_lower_tiers() or \
                (self.host_hit_weight == 0 and self.disk_hit_weight == 0):
            return {wid: (float(n), n) for wid, n in ix.find_matches(hashes).items()}
        wh, wd = self.host_hit_weight, self.disk_hit_weight
        out: dict[str, tuple[float, int]] = {}
        for wid, c in ix.find_matches_by_tier(hashes).items():
            p, ph, pd = c[PRIMARY], c["host"], c["disk"]
            out[wid] = (p + wh * (ph - p) + wd * (pd - ph), pd)
        return out

    def _select_kv(
        self,
        workers: Sequence[str],
        hashes: Sequence[int],
        loads: Mapping[str, LoadMetrics],
        request_blocks: int,
    ) -> tuple[RouteDecision, int]:
        costs = self._costs(workers, hashes, loads, request_blocks)
        if self.temperature > 0 and len(costs) > 1:
            wid = self._sample(costs)
            reason = "kv-sampled"
        else:
            best = min(c for c, _, _ in costs.values())
            tied = [k for k, (c, _, _) in costs.items() if c == best]
            wid = tied[0] if len(tied) == 1 else self._rng.choice(tied)
            reason = "kv"
        cost, overlap, prefill = costs[wid]
        if hashes:
            self.indexer.on_routed(wid, hashes)
        return RouteDecision(wid, overlap, cost, reason, request_blocks), prefill

    def _sample(self, costs: Mapping[str, tuple[float, int, int]]) -> str:
        best = min(c[0] for c in costs.values())
        # Shifting by the best cost keeps exp() in range; the distribution is unchanged.
        ids = list(costs)
        weights = [math.exp(-(costs[k][0] - best) / self.temperature) for k in ids]
        return self._rng.choices(ids, weights=weights, k=1)[0]

    def _select_least_loaded(
        self, workers: Sequence[str], loads: Mapping[str, LoadMetrics], request_blocks: int
    ) -> RouteDecision:
        best_key: tuple[int, float] | None = None
        best: list[str] = []
        for wid in workers:
            lm = loads.get(wid)
            reqs = self.active.requests(wid)
            usage = 0.0
            if lm is not None:
                reqs = max(reqs, lm.active_requests + lm.waiting_requests)
                if lm.kv_blocks_total > 0:
                    usage = lm.kv_blocks_used / lm.kv_blocks_total
            key = (reqs, usage)
            if best_key is None or key < best_key:
                best_key, best = key, [wid]
            elif key == best_key:
                best.append(wid)
        assert best_key is not None  # workers is not empty
        return RouteDecision(self._rng.choice(best), 0, float(best_key[0]), "least-loaded", request_blocks)
