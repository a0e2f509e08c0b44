"""The mocker's continuously batched scheduler over a real block manager: nothing computed, all accounted.

Place: :class:`workers.mocker.engine.MockerEngine` (the Engine facade) admits requests into a
:class:`Scheduler` and steps it: :meth:`Scheduler.plan_step` picks the work, the engine sleeps what
:class:`workers.mocker.timing.TimingModel` says the step costs, :meth:`Scheduler.finish_step` applies it.
Blocks are held in :class:`workers.common.blocks.BlockManager`, the reference engine's own block manager,
so prefix hits, LRU eviction, pins and the KV events (stored / removed / cleared) are those of a real
engine; tokens come from :class:`workers.mocker.outputs.OutputModel`.

One step: every decoding sequence gets one token (a sequence that needs a block and finds none preempts
the newest running one, recompute-style), then prefilling sequences get chunks within
``max_num_batched_tokens``. Waiting sequences are admitted first come, first served while slots and blocks
allow; admission matches the prompt's full blocks in the prefix cache (never the last token, whose
logits are needed) and allocates the whole prompt. A request with ``kv_transfer`` set "reads" its remote
KV for the modelled transfer time instead of prefilling; a ``prefill_only`` one leaves its blocks pinned.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo_rt.errors import ErrorCode, InvalidRequest
from dynamo_rt.kvhash import chain_root, hash_block
from dynamo_rt.protocol import GenerateRequest, KvTransferParams, TokenLogprob
from workers.common.blocks import BlockManager
from workers.mocker.outputs import OutputModel
from workers.mocker.timing import RequestStats, TimingModel

log = logging.getLogger(__name__)

_STATS_KEPT = 1024  # finished requests whose simulated timings are kept for tests and benches


class Phase:
    WAITING = 0  # queued, holds no blocks
    TRANSFER = 1  # holds blocks, remote KV is being "read"
    PREFILL = 2  # holds blocks, prompt being computed (maybe over several steps)
    DECODE = 3  # one token per step
    DONE = 4  # finished, cancelled or pinned: the scheduler forgets it


@dataclass(slots=True, eq=False)
class Seq:
    request: GenerateRequest
    prompt_len: int
    tokens: list[int]  # prompt + generated
    digest: int  # seed of the output tokens
    hashes: list[int]  # chained hashes of every full block of ``tokens`` known so far
    stops: frozenset[int]
    arrival_ms: float
    phase: int = Phase.WAITING
    blocks: list[int] = field(default_factory=list)
    registered: int = 0  # leading blocks whose hash is already known to be in the cache (ours or a twin)
    computed: int = 0  # tokens whose KV is in ``blocks``
    pending: list[int] = field(default_factory=list)  # generated, not yet handed to the consumer
    pending_lp: list[TokenLogprob] = field(default_factory=list)
    first_sent: bool = False
    finish: str | None = None
    kv_out: KvTransferParams | None = None
    error: BaseException | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stats: RequestStats = field(default_factory=lambda: RequestStats(0))
    scheduled: bool = False
    transfer_handle: asyncio.TimerHandle | None = None
    offset: int = 0  # output produced before a migration: the last ``offset`` of the prompt

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Scheduler:
    """Queues, blocks and pins of one mocker; see the module docstring. Runs on the engine's event loop.

    ``notify`` is called after a change made outside a step (a transfer landed, a pin went away, a
    request left): the engine then flushes KV events and wakes its step loop.
    """

    def __init__(self, *, block_size: int, num_blocks: int, max_num_seqs: int, max_num_batched_tokens: int,
                 context_length: int, timing: TimingModel, outputs: OutputModel, speedup: float,
                 pin_timeout_s: float, instance_id: str, notify: Callable[[], None]) -> None:
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.context_length = context_length
        self.timing = timing
        self.outputs = outputs
        self.speedup = speedup
        self.pin_timeout_s = pin_timeout_s
        self.instance_id = instance_id
        self._notify = notify
        self.bm = BlockManager(num_blocks)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # PREFILL and DECODE, in admission order
        self.transferring: set[Seq] = set()
        self._pin_timers: dict[str, asyncio.TimerHandle] = {}
        self.sim_ms = 0.0  # simulated time spent stepping since start
        self.steps = 0
        self.stats: OrderedDict[str, RequestStats] = OrderedDict()

    @property
    def no_sleep(self) -> bool:
        return self.speedup == 0 or self.speedup >= 1e6

    # ------------------------------------------------------------------------------------- requests

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Seq) -> None:
        """The consumer went away: forget the request and free its blocks."""
        if seq.phase == Phase.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq.phase == Phase.TRANSFER:
            self.transferring.discard(seq)
            if seq.transfer_handle is not None:
                seq.transfer_handle.cancel()
        elif seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.phase = Phase.DONE
        self._notify()  # freed blocks may let a waiting request in

    def stop(self, err: BaseException) -> None:
        """Fail every request, drop every pin and forget the prefix cache (one ``cleared`` event)."""
        for seq in [*self.waiting, *self.running, *self.transferring]:
            if seq.transfer_handle is not None:
                seq.transfer_handle.cancel()
            self._release(seq)
            seq.error = err
            seq.ready.set()
        self.waiting.clear()
        self.running.clear()
        self.transferring.clear()
        for timer in self._pin_timers.values():
            timer.cancel()
        self._pin_timers.clear()
        self.bm.unpin_all()
        self.bm.clear()

    def _release(self, seq: Seq) -> None:
        if seq.blocks:
            self.bm.release(seq.blocks)
            seq.blocks = []

    def _register(self, seq: Seq, upto: int) -> None:
        """Put the seq's full, computed blocks [registered, upto) in the prefix cache."""
        first = seq.registered
        if upto <= first:
            return
        hashes, bs = seq.hashes, self.block_size
        while len(hashes) < upto:  # generated tokens: hash the block now it is full
            j = len(hashes) * bs
            hashes.append(hash_block(hashes[-1] if hashes else chain_root(seq.request.cache_salt),
                                     seq.tokens[j : j + bs]))
        self.bm.register(list(zip(seq.blocks[first:upto], hashes[first:upto], strict=True)),
                         hashes[first - 1] if first > 0 else None)
        seq.registered = upto

    # ------------------------------------------------------------------------------------- pins

    def _pin(self, seq: Seq) -> KvTransferParams:
        blocks, seq.blocks = seq.blocks, []
        loop = asyncio.get_running_loop()
        pin_id = self.bm.pin(blocks, loop.time() + self.pin_timeout_s)
        self._pin_timers[pin_id] = loop.call_later(self.pin_timeout_s, self._pin_expired, pin_id)
        return KvTransferParams(
            instance_id=self.instance_id,
            block_ids=list(blocks),
            num_tokens=seq.prompt_len,
            first_token=seq.tokens[seq.prompt_len],
            pin_id=pin_id,
        )

    def _pin_expired(self, pin_id: str) -> None:
        if self.unpin(pin_id):
            self.bm.pins_expired += 1
            log.warning("pinned blocks %s expired after %.0f s without a release", pin_id, self.pin_timeout_s)

    def unpin(self, pin_id: str) -> bool:
        timer = self._pin_timers.pop(pin_id, None)
        if timer is not None:
            timer.cancel()
        if not self.bm.unpin(pin_id):
            return False
        self._notify()
        return True

    # ------------------------------------------------------------------------------------- admission

    def schedule_waiting(self) -> None:
        """Admit waiting requests in FCFS order while slots and blocks allow."""
        bm, bs = self.bm, self.block_size
        while self.waiting and len(self.running) + len(self.transferring) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq.tokens)
            # Never match the whole sequence: its last token must be computed to produce the next one.
            hit = bm.match(seq.hashes[: (n - 1) // bs])
            need = -(-n // bs) - len(hit)
            if need > bm.num_available - bm.num_evictable_in(hit):
                if not self.running and not self.transferring and not bm.pins:
                    # Nothing will ever free blocks: the sequence cannot fit even on an idle engine.
                    self.waiting.popleft()
                    if seq.generated > 0:
                        self._finish(seq, "length")  # grew to the size of the whole pool
                    else:
                        self._fail(seq, InvalidRequest("the request does not fit the KV cache",
                                                       code=ErrorCode.CONTEXT_LENGTH))
                    continue
                return
            self.waiting.popleft()
            bm.acquire(hit)
            seq.blocks = hit + bm.allocate(need)
            seq.registered = len(hit)
            seq.computed = len(hit) * bs
            if not seq.scheduled:
                seq.scheduled = True
                seq.stats.cached_tokens = seq.computed
                seq.stats.queue_ms = self.sim_ms - seq.arrival_ms
            kt = seq.request.kv_transfer
            if kt is not None and kt.block_ids and kt.num_tokens > 0 and seq.generated == 0:
                self._start_transfer(seq, min(kt.num_tokens, n))
            else:
                seq.phase = Phase.PREFILL
                self.running.append(seq)

    def _start_transfer(self, seq: Seq, remote_tokens: int) -> None:
        blocks = max(0, -(-remote_tokens // self.block_size) - seq.computed // self.block_size)
        ms = self.timing.transfer_ms(blocks)
        seq.phase = Phase.TRANSFER
        seq.stats.transferred_blocks = blocks
        seq.stats.transfer_ms = ms
        self.transferring.add(seq)
        delay = 0.0 if self.no_sleep else ms / 1000.0 / self.speedup
        seq.transfer_handle = asyncio.get_running_loop().call_later(delay, self._transfer_done, seq, remote_tokens)

    def _transfer_done(self, seq: Seq, remote_tokens: int) -> None:
        if seq.phase != Phase.TRANSFER:
            return
        self.transferring.discard(seq)
        seq.transfer_handle = None
        seq.computed = max(seq.computed, remote_tokens)
        self._register(seq, seq.computed // self.block_size)
        kt = seq.request.kv_transfer
        if seq.computed >= seq.prompt_len:
            # The prefill worker already sampled the first token: continue from it.
            first = kt.first_token if kt is not None and kt.first_token >= 0 else self._token_at(seq, 0)
            seq.stats.ttft_ms = self.sim_ms - seq.arrival_ms + seq.stats.transfer_ms
            self._emit(seq, first)
            if seq.phase != Phase.DONE:
                seq.phase = Phase.DECODE
                self.running.append(seq)
        else:
            seq.phase = Phase.PREFILL
            self.running.append(seq)
        self._notify()

    # ------------------------------------------------------------------------------------- steps

    def plan_step(self) -> tuple[list[tuple[Seq, int]], list[Seq]]:
        """Choose this step's work: every decoding sequence, then prefill chunks within the token budget."""
        bs = self.block_size
        decode: list[Seq] = []
        for seq in list(self.running):
            if seq.phase != Phase.DECODE:
                continue
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            if not self._grow(seq, -(-len(seq.tokens) // bs)):
                continue
            decode.append(seq)
        budget = self.max_num_batched_tokens - len(decode)
        prefill: list[tuple[Seq, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.phase != Phase.PREFILL:
                continue
            chunk = min(len(seq.tokens) - seq.computed, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        return prefill, decode

    def _grow(self, seq: Seq, want: int) -> bool:
        """Give ``seq`` ``want`` blocks, preempting the newest running requests while the pool is short."""
        need = want - len(seq.blocks)
        if need <= 0:
            return True
        while self.bm.num_available < need:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks += self.bm.allocate(need)
        return True

    def _preempt(self, seq: Seq) -> None:
        """Recompute-style preemption: drop the blocks, recompute prompt + generated on readmission."""
        self.running.remove(seq)
        self._release(seq)
        seq.registered = 0
        seq.computed = 0
        seq.phase = Phase.WAITING
        seq.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def finish_step(self, prefill: list[tuple[Seq, int]], decode: list[Seq], ms: float) -> None:
        """The step of ``ms`` simulated milliseconds is over: its KV is computed and its tokens produced."""
        self.sim_ms += ms
        self.steps += 1
        bs = self.block_size
        for seq, chunk in prefill:
            if seq.phase != Phase.PREFILL:  # cancelled during the step
                continue
            seq.computed += chunk
            seq.stats.prefill_tokens += chunk
            seq.stats.prefill_ms += ms
            self._register(seq, seq.computed // bs)
            if seq.computed < len(seq.tokens):
                continue
            if seq.stats.ttft_ms == 0.0 and seq.generated == 0:
                seq.stats.ttft_ms = self.sim_ms - seq.arrival_ms
            seq.phase = Phase.DECODE
            self._emit(seq, self._token_at(seq, seq.generated))
        for seq in decode:
            if seq.phase != Phase.DECODE:
                continue
            seq.computed = len(seq.tokens)
            self._register(seq, seq.computed // bs)
            self._emit(seq, self._token_at(seq, seq.generated))

    def _token_at(self, seq: Seq, pos: int) -> int:
        return self.outputs.token_at(seq.digest, pos, seq.request.stop, seq.offset)

    def _emit(self, seq: Seq, tok: int) -> None:
        seq.tokens.append(tok)
        seq.pending.append(tok)
        k = seq.request.sampling.logprobs
        if k is not None:
            seq.pending_lp.append(self.outputs.logprob(seq.digest, seq.offset + seq.generated - 1, tok, k))
        seq.ready.set()
        g = seq.generated
        st = seq.request.stop
        if tok in seq.stops and g >= st.min_tokens:
            self._end_running(seq, "stop")
        elif g >= st.max_tokens or len(seq.tokens) >= self.context_length or seq.request.prefill_only:
            self._end_running(seq, "length")

    def _end_running(self, seq: Seq, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.request.prefill_only:
            seq.kv_out = self._pin(seq)  # the blocks outlive the request until the decode side releases them
        self._finish(seq, reason)

    def _finish(self, seq: Seq, reason: str) -> None:
        self._release(seq)
        seq.phase = Phase.DONE
        seq.finish = reason
        st = seq.stats
        st.finish_reason = reason
        st.completion_tokens = seq.generated
        st.total_ms = self.sim_ms - seq.arrival_ms + st.transfer_ms
        self.stats[seq.request.request_id] = st
        while len(self.stats) > _STATS_KEPT:
            self.stats.popitem(last=False)
        seq.ready.set()

    def _fail(self, seq: Seq, err: BaseException) -> None:
        self._release(seq)
        seq.phase = Phase.DONE
        seq.error = err
        seq.ready.set()
