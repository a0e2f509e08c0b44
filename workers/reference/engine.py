"""ReferenceEngine: our torch engine behind the :class:`workers.common.engine.Engine` protocol.

Place: the worker runtime (``workers.common.runtime``) calls :meth:`ReferenceEngine.generate` per request
on its asyncio loop; the model runs on ONE dedicated step thread, so the loop never waits on compute. This
module is the facade (lifecycle, requests, events, pins, the step thread); the parts it wires:

  requests.py   a GenerateRequest checked and turned into a sequence (sampling state, output queue)
  scheduler.py  admission, continuous batching, chunked prefill, preemption, pins (pure Python)
  batch.py      a scheduled step -> the model's tensors, and the forward on the torch or native path
  model.py      the decoder; native.py the C decode step; sampler.py the sampling
  kv_cache.py   the paged KV pool and its block manager; kvbm.py + tierfile.py the lower KV tiers

Threads and ownership
  * The event loop: ``generate`` validates, enqueues a sequence, then awaits its per-request
    ``asyncio.Queue``. Cancellation (``aclose`` / task cancel) runs the generator's ``finally``, which
    frees the sequence's blocks, or marks it so the step thread frees them after the step using them.
  * The step thread loops: schedule + build the batch (under ``_lock``) -> forward + sample (no lock) ->
    post-process (under ``_lock``), then hands outputs and KV events to the loop with
    ``call_soon_threadsafe``.
  * All scheduler state (queues, block manager, pins) is touched only under ``_lock``; blocks are
    allocated only by the step thread, between forwards.

Disaggregation
  * ``prefill_only``: the first token is sampled, then the prompt's blocks stay referenced under a pin id
    until :meth:`release_pin` or ``pin_timeout`` seconds; the output carries ``KvTransferParams``.
  * ``kv_transfer`` set: the prompt's KV comes from elsewhere. The step thread allocates local blocks,
    then ``generate`` awaits ``kv_loader(params, local_block_ids)`` (see :data:`KvLoader`) on the loop;
    on success the sequence continues from ``first_token`` without recomputing the prompt; if the loader
    is unset or raises, the prompt is prefilled locally and the request still completes.

Lower KV tiers (optional: ``host_tier_path`` / ``disk_tier_path``): the scheduler offloads registered
blocks and onboards prefixes found there; tier events (``KvEvent.tier`` = host / disk) go out like
primary ones, and the blocks a restarted worker found in its host tier are announced when the event sink
is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import torch

from dynamo_rt.errors import DynamoError, Unavailable
from dynamo_rt.protocol import FinishReason, GenerateRequest, KvEvent, KvTransferParams
from workers.common.blocks import BlockManager
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo
from workers.reference.batch import BatchBuilder
from workers.reference.guided import GrammarCache
from workers.reference.kv_cache import KvPool
from workers.reference.kvbm import KvTiers, TierConfig, model_fingerprint, open_tiers
from workers.reference.model import DecoderModel, ModelConfig, parse_dtype, rope_inv_freq
from workers.reference.native import NativeDecode, enabled_by_env, load_library
from workers.reference.requests import Request, attach_guide, eos_ids, first_logprob, new_request
from workers.reference.scheduler import Scheduler, SeqState
from workers.reference.stepper import StepThread
from workers.reference.testfaults import KillSwitch, from_env

log = logging.getLogger(__name__)

# The decode side's KV hook: fill ``local_block_ids[i]`` with the KV of the prefill worker's
# ``params.block_ids[i]`` (same block size and layout), for every i; return when the bytes are in place.
# Raise (anything) to make the engine prefill locally instead. It runs on the event loop inside
# ``generate``; if the request is cancelled meanwhile it is cancelled, and the engine frees the blocks
# only after it has returned or raised, so it must not leave a transfer running into them.
KvLoader = Callable[[KvTransferParams, list[int]], Awaitable[None]]

DEFAULT_KV_MEMORY_GIB = 0.5  # CPU pool size when neither num_blocks nor kv_cache_memory is given
DEFAULT_GPU_KV_FRACTION = 0.8  # of the free device memory after the weights are loaded

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
            eos_token_ids=eos_ids(self.model_path, self.cfg),
            bos_token_id=self.cfg.bos_token_id,
        )
        self.vocab_size = self.cfg.vocab_size
        # Set by the worker (NIXL) or a test; None means a decode request prefills locally.
        self.kv_loader: KvLoader | None = None

        self.model: DecoderModel | None = None
        self.native_decode: NativeDecode | None = None  # the native step in use (None after stop())
        self.pool: KvPool | None = None
        self._sched: Scheduler[Request] | None = None
        self._batch: BatchBuilder | None = None
        self._tiers: KvTiers | None = None
        self._announce = False  # blocks found in the tiers at start, not yet told to an event sink
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: StepThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: KvEventSink | None = None
        self._steps_before = 0  # forwards of earlier runs (start / stop / start)
        self.kill_switch: KillSwitch = from_env()  # test-only crash points (testfaults.py); inert when unset
        self.grammars: GrammarCache | None = None  # structured outputs: compiled on first use

    # ----------------------------------------------------------------------------------------- lifecycle

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks if self.pool is not None else 0

    @property
    def preemptions(self) -> int:
        return self._sched.preemptions if self._sched is not None else 0

    @property
    def pins_expired(self) -> int:
        """Pins freed by ``pin_timeout`` (:class:`workers.common.engine.CountsPins`); an int, read unlocked."""
        return self._sched.bm.pins_expired if self._sched is not None else 0

    @property
    def pins_held(self) -> int:
        """Pins not yet released or expired (``workers.common.live_gauges.HoldsPins``); read unlocked."""
        return len(self._sched.bm.pins) if self._sched is not None else 0

    @property
    def steps(self) -> int:
        """Forwards run (tests / bench)."""
        return self._steps_before + (self._thread.steps if self._thread is not None else 0)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        assert self._sched is not None and self._batch is not None and self.pool is not None
        self._thread = StepThread(self._sched, self._batch, self.pool.tensor, lock=self._lock, wake=self._wake,
                                  loop=self._loop, flush_events=self._flush_events_locked,
                                  context_length=self.info.context_length, torch_threads=self.torch_threads,
                                  name=f"ref-engine-{self.info.name}", kill_switch=self.kill_switch)
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
                self.native_decode = NativeDecode(self.model, self.block_size, lib, threads=self.torch_threads or 1)
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
        self._sched = Scheduler(
            BlockManager(n), block_size=self.block_size, max_batch_tokens=self.max_batch_tokens,
            max_num_seqs=self.max_num_seqs, context_length=self.info.context_length, pin_timeout=self.pin_timeout,
            block_bytes=self.pool.block_bytes, onboard_min_blocks=self.onboard_min_blocks,
            onboard_sync_bytes=self.onboard_sync_bytes, on_onboarded=self._on_onboarded)
        self._batch = BatchBuilder(self.model, self.block_size, self.info.context_length, self.native_decode)
        log.info("reference engine: %s on %s/%s, %d KV blocks of %d tokens (%.1f MiB), loaded in %.1fs",
                 self.model_path, self.device, self.dtype, n, self.block_size, self.pool.total_bytes / 2**20,
                 time.monotonic() - t0)
        if self.tier_config.enabled:
            self._open_tiers()

    def _open_tiers(self) -> None:
        assert self.pool is not None and self._sched is not None
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
        self._sched.tiers = self._tiers
        self._announce = True

    async def stop(self) -> None:
        th = self._thread
        if th is None:
            return
        await asyncio.to_thread(th.stop)
        self._thread = None
        self._steps_before += th.steps
        if self.native_decode is not None:
            self.native_decode.close()  # its worker threads; the step thread that used them is gone
            self.native_decode = None
            if self._batch is not None:
                self._batch.native = None
        tiers = self._tiers
        if tiers is not None:
            # Lets queued offloads land (a restarted worker finds them) and fails queued onboards, whose
            # sequences go back to the waiting queue and are failed below.
            await asyncio.to_thread(tiers.shutdown, self.tier_drain_s)
        err = Unavailable("engine stopped")
        with self._lock:
            sched = self._sched
            assert sched is not None
            for s in sched.drain():
                s.queue.put_nowait(err)
                if s.load_future is not None and not s.load_future.done():
                    s.load_future.set_exception(err)
            events = sched.bm.take_events()
            self._tiers = sched.tiers = None
        if tiers is not None:
            tiers.close()
        if events:
            # After any event batch the step thread already queued, to keep the router's order.
            asyncio.get_running_loop().call_soon(self._emit, events)

    # ----------------------------------------------------------------------------------------- protocol

    def load(self) -> EngineLoad:
        with self._lock:
            sched = self._sched
            if sched is None:
                return EngineLoad(active_requests=0, waiting_requests=0, kv_blocks_used=0,
                                  kv_blocks_total=self.num_blocks, active_decode_blocks=0)
            return EngineLoad(
                active_requests=sched.num_active,
                waiting_requests=len(sched.waiting),
                kv_blocks_used=sched.bm.num_used,
                kv_blocks_total=self.num_blocks,
                active_decode_blocks=sched.active_decode_blocks(),
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
            return list(self._sched.bm.cache) if self._sched else []

    def cached_block_hashes_by_tier(self) -> dict[str, list[int]]:
        """Hashes held by each lower KV tier (``host`` / ``disk``), for a router resync's ``other_tiers``."""
        tiers = self._tiers
        return tiers.inventory() if tiers is not None else {}

    async def release_pin(self, pin_id: str) -> bool:
        with self._lock:
            if self._sched is None or not self._sched.release_pin(pin_id):
                return False
        self._wake.set()
        return True

    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        if self._thread is None or self.model is None or self._loop is None:
            raise Unavailable("engine is not started")
        # Validates now, so bad input raises at the call.
        seq = new_request(request, self.info, vocab_size=self.vocab_size, num_blocks=self.num_blocks,
                          device=self.device, can_load=self.kv_loader is not None)
        return self._generate(seq)

    def _grammars(self) -> GrammarCache:
        if self.grammars is None:
            self.grammars = GrammarCache(self.model_path, self.vocab_size, self.info.eos_token_ids)
        return self.grammars

    # ----------------------------------------------------------------------------------------- requests

    async def _generate(self, seq: Request) -> AsyncIterator[EngineOutput]:
        req = seq.req
        kt = req.kv_transfer
        try:
            if req.sampling.guided is not None:
                await attach_guide(seq, self._grammars())
            if kt is not None and kt.first_token >= 0 and not req.prefill_only:
                # Decode side of disagg: the first token is known; emit it, then continue from it.
                first = kt.first_token
                seq.tokens.append(first)  # the prefill worker drew it at position output_offset
                reason = seq.finish_reason(first, self.info.context_length)
                if seq.sampling.guide is not None and seq.sampling.guide.step(first) and reason is None:
                    reason = FinishReason.STOP.value
                seq.sent_first = True
                lp = first_logprob(kt) if req.sampling.logprobs is not None else None
                yield EngineOutput(token_ids=[first], logprobs=[lp] if lp else None, finish_reason=reason,
                                   prompt_tokens=seq.prompt_len, cached_tokens=0)
                if reason is not None:
                    seq.state = SeqState.FINISHED
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
            if seq.state is not SeqState.FINISHED:
                self._cancel(seq)

    def _enqueue(self, seq: Request) -> None:
        with self._lock:
            assert self._sched is not None
            self._sched.add(seq)
        self._wake.set()

    async def _load_kv(self, seq: Request, kt: KvTransferParams) -> None:
        assert self._loop is not None and self.kv_loader is not None
        seq.load_future = self._loop.create_future()
        self._enqueue(seq)
        blocks = await seq.load_future
        ok = False
        try:
            self.kill_switch.kv_load(self._loop)
            await self.kv_loader(kt, list(blocks))
            ok = True
        except Exception as e:  # any loader failure means: compute the prompt here instead
            log.warning("request %s: KV load failed (%s: %s); prefilling locally", seq.req.request_id,
                        type(e).__name__, e)
        with self._lock:
            assert self._sched is not None
            if not self._sched.loaded(seq, ok):  # the engine stopped meanwhile
                raise Unavailable("engine stopped")
            self._flush_events_locked()
        self._wake.set()

    def _cancel(self, seq: Request) -> None:
        with self._lock:
            assert self._sched is not None
            if not self._sched.cancel(seq):
                return  # over already, or freed by the step thread after the step / onboard using it
            self._flush_events_locked()
        self._wake.set()

    # ----------------------------------------------------------------------------------------- KV tiers

    def _on_onboarded(self, seq: Request, ok: bool) -> None:
        """From a tier thread: the onboard of ``seq`` finished (``ok``) or failed / was abandoned."""
        with self._lock:
            assert self._sched is not None
            self._sched.onboarded(seq, ok)
            self._flush_events_locked()
        self._wake.set()

    def _tier_emit(self, events: list[KvEvent]) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._emit, events)

    def _tier_release(self, blocks: list[int]) -> None:
        with self._lock:
            if self._sched is not None:
                self._sched.bm.release(blocks)
        self._wake.set()

    # ----------------------------------------------------------------------------------------- hand-back

    def _flush_events_locked(self) -> None:
        if self._sched is None or not self._sched.bm.events or self._loop is None:
            return
        events = self._sched.bm.take_events()
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
            sched = self._sched
            if sched is None:
                return {"used": 0, "free": 0, "evictable": 0, "cached": 0, "pins": 0}
            bm = sched.bm
            out = {"used": bm.num_used, "free": len(bm.free), "evictable": len(bm.evictable),
                   "cached": len(bm.cache), "pins": len(bm.pins), "onboarding": len(sched.onboarding)}
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
