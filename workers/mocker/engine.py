"""The mocker engine: simulated compute time, real KV block accounting.

It implements :class:`workers.common.engine.Engine` for router, planner and load tests. Nothing is
computed; a single asyncio task steps a continuously batched scheduler (:mod:`workers.mocker.scheduler`)
and sleeps for the time the step would take on the modelled hardware (:mod:`workers.mocker.timing`,
divided by ``speedup``). What is real is the bookkeeping a router and a planner observe: the reference
engine's block manager (:mod:`workers.common.blocks`: prefix caching by :func:`dynamo_rt.kvhash.block_hashes`,
LRU eviction, the same KV events), preemption when the pool runs dry, pinned blocks for disaggregated
prefill, and the load numbers.

This module is the facade: request validation, the step loop and its clock, the event sink, the load.
Output tokens come from :mod:`workers.mocker.outputs`, a pure function of ``(seed, prompt, position)``.
The stop token (a requested ``stop_token_ids`` id, or EOS) is included in the output, as vLLM does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable

from dynamo_rt.errors import ErrorCode, InvalidRequest, Unavailable
from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import GenerateRequest, TokenLogprob
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo
from workers.mocker.outputs import OutputModel
from workers.mocker.scheduler import Phase, Scheduler, Seq
from workers.mocker.timing import RequestStats, TimingModel

__all__ = ["MockerEngine", "RequestStats", "TimingModel"]

log = logging.getLogger(__name__)


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
        self.eos_probability = eos_probability
        self._outputs = OutputModel(vocab_size=vocab_size, eos_ids=eos_ids, eos_probability=eos_probability,
                                    special_token_ids=special_token_ids, bos_token_id=info.bos_token_id,
                                    seed=seed)
        self.seed = seed
        self.pin_timeout_s = pin_timeout_s
        self.instance_id = instance_id
        self._sched = Scheduler(
            block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, context_length=self.info.context_length,
            timing=self.timing, outputs=self._outputs, speedup=speedup, pin_timeout_s=pin_timeout_s,
            instance_id=instance_id, notify=self._changed,
        )
        self._sink: KvEventSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        self._next_wall = 0.0

    @property
    def sim_ms(self) -> float:
        """Simulated time spent stepping since the engine was built."""
        return self._sched.sim_ms

    @property
    def steps(self) -> int:
        return self._sched.steps

    @property
    def pins_expired(self) -> int:
        """Pins freed by their timeout (:class:`workers.common.engine.CountsPins`)."""
        return self._sched.bm.pins_expired

    @property
    def stats(self) -> OrderedDict[str, RequestStats]:
        """Simulated timings of the last finished requests, by request id."""
        return self._sched.stats

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
        self._sched.stop(Unavailable("engine stopped"))
        self._flush_events()

    # ------------------------------------------------------------------------------------ protocol

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return self._sched.bm.cached_hashes()

    def load(self) -> EngineLoad:
        s = self._sched
        busy = [*s.running, *s.transferring]
        return EngineLoad(
            active_requests=len(busy),
            waiting_requests=len(s.waiting),
            kv_blocks_used=s.bm.num_used,
            kv_blocks_total=self.num_blocks,
            active_decode_blocks=sum(len(seq.blocks) for seq in busy),
        )

    async def release_pin(self, pin_id: str) -> bool:
        return self._sched.unpin(pin_id)

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
            if seq.phase != Phase.DONE:
                self._sched.abort(seq)

    # --------------------------------------------------------------------------------- admission

    def _admit_request(self, req: GenerateRequest) -> Seq:
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
        off = req.output_offset
        if not 0 <= off < n:
            raise InvalidRequest(f"output_offset must be in 0..{n - 1}, got {off}", param="output_offset")
        stops = set(st.stop_token_ids)
        if not st.ignore_eos:
            stops |= self.eos_ids
        seq = Seq(
            request=req,
            prompt_len=n,
            tokens=list(prompt),
            digest=self._outputs.digest(prompt[:n - off]),  # a migrated request continues its own outputs
            offset=off,
            hashes=block_hashes(prompt, self.block_size, cache_salt=req.cache_salt),
            stops=frozenset(stops),
            arrival_ms=self._sched.sim_ms,
            stats=RequestStats(prompt_tokens=n),
        )
        self._sched.add(seq)
        self._wake.set()
        return seq

    # --------------------------------------------------------------------------------- step loop

    def _changed(self) -> None:
        self._flush_events()
        self._wake.set()

    def _flush_events(self) -> None:
        bm = self._sched.bm
        if not bm.events:
            return
        events = bm.take_events()
        if self._sink is not None:
            try:
                self._sink(events)
            except Exception:  # a broken sink must not stop the scheduler
                log.exception("KV event sink failed")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        s = self._sched
        self._next_wall = loop.time()
        while True:
            s.schedule_waiting()
            self._flush_events()
            if not s.running:
                self._wake.clear()
                await self._wake.wait()
                self._next_wall = loop.time()  # idle time is not a debt to catch up on
                continue
            prefill, decode = s.plan_step()
            if not prefill and not decode:  # everything was preempted: admit again
                await asyncio.sleep(0)
                continue
            prefill_tokens = sum(chunk for _, chunk in prefill)
            ms = self.timing.step_ms(len(prefill) + len(decode), prefill_tokens)
            await self._sleep(loop, ms)
            s.finish_step(prefill, decode, ms)
            self._flush_events()

    async def _sleep(self, loop: asyncio.AbstractEventLoop, ms: float) -> None:
        if self._sched.no_sleep:
            await asyncio.sleep(0)
            return
        now = loop.time()
        # An absolute schedule absorbs the event loop's oversleep instead of accumulating it.
        self._next_wall = max(self._next_wall, now - 0.05) + ms / 1000.0 / self.speedup
        await asyncio.sleep(max(0.0, self._next_wall - now))
