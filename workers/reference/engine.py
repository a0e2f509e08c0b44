"""ReferenceEngine: our torch engine behind the :class:`workers.common.engine.Engine` protocol.

Place: the worker runtime (``workers.common.runtime``) calls :meth:`ReferenceEngine.generate` per request
on its asyncio loop; the model runs on ONE dedicated step thread, so the loop never waits on compute.

Threads and ownership
  * The event loop: ``generate`` validates, enqueues a sequence, then awaits its per-request
    ``asyncio.Queue``. Cancellation (``aclose`` / task cancel) runs the generator's ``finally``, which
    frees the sequence's blocks, or marks it so the step thread frees them after the step using them.
  * The step thread loops: schedule (under ``_lock``) -> forward + sample (no lock) -> post-process
    (under ``_lock``), then hands outputs and KV events to the loop with ``call_soon_threadsafe``.
  * All scheduler state (queues, :class:`~workers.reference.kv_cache.BlockManager`, pins) is touched only
    under ``_lock``; blocks are allocated only by the step thread, between forwards.

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

Disaggregation
  * ``prefill_only``: the first token is sampled, then the prompt's blocks stay referenced under a pin id
    until :meth:`release_pin` or ``pin_timeout`` seconds; the output carries ``KvTransferParams``.
  * ``kv_transfer`` set: the prompt's KV comes from elsewhere. The step thread allocates local blocks,
    then ``generate`` awaits ``kv_loader(params, local_block_ids)`` (see :data:`KvLoader`) on the loop;
    on success the sequence continues from ``first_token`` without recomputing the prompt; if the loader
    is unset or raises, the prompt is prefilled locally and the request still completes.

Lower KV tiers (:mod:`workers.reference.kvbm`, optional: ``host_tier_path`` / ``disk_tier_path``)
  * Every block registered in the prefix cache is queued for a copy into the host tier (or the disk tier
    without one); the copy holds a reference on the block until it is done, and queued copies are dropped
    when the scheduler is short of blocks (:meth:`ReferenceEngine._reclaim_locked`).
  * Admission looks past the primary prefix hit into the tiers: a hit there is pinned, primary blocks are
    allocated and the sequence waits in ``ONBOARDING`` while a tier thread fills them; the step thread keeps
    stepping the others. Then it is an ordinary prefix hit (``cached_tokens`` counts the onboarded tokens).
    A small host-only run (``onboard_sync_bytes``) is copied at once by the step thread instead: the blocks
    join the primary prefix cache and the sequence is admitted in the same step.
  * Tier events (``KvEvent.tier`` = host / disk) go out like primary ones; the blocks a restarted worker
    found in its host tier are announced when the event sink is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from dynamo_rt import kvhash
from dynamo_rt.errors import DynamoError, ErrorCode, InvalidRequest, Unavailable
from dynamo_rt.protocol import FinishReason, GenerateRequest, KvEvent, KvTransferParams, TokenLogprob
from workers.common.blocks import BlockManager
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo
from workers.reference.kv_cache import KvPool
from workers.reference.kvbm import KvTiers, OnboardJob, TierConfig, model_fingerprint, open_tiers
from workers.reference.model import (
    DecoderModel,
    ModelConfig,
    PrefillChunk,
    StepBatch,
    parse_dtype,
    rope_inv_freq,
)
from workers.reference.native import NativeDecode, NativeStep, enabled_by_env, load_library
from workers.reference.sampler import SampleSpec, sample, skip_draw

log = logging.getLogger(__name__)

# The decode side's KV hook: fill ``local_block_ids[i]`` with the KV of the prefill worker's
# ``params.block_ids[i]`` (same block size and layout), for every i; return when the bytes are in place.
# Raise (anything) to make the engine prefill locally instead. It runs on the event loop inside
# ``generate``; if the request is cancelled meanwhile it is cancelled, and the engine frees the blocks
# only after it has returned or raised, so it must not leave a transfer running into them.
KvLoader = Callable[[KvTransferParams, list[int]], Awaitable[None]]

DEFAULT_KV_MEMORY_GIB = 0.5  # CPU pool size when neither num_blocks nor kv_cache_memory is given
DEFAULT_GPU_KV_FRACTION = 0.8  # of the free device memory after the weights are loaded
MAX_LOGPROBS = 20
_NO_ROWS = torch.zeros(0, dtype=torch.long)  # StepBatch's unused index fields on the native path


class _State(Enum):
    WAITING = "waiting"  # in the waiting queue, no blocks (or needs local blocks for a KV load)
    LOADING = "loading"  # blocks allocated, the kv_loader is filling them (not scheduled)
    ONBOARDING = "onboarding"  # blocks allocated, a KV tier thread is filling them from host / disk
    RUNNING = "running"  # admitted: prefilling or decoding
    FINISHED = "finished"  # done or cancelled: its blocks are released (or pinned)


@dataclass(eq=False, slots=True)
class _Seq:
    req: GenerateRequest
    tokens: list[int]
    prompt_len: int
    max_tokens: int  # generated tokens allowed (already capped by the context length)
    stop_ids: frozenset[int]
    sampling: SampleSpec
    queue: asyncio.Queue[EngineOutput | BaseException]
    order: int
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of ``tokens``
    num_computed: int = 0
    num_registered: int = 0  # leading blocks already offered to the prefix cache
    cached_tokens: int = 0
    state: _State = _State.WAITING
    wants_load: bool = False  # decode request whose prompt KV a kv_loader provides
    load_future: asyncio.Future[list[int]] | None = None
    cancelled: bool = False  # cancelled while part of an in-flight step or an onboard: free after it
    no_onboard: bool = False  # an onboard failed: recompute instead
    sent_first: bool = False

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass(slots=True)
class _Plan:
    seqs: list[tuple[_Seq, int]]  # (sequence, tokens computed this step), decode rows first
    batch: StepBatch
    samplers: list[_Seq]
    specs: list[SampleSpec]


@dataclass(slots=True)
class _Pin:
    blocks: list[int]
    deadline: float


class ReferenceEngine:
    """Torch engine for Llama / Qwen2 / Mistral checkpoints (HF safetensors). See the module docstring."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        served_model_name: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory: float | None = None,
        max_batch_tokens: int = 512,
        max_num_seqs: int = 128,
        threads: int | None = None,
        pin_timeout: float = 60.0,
        host_tier_path: str | None = None,
        host_tier_bytes: int | None = None,
        host_tier_blocks: int | None = None,
        disk_tier_path: str | None = None,
        disk_tier_bytes: int | None = None,
        disk_tier_blocks: int | None = None,
        onboard_min_blocks: int = 1,
        onboard_sync_bytes: int = 8 * 2**20,
        tier_drain_s: float = 5.0,
        native: bool | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.cfg = ModelConfig.load(self.model_path)
        rope_inv_freq(self.cfg)  # unsupported RoPE types fail here, not at start()
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        if block_size < 1:
            raise DynamoError("block_size must be >= 1")
        if max_batch_tokens < 1 or max_num_seqs < 1:
            raise DynamoError("max_batch_tokens and max_num_seqs must be >= 1")
        self.block_size = block_size
        self._num_blocks_arg = num_blocks
        self._kv_memory_arg = kv_cache_memory
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.threads = threads
        # The native decode step (native.py) for all-decode steps on CPU fp32; None: on unless DYN_REF_NATIVE=0.
        self.native = enabled_by_env() if native is None else native
        # Leave a core to the event loop on CPU: OpenMP workers spin between ops, and an intra-op pool as
        # wide as the machine stalls whenever the loop thread takes one of its cores.
        self.torch_threads = threads or (max(1, _cpu_count() - 1) if self.device.type == "cpu" else None)
        self.pin_timeout = pin_timeout
        self.tier_config = TierConfig(host_path=host_tier_path, host_bytes=host_tier_bytes,
                                      host_blocks=host_tier_blocks, disk_path=disk_tier_path,
                                      disk_bytes=disk_tier_bytes, disk_blocks=disk_tier_blocks)
        self.onboard_min_blocks = max(1, onboard_min_blocks)
        self.onboard_sync_bytes = onboard_sync_bytes
        self.tier_drain_s = tier_drain_s
        self.info = ModelInfo(
            name=served_model_name or self.model_path.name,
            path=str(self.model_path),
            context_length=self.cfg.max_position_embeddings,
            block_size=block_size,
            eos_token_ids=_eos_ids(self.model_path, self.cfg),
            bos_token_id=self.cfg.bos_token_id,
        )
        self.vocab_size = self.cfg.vocab_size
        # Set by the worker (NIXL) or a test; None means a decode request prefills locally.
        self.kv_loader: KvLoader | None = None

        self.model: DecoderModel | None = None
        self.pool: KvPool | None = None
        self._bm: BlockManager | None = None
        self._tiers: KvTiers | None = None
        self._announce = False  # blocks found in the tiers at start, not yet told to an event sink
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: KvEventSink | None = None
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._loading: set[_Seq] = set()
        self._onboarding: set[_Seq] = set()
        self._inflight: set[_Seq] = set()
        self._pins: dict[str, _Pin] = {}
        self._order = itertools.count()
        self._arange_bs = torch.arange(block_size)
        self._layer_rows = torch.zeros(0, dtype=torch.long)
        self._dec_const = torch.zeros(0, dtype=torch.long)
        self._arange_ctx = torch.zeros(0, dtype=torch.long)
        self.steps = 0  # forwards run (tests / bench)
        self.preemptions = 0

    # ----------------------------------------------------------------------------------------- lifecycle

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks if self.pool is not None else 0

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"ref-engine-{self.info.name}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        t0 = time.monotonic()
        self.model = DecoderModel.load(self.model_path, self.cfg, self.device, self.dtype)
        if self.native:
            why = NativeDecode.supports(self.model)
            lib = load_library() if why is None else None
            if lib is not None:
                self.model.native = NativeDecode(self.model, self.block_size, lib, threads=self.torch_threads or 1)
            elif why is not None:
                log.info("native decode step not used: %s", why)
        cfg = self.cfg
        per_block = KvPool.bytes_per_block(cfg.num_layers, self.block_size, cfg.num_kv_heads, cfg.head_dim,
                                           self.dtype)
        n = self._num_blocks_arg
        if n is None:
            if self._kv_memory_arg is not None:
                budget = int(self._kv_memory_arg * 2**30)
            elif self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * DEFAULT_GPU_KV_FRACTION)
            else:
                budget = int(DEFAULT_KV_MEMORY_GIB * 2**30)
            # No point holding more than every sequence at full context.
            cap = self.max_num_seqs * math.ceil(self.info.context_length / self.block_size)
            n = max(1, min(budget // per_block, cap))
        self.pool = KvPool(n, cfg.num_layers, self.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype,
                           self.device)
        self._bm = BlockManager(n)
        self._make_index_tables()
        log.info("reference engine: %s on %s/%s, %d KV blocks of %d tokens (%.1f MiB), loaded in %.1fs",
                 self.model_path, self.device, self.dtype, n, self.block_size, self.pool.total_bytes / 2**20,
                 time.monotonic() - t0)
        if self.tier_config.enabled:
            self._open_tiers()

    def _open_tiers(self) -> None:
        assert self.pool is not None
        cfg = self.cfg
        dtype = str(self.dtype).removeprefix("torch.")
        fp = model_fingerprint(self.model_path, dtype=dtype, block_size=self.block_size,
                               num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                               block_bytes=self.pool.block_bytes)
        host, disk = open_tiers(self.tier_config, fp, self.pool.block_bytes)
        if host is None and disk is None:
            return
        blocks = self.pool.tensor.view(torch.uint8).reshape(self.pool.num_blocks, self.pool.block_bytes)
        self._tiers = KvTiers(blocks, host, disk, emit=self._tier_emit, release=self._tier_release)
        self._announce = True

    async def stop(self) -> None:
        th = self._thread
        if th is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(th.join)
        self._thread = None
        if self.model is not None and self.model.native is not None:
            self.model.native.close()  # its worker threads; the step thread that used them is gone
            self.model.native = None
        tiers = self._tiers
        if tiers is not None:
            # Lets queued offloads land (a restarted worker finds them) and fails queued onboards, whose
            # sequences go back to the waiting queue and are failed below.
            await asyncio.to_thread(tiers.shutdown, self.tier_drain_s)
        err = Unavailable("engine stopped")
        with self._lock:
            seqs = list(self._waiting) + self._running + list(self._loading) + list(self._onboarding)
            self._waiting.clear()
            self._running.clear()
            self._loading.clear()
            self._onboarding.clear()
            for s in seqs:
                self._finish_locked(s)
                s.queue.put_nowait(err)
                if s.load_future is not None and not s.load_future.done():
                    s.load_future.set_exception(err)
            assert self._bm is not None
            for pin in self._pins.values():
                self._bm.release(pin.blocks)
            self._pins.clear()
            self._inflight.clear()
            self._bm.clear()
            events = self._bm.take_events()
            self._tiers = None
        if tiers is not None:
            tiers.close()
        if events:
            # After any event batch the step thread already queued, to keep the router's order.
            asyncio.get_running_loop().call_soon(self._emit, events)

    # ----------------------------------------------------------------------------------------- protocol

    def load(self) -> EngineLoad:
        with self._lock:
            bm = self._bm
            return EngineLoad(
                active_requests=len(self._running) + len(self._loading) + len(self._onboarding),
                waiting_requests=len(self._waiting),
                kv_blocks_used=bm.num_used if bm else 0,
                kv_blocks_total=self.num_blocks,
                active_decode_blocks=sum(len(s.blocks) for s in self._running
                                         if s.num_computed >= s.prompt_len),
            )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Called on the event loop. The first sink after start also hears which blocks the lower tiers
        already hold (a worker restarted on its host tier serves those prefixes at once)."""
        self._sink = sink
        tiers = self._tiers
        if sink is None or tiers is None or not self._announce:
            return
        self._announce = False
        events = [KvEvent(kind="stored", block_hashes=hs, tier=tier)
                  for tier, hs in tiers.inventory().items() if hs]
        if events:
            self._emit(events)

    def cached_block_hashes(self) -> list[int]:
        with self._lock:
            return list(self._bm.cache) if self._bm else []

    def cached_block_hashes_by_tier(self) -> dict[str, list[int]]:
        """Hashes held by each lower KV tier (``host`` / ``disk``), for a router resync's ``other_tiers``."""
        tiers = self._tiers
        return tiers.inventory() if tiers is not None else {}

    async def release_pin(self, pin_id: str) -> bool:
        with self._lock:
            pin = self._pins.pop(pin_id, None)
            if pin is None:
                return False
            assert self._bm is not None
            self._bm.release(pin.blocks)
        self._wake.set()
        return True

    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        seq = self._new_seq(request)  # validates now, so bad input raises at the call
        return self._generate(seq)

    # ----------------------------------------------------------------------------------------- requests

    def _new_seq(self, req: GenerateRequest) -> _Seq:
        if self._thread is None or self.model is None or self._loop is None:
            raise Unavailable("engine is not started")
        prompt = list(req.token_ids)
        ctx = self.info.context_length
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="token_ids")
        bad = next((t for t in prompt if t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of the vocabulary (0..{self.vocab_size - 1})",
                                 param="token_ids")
        if len(prompt) >= ctx:
            raise InvalidRequest(f"the prompt has {len(prompt)} tokens; this model's context is {ctx} "
                                 f"(prompt + output), so at most {ctx - 1} prompt tokens fit",
                                 code=ErrorCode.CONTEXT_LENGTH, param="token_ids")
        sp, st = req.sampling, req.stop
        if st.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {st.max_tokens}", param="max_tokens")
        if st.min_tokens < 0:
            raise InvalidRequest(f"min_tokens must be >= 0, got {st.min_tokens}", param="min_tokens")
        if sp.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {sp.temperature}", param="temperature")
        if not 0.0 < sp.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {sp.top_p}", param="top_p")
        if sp.top_k < -1:
            raise InvalidRequest(f"top_k must be -1, 0 or positive, got {sp.top_k}", param="top_k")
        if not 0.0 <= sp.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {sp.min_p}", param="min_p")
        if sp.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {sp.repetition_penalty}",
                                 param="repetition_penalty")
        if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in 0..{MAX_LOGPROBS}, got {sp.logprobs}", param="logprobs")
        max_tokens = 1 if req.prefill_only else min(st.max_tokens, ctx - len(prompt))
        # KV is never needed for the last token, so a request holds at most prompt + max_tokens - 1 slots.
        need = math.ceil((len(prompt) + max_tokens - 1) / self.block_size)
        if need > self.num_blocks:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks of "
                f"{self.block_size} tokens; this worker's KV cache has {self.num_blocks}", param="max_tokens")
        stop = {t for t in st.stop_token_ids if 0 <= t < self.vocab_size}
        if not st.ignore_eos:
            stop.update(t for t in self.info.eos_token_ids if 0 <= t < self.vocab_size)
        gen = None
        if sp.seed is not None and sp.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sp.seed & 0xFFFF_FFFF_FFFF_FFFF)
        spec = SampleSpec(
            temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0), min_p=sp.min_p,
            generator=gen, presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
            repetition_penalty=sp.repetition_penalty, logprobs=sp.logprobs, prompt_len=len(prompt),
        )
        seq = _Seq(req=req, tokens=prompt, prompt_len=len(prompt), max_tokens=max_tokens,
                   stop_ids=frozenset(stop), sampling=spec, queue=asyncio.Queue(), order=next(self._order))
        spec.tokens = seq.tokens
        kt = req.kv_transfer
        if kt is not None and kt.first_token >= 0 and not req.prefill_only:
            if kt.first_token >= self.vocab_size:
                raise InvalidRequest(f"kv_transfer.first_token {kt.first_token} is out of the vocabulary",
                                     param="kv_transfer")
            seq.wants_load = (self.kv_loader is not None and kt.num_tokens == len(prompt)
                              and len(kt.block_ids) == math.ceil(len(prompt) / self.block_size))
            if self.kv_loader is not None and not seq.wants_load:
                log.warning("request %s: kv_transfer does not match the prompt (%d tokens, %d blocks for %d "
                            "prompt tokens): prefilling locally", req.request_id, kt.num_tokens,
                            len(kt.block_ids), len(prompt))
        return seq

    async def _generate(self, seq: _Seq) -> AsyncIterator[EngineOutput]:
        req = seq.req
        kt = req.kv_transfer
        try:
            if kt is not None and kt.first_token >= 0 and not req.prefill_only:
                # Decode side of disagg: the first token is known; emit it, then continue from it.
                first = kt.first_token
                seq.tokens.append(first)
                if seq.sampling.generator is not None:
                    skip_draw(seq.sampling.generator, self.vocab_size, self.device)
                reason = self._finish_reason(seq, first)
                seq.sent_first = True
                lp = _first_logprob(kt) if req.sampling.logprobs is not None else None
                yield EngineOutput(token_ids=[first], logprobs=[lp] if lp else None, finish_reason=reason,
                                   prompt_tokens=seq.prompt_len, cached_tokens=0)
                if reason is not None:
                    seq.state = _State.FINISHED
                    return
                if seq.wants_load:
                    await self._load_kv(seq, kt)
                else:
                    self._enqueue(seq)
            else:
                self._enqueue(seq)
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if seq.state is not _State.FINISHED:
                self._cancel(seq)

    def _enqueue(self, seq: _Seq, front: bool = False) -> None:
        with self._lock:
            if front:
                self._waiting.appendleft(seq)
            else:
                self._waiting.append(seq)
        self._wake.set()

    async def _load_kv(self, seq: _Seq, kt: KvTransferParams) -> None:
        assert self._loop is not None and self.kv_loader is not None
        seq.load_future = self._loop.create_future()
        self._enqueue(seq)
        blocks = await seq.load_future
        ok = False
        try:
            await self.kv_loader(kt, list(blocks))
            ok = True
        except Exception as e:  # any loader failure means: compute the prompt here instead
            log.warning("request %s: KV load failed (%s: %s); prefilling locally", seq.req.request_id,
                        type(e).__name__, e)
        with self._lock:
            if seq.state is not _State.LOADING:  # the engine stopped meanwhile
                raise Unavailable("engine stopped")
            self._loading.discard(seq)
            seq.wants_load = False  # a later preemption recomputes locally
            if ok:
                seq.num_computed = seq.prompt_len
                seq.state = _State.RUNNING
                self._register_locked(seq)
                self._running.append(seq)
            else:
                assert self._bm is not None
                self._bm.release(seq.blocks)
                seq.blocks = []
                seq.state = _State.WAITING
                self._waiting.appendleft(seq)
            self._flush_events_locked()
        self._wake.set()

    def _cancel(self, seq: _Seq) -> None:
        with self._lock:
            if seq.state is _State.FINISHED:
                return
            if seq in self._inflight or seq.state is _State.ONBOARDING:
                seq.cancelled = True  # the step thread frees it after the step that uses its blocks
                return
            self._remove_locked(seq)
            self._finish_locked(seq)
            self._flush_events_locked()
        self._wake.set()

    def _remove_locked(self, seq: _Seq) -> None:
        if seq.state is _State.WAITING:
            with contextlib.suppress(ValueError):
                self._waiting.remove(seq)
        elif seq.state is _State.RUNNING:
            with contextlib.suppress(ValueError):
                self._running.remove(seq)
        self._loading.discard(seq)

    def _finish_locked(self, seq: _Seq) -> None:
        if seq.blocks:
            assert self._bm is not None
            self._bm.release(seq.blocks)
            seq.blocks = []
        seq.state = _State.FINISHED

    def _finish_reason(self, seq: _Seq, token: int) -> str | None:
        if token in seq.stop_ids and seq.num_output >= seq.req.stop.min_tokens:
            return FinishReason.STOP.value
        if seq.num_output >= seq.max_tokens or len(seq.tokens) >= self.info.context_length:
            return FinishReason.LENGTH.value
        return None

    # ----------------------------------------------------------------------------------------- step thread

    def _run(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # OpenMP's thread count is per calling thread
        with torch.inference_mode():
            while not self._stopping:
                self._wake.clear()
                try:
                    with self._lock:
                        self._expire_pins_locked()
                        plan = self._schedule_locked()
                        self._flush_events_locked()
                except Exception as e:  # a bug: fail what is running rather than hang it
                    log.exception("reference engine scheduling failed")
                    self._fail_all(e)
                    continue
                if plan is None:
                    self._wake.wait(self._idle_timeout())
                    continue
                try:
                    assert self.model is not None and self.pool is not None
                    logits = self.model.forward(plan.batch, self.pool.tensor)
                    tokens, lps = sample(logits, plan.specs)
                except Exception as e:
                    log.exception("reference engine step failed")
                    self._fail_step(plan, e)
                    continue
                self.steps += 1
                with self._lock:
                    out = self._postprocess_locked(plan, tokens, lps)
                    self._flush_events_locked()
                self._deliver(out)

    def _idle_timeout(self) -> float:
        with self._lock:
            if not self._pins:
                return 1.0
            nxt = min(p.deadline for p in self._pins.values())
        return max(0.0, min(1.0, nxt - time.monotonic()))

    def _expire_pins_locked(self) -> None:
        if not self._pins:
            return
        now = time.monotonic()
        assert self._bm is not None
        for pid in [p for p, pin in self._pins.items() if pin.deadline <= now]:
            log.info("pin %s timed out: freeing its blocks", pid)
            self._bm.release(self._pins.pop(pid).blocks)

    def _blocks_for(self, n_tokens: int) -> int:
        return (n_tokens + self.block_size - 1) // self.block_size

    def _ensure_hashes(self, seq: _Seq, n_blocks: int) -> None:
        bs = self.block_size
        while len(seq.hashes) < n_blocks:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else kvhash.ROOT_HASH
            seq.hashes.append(kvhash.hash_block(parent, seq.tokens[i * bs:(i + 1) * bs]))

    def _preempt_locked(self, seq: _Seq) -> None:
        assert self._bm is not None
        log.debug("preempting %s (%d blocks)", seq.req.request_id, len(seq.blocks))
        self.preemptions += 1
        self._running.remove(seq)
        self._bm.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.state = _State.WAITING
        self._waiting.appendleft(seq)

    def _schedule_locked(self) -> _Plan | None:
        bm = self._bm
        assert bm is not None and self._loop is not None
        budget = self.max_batch_tokens
        chosen: list[tuple[_Seq, int]] = []
        scheduled: set[_Seq] = set()
        # 1. running: decodes first (one token each), then prefills in progress.
        decoding = [s for s in self._running if len(s.tokens) - s.num_computed == 1]
        prefilling = [s for s in self._running if len(s.tokens) - s.num_computed > 1]
        for seq in decoding + prefilling:
            if budget <= 0:
                break
            if seq.state is not _State.RUNNING:
                continue  # preempted earlier in this loop
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = self._blocks_for(seq.num_computed + n) - len(seq.blocks)
            while need > bm.num_available:
                if self._reclaim_locked(need - bm.num_available):
                    continue
                victim = next((s for s in reversed(self._running) if s not in scheduled), None)
                if victim is None:
                    break
                self._preempt_locked(victim)
                if victim is seq:
                    break
            if seq.state is not _State.RUNNING or need > bm.num_available:
                continue
            if need > 0:
                seq.blocks += bm.allocate(need)
            chosen.append((seq, n))
            scheduled.add(seq)
            budget -= n
        # 2. admissions.
        while self._waiting and budget > 0 and \
                len(self._running) + len(self._loading) + len(self._onboarding) < self.max_num_seqs:
            seq = self._waiting[0]
            if seq.wants_load:
                need = self._blocks_for(seq.prompt_len)
                if need > bm.num_available:
                    break
                self._waiting.popleft()
                seq.blocks = bm.allocate(need)
                seq.state = _State.LOADING
                self._loading.add(seq)
                if seq.load_future is not None:
                    self._loop.call_soon_threadsafe(_set_result, seq.load_future, list(seq.blocks))
                continue
            # Prefix cache: full blocks only, and never the last token (its logits are needed).
            n_full = (len(seq.tokens) - 1) // self.block_size
            self._ensure_hashes(seq, n_full)
            hit = bm.match(seq.hashes[:n_full])
            if self._tiers is not None and len(hit) < n_full and not seq.no_onboard:
                started = self._start_onboard_locked(seq, hit, n_full, budget)
                if started is None:
                    break
                if started:
                    continue
                hit = bm.match(seq.hashes[:n_full])  # a synchronous onboard grew the primary prefix
            start = len(hit) * self.block_size
            n = min(len(seq.tokens) - start, budget)
            need = self._blocks_for(start + n) - len(hit)
            room = bm.num_available - bm.num_evictable_in(hit)
            if need > room and self._reclaim_locked(need - room):
                room = bm.num_available - bm.num_evictable_in(hit)
            if need > room:
                break
            self._waiting.popleft()
            bm.acquire(hit)
            seq.blocks = hit + bm.allocate(need)
            seq.num_computed = start
            seq.num_registered = len(hit)
            if not seq.sent_first:
                seq.cached_tokens = start
            seq.state = _State.RUNNING
            self._running.append(seq)
            chosen.append((seq, n))
            scheduled.add(seq)
            budget -= n
        if not chosen:
            return None
        return self._build_plan(chosen)

    # ----------------------------------------------------------------------------------------- KV tiers

    def _reclaim_locked(self, need: int) -> bool:
        """Short of ``need`` blocks: drop queued tier offloads that alone hold blocks. True if any freed."""
        tiers, bm = self._tiers, self._bm
        if tiers is None or bm is None:
            return False
        blocks = tiers.reclaim(need, lambda b: bm.ref[b] == 1)
        if blocks:
            bm.release(blocks)
        return bool(blocks)

    def _start_onboard_locked(self, seq: _Seq, hit: list[int], n_full: int, budget: int) -> bool | None:
        """Onboard the blocks past ``seq``'s primary ``hit`` that the lower tiers hold.
        True: ``seq`` is admitted into ONBOARDING (popped from the waiting queue); False: admit it normally
        (no tier hit, or a small host run was just copied into the primary prefix cache); None: not enough
        free blocks now."""
        tiers, bm, bs = self._tiers, self._bm, self.block_size
        assert tiers is not None and bm is not None and self.pool is not None
        job = tiers.pin_prefix(seq.hashes[len(hit):n_full])
        if job is None:
            return False
        if len(job) < self.onboard_min_blocks:
            tiers.unpin(job)
            return False
        sync = not job.touches_disk and len(job) * self.pool.block_bytes <= self.onboard_sync_bytes
        if sync:
            # Room for the whole admission that follows, not just the copy: else the copied blocks would
            # sit evictable while the sequence waits, and be copied again at the next attempt.
            start = (len(hit) + len(job)) * bs
            need = self._blocks_for(start + min(len(seq.tokens) - start, budget)) - len(hit)
        else:
            need = len(job)
        room = bm.num_available - bm.num_evictable_in(hit)
        if need > room and self._reclaim_locked(need - room):
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
        self._waiting.popleft()
        bm.acquire(hit)
        new = bm.allocate(len(job))
        seq.blocks = hit + new
        seq.num_computed = len(hit) * self.block_size
        seq.num_registered = len(hit)
        seq.state = _State.ONBOARDING
        self._onboarding.add(seq)
        tiers.onboard(job, new, lambda ok: self._on_onboarded(seq, job, ok))
        return True

    def _on_onboarded(self, seq: _Seq, job: OnboardJob, ok: bool) -> None:
        """From a tier thread: the onboard of ``seq`` finished (``ok``) or failed / was abandoned."""
        with self._lock:
            self._onboarding.discard(seq)
            if seq.state is not _State.ONBOARDING:
                return  # the engine stopped and already failed it
            if seq.cancelled:
                self._finish_locked(seq)
            elif ok:
                seq.num_computed = len(seq.blocks) * self.block_size
                if not seq.sent_first:
                    seq.cached_tokens = seq.num_computed
                seq.state = _State.RUNNING
                self._running.append(seq)
                self._register_locked(seq)
            else:
                assert self._bm is not None
                self._bm.release(seq.blocks)
                seq.blocks = []
                seq.num_computed = 0
                seq.num_registered = 0
                seq.no_onboard = True
                seq.state = _State.WAITING
                self._waiting.appendleft(seq)
            self._flush_events_locked()
        self._wake.set()

    def _tier_emit(self, events: list[KvEvent]) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._emit, events)

    def _tier_release(self, blocks: list[int]) -> None:
        with self._lock:
            if self._bm is not None:
                self._bm.release(blocks)
        self._wake.set()

    def _make_index_tables(self) -> None:
        """Constant index pieces of every step's gathers (see :class:`workers.reference.model.StepBatch`),
        on the device, so building a step's indices is a couple of broadcast ops."""
        bs, dev = self.block_size, self.device
        nl, kv = self.cfg.num_layers, self.cfg.num_kv_heads
        self._arange_bs = torch.arange(bs, device=dev)
        self._layer_rows = (torch.arange(nl, device=dev) * bs)[:, None]  # token row offset of layer l
        # Head row of (layer l, K/V half, head h, slot t) inside a block: ((l*bs + t) * 2 + half) * KV + h,
        # shaped [L, 2, 1(seq), KV, 1(block), bs] to broadcast against a [seq, block] table.
        lt = (torch.arange(nl, device=dev)[:, None] * bs + self._arange_bs[None, :]).view(nl, 1, 1, 1, 1, bs)
        half = torch.arange(2, device=dev).view(1, 2, 1, 1, 1, 1)
        head = torch.arange(kv, device=dev).view(1, 1, 1, kv, 1, 1)
        self._dec_const = (lt * 2 + half) * kv + head
        self._arange_ctx = torch.arange(self._blocks_for(self.info.context_length) * bs, device=dev)

    def _build_plan(self, chosen: list[tuple[_Seq, int]]) -> _Plan:
        """The step's flat token batch and every index tensor its forward needs, for all layers at once.
        Per step: a few small host lists, one host-to-device tensor for the token rows, and O(1) tensor
        ops for the decode gathers (no per-sequence or per-layer tensor work)."""
        bs = self.block_size
        per_block = self.cfg.num_layers * bs  # token rows per block (see StepBatch)
        dev = self.device
        chosen.sort(key=lambda sn: sn[1] > 1)  # decode rows first (stable)
        ids: list[int] = []
        pos: list[int] = []
        widx: list[int] = []
        sample_rows: list[int] = []
        samplers: list[_Seq] = []
        dec_tables: list[list[int]] = []
        prefill_meta: list[tuple[int, int, int, list[int]]] = []
        for seq, n in chosen:
            row = len(ids)
            start = seq.num_computed
            blocks = seq.blocks
            if n == 1:
                ids.append(seq.tokens[start])
                pos.append(start)
                widx.append(blocks[start // bs] * per_block + start % bs)
                dec_tables.append(blocks[: start // bs + 1])
            else:
                ids.extend(seq.tokens[start:start + n])
                pos.extend(range(start, start + n))
                widx.extend([blocks[p // bs] * per_block + p % bs for p in range(start, start + n)])
                prefill_meta.append((row, n, start, blocks[: (start + n - 1) // bs + 1]))
            if start + n == len(seq.tokens):
                sample_rows.append(row + n - 1)
                samplers.append(seq)
        self._inflight.update(seq for seq, _ in chosen)
        assert self.model is not None
        self.model.ensure_rope(max(pos) + 1)
        if not prefill_meta and self.model.native is not None:
            # All decode: the native step reads the block tables itself, no index tensors.
            batch = StepBatch(input_ids=_NO_ROWS, positions=_NO_ROWS, write_idx=(), num_decode=len(ids),
                              decode_gather=None, decode_bias=None, decode_len=0, prefills=[], sample_rows=None,
                              native=NativeStep(ids, pos, dec_tables))
            return _Plan(seqs=chosen, batch=batch, samplers=samplers, specs=self._specs(samplers))
        n_tok = len(ids)
        rows = torch.tensor([ids, pos, widx], dtype=torch.long, device=dev)
        input_ids, positions, wrow = rows.unbind(0)
        write_idx = (wrow[None, :] + self._layer_rows).unbind(0)
        nd = len(dec_tables)
        dec_gather = dec_bias = None
        T = 0
        if nd:
            kv = self.cfg.num_kv_heads
            g = self.cfg.num_heads // kv
            nb = max(len(t) for t in dec_tables)
            T = nb * bs
            tbl = torch.tensor([t + [0] * (nb - len(t)) for t in dec_tables], dtype=torch.long, device=dev)
            # [L, 2, seq, KV, block, slot] head rows, one flat index per layer.
            gat = (tbl * (per_block * 2 * kv)).view(1, 1, nd, 1, nb, 1) + self._dec_const
            dec_gather = gat.view(self.cfg.num_layers, -1).unbind(0)
            pad = self._arange_ctx[:T] > positions[:nd, None]  # slots past each sequence's new token
            dec_bias = torch.zeros((nd, kv, g, T), dtype=self.dtype, device=dev).masked_fill_(
                pad.view(nd, 1, 1, T), float("-inf")).view(nd * kv, g, T)
        prefills: list[PrefillChunk] = []
        for row, n, start, blocks in prefill_meta:
            gather = None
            if start > 0:
                t = torch.tensor(blocks, dtype=torch.long, device=dev)
                first = ((t * per_block)[:, None] + self._arange_bs).view(-1)[: start + n]
                gather = (first[None, :] + self._layer_rows).unbind(0)
            prefills.append(PrefillChunk(row=row, n=n, start=start, gather=gather))
        every_row = len(sample_rows) == n_tok  # then the rows are 0..n-1 in order (all decode)
        batch = StepBatch(
            input_ids=input_ids,
            positions=positions,
            write_idx=write_idx,
            num_decode=nd,
            decode_gather=dec_gather,
            decode_bias=dec_bias,
            decode_len=T,
            prefills=prefills,
            sample_rows=None if every_row else torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        return _Plan(seqs=chosen, batch=batch, samplers=samplers, specs=self._specs(samplers))

    @staticmethod
    def _specs(samplers: list[_Seq]) -> list[SampleSpec]:
        specs = []
        for seq in samplers:
            sp = seq.sampling
            if seq.num_output < seq.req.stop.min_tokens and seq.stop_ids:
                sp.suppress = tuple(seq.stop_ids)
            elif sp.suppress:
                sp.suppress = ()
            specs.append(sp)
        return specs

    def _register_locked(self, seq: _Seq) -> None:
        """Offer newly completed full blocks to the prefix cache."""
        full = seq.num_computed // self.block_size
        if full <= seq.num_registered:
            return
        assert self._bm is not None
        self._ensure_hashes(seq, full)
        first = seq.num_registered
        pairs = [(seq.blocks[i], seq.hashes[i]) for i in range(first, full)]
        new = self._bm.register(pairs, seq.hashes[first - 1] if first > 0 else None)
        seq.num_registered = full
        if new and self._tiers is not None:
            self._tiers.offload(new, self._bm.acquire)

    def _postprocess_locked(self, plan: _Plan, tokens: list[int], lps: list[TokenLogprob | None]
                            ) -> list[tuple[_Seq, EngineOutput | BaseException]]:
        out: list[tuple[_Seq, EngineOutput | BaseException]] = []
        sampled = {id(s): i for i, s in enumerate(plan.samplers)}
        for seq, n in plan.seqs:
            self._inflight.discard(seq)
            if seq.cancelled:
                self._remove_locked(seq)
                self._finish_locked(seq)
                continue
            if seq.state is not _State.RUNNING:
                continue
            seq.num_computed += n
            self._register_locked(seq)
            i = sampled.get(id(seq))
            if i is None:
                continue
            tok = tokens[i]
            seq.tokens.append(tok)
            reason = self._finish_reason(seq, tok)
            lp = lps[i]
            o = EngineOutput(token_ids=[tok], logprobs=[lp] if lp is not None else None, finish_reason=reason)
            if not seq.sent_first:
                o.prompt_tokens = seq.prompt_len
                o.cached_tokens = seq.cached_tokens
                seq.sent_first = True
            if seq.req.prefill_only:
                self._finish_prefill_only_locked(seq, o, lps[i])
            elif reason is not None:
                self._running.remove(seq)
                self._finish_locked(seq)
            out.append((seq, o))
        return out

    def _finish_prefill_only_locked(self, seq: _Seq, o: EngineOutput, lp: TokenLogprob | None) -> None:
        """The first token is out: pin the prompt's blocks for a decode worker, unless it is already over."""
        self._running.remove(seq)
        complete = o.finish_reason == FinishReason.STOP.value or seq.req.stop.max_tokens <= 1 \
            or len(seq.tokens) >= self.info.context_length
        if complete:
            o.finish_reason = o.finish_reason or FinishReason.LENGTH.value
            self._finish_locked(seq)
            return
        # Like a max_tokens=1 request: the runtime forwards kv_transfer with the final frame.
        o.finish_reason = FinishReason.LENGTH.value
        pin_id = uuid.uuid4().hex
        n_prompt = self._blocks_for(seq.prompt_len)
        blocks = seq.blocks[:n_prompt]
        assert self._bm is not None
        if len(seq.blocks) > n_prompt:
            self._bm.release(seq.blocks[n_prompt:])
        self._pins[pin_id] = _Pin(blocks=blocks, deadline=time.monotonic() + self.pin_timeout)
        seq.blocks = []
        seq.state = _State.FINISHED
        opaque: dict[str, Any] = {}
        if lp is not None:
            opaque["first_logprob"] = [lp.token_id, lp.logprob, [list(t) for t in lp.top]]
        o.kv_transfer = KvTransferParams(block_ids=list(blocks), num_tokens=seq.prompt_len,
                                         first_token=seq.tokens[-1], pin_id=pin_id, opaque=opaque)

    def _fail_all(self, exc: Exception) -> None:
        err = DynamoError(f"engine step failed: {type(exc).__name__}: {exc}")
        with self._lock:
            seqs = list(self._running)
            for seq in seqs:
                self._inflight.discard(seq)
                self._remove_locked(seq)
                self._finish_locked(seq)
            self._flush_events_locked()
        self._deliver([(s, err) for s in seqs if not s.cancelled])

    def _fail_step(self, plan: _Plan, exc: Exception) -> None:
        err = DynamoError(f"engine step failed: {type(exc).__name__}: {exc}")
        out: list[tuple[_Seq, EngineOutput | BaseException]] = []
        with self._lock:
            for seq, _ in plan.seqs:
                self._inflight.discard(seq)
                self._remove_locked(seq)
                self._finish_locked(seq)
                if not seq.cancelled:
                    out.append((seq, err))
            self._flush_events_locked()
        self._deliver(out)

    # ----------------------------------------------------------------------------------------- hand-back

    def _deliver(self, items: list[tuple[_Seq, EngineOutput | BaseException]]) -> None:
        if not items or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(_put_all, items)

    def _flush_events_locked(self) -> None:
        if self._bm is None or not self._bm.events or self._loop is None:
            return
        events = self._bm.take_events()
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._emit, events)

    def _emit(self, events: list[KvEvent]) -> None:
        sink = self._sink
        if sink is not None:
            try:
                sink(events)
            except Exception:
                log.exception("KV event sink failed")

    # ----------------------------------------------------------------------------------------- test hooks

    def block_stats(self) -> dict[str, int]:
        """Used / free / cached-unreferenced block counts, and with KV tiers their slots, pins, queues and
        counters (:meth:`workers.reference.kvbm.KvTiers.snapshot`) (tests, bench and debugging)."""
        with self._lock:
            bm = self._bm
            if bm is None:
                return {"used": 0, "free": 0, "evictable": 0, "cached": 0, "pins": 0}
            out = {"used": bm.num_used, "free": len(bm.free), "evictable": len(bm.evictable),
                   "cached": len(bm.cache), "pins": len(self._pins), "onboarding": len(self._onboarding)}
            if self._tiers is not None:
                out.update(self._tiers.snapshot())
            return out

    def tiers_idle(self) -> bool:
        """No KV tier copy queued or running (tests wait for this before checking block accounting)."""
        tiers = self._tiers
        return tiers is None or tiers.idle()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _put_all(items: list[tuple[_Seq, EngineOutput | BaseException]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


def _set_result(fut: asyncio.Future[list[int]], value: list[int]) -> None:
    if not fut.done():
        fut.set_result(value)


def _first_logprob(kt: KvTransferParams) -> TokenLogprob | None:
    raw = kt.opaque.get("first_logprob") if kt.opaque else None
    if not raw:
        return None
    try:
        return TokenLogprob(int(raw[0]), float(raw[1]), [(int(a), float(b)) for a, b in raw[2]])
    except (TypeError, ValueError, IndexError):
        return None


def _eos_ids(model_dir: Path, cfg: ModelConfig) -> list[int]:
    """generation_config.json's eos (an int or a list) wins; then config.json; then tokenizer_config's
    eos_token looked up in tokenizer.json."""
    try:
        gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
        eos = gen.get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else [int(x) for x in eos]
    except (OSError, ValueError):
        pass
    if cfg.eos_token_ids:
        return list(cfg.eos_token_ids)
    try:
        tc = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok = tc.get("eos_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        for at in tj.get("added_tokens", []):
            if at.get("content") == tok:
                return [int(at["id"])]
        vocab = tj.get("model", {}).get("vocab", {})
        if isinstance(vocab, dict) and tok in vocab:
            return [int(vocab[tok])]
    except (OSError, ValueError, AttributeError):
        pass
    return []
