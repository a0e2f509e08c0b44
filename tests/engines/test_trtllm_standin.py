"""Contract tests of the TensorRT-LLM adapter (``workers.trtllm``) against STAND-IN API objects, not TensorRT-LLM.

TensorRT-LLM has no installable wheel here, so it cannot run; ``bench/gpu_engines_check.sh trtllm`` checks the
adapter with the real engine on a GPU host. The stand-ins have the names and keyword parameters the adapter
uses from TensorRT-LLM 1.x: ``LLM(**llm_args)`` with ``generate_async(inputs, sampling_params=, streaming=,
disaggregated_params=)`` returning an async-iterable result (``outputs[0].token_ids`` cumulative,
``finish_reason``, ``disaggregated_params``; ``abort()``), ``get_stats_async(timeout)``,
``get_kv_cache_events_async(timeout)``, ``shutdown()``, ``args.kv_cache_config``; ``SamplingParams`` and
``DisaggregatedParams`` as keyword-only dataclasses with TensorRT-LLM's field names, so a misspelt field fails
here. A context-only request returns the first token plus an opaque state; a generation-only request with that
state continues from it, as TensorRT-LLM's cache transceiver does.
"""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from dynamo_rt import errors, kvhash
from dynamo_rt.protocol import Final, GenerateRequest, SamplingParams, StopConditions, decode_frame, encode
from tests.conftest import arun
from tests.engines.standin import collect, engine_args, req, tokens, worker_argvs
from workers.main import parse_args
from workers.trtllm.engine import TrtllmEngine
from workers.trtllm.flags import engine_kwargs

BLOCK = 16


@dataclasses.dataclass(kw_only=True)
class StandinSamplingParams:
    """``tensorrt_llm.SamplingParams`` fields the adapter may set (1.x names)."""

    max_tokens: int = 32
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    detokenize: bool = True


@dataclasses.dataclass(kw_only=True)
class StandinDisaggregatedParams:
    """``tensorrt_llm.llmapi.DisaggregatedParams`` (1.x fields)."""

    request_type: str | None = None
    first_gen_tokens: list[int] | None = None
    first_gen_log_probs: list[Any] | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list[int] | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None


def standin_token(prompt: list[int], i: int) -> int:
    return (sum(prompt) * 17 + i * 29) % 900 + 10


@dataclasses.dataclass
class _Output:
    token_ids: list[int]
    finish_reason: str | None = None
    disaggregated_params: Any = None
    logprobs: list[Any] | None = None


class StandinResult:
    """``RequestOutput``: an async iterator of itself, one step at a time."""

    def __init__(self, llm: StandinLLM, ids: list[int], sp: StandinSamplingParams, streaming: bool,
                 dp: StandinDisaggregatedParams | None) -> None:
        self.llm, self.ids, self.sp, self.streaming, self.dp = llm, ids, sp, streaming, dp
        self.outputs = [_Output(token_ids=[])]
        self.finished = False
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    async def __aiter__(self) -> Any:
        toks = [standin_token(self.ids, i) for i in range(max(self.sp.max_tokens, 1))]
        out = self.outputs[0]
        if self.dp is not None and self.dp.request_type == "context_only":
            rid = self.llm.next_ctx_id
            self.llm.next_ctx_id += 1
            self.llm.contexts[rid] = (list(self.ids), toks[0])
            out.token_ids = [toks[0]]
            out.finish_reason = "not_finished"
            out.disaggregated_params = StandinDisaggregatedParams(
                request_type="context_only", first_gen_tokens=[toks[0]], ctx_request_id=rid,
                opaque_state=b"\x00transceiver-state\xff", draft_tokens=None)
            self.finished = True
            yield self
            return
        start = 0
        if self.dp is not None:
            assert self.dp.request_type == "generation_only"
            assert self.dp.opaque_state == b"\x00transceiver-state\xff"
            ctx_ids, first = self.llm.contexts.pop(self.dp.ctx_request_id)
            assert ctx_ids == self.ids and self.dp.first_gen_tokens == [first]
            out.token_ids = [first]  # generation-only output starts with the context phase's token
            start = 1
        for i in range(start, self.sp.max_tokens):
            await self.llm.step.wait()
            out.token_ids = [*out.token_ids, toks[i]]
            if self.sp.logprobs:
                out.logprobs = [*(out.logprobs or []), {toks[i]: SimpleNamespace(logprob=-1.0 - i, rank=1)}]
            if i == self.sp.max_tokens - 1:
                out.finish_reason = "length"
                self.finished = True
            yield self
            await asyncio.sleep(0)


class StandinLLM:
    """``tensorrt_llm.LLM`` (see the module docstring)."""

    def __init__(self, **llm_args: Any) -> None:
        self.llm_args = llm_args
        kvc = llm_args.get("kv_cache_config") or {}
        self.args = SimpleNamespace(kv_cache_config=SimpleNamespace(tokens_per_block=kvc.get("tokens_per_block")),
                                    max_seq_len=llm_args.get("max_seq_len"))
        self.contexts: dict[int, tuple[list[int], int]] = {}
        self.next_ctx_id = 1000
        self.results: list[StandinResult] = []
        self.events: list[dict[str, Any]] = []
        self.step = asyncio.Event()
        self.step.set()
        self.shut = False

    def generate_async(self, inputs: Any, sampling_params: StandinSamplingParams | None = None,
                       lora_request: Any = None, prompt_adapter_request: Any = None, streaming: bool = False,
                       kv_cache_retention_config: Any = None, disaggregated_params: Any = None) -> StandinResult:
        assert isinstance(inputs, dict) and isinstance(sampling_params, StandinSamplingParams)
        r = StandinResult(self, list(inputs["prompt_token_ids"]), sampling_params, streaming, disaggregated_params)
        self.results.append(r)
        return r

    async def get_stats_async(self, timeout: float | None = 2) -> Any:
        yield '{"numActiveRequests": 1, "numQueuedRequests": 3, "kvCacheStats": {"maxNumBlocks": 500, ' \
              '"usedNumBlocks": 20, "tokensPerBlock": 16}}'

    async def get_kv_cache_events_async(self, timeout: float | None = 2) -> Any:
        while self.events:
            yield self.events.pop(0)

    def shutdown(self) -> None:
        self.shut = True


def _api() -> Any:
    return SimpleNamespace(LLM=StandinLLM, SamplingParams=StandinSamplingParams,
                           DisaggregatedParams=StandinDisaggregatedParams, KvCacheConfig=None)


def _engine(mode: str) -> TrtllmEngine:
    args = engine_args("trtllm", mode, BLOCK, "--max-model-len", "2048")
    return TrtllmEngine(model_path=args.model, served_model_name="tiny", mode=mode, engine_kwargs=engine_kwargs(args),
                        api=_api)




def test_trtllm_standin_agg_sampling_logprobs_and_load() -> None:
    prompt = list(range(30, 70))

    async def main() -> None:
        eng = _engine("agg")
        await eng.start()
        try:
            llm: StandinLLM = eng._llm
            assert llm.llm_args["kv_cache_config"] == {"enable_block_reuse": True, "tokens_per_block": BLOCK,
                                                       "event_buffer_max_size": 16384}
            assert "cache_transceiver_config" not in llm.llm_args and llm.llm_args["max_seq_len"] == 2048
            assert (eng.info.block_size, eng.info.context_length) == (BLOCK, 2048)
            outs = await collect(eng, req("a1", prompt, 5, sampling=SamplingParams(temperature=0.0, logprobs=0)))
            assert tokens(outs) == [standin_token(prompt, i) for i in range(5)]
            assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
            assert outs[0].prompt_tokens == 40
            assert [lp.logprob for o in outs for lp in o.logprobs or []] == [-1.0 - i for i in range(5)]
            # Greedy is top_k=1 (TensorRT-LLM wants temperature > 0 when given); logprobs=0 asks for 1.
            assert llm.results[0].sp == StandinSamplingParams(max_tokens=5, top_k=1, ignore_eos=True, logprobs=1,
                                                               detokenize=False)
            await collect(eng, GenerateRequest(
                request_id="a2", token_ids=prompt,
                sampling=SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=3, frequency_penalty=0.5),
                stop=StopConditions(max_tokens=3, min_tokens=2, stop_token_ids=[2])))
            assert llm.results[1].sp == StandinSamplingParams(
                max_tokens=3, min_tokens=2, temperature=0.8, top_p=0.9, top_k=40, seed=3, frequency_penalty=0.5,
                stop_token_ids=[2], detokenize=False)
            await asyncio.sleep(0.05)
            ld = eng.load()
            assert (ld.active_requests, ld.waiting_requests, ld.kv_blocks_total) == (0, 3, 500)
        finally:
            await eng.stop()
        assert llm.shut

    arun(main(), timeout=30)


def test_trtllm_standin_context_only_then_generation_only_through_our_protocol() -> None:
    prompt = list(range(200, 233))
    want = [standin_token(prompt, i) for i in range(7)]

    async def main() -> None:
        pre, dec = _engine("prefill"), _engine("decode")
        pre.instance_id = "p9"
        await pre.start()
        await dec.start()
        try:
            assert pre._llm.llm_args["cache_transceiver_config"] == {"backend": "NIXL"}
            assert pre._llm.llm_args["disable_overlap_scheduler"] is True
            assert dec._llm.llm_args["cache_transceiver_config"] == {"backend": "NIXL"}
            dec._llm.contexts = pre._llm.contexts  # the stand-in of the cache transceiver
            pouts = await collect(pre, req("x-p", prompt, 7, prefill_only=True))
            assert len(pouts) == 1 and pouts[0].token_ids == want[:1] and pouts[0].finish_reason == "length"
            ctx_req = pre._llm.results[0]
            assert ctx_req.sp.max_tokens == 1 and ctx_req.streaming is False
            assert ctx_req.dp == StandinDisaggregatedParams(request_type="context_only")
            # The hand-off crosses NATS as msgpack: the opaque bytes survive.
            final = decode_frame(encode(Final(seq=0, finish_reason="length", kv_transfer=pouts[0].kv_transfer)))
            assert isinstance(final, Final) and final.kv_transfer is not None
            kt = final.kv_transfer
            assert (kt.instance_id, kt.first_token, kt.num_tokens) == ("p9", want[0], len(prompt))
            assert kt.opaque == {"first_gen_tokens": [want[0]], "ctx_request_id": 1000,
                                 "opaque_state": b"\x00transceiver-state\xff"}
            douts = await collect(dec, req("x", prompt, 7, kv_transfer=kt))
            assert tokens(douts) == want
            assert dec._llm.results[0].dp == StandinDisaggregatedParams(
                request_type="generation_only", first_gen_tokens=[want[0]], ctx_request_id=1000,
                opaque_state=b"\x00transceiver-state\xff")
            # No hand-off: the decode worker runs context and generation itself.
            douts = await collect(dec, req("y", prompt, 7))
            assert tokens(douts) == want and dec._llm.results[1].dp is None
        finally:
            await pre.stop()
            await dec.stop()

    arun(main(), timeout=30)


def test_trtllm_standin_cancel_aborts_and_errors_are_typed() -> None:
    async def main() -> None:
        eng = _engine("agg")
        await eng.start()
        try:
            llm: StandinLLM = eng._llm
            gen = eng.generate(req("c1", [1, 2, 3], 40))
            await gen.__anext__()
            llm.step.clear()
            await gen.aclose()
            assert llm.results[0].aborted and eng.load().active_requests == 0
            llm.step.set()
            # TensorRT-LLM's own validation error becomes InvalidRequest (a 400), not an internal error.
            with pytest.raises(errors.InvalidRequest, match="sampling"):
                await collect(eng, _bad_sampling(eng))
        finally:
            await eng.stop()

    arun(main(), timeout=30)


def _bad_sampling(eng: TrtllmEngine) -> GenerateRequest:
    """A request whose sampling the stand-in SamplingParams rejects (as TensorRT-LLM's validation would)."""
    orig = eng._api.SamplingParams

    def strict(**kw: Any) -> Any:
        if kw.get("top_p") == 0.5:
            raise ValueError("top_p 0.5 rejected by the stand-in")
        return orig(**kw)

    eng._api = SimpleNamespace(**{**vars(eng._api), "SamplingParams": strict})
    return GenerateRequest(request_id="bad", token_ids=[1, 2], sampling=SamplingParams(temperature=0.5, top_p=0.5),
                           stop=StopConditions(max_tokens=2))


def test_trtllm_kv_events_map_to_our_block_hashes() -> None:
    toks = list(range(5, 5 + 3 * BLOCK))
    ours = kvhash.block_hashes(toks, BLOCK)

    async def main() -> list[Any]:
        eng = _engine("agg")
        got: list[Any] = []
        eng.set_kv_event_sink(got.extend)
        await eng.start()
        try:
            def blocks(i: int, j: int) -> list[dict[str, Any]]:
                return [{"type": "stored_block", "block_hash": 700 + b, "lora_id": None, "cache_level": 0,
                         "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0}
                                    for t in toks[b * BLOCK : (b + 1) * BLOCK]]} for b in range(i, j)]

            eng._llm.events += [
                {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [500]}},
                {"event_id": 1, "data": {"type": "stored", "parent_hash": None, "blocks": blocks(0, 2)}},
                {"event_id": 2, "data": {"type": "stored", "parent_hash": 701, "blocks": blocks(2, 3)}},
                {"event_id": 3, "data": {"type": "removed", "block_hashes": [700]}},
            ]
            for _ in range(100):
                if len(got) >= 3:
                    break
                await asyncio.sleep(0.02)
            assert sorted(eng.cached_block_hashes()) == sorted(ours[1:])
            return got
        finally:
            await eng.stop()

    got = arun(main(), timeout=30)
    assert [(e.kind, e.block_hashes, e.parent_hash) for e in got] == [
        ("stored", ours[:2], None), ("stored", ours[2:], ours[1]), ("removed", ours[:1], None)]


def test_trtllm_flags_from_the_manifests_parse() -> None:
    argvs = worker_argvs("trtllm")
    assert len(argvs) >= 6
    for argv in argvs:
        args = parse_args(argv)
        kw = engine_kwargs(args)
        assert kw["tensor_parallel_size"] == args.tp
        assert ("cache_transceiver_config" in kw) == (args.mode != "agg")
