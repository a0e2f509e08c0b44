"""The mocker engine: simulated compute time, real KV block accounting.

It implements :class:`workers.common.engine.Engine` for router, planner and load tests. Nothing is
computed; a single asyncio task steps a continuously batched scheduler and sleeps for the time the step
would take on the modelled hardware (:class:`TimingModel`, divided by ``speedup``). What is real is the
bookkeeping a router and a planner observe: a paged block pool with prefix caching by
:func:`dynamo_rt.kvhash.block_hashes`, LRU eviction of unreferenced cached blocks, KV events (stored /
removed) to the sink, preemption when the pool runs dry, pinned blocks for disaggregated prefill, and the
load numbers.

Output tokens are a pure function of ``(seed, prompt, position)``, so two mockers (or a prefill mocker and
a decode mocker) produce the same tokens for the same request, and special ids are never produced.
The stop token (a requested ``stop_token_ids`` id, or EOS) is included in the output, as vLLM does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from dynamo_rt.errors import ErrorCode, InvalidRequest, Unavailable
from dynamo_rt.kvhash import ROOT_HASH, block_hashes, hash_block
from dynamo_rt.protocol import GenerateRequest, KvEvent, KvTransferParams, TokenLogprob
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_STATS_KEPT = 1024  # finished requests whose simulated timings are kept for tests and benches


@dataclass(slots=True, frozen=True)
class TimingModel:
    """Simulated cost of one scheduler step, in milliseconds of the modelled hardware.

    Defaults resemble an 8B dense model (bf16) on one H100: a forward pass has a ~10 ms floor (reading
    16 GB of weights), each running sequence adds ~0.1 ms of attention / sampling, and prefill costs
    ~0.07 ms per uncached token (~2 * 8e9 FLOP per token at ~250 TFLOP/s achieved) plus ~2 ms of extra
    launch overhead. A KV block of 16 tokens (~2 MiB for Llama-3-8B) moves over RDMA in ~0.08 ms.
    """

    prefill_ms_per_token: float = 0.07
    prefill_base_ms: float = 2.0
    decode_ms_base: float = 10.0
    decode_ms_per_seq: float = 0.1
    transfer_ms_per_block: float = 0.08

    def step_ms(self, num_seqs: int, prefill_tokens: int) -> float:
        """One forward pass over ``num_seqs`` sequences, ``prefill_tokens`` of them being prompt tokens."""
        ms = self.decode_ms_base + self.decode_ms_per_seq * num_seqs
        if prefill_tokens:
            ms += self.prefill_base_ms + self.prefill_ms_per_token * prefill_tokens
        return ms

    def prefill_ms(self, uncached_tokens: int) -> float:
        """A lone prefill of ``uncached_tokens`` (what TTFT is on an idle engine)."""
        return self.step_ms(1, uncached_tokens)

    def transfer_ms(self, blocks: int) -> float:
        return self.transfer_ms_per_block * blocks


@dataclass(slots=True)
class RequestStats:
    """Simulated timings of one finished request (milliseconds on the modelled hardware)."""

    prompt_tokens: int
    cached_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens computed here (uncached, not transferred), preemptions included
    transferred_blocks: int = 0
    queue_ms: float = 0.0  # arrival -> first scheduled
    prefill_ms: float = 0.0  # sum of the steps the request's prefill took part in
    transfer_ms: float = 0.0
    ttft_ms: float = 0.0  # arrival -> first token (transfer included)
    total_ms: float = 0.0
    completion_tokens: int = 0
    preemptions: int = 0
    finish_reason: str | None = None


class _Phase:
    WAITING = 0  # queued, holds no blocks
    TRANSFER = 1  # holds blocks, remote KV is being "read"
    PREFILL = 2  # holds blocks, prompt being computed (maybe over several steps)
    DECODE = 3  # one token per step
    DONE = 4  # finished, cancelled or pinned: the scheduler forgets it


@dataclass(slots=True, eq=False)
class _Seq:
    request: GenerateRequest
    prompt_len: int
    tokens: list[int]  # prompt + generated
    digest: int  # seed of the output tokens
    hashes: list[int]  # chained hashes of every full block of ``tokens`` known so far
    stops: frozenset[int]
    arrival_ms: float
    phase: int = _Phase.WAITING
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

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass(slots=True)
class _Pin:
    blocks: list[int]
    timer: asyncio.TimerHandle | None


class MockerEngine:
    """A simulated engine; see the module docstring. Implements the Engine protocol."""

    def __init__(
        self,
        info: ModelInfo,
        *,
        block_size: int = 16,
        num_blocks: int = 16384,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        prefill_ms_per_token: float = 0.07,
        prefill_base_ms: float = 2.0,
        decode_ms_base: float = 10.0,
        decode_ms_per_seq: float = 0.1,
        speedup: float = 1.0,
        transfer_ms_per_block: float = 0.08,
        vocab_size: int = 32000,
        eos_token_id: int | None = None,
        eos_probability: float = 0.0,
        special_token_ids: Iterable[int] = (),
        seed: int = 0,
        pin_timeout_s: float = 30.0,
        instance_id: str = "",
    ) -> None:
        if block_size <= 0 or num_blocks <= 0 or max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("block_size, num_blocks, max_num_seqs and max_num_batched_tokens must be > 0")
        if speedup < 0:
            raise ValueError("speedup must be >= 0 (0: as fast as possible)")
        eos_ids = list(info.eos_token_ids)
        if eos_token_id is not None and eos_token_id not in eos_ids:
            eos_ids.insert(0, eos_token_id)
        if eos_probability > 0 and not eos_ids:
            raise ValueError("eos_probability > 0 needs an EOS id (eos_token_id or info.eos_token_ids)")
        # The published card must carry the block size the pool really uses.
        self.info = dataclasses.replace(info, block_size=block_size, eos_token_ids=eos_ids)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.timing = TimingModel(
            prefill_ms_per_token=prefill_ms_per_token,
            prefill_base_ms=prefill_base_ms,
            decode_ms_base=decode_ms_base,
            decode_ms_per_seq=decode_ms_per_seq,
            transfer_ms_per_block=transfer_ms_per_block,
        )
        self.speedup = speedup
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self._eos_first = eos_ids[0] if eos_ids else -1
        self.eos_probability = eos_probability
        specials = set(special_token_ids) | set(eos_ids)
        if info.bos_token_id is not None:
            specials.add(info.bos_token_id)
        self._specials = frozenset(s for s in specials if 0 <= s < vocab_size)
        if len(self._specials) >= vocab_size:
            raise ValueError("vocab_size leaves no ordinary token ids")
        self.seed = seed
        self.pin_timeout_s = pin_timeout_s
        self.instance_id = instance_id

        # Block pool. A block is free-new, referenced (refcount > 0) or cached-evictable (refcount 0 but
        # its hash is in the cache); evictable blocks are reused in LRU order, emitting "removed".
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_blocks
        self._block_hash: dict[int, int] = {}
        self._cache: dict[int, int] = {}  # hash -> block id

        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # PREFILL and DECODE, in admission order
        self._transferring: set[_Seq] = set()
        self._pins: dict[str, _Pin] = {}
        self._events: list[KvEvent] = []
        self._sink: KvEventSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        self._next_wall = 0.0
        self.sim_ms = 0.0  # simulated time spent stepping since start
        self.steps = 0
        self.stats: OrderedDict[str, RequestStats] = OrderedDict()

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        self._stopped = False
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="mocker-scheduler")
        log.info(
            "mocker engine: %d blocks of %d tokens, max %d seqs, speedup %s, vocab %d",
            self.num_blocks, self.block_size, self.max_num_seqs, self.speedup, self.vocab_size,
        )

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        err = Unavailable("engine stopped")
        for seq in [*self._waiting, *self._running, *self._transferring]:
            self._release(seq)
            seq.error = err
            seq.ready.set()
        self._waiting.clear()
        self._running.clear()
        self._transferring.clear()
        for pin_id in list(self._pins):
            self._unpin(pin_id)
        if self._cache:
            self._events.append(KvEvent("cleared"))
        self._evictable.clear()
        self._cache.clear()
        self._block_hash.clear()
        self._refs = [0] * self.num_blocks
        self._free = deque(range(self.num_blocks))
        self._flush_events()

    # ------------------------------------------------------------------------------------ protocol

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return list(self._cache)

    def load(self) -> EngineLoad:
        active = len(self._running) + len(self._transferring)
        decode_blocks = sum(len(s.blocks) for s in self._running)
        decode_blocks += sum(len(s.blocks) for s in self._transferring)
        return EngineLoad(
            active_requests=active,
            waiting_requests=len(self._waiting),
            kv_blocks_used=self.num_blocks - len(self._free) - len(self._evictable),
            kv_blocks_total=self.num_blocks,
            active_decode_blocks=decode_blocks,
        )

    async def release_pin(self, pin_id: str) -> bool:
        return self._unpin(pin_id)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        seq = self._admit_request(request)
        try:
            while True:
                if not seq.pending and seq.finish is None and seq.error is None:
                    seq.ready.clear()
                    await seq.ready.wait()
                if seq.error is not None:
                    raise seq.error
                toks, seq.pending = seq.pending, []
                lps: list[TokenLogprob] | None = None
                if request.sampling.logprobs is not None:
                    lps, seq.pending_lp = seq.pending_lp, []
                out = EngineOutput(token_ids=toks, logprobs=lps)
                if not seq.first_sent:
                    seq.first_sent = True
                    out.prompt_tokens = seq.prompt_len
                    out.cached_tokens = seq.stats.cached_tokens
                if seq.finish is not None:
                    out.finish_reason = seq.finish
                    out.kv_transfer = seq.kv_out
                    yield out
                    return
                yield out
        finally:
            if seq.phase != _Phase.DONE:
                self._abort(seq)

    # --------------------------------------------------------------------------------- admission

    def _admit_request(self, req: GenerateRequest) -> _Seq:
        if self._task is None or self._stopped:
            raise Unavailable("engine not started")
        prompt = req.token_ids
        n = len(prompt)
        if n == 0:
            raise InvalidRequest("the prompt is empty", param="token_ids")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param="token_ids")
        if n >= self.info.context_length:
            raise InvalidRequest(
                f"prompt of {n} tokens leaves no room in the context of {self.info.context_length}",
                code=ErrorCode.CONTEXT_LENGTH, param="token_ids",
            )
        if math.ceil((n + 1) / self.block_size) > self.num_blocks:
            raise InvalidRequest(
                f"prompt of {n} tokens does not fit the KV cache ({self.num_blocks} blocks)",
                code=ErrorCode.CONTEXT_LENGTH, param="token_ids",
            )
        st = req.stop
        if st.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if st.min_tokens < 0 or st.min_tokens > st.max_tokens:
            raise InvalidRequest("min_tokens must be in [0, max_tokens]", param="min_tokens")
        stops = set(st.stop_token_ids)
        if not st.ignore_eos:
            stops |= self.eos_ids
        digest = _digest(self.seed, prompt)
        seq = _Seq(
            request=req,
            prompt_len=n,
            tokens=list(prompt),
            digest=digest,
            hashes=block_hashes(prompt, self.block_size),
            stops=frozenset(stops),
            arrival_ms=self.sim_ms,
            stats=RequestStats(prompt_tokens=n),
        )
        self._waiting.append(seq)
        self._wake.set()
        return seq

    def _abort(self, seq: _Seq) -> None:
        """The consumer went away: forget the request and free its blocks."""
        if seq.phase == _Phase.WAITING:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        elif seq.phase == _Phase.TRANSFER:
            self._transferring.discard(seq)
            if seq.transfer_handle is not None:
                seq.transfer_handle.cancel()
        elif seq in self._running:
            self._running.remove(seq)
        self._release(seq)
        seq.phase = _Phase.DONE
        self._flush_events()
        self._wake.set()  # freed blocks may let a waiting request in

    # --------------------------------------------------------------------------------- block pool

    def _available(self) -> int:
        return len(self._free) + len(self._evictable)

    def _alloc(self) -> int:
        if self._free:
            blk = self._free.popleft()
        else:
            blk, _ = self._evictable.popitem(last=False)
            self._drop_hash(blk, emit=True)
        self._refs[blk] = 1
        return blk

    def _drop_hash(self, blk: int, *, emit: bool) -> None:
        h = self._block_hash.pop(blk, None)
        if h is not None:
            del self._cache[h]
            if emit:
                self._events.append(KvEvent("removed", [h]))

    def _ref(self, blk: int) -> None:
        if self._refs[blk] == 0:
            del self._evictable[blk]
        self._refs[blk] += 1

    def _unref_all(self, blocks: list[int]) -> None:
        # Tail first: a prefix's tail is then evicted before its head, which is what keeps shared heads.
        for blk in reversed(blocks):
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                if blk in self._block_hash:
                    self._evictable[blk] = None
                else:
                    self._free.append(blk)

    def _release(self, seq: _Seq) -> None:
        if seq.blocks:
            self._unref_all(seq.blocks)
            seq.blocks = []

    def _register(self, seq: _Seq, upto: int) -> None:
        """Put the seq's full, computed blocks [registered, upto) in the prefix cache; emit "stored"."""
        run: list[int] = []
        run_parent: int | None = None
        for i in range(seq.registered, upto):
            while len(seq.hashes) <= i:  # generated tokens: hash the block now it is full
                parent = seq.hashes[-1] if seq.hashes else ROOT_HASH
                j = len(seq.hashes) * self.block_size
                seq.hashes.append(hash_block(parent, seq.tokens[j : j + self.block_size]))
            h = seq.hashes[i]
            blk = seq.blocks[i]
            if h in self._cache:
                # Another request computed the same block first; ours stays anonymous and is freed later.
                if run:
                    self._events.append(KvEvent("stored", run, run_parent))
                    run = []
                continue
            self._cache[h] = blk
            self._block_hash[blk] = h
            if not run:
                run_parent = seq.hashes[i - 1] if i > 0 else None
            run.append(h)
        if run:
            self._events.append(KvEvent("stored", run, run_parent))
        seq.registered = max(seq.registered, upto)

    def _flush_events(self) -> None:
        if not self._events:
            return
        events, self._events = self._events, []
        if self._sink is not None:
            try:
                self._sink(events)
            except Exception:  # a broken sink must not stop the scheduler
                log.exception("KV event sink failed")

    # --------------------------------------------------------------------------------- pins

    def _pin(self, seq: _Seq) -> KvTransferParams:
        pin_id = uuid.uuid4().hex
        blocks, seq.blocks = seq.blocks, []
        timer = asyncio.get_running_loop().call_later(self.pin_timeout_s, self._pin_expired, pin_id)
        self._pins[pin_id] = _Pin(blocks, timer)
        return KvTransferParams(
            instance_id=self.instance_id,
            block_ids=list(blocks),
            num_tokens=seq.prompt_len,
            first_token=seq.tokens[seq.prompt_len],
            pin_id=pin_id,
        )

    def _pin_expired(self, pin_id: str) -> None:
        if self._unpin(pin_id):
            log.warning("pinned blocks %s expired after %.0f s without a release", pin_id, self.pin_timeout_s)

    def _unpin(self, pin_id: str) -> bool:
        pin = self._pins.pop(pin_id, None)
        if pin is None:
            return False
        if pin.timer is not None:
            pin.timer.cancel()
        self._unref_all(pin.blocks)
        self._wake.set()
        return True

    # --------------------------------------------------------------------------------- scheduler

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_wall = loop.time()
        while True:
            self._schedule_waiting()
            self._flush_events()
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                self._next_wall = loop.time()  # idle time is not a debt to catch up on
                continue
            prefill, decode = self._plan_step()
            if not prefill and not decode:  # everything was preempted: admit again
                await asyncio.sleep(0)
                continue
            prefill_tokens = sum(chunk for _, chunk in prefill)
            ms = self.timing.step_ms(len(prefill) + len(decode), prefill_tokens)
            await self._sleep(loop, ms)
            self.sim_ms += ms
            self.steps += 1
            self._finish_step(prefill, decode, ms)
            self._flush_events()

    async def _sleep(self, loop: asyncio.AbstractEventLoop, ms: float) -> None:
        if self.speedup == 0 or self.speedup >= 1e6:
            await asyncio.sleep(0)
            return
        now = loop.time()
        # An absolute schedule absorbs the event loop's oversleep instead of accumulating it.
        self._next_wall = max(self._next_wall, now - 0.05) + ms / 1000.0 / self.speedup
        await asyncio.sleep(max(0.0, self._next_wall - now))

    def _schedule_waiting(self) -> None:
        """Admit waiting requests in FCFS order while slots and blocks allow."""
        bs = self.block_size
        while self._waiting and len(self._running) + len(self._transferring) < self.max_num_seqs:
            seq = self._waiting[0]
            n = len(seq.tokens)
            # Never match the whole sequence: its last token must be computed to produce the next one.
            matchable = (n - 1) // bs
            matched: list[int] = []
            for h in seq.hashes[:matchable]:
                blk = self._cache.get(h)
                if blk is None:
                    break
                matched.append(blk)
            need = math.ceil(n / bs) - len(matched)
            reusable = sum(1 for b in matched if self._refs[b] == 0)
            if need > self._available() - reusable:
                if not self._running and not self._transferring and not self._pins:
                    # Nothing will ever free blocks: the sequence cannot fit even on an idle engine.
                    self._waiting.popleft()
                    if seq.generated > 0:
                        self._finish(seq, "length")  # grew to the size of the whole pool
                    else:
                        self._fail(seq, InvalidRequest("the request does not fit the KV cache",
                                                       code=ErrorCode.CONTEXT_LENGTH))
                    continue
                return
            self._waiting.popleft()
            for blk in matched:
                self._ref(blk)
            seq.blocks = matched + [self._alloc() for _ in range(need)]
            seq.registered = len(matched)
            seq.computed = len(matched) * bs
            if not seq.scheduled:
                seq.scheduled = True
                seq.stats.cached_tokens = seq.computed
                seq.stats.queue_ms = self.sim_ms - seq.arrival_ms
            kt = seq.request.kv_transfer
            if kt is not None and kt.block_ids and kt.num_tokens > 0 and seq.generated == 0:
                self._start_transfer(seq, min(kt.num_tokens, n))
            else:
                seq.phase = _Phase.PREFILL
                self._running.append(seq)

    def _start_transfer(self, seq: _Seq, remote_tokens: int) -> None:
        blocks = max(0, math.ceil(remote_tokens / self.block_size) - seq.computed // self.block_size)
        ms = self.timing.transfer_ms(blocks)
        seq.phase = _Phase.TRANSFER
        seq.stats.transferred_blocks = blocks
        seq.stats.transfer_ms = ms
        self._transferring.add(seq)
        delay = 0.0 if self.speedup == 0 or self.speedup >= 1e6 else ms / 1000.0 / self.speedup
        seq.transfer_handle = asyncio.get_running_loop().call_later(
            delay, self._transfer_done, seq, remote_tokens
        )

    def _transfer_done(self, seq: _Seq, remote_tokens: int) -> None:
        if seq.phase != _Phase.TRANSFER:
            return
        self._transferring.discard(seq)
        seq.transfer_handle = None
        seq.computed = max(seq.computed, remote_tokens)
        self._register(seq, seq.computed // self.block_size)
        kt = seq.request.kv_transfer
        if seq.computed >= seq.prompt_len:
            # The prefill worker already sampled the first token: continue from it.
            first = kt.first_token if kt is not None and kt.first_token >= 0 else self._token_at(seq, 0)
            seq.stats.ttft_ms = self.sim_ms - seq.arrival_ms + seq.stats.transfer_ms
            self._emit(seq, first)
            if seq.phase != _Phase.DONE:
                seq.phase = _Phase.DECODE
                self._running.append(seq)
        else:
            seq.phase = _Phase.PREFILL
            self._running.append(seq)
        self._flush_events()
        self._wake.set()

    def _plan_step(self) -> tuple[list[tuple[_Seq, int]], list[_Seq]]:
        """Choose this step's work: every decoding sequence, then prefill chunks within the token budget."""
        bs = self.block_size
        decode: list[_Seq] = []
        for seq in list(self._running):
            if seq.phase != _Phase.DECODE:
                continue
            if seq not in self._running:  # preempted while making room for an earlier one
                continue
            if not self._grow(seq, math.ceil(len(seq.tokens) / bs)):
                continue
            decode.append(seq)
        budget = self.max_num_batched_tokens - len(decode)
        prefill: list[tuple[_Seq, int]] = []
        for seq in self._running:
            if budget <= 0:
                break
            if seq.phase != _Phase.PREFILL:
                continue
            chunk = min(len(seq.tokens) - seq.computed, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        return prefill, decode

    def _grow(self, seq: _Seq, want: int) -> bool:
        """Give ``seq`` ``want`` blocks, preempting the newest running requests if the pool is dry."""
        while len(seq.blocks) < want:
            if self._available() > 0:
                seq.blocks.append(self._alloc())
                continue
            victim = self._running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: _Seq) -> None:
        """Recompute-style preemption: drop the blocks, recompute prompt + generated on readmission."""
        self._running.remove(seq)
        self._release(seq)
        seq.registered = 0
        seq.computed = 0
        seq.phase = _Phase.WAITING
        seq.stats.preemptions += 1
        self._waiting.appendleft(seq)

    def _finish_step(self, prefill: list[tuple[_Seq, int]], decode: list[_Seq], ms: float) -> None:
        bs = self.block_size
        for seq, chunk in prefill:
            if seq.phase != _Phase.PREFILL:  # cancelled during the step
                continue
            seq.computed += chunk
            seq.stats.prefill_tokens += chunk
            seq.stats.prefill_ms += ms
            self._register(seq, seq.computed // bs)
            if seq.computed < len(seq.tokens):
                continue
            if seq.stats.ttft_ms == 0.0 and seq.generated == 0:
                seq.stats.ttft_ms = self.sim_ms - seq.arrival_ms
            seq.phase = _Phase.DECODE
            self._emit(seq, self._token_at(seq, seq.generated))
        for seq in decode:
            if seq.phase != _Phase.DECODE:
                continue
            seq.computed = len(seq.tokens)
            self._register(seq, seq.computed // bs)
            self._emit(seq, self._token_at(seq, seq.generated))

    def _emit(self, seq: _Seq, tok: int) -> None:
        seq.tokens.append(tok)
        seq.pending.append(tok)
        if seq.request.sampling.logprobs is not None:
            seq.pending_lp.append(self._logprob(seq, seq.generated - 1, tok, seq.request.sampling.logprobs))
        seq.ready.set()
        g = seq.generated
        st = seq.request.stop
        if tok in seq.stops and g >= st.min_tokens:
            self._end_running(seq, "stop")
        elif g >= st.max_tokens or len(seq.tokens) >= self.info.context_length or seq.request.prefill_only:
            self._end_running(seq, "length")

    def _end_running(self, seq: _Seq, reason: str) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq.request.prefill_only:
            seq.kv_out = self._pin(seq)  # the blocks outlive the request until the decode side releases them
        self._finish(seq, reason)

    def _finish(self, seq: _Seq, reason: str) -> None:
        self._release(seq)
        seq.phase = _Phase.DONE
        seq.finish = reason
        st = seq.stats
        st.finish_reason = reason
        st.completion_tokens = seq.generated
        st.total_ms = self.sim_ms - seq.arrival_ms + st.transfer_ms
        self.stats[seq.request.request_id] = st
        while len(self.stats) > _STATS_KEPT:
            self.stats.popitem(last=False)
        seq.ready.set()

    def _fail(self, seq: _Seq, err: BaseException) -> None:
        self._release(seq)
        seq.phase = _Phase.DONE
        seq.error = err
        seq.ready.set()

    # --------------------------------------------------------------------------------- outputs

    def _token_at(self, seq: _Seq, pos: int) -> int:
        """The output token at generated position ``pos``: a pure function of (seed, prompt, pos)."""
        x = _mix(seq.digest ^ ((pos + 1) * 0x9E3779B97F4A7C15 & _MASK64))
        st = seq.request.stop
        if self.eos_probability > 0 and pos + 1 >= st.min_tokens and not st.ignore_eos:
            if (x >> 11) / float(1 << 53) < self.eos_probability:
                return self._eos_first
            x = _mix(x)
        tok = x % self.vocab_size
        while tok in self._specials:
            tok = (tok + 1) % self.vocab_size
        return tok

    def _logprob(self, seq: _Seq, pos: int, tok: int, k: int) -> TokenLogprob:
        x = _mix(seq.digest ^ pos ^ 0x5851F42D4C957F2D)
        lp = -((x % 1000) + 1) / 1000.0
        top: list[tuple[int, float]] = [(tok, lp)]
        for i in range(1, k):
            top.append(((tok + i) % self.vocab_size, lp - i))
        return TokenLogprob(tok, lp, top if k > 0 else [])


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit permutation."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def _digest(seed: int, prompt: list[int]) -> int:
    h = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=8)
    h.update(array("I", prompt).tobytes())
    return int.from_bytes(h.digest(), "little")
