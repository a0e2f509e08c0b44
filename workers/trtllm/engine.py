"""The TensorRT-LLM engine adapter: its LLM API in the worker process, translated to our Engine protocol.

Place: built by ``workers.trtllm.flags.build_engine``; the worker runtime serves it like any engine.
TensorRT-LLM is imported in :meth:`TrtllmEngine.start` (through ``api``), so this module imports without it and
the contract tests drive it with stand-in API objects. API followed: TensorRT-LLM 1.x (PyTorch backend;
``tensorrt_llm/llmapi/llm.py``, ``executor/result.py``, ``disaggregated_params.py``, ``sampling_params.py``):

* ``LLM(model, tokenizer, tensor_parallel_size, dtype, **llm_args)``; ``LLM.generate_async(inputs,
  sampling_params, streaming=..., disaggregated_params=...)`` returns a ``RequestOutput`` that is an async
  iterator of itself; ``outputs[0]`` has ``token_ids`` (all tokens so far), ``finish_reason`` (``stop``,
  ``length``, ``timeout``, ``cancelled``, ``not_finished`` for a finished context-only request), ``logprobs``
  and ``disaggregated_params``; ``RequestOutput.abort()`` cancels; ``LLM.shutdown()``.
* ``SamplingParams(max_tokens, min_tokens, temperature, top_p, top_k, min_p, seed, presence_penalty,
  frequency_penalty, repetition_penalty, stop_token_ids, ignore_eos, logprobs, detokenize)``. Greedy is
  ``top_k=1`` (temperature must be > 0 when given).
* ``DisaggregatedParams(request_type="context_only" | "generation_only", first_gen_tokens, ctx_request_id,
  opaque_state, draft_tokens, ...)``.
* ``LLM.get_stats_async(timeout)`` (iteration stats: ``numActiveRequests``, ``numQueuedRequests``,
  ``kvCacheStats.{maxNumBlocks, usedNumBlocks}``) and ``LLM.get_kv_cache_events_async(timeout)`` (``{"data":
  {"type": "stored", "parent_hash", "blocks": [{"block_hash", "tokens": [{"token_id"}]}]}}`` / ``"removed"``).

Disaggregation with TensorRT-LLM's own hand-off (DESIGN "Disaggregated prefill / decode" point 4): the prefill
request runs ``context_only`` with ``max_tokens=1``; the ``DisaggregatedParams`` it returns (the KV transceiver's
opaque state, the context request id, the first token) travel to the decode worker in our
``KvTransferParams.opaque``; the decode request runs ``generation_only`` with them, and TensorRT-LLM's cache
transceiver (NIXL) moves the KV. A decode request without them is generated locally (context and generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dynamo_rt import errors
from dynamo_rt.protocol import GenerateRequest, KvTransferParams, TokenLogprob
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo
from workers.common.kv_events import KvHashMap
from workers.common.model_info import model_info_from_dir
from workers.common.structured import trtllm_guided

log = logging.getLogger(__name__)

# DisaggregatedParams fields that carry the hand-off (plain values: they travel in msgpack). Logits, logprobs
# and multimodal handles do not cross workers here.
HANDOFF_FIELDS = ("first_gen_tokens", "ctx_request_id", "opaque_state", "draft_tokens", "disagg_request_id",
                  "ctx_dp_rank", "ctx_info_endpoint")
STATS_TIMEOUT = 2.0
EVENTS_TIMEOUT = 2.0
_FINISH = {"stop": "stop", "length": "length", "not_finished": "length"}


def tensorrt_llm_api() -> Any:
    """The TensorRT-LLM names this adapter uses (a stand-in namespace replaces it in the contract tests)."""
    import tensorrt_llm
    from tensorrt_llm.llmapi import DisaggregatedParams, GuidedDecodingParams, KvCacheConfig

    return SimpleNamespace(LLM=tensorrt_llm.LLM, SamplingParams=tensorrt_llm.SamplingParams,
                           DisaggregatedParams=DisaggregatedParams, KvCacheConfig=KvCacheConfig,
                           GuidedDecodingParams=GuidedDecodingParams)


class TrtllmEngine:
    """One TensorRT-LLM ``LLM`` serving one model in agg, prefill or decode mode."""

    def __init__(self, *, model_path: str, served_model_name: str | None, mode: str, engine_kwargs: dict[str, Any],
                 kv_events: bool = True, api: Callable[[], Any] = tensorrt_llm_api) -> None:
        self.mode = mode
        self.engine_kwargs = dict(engine_kwargs)
        self.kv_events = kv_events
        kvc = engine_kwargs.get("kv_cache_config") or {}
        self.info: ModelInfo = model_info_from_dir(Path(model_path), served_model_name,
                                                   int(kvc.get("tokens_per_block") or 32))
        if engine_kwargs.get("max_seq_len"):
            self.info.context_length = int(engine_kwargs["max_seq_len"])
        self.instance_id = ""  # set by the runtime; goes into KvTransferParams.instance_id
        self._api_loader = api
        self._api: Any = None
        self._llm: Any = None
        self._sink: KvEventSink | None = None
        self._hash_map = KvHashMap(self.info.block_size)
        self._active: dict[str, int] = {}
        self._stats: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    def _llm_kwargs(self) -> dict[str, Any]:
        kw = dict(self.engine_kwargs)
        kvc = dict(kw.get("kv_cache_config") or {})
        known = getattr(getattr(self._api, "KvCacheConfig", None), "model_fields", None)
        if known is not None and "tokens_per_block" not in known:
            kvc.pop("tokens_per_block", None)  # older 1.x: the block size is TensorRT-LLM's own (32)
        if self.kv_events:
            kvc.setdefault("event_buffer_max_size", 16384)
            kvc["enable_block_reuse"] = True
        kw["kv_cache_config"] = kvc
        return kw

    async def start(self) -> None:
        self._api = self._api_loader()
        kw = self._llm_kwargs()
        self._llm = await asyncio.to_thread(lambda: self._api.LLM(**kw))
        kvc = getattr(getattr(self._llm, "args", None), "kv_cache_config", None)
        tpb = getattr(kvc, "tokens_per_block", None) or kw["kv_cache_config"].get("tokens_per_block") or 32
        self.info.block_size = self._hash_map.block_size = int(tpb)
        msl = getattr(getattr(self._llm, "args", None), "max_seq_len", None)
        if isinstance(msl, int) and msl > 0:
            self.info.context_length = msl
        self._tasks.append(asyncio.create_task(self._poll_stats(), name="trtllm-stats"))
        if self.kv_events:
            self._tasks.append(asyncio.create_task(self._poll_events(), name="trtllm-kv-events"))
        log.info("TensorRT-LLM engine ready: %s (%s), block size %d, context %d", self.info.name, self.mode,
                 self.info.block_size, self.info.context_length)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    # ------------------------------------------------------------------ requests

    def _sampling(self, request: GenerateRequest) -> Any:
        s, stop = request.sampling, request.stop
        max_tokens = 1 if request.prefill_only else stop.max_tokens
        kw: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": stop.ignore_eos, "detokenize": False}
        if stop.min_tokens:
            kw["min_tokens"] = min(stop.min_tokens, max_tokens)
        if stop.stop_token_ids:
            kw["stop_token_ids"] = list(stop.stop_token_ids)
        if s.temperature == 0:
            kw["top_k"] = 1
        else:
            kw.update(temperature=s.temperature, top_p=s.top_p)
            if s.top_k > 0:
                kw["top_k"] = s.top_k
            if s.min_p > 0:
                kw["min_p"] = s.min_p
        if s.seed is not None:
            kw["seed"] = s.seed
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(s, name):
                kw[name] = getattr(s, name)
        if s.repetition_penalty != 1.0:
            kw["repetition_penalty"] = s.repetition_penalty
        if s.logprobs is not None:
            kw["logprobs"] = max(1, s.logprobs)  # the sampled token's logprob needs at least 1
        if s.logit_bias:
            raise errors.InvalidRequest("logit_bias is not supported on the TensorRT-LLM engine", param="logit_bias")
        if s.guided is not None:
            kw["guided_decoding"] = self._api.GuidedDecodingParams(**trtllm_guided(s.guided))
        try:
            return self._api.SamplingParams(**kw)
        except (TypeError, ValueError) as exc:
            raise errors.InvalidRequest(f"TensorRT-LLM rejected the sampling parameters: {exc}") from exc

    def _disagg_params(self, request: GenerateRequest) -> Any:
        DP = self._api.DisaggregatedParams
        if request.prefill_only:
            return DP(request_type="context_only")
        kt = request.kv_transfer
        if kt is None or "opaque_state" not in kt.opaque:
            return None  # no hand-off (or another engine's): context and generation here
        names = {f.name for f in dataclasses.fields(DP)} if dataclasses.is_dataclass(DP) else set(HANDOFF_FIELDS)
        fields = {k: v for k, v in kt.opaque.items() if k in HANDOFF_FIELDS and k in names}
        return DP(request_type="generation_only", **fields)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        if self._llm is None:
            raise errors.Unavailable("TensorRT-LLM engine is not running")
        rid = request.request_id
        sampling = self._sampling(request)
        disagg = self._disagg_params(request)
        self._active[rid] = len(request.token_ids)
        result: Any = None
        finished = False
        try:
            result = self._llm.generate_async({"prompt_token_ids": list(request.token_ids)}, sampling_params=sampling,
                                              streaming=not request.prefill_only, disaggregated_params=disagg)
            seen = 0
            first = True
            async for res in result:
                out = res.outputs[0]
                ids = list(out.token_ids or [])
                eo = EngineOutput(token_ids=[int(t) for t in ids[seen:]])
                if request.sampling.logprobs is not None:
                    eo.logprobs = _logprobs(out, seen, len(ids), request.sampling.logprobs)
                seen = len(ids)
                if first:
                    first = False
                    eo.prompt_tokens = len(request.token_ids)
                self._active[rid] += len(eo.token_ids)
                reason = out.finish_reason
                if reason is not None or getattr(res, "finished", False):
                    if reason not in _FINISH:
                        raise errors.Unavailable(f"TensorRT-LLM ended request {rid}: {reason}")
                    eo.finish_reason = _FINISH[reason]
                    finished = True
                    if request.prefill_only:
                        eo.kv_transfer = self._kv_transfer(request, out)
                yield eo
                if finished:
                    return
        except (errors.DynamoError, asyncio.CancelledError, GeneratorExit):
            raise
        except ValueError as exc:
            raise errors.InvalidRequest(str(exc)) from exc
        except Exception as exc:
            raise errors.DynamoError(f"TensorRT-LLM failed the request: {type(exc).__name__}: {exc}") from exc
        finally:
            self._active.pop(rid, None)
            if result is not None and not finished:
                with contextlib.suppress(Exception):
                    result.abort()

    def _kv_transfer(self, request: GenerateRequest, out: Any) -> KvTransferParams:
        dp = getattr(out, "disaggregated_params", None)
        if dp is None:
            raise errors.KvTransferError("TensorRT-LLM returned no disaggregated_params for a context-only "
                                         "request (is the cache transceiver configured?)")
        opaque = {k: getattr(dp, k) for k in HANDOFF_FIELDS if getattr(dp, k, None) is not None}
        first = opaque.get("first_gen_tokens") or list(out.token_ids or [])[:1]
        return KvTransferParams(instance_id=self.instance_id, num_tokens=len(request.token_ids),
                                first_token=int(first[0]) if first else -1, opaque=opaque)

    # ------------------------------------------------------------------ load, events, pins

    async def _poll_stats(self) -> None:
        while True:
            try:
                async for stat in self._llm.get_stats_async(timeout=STATS_TIMEOUT):
                    self._stats = json.loads(stat) if isinstance(stat, str) else dict(stat)
            except Exception as exc:  # stats are best effort: load falls back to our own counts
                log.debug("TensorRT-LLM stats: %s", exc)
            await asyncio.sleep(1.0)

    async def _poll_events(self) -> None:
        while True:
            try:
                async for ev in self._llm.get_kv_cache_events_async(timeout=EVENTS_TIMEOUT):
                    events = self.translate_event(json.loads(ev) if isinstance(ev, str) else ev)
                    if events and self._sink is not None:
                        self._sink(events)
            except Exception as exc:  # a broken event stream loses router hits, never requests
                log.debug("TensorRT-LLM KV events: %s", exc)
            await asyncio.sleep(0.1)

    def translate_event(self, event: dict[str, Any]) -> list[Any]:
        """One TensorRT-LLM KV cache event -> our events (``created`` / ``updated`` carry no blocks we index)."""
        data = event.get("data") or {}
        kind = data.get("type")
        if kind == "stored":
            blocks = data.get("blocks") or []
            hashes = [b["block_hash"] for b in blocks]
            tokens = [t["token_id"] for b in blocks for t in b.get("tokens", [])]
            plain = [not b.get("lora_id") and len(b.get("tokens", [])) == self.info.block_size for b in blocks]
            e = self._hash_map.stored(hashes, data.get("parent_hash"), tokens, plain=plain)
        elif kind == "removed":
            e = self._hash_map.removed(data.get("block_hashes") or [])
        else:
            e = None
        return [e] if e is not None else []

    def load(self) -> EngineLoad:
        bs = self.info.block_size
        ld = EngineLoad(active_requests=len(self._active),
                        active_decode_blocks=sum(-(-n // bs) for n in self._active.values()))
        kv = self._stats.get("kvCacheStats") or {}
        ld.waiting_requests = int(self._stats.get("numQueuedRequests", 0) or 0)
        ld.kv_blocks_total = int(kv.get("maxNumBlocks", 0) or 0)
        ld.kv_blocks_used = int(kv.get("usedNumBlocks", 0) or 0) if self._active else 0
        return ld

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return self._hash_map.cached()

    async def release_pin(self, pin_id: str) -> bool:
        return False  # TensorRT-LLM's cache transceiver frees the context side's blocks after the transfer


def _logprobs(out: Any, start: int, end: int, k: int) -> list[TokenLogprob] | None:
    """TensorRT-LLM's ``logprobs`` (per position: ``{token_id: Logprob(logprob, rank)}``, or a float when only
    the sampled token's is known) for tokens ``[start, end)`` -> ours."""
    positions = list(out.logprobs or [])[start:end]
    ids = list(out.token_ids or [])[start:end]
    res: list[TokenLogprob] = []
    for tok, pos in zip(ids, positions, strict=False):
        if isinstance(pos, dict):
            chosen = pos.get(tok)
            top = sorted(((t, lp) for t, lp in pos.items() if getattr(lp, "rank", None) and lp.rank <= k),
                         key=lambda item: item[1].rank)
            res.append(TokenLogprob(int(tok), float(chosen.logprob) if chosen is not None else float("nan"),
                                    [(int(t), float(lp.logprob)) for t, lp in top]))
        else:
            res.append(TokenLogprob(int(tok), float(pos)))
    return res or None
