"""The reference engine's scheduler: which sequences compute which tokens in the next step, and who holds
which KV blocks. Pure Python (no torch): tests drive it with synthetic requests.

Place: :mod:`workers.reference.engine` owns one :class:`Scheduler` and calls it only under its own lock,
from the step thread (``schedule``, ``advance``) and the event loop (``add``, ``cancel``, ``loaded``);
:mod:`workers.reference.batch` turns the chosen ``(sequence, tokens)`` pairs into the model's tensors.
Blocks come from a :class:`~workers.reference.kv_cache.BlockManager`; the optional lower KV tiers
(:class:`~workers.reference.kvbm.KvTiers`) are asked for offloads, reclaims and onboards.

Scheduling (one step)
  1. Running sequences that need one token (decode) each get it; then running sequences still in
     prefill get chunks, all within ``max_batch_tokens``. A sequence that cannot get a block preempts the
     newest running sequence (its blocks are freed, it goes back to the head of the waiting queue and is
     recomputed later, mostly from the prefix cache), or itself if it is the newest.
  2. Waiting sequences are admitted in order while the token budget, ``max_num_seqs`` and free blocks
     allow: their prompt is matched against the prefix cache (full blocks, never the last token) and
     the first chunk is scheduled. Admission never preempts, so an admitted sequence makes progress.
  A sequence is ``tokens`` (prompt + generated) and ``num_computed`` (tokens whose KV is in the pool);
  when a step brings ``num_computed`` to ``len(tokens)`` the last row's logits are sampled. Prefill,
  decode, recompute after preemption and the disagg fallback are all that one rule.

Other holders of blocks
  * ``LOADING``: a decode request whose prompt KV a loader provides gets its prompt's blocks at admission
    (:attr:`Step.loads`); :meth:`Scheduler.loaded` then runs it from its first token, or prefills locally.
  * Pins: a prefill-only request's prompt blocks, until :meth:`Scheduler.release_pin` or the deadline.
  * ``ONBOARDING``: admission looks past the primary prefix hit into the lower tiers; a hit there is
    pinned, primary blocks are allocated and a tier thread fills them (then :meth:`Scheduler.onboarded`).
    A small host-only run (``onboard_sync_bytes``) is copied at once and admitted in the same step.
    Queued tier offloads that alone hold blocks are dropped when the scheduler is short of blocks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Generic, TypeVar

from dynamo_rt import kvhash
from dynamo_rt.protocol import FinishReason, GenerateRequest
from workers.common.blocks import BlockManager

if TYPE_CHECKING:  # the tiers import torch; the scheduler only calls them
    from workers.reference.kvbm import KvTiers

log = logging.getLogger(__name__)


class SeqState(Enum):
    WAITING = "waiting"  # in the waiting queue, no blocks (or needs local blocks for a KV load)
    LOADING = "loading"  # blocks allocated, the kv_loader is filling them (not scheduled)
    ONBOARDING = "onboarding"  # blocks allocated, a KV tier thread is filling them from host / disk
    RUNNING = "running"  # admitted: prefilling or decoding
    FINISHED = "finished"  # done or cancelled: its blocks are released (or pinned)


@dataclass(eq=False, slots=True, kw_only=True)
class Seq:
    """One request as the scheduler sees it (the engine subclasses it with its sampling and output queue)."""

    req: GenerateRequest
    tokens: list[int]
    prompt_len: int
    max_tokens: int  # generated tokens allowed (already capped by the context length)
    stop_ids: frozenset[int] = frozenset()
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of ``tokens``
    num_computed: int = 0
    num_registered: int = 0  # leading blocks already offered to the prefix cache
    cached_tokens: int = 0
    state: SeqState = SeqState.WAITING
    wants_load: bool = False  # decode request whose prompt KV a kv_loader provides
    cancelled: bool = False  # cancelled while part of an in-flight step or an onboard: free after it
    no_onboard: bool = False  # an onboard failed: recompute instead
    sent_first: bool = False

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    def finish_reason(self, token: int, context_length: int) -> str | None:
        """Why the sequence ends with ``token`` (already appended), or None if it goes on."""
        if token in self.stop_ids and self.num_output >= self.req.stop.min_tokens:
            return FinishReason.STOP.value
        if self.num_output >= self.max_tokens or len(self.tokens) >= context_length:
            return FinishReason.LENGTH.value
        return None


S = TypeVar("S", bound=Seq)


@dataclass(slots=True)
class Step(Generic[S]):
    """One scheduling decision."""

    chosen: list[tuple[S, int]]  # (sequence, tokens it computes this step), in admission order
    loads: list[S]  # decode sequences whose blocks were just allocated: their KV load may start


class Scheduler(Generic[S]):
    """Queues, block ownership and the step decision. Not thread-safe: the engine serialises calls."""

    def __init__(self, blocks: BlockManager, *, block_size: int, max_batch_tokens: int, max_num_seqs: int,
                 context_length: int, pin_timeout: float = 60.0, tiers: KvTiers | None = None,
                 block_bytes: int = 0, onboard_min_blocks: int = 1, onboard_sync_bytes: int = 0,
                 on_onboarded: Callable[[S, bool], None] | None = None) -> None:
        self.bm = blocks
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.context_length = context_length
        self.pin_timeout = pin_timeout
        self.tiers = tiers
        self.block_bytes = block_bytes
        self.onboard_min_blocks = max(1, onboard_min_blocks)
        self.onboard_sync_bytes = onboard_sync_bytes
        # Called from a tier thread when an onboard ends; the engine takes its lock, then calls onboarded().
        self.on_onboarded = on_onboarded
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self.loading: set[S] = set()
        self.onboarding: set[S] = set()
        self.inflight: set[S] = set()  # part of the step being computed
        self.preemptions = 0

    # ----------------------------------------------------------------------------------------- queries

    def blocks_for(self, n_tokens: int) -> int:
        return (n_tokens + self.block_size - 1) // self.block_size

    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.loading) + len(self.onboarding)

    def active_decode_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.running if s.num_computed >= s.prompt_len)

    def next_pin_deadline(self) -> float | None:
        return self.bm.next_pin_deadline()

    # ----------------------------------------------------------------------------------------- requests

    def add(self, seq: S, front: bool = False) -> None:
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def cancel(self, seq: S) -> bool:
        """Drop ``seq``. True if its blocks were freed now; False if it was over already, or is part of
        the step being computed or of an onboard (then it is freed when that ends)."""
        if seq.state is SeqState.FINISHED:
            return False
        if seq in self.inflight or seq.state is SeqState.ONBOARDING:
            seq.cancelled = True
            return False
        self._remove(seq)
        self.finish(seq)
        return True

    def finish(self, seq: S) -> None:
        if seq.blocks:
            self.bm.release(seq.blocks)
            seq.blocks = []
        seq.state = SeqState.FINISHED

    def finish_running(self, seq: S) -> None:
        self.running.remove(seq)
        self.finish(seq)

    def abort(self, seqs: list[S]) -> None:
        """End ``seqs`` (a failed step, or every running one after a scheduling bug)."""
        for seq in seqs:
            self.inflight.discard(seq)
            self._remove(seq)
            self.finish(seq)

    def drain(self) -> list[S]:
        """Engine stop: every sequence still held (now finished), pins released, prefix cache cleared."""
        seqs = list(self.waiting) + self.running + list(self.loading) + list(self.onboarding)
        self.waiting.clear()
        self.running.clear()
        self.loading.clear()
        self.onboarding.clear()
        for s in seqs:
            self.finish(s)
        self.bm.unpin_all()
        self.inflight.clear()
        self.bm.clear()
        return seqs

    def _remove(self, seq: S) -> None:
        if seq.state is SeqState.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        elif seq.state is SeqState.RUNNING:
            with contextlib.suppress(ValueError):
                self.running.remove(seq)
        self.loading.discard(seq)

    def loaded(self, seq: S, ok: bool) -> bool:
        """The KV load of a ``LOADING`` sequence ended: run it from its first token (``ok``), else prefill
        it locally. False if the sequence is no longer loading (the engine stopped meanwhile)."""
        if seq.state is not SeqState.LOADING:
            return False
        self.loading.discard(seq)
        seq.wants_load = False  # a later preemption recomputes locally
        if ok:
            seq.num_computed = seq.prompt_len
            seq.state = SeqState.RUNNING
            self.register(seq)
            self.running.append(seq)
        else:
            self.bm.release(seq.blocks)
            seq.blocks = []
            seq.state = SeqState.WAITING
            self.waiting.appendleft(seq)
        return True

    # ----------------------------------------------------------------------------------------- pins

    def pin_prompt(self, seq: S) -> tuple[str, list[int]]:
        """A prefill-only sequence produced its token: keep its prompt's blocks under a new pin id."""
        self.running.remove(seq)
        n_prompt = self.blocks_for(seq.prompt_len)
        blocks = seq.blocks[:n_prompt]
        if len(seq.blocks) > n_prompt:
            self.bm.release(seq.blocks[n_prompt:])
        pin_id = self.bm.pin(blocks, time.monotonic() + self.pin_timeout)
        seq.blocks = []
        seq.state = SeqState.FINISHED
        return pin_id, list(blocks)

    def release_pin(self, pin_id: str) -> bool:
        return self.bm.unpin(pin_id)

    def expire_pins(self, now: float) -> None:
        for pid in self.bm.expire_pins(now):
            log.info("pin %s timed out: freeing its blocks", pid)

    # ----------------------------------------------------------------------------------------- the step

    def schedule(self) -> Step[S]:
        """Choose this step's work (see the module docstring); the chosen sequences become in flight."""
        bm = self.bm
        budget = self.max_batch_tokens
        chosen: list[tuple[S, int]] = []
        loads: list[S] = []
        scheduled: set[S] = set()
        # 1. running: decodes first (one token each), then prefills in progress.
        decoding = [s for s in self.running if len(s.tokens) - s.num_computed == 1]
        prefilling = [s for s in self.running if len(s.tokens) - s.num_computed > 1]
        for seq in decoding + prefilling:
            if budget <= 0:
                break
            if seq.state is not SeqState.RUNNING:
                continue  # preempted earlier in this loop
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = self.blocks_for(seq.num_computed + n) - len(seq.blocks)
            while need > bm.num_available:
                if self.reclaim(need - bm.num_available):
                    continue
                victim = next((s for s in reversed(self.running) if s not in scheduled), None)
                if victim is None:
                    break
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.state is not SeqState.RUNNING or need > bm.num_available:
                continue
            if need > 0:
                seq.blocks += bm.allocate(need)
            chosen.append((seq, n))
            scheduled.add(seq)
            budget -= n
        # 2. admissions.
        while self.waiting and budget > 0 and self.num_active < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.wants_load:
                need = self.blocks_for(seq.prompt_len)
                if need > bm.num_available:
                    break
                self.waiting.popleft()
                seq.blocks = bm.allocate(need)
                seq.state = SeqState.LOADING
                self.loading.add(seq)
                loads.append(seq)
                continue
            # Prefix cache: full blocks only, and never the last token (its logits are needed).
            n_full = (len(seq.tokens) - 1) // self.block_size
            self.ensure_hashes(seq, n_full)
            hit = bm.match(seq.hashes[:n_full])
            if self.tiers is not None and len(hit) < n_full and not seq.no_onboard:
                started = self._start_onboard(seq, hit, n_full, budget)
                if started is None:
                    break
                if started:
                    continue
                hit = bm.match(seq.hashes[:n_full])  # a synchronous onboard grew the primary prefix
            start = len(hit) * self.block_size
            n = min(len(seq.tokens) - start, budget)
            need = self.blocks_for(start + n) - len(hit)
            room = bm.num_available - bm.num_evictable_in(hit)
            if need > room and self.reclaim(need - room):
                room = bm.num_available - bm.num_evictable_in(hit)
            if need > room:
                break
            self.waiting.popleft()
            bm.acquire(hit)
            seq.blocks = hit + bm.allocate(need)
            seq.num_computed = start
            seq.num_registered = len(hit)
            if not seq.sent_first:
                seq.cached_tokens = start
            seq.state = SeqState.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            scheduled.add(seq)
            budget -= n
        self.inflight.update(seq for seq, _ in chosen)
        return Step(chosen=chosen, loads=loads)

    def advance(self, seq: S, n: int) -> bool:
        """After the step: ``seq`` computed ``n`` more tokens. False if it is no longer running (cancelled
        during the step, then freed now, or ended meanwhile): its row is dropped."""
        self.inflight.discard(seq)
        if seq.cancelled:
            self._remove(seq)
            self.finish(seq)
            return False
        if seq.state is not SeqState.RUNNING:
            return False
        seq.num_computed += n
        self.register(seq)
        return True

    def preempt(self, seq: S) -> None:
        log.debug("preempting %s (%d blocks)", seq.req.request_id, len(seq.blocks))
        self.preemptions += 1
        self.running.remove(seq)
        self.bm.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.state = SeqState.WAITING
        self.waiting.appendleft(seq)

    def ensure_hashes(self, seq: S, n_blocks: int) -> None:
        bs = self.block_size
        while len(seq.hashes) < n_blocks:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else kvhash.chain_root(seq.req.cache_salt)  # tenant salt
            seq.hashes.append(kvhash.hash_block(parent, seq.tokens[i * bs:(i + 1) * bs]))

    def register(self, seq: S) -> None:
        """Offer newly completed full blocks to the prefix cache (and their copies to the lower tiers)."""
        full = seq.num_computed // self.block_size
        if full <= seq.num_registered:
            return
        self.ensure_hashes(seq, full)
        first = seq.num_registered
        pairs = [(seq.blocks[i], seq.hashes[i]) for i in range(first, full)]
        new = self.bm.register(pairs, seq.hashes[first - 1] if first > 0 else None)
        seq.num_registered = full
        if new and self.tiers is not None:
            self.tiers.offload(new, self.bm.acquire)

    # ----------------------------------------------------------------------------------------- KV tiers

    def reclaim(self, need: int) -> bool:
        """Short of ``need`` blocks: drop queued tier offloads that alone hold blocks. True if any freed."""
        tiers, bm = self.tiers, self.bm
        if tiers is None:
            return False
        blocks = tiers.reclaim(need, lambda b: bm.ref[b] == 1)
        if blocks:
            bm.release(blocks)
        return bool(blocks)

    def _start_onboard(self, seq: S, hit: list[int], n_full: int, budget: int) -> bool | None:
        """Onboard the blocks past ``seq``'s primary ``hit`` that the lower tiers hold.
        True: ``seq`` is admitted into ONBOARDING (popped from the waiting queue); False: admit it normally
        (no tier hit, or a small host run was just copied into the primary prefix cache); None: not enough
        free blocks now."""
        tiers, bm, bs = self.tiers, self.bm, self.block_size
        assert tiers is not None
        job = tiers.pin_prefix(seq.hashes[len(hit):n_full])
        if job is None:
            return False
        if len(job) < self.onboard_min_blocks:
            tiers.unpin(job)
            return False
        sync = not job.touches_disk and len(job) * self.block_bytes <= self.onboard_sync_bytes
        if sync:
            # Room for the whole admission that follows, not just the copy: else the copied blocks would
            # sit evictable while the sequence waits, and be copied again at the next attempt.
            start = (len(hit) + len(job)) * bs
            need = self.blocks_for(start + min(len(seq.tokens) - start, budget)) - len(hit)
        else:
            need = len(job)
        room = bm.num_available - bm.num_evictable_in(hit)
        if need > room and self.reclaim(need - room):
            room = bm.num_available - bm.num_evictable_in(hit)
        if need > room:
            tiers.unpin(job)
            return None
        if sync:
            bm.acquire(hit)
            new = bm.allocate(len(job))
            try:
                tiers.copy_now(job, new)
                hashes = seq.hashes[len(hit):len(hit) + len(new)]
                bm.register(list(zip(new, hashes, strict=True)), seq.hashes[len(hit) - 1] if hit else None)
            finally:
                bm.release(hit + new)  # cached and unreferenced: the normal admission takes them next
            return False
        self.waiting.popleft()
        bm.acquire(hit)
        new = bm.allocate(len(job))
        seq.blocks = hit + new
        seq.num_computed = len(hit) * self.block_size
        seq.num_registered = len(hit)
        seq.state = SeqState.ONBOARDING
        self.onboarding.add(seq)
        tiers.onboard(job, new, lambda ok: self._onboard_ended(seq, ok))
        return True

    def _onboard_ended(self, seq: S, ok: bool) -> None:
        if self.on_onboarded is not None:
            self.on_onboarded(seq, ok)

    def onboarded(self, seq: S, ok: bool) -> None:
        """The onboard of ``seq`` finished (``ok``) or failed / was abandoned (the caller holds the lock)."""
        self.onboarding.discard(seq)
        if seq.state is not SeqState.ONBOARDING:
            return  # the engine stopped and already failed it
        if seq.cancelled:
            self.finish(seq)
        elif ok:
            seq.num_computed = len(seq.blocks) * self.block_size
            if not seq.sent_first:
                seq.cached_tokens = seq.num_computed
            seq.state = SeqState.RUNNING
            self.running.append(seq)
            self.register(seq)
        else:
            self.bm.release(seq.blocks)
            seq.blocks = []
            seq.num_computed = 0
            seq.num_registered = 0
            seq.no_onboard = True
            seq.state = SeqState.WAITING
            self.waiting.appendleft(seq)
