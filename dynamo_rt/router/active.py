"""The router's own account of the requests it sent to each worker and has not seen finish.

Workers report their load about once a second (:class:`~dynamo_rt.protocol.LoadMetrics`), which is far
too late for a router placing tens of requests a second: a burst would all land on the worker that looked
idlest at the last report. So the :class:`~dynamo_rt.router.policy.Router` books every request here when
it routes it and drops it when the request ends, and scores workers by this book:

* **active blocks**: the distinct KV blocks the worker's running requests hold. Prompts sharing a prefix
  (a system prompt, earlier turns of a chat) share those blocks in the engine's paged cache, so they are
  counted once (a refcount per block hash); a request's partial last block is its own.
* **pending prefill**: the prompt blocks a request must still compute (those not cached where it went),
  counted from routing until its prefill is over. The end of the prefill is its first token
  (:meth:`ActiveRequests.first_token`, when the caller reports it) or, with an event-fed index, the moment
  the worker reports it stored the prompt's last full block, which engines do when that block's KV is
  computed, i.e. with the first token.

Block hashes are chained, so the blocks of one request a worker holds are a prefix of its prompt; the
active set of a worker is the union of such prefixes, and whether a prompt's first ``n`` blocks are all
active is monotone in ``n`` (binary search, :meth:`ActiveRequests.new_blocks`).

Pure bookkeeping, no I/O; one instance per :class:`Router` (per pool).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Request:
    worker: str
    hashes: tuple[int, ...]  # the prompt's full blocks
    blocks: int  # full blocks + the partial last one
    prefill: int  # prompt blocks still to compute; 0 once the first token is out


@dataclass(slots=True)
class _Worker:
    refs: dict[int, int] = field(default_factory=dict)  # block hash -> running requests holding it
    tails: int = 0  # partial last blocks (never shared)
    total_blocks: int = 0  # sum of the requests' blocks, shared ones counted per request
    prefill: int = 0  # sum of pending prefill blocks
    pending: dict[int, int] = field(default_factory=dict)  # key -> last full block hash, prefill pending
    keys: dict[int, None] = field(default_factory=dict)  # requests in routing order (oldest first)


class ActiveRequests:
    """Requests in flight per worker: distinct active blocks and pending prefill blocks."""

    def __init__(self) -> None:
        self._reqs: dict[int, _Request] = {}
        self._workers: dict[str, _Worker] = {}
        self._next_key = 1
        self.tracked = 0  # requests ever added (0: this router never tracked, loads come from reports)

    # ------------------------------------------------------------------------------------ updates

    def add(self, worker: str, hashes: Sequence[int], blocks: int, prefill_blocks: int = 0) -> int:
        """Book a request routed to ``worker``; returns its key for :meth:`first_token` / :meth:`finish`.

        ``hashes`` are the prompt's full block hashes (may be empty: only ``blocks`` is counted then, as
        distinct blocks); ``prefill_blocks`` the blocks the worker must compute (uncached there)."""
        key = self._next_key
        self._next_key += 1
        self.tracked += 1
        hs = tuple(hashes)
        prefill = max(0, prefill_blocks)
        self._reqs[key] = _Request(worker, hs, blocks, prefill)
        w = self._workers.setdefault(worker, _Worker())
        refs = w.refs
        for h in hs:
            refs[h] = refs.get(h, 0) + 1
        w.tails += max(0, blocks - len(hs))
        w.total_blocks += blocks
        w.keys[key] = None
        if prefill:
            w.prefill += prefill
            # Without a full block there is no stored event to wait for: only an explicit first token
            # (or the finish) ends such a prefill.
            w.pending[key] = hs[-1] if hs else 0
        return key

    def first_token(self, key: int) -> None:
        """The request's prefill is over: its prompt blocks stop counting as pending prefill."""
        r = self._reqs.get(key)
        if r is None or not r.prefill:
            return
        w = self._workers[r.worker]
        w.prefill -= r.prefill
        r.prefill = 0
        w.pending.pop(key, None)

    def finish(self, key: int) -> bool:
        """The request ended (any way); False if the key is unknown (already finished, worker removed)."""
        r = self._reqs.pop(key, None)
        if r is None:
            return False
        w = self._workers[r.worker]
        if r.prefill:
            w.prefill -= r.prefill
            w.pending.pop(key, None)
        refs = w.refs
        for h in r.hashes:
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
        w.tails -= max(0, r.blocks - len(r.hashes))
        w.total_blocks -= r.blocks
        del w.keys[key]
        return True

    def oldest(self, worker: str, blocks: int) -> int | None:
        """Key of the oldest request on ``worker`` of ``blocks`` blocks (for callers that kept no key)."""
        w = self._workers.get(worker)
        if w is None:
            return None
        for key in w.keys:
            if self._reqs[key].blocks == blocks:
                return key
        return None

    def remove_worker(self, worker: str) -> None:
        w = self._workers.pop(worker, None)
        if w is not None:
            for key in w.keys:
                del self._reqs[key]

    # ------------------------------------------------------------------------------------ queries

    def workers(self) -> list[str]:
        """Workers with a booked request or a record of one."""
        return list(self._workers)

    def requests(self, worker: str) -> int:
        w = self._workers.get(worker)
        return len(w.keys) if w is not None else 0

    def total_blocks(self, worker: str) -> int:
        """Blocks of the worker's requests, a shared block counted once per request holding it."""
        w = self._workers.get(worker)
        return w.total_blocks if w is not None else 0

    def active_blocks(self, worker: str) -> int:
        """Distinct blocks the worker's requests hold."""
        w = self._workers.get(worker)
        return len(w.refs) + w.tails if w is not None else 0

    def new_blocks(self, worker: str, hashes: Sequence[int], blocks: int) -> int:
        """Blocks a prompt (``hashes`` its full blocks, ``blocks`` in all) would add to the active set."""
        w = self._workers.get(worker)
        if w is None or not w.refs or not hashes:
            return blocks
        refs = w.refs
        lo, hi = 0, len(hashes)  # the first lo blocks are active; find the largest such lo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in refs:
                lo = mid
            else:
                hi = mid - 1
        return blocks - lo

    def pending_prefill(self, worker: str, holds: Callable[[str, int], bool] | None = None) -> int:
        """Prompt blocks the worker still has to compute for its requests.

        ``holds(worker, hash)`` (an event-fed index) ends the prefill of each request whose last full block
        the worker now reports stored."""
        w = self._workers.get(worker)
        if w is None or not w.prefill:
            return 0
        if holds is not None:
            done = [k for k, h in w.pending.items() if h and holds(worker, h)]
            for k in done:
                self.first_token(k)
        return w.prefill
