"""Contract tests of the SGLang adapter (``workers.sglang``) against a STAND-IN engine, not SGLang.

SGLang has no CPU kernels, so it cannot run here; ``bench/gpu_engines_check.sh sglang`` checks the adapter with
the real engine on a GPU host. :class:`StandinSglangEngine` has the method names and keyword parameters the
adapter calls on ``sglang.Engine`` 0.5.23 (``async_generate(input_ids=, sampling_params=, stream=, rid=,
return_logprob=, top_logprobs_num=, bootstrap_host=, bootstrap_port=, bootstrap_room=)`` returning an async
iterator of ``{"output_ids", "meta_info"}`` dicts, cumulative; ``server_args``; ``tokenizer_manager.get_loads()``
/ ``abort_request(rid)``; ``shutdown()``), so a renamed or missing argument fails here. Its prefill and decode
instances pair up by bootstrap room the way SGLang's do: the prefill request does not finish until a decode
request has joined its room, and the decode output starts with the token the prefill side produced.
"""

from __future__ import annotations

import asyncio
import secrets
from types import SimpleNamespace
from typing import Any

import pytest

from dynamo_rt import errors, kvhash
from dynamo_rt.protocol import GenerateRequest, KvTransferParams, SamplingParams, StopConditions
from tests.conftest import arun
from tests.engines.standin import collect, engine_args, req, tokens, worker_argvs
from workers.common.kv_events import KvHashMap
from workers.main import parse_args
from workers.sglang.engine import SglangEngine
from workers.sglang.flags import engine_kwargs, resolve_mode

PAGE = 16


def standin_token(prompt: list[int], i: int) -> int:
    """The stand-in model: output token i of a prompt."""
    return (sum(prompt) * 31 + len(prompt) * 7 + i * 13) % 1000 + 10


class Rooms:
    """The stand-in of SGLang's bootstrap pairing, shared by a prefill and a decode stand-in."""

    def __init__(self) -> None:
        self.joined: dict[int, asyncio.Event] = {}
        self.first: dict[int, asyncio.Future[int]] = {}

    def slot(self, room: int) -> tuple[asyncio.Event, asyncio.Future[int]]:
        if room not in self.joined:
            self.joined[room] = asyncio.Event()
            self.first[room] = asyncio.get_running_loop().create_future()
        return self.joined[room], self.first[room]


class StandinTokenizerManager:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)

    async def get_loads(self, include: list[str] | None = None, dp_rank: int | None = None) -> list[Any]:
        return [SimpleNamespace(num_waiting_reqs=2, num_used_tokens=64, max_total_num_tokens=1600)]


class StandinSglangEngine:
    """Stand-in for ``sglang.Engine`` (see the module docstring): same constructor and method signatures."""

    def __init__(self, *, rooms: Rooms | None = None, **server_args: Any) -> None:
        self.kwargs = server_args
        self.rooms = rooms or Rooms()
        self.mode = server_args.get("disaggregation_mode", "null")
        self.server_args = SimpleNamespace(page_size=server_args.get("page_size", 1),
                                           context_length=server_args.get("context_length") or 4096,
                                           incremental_streaming_output=False)
        self.tokenizer_manager = StandinTokenizerManager()
        self.calls: list[dict[str, Any]] = []
        self.step = asyncio.Event()  # cancellation tests hold the stream here
        self.step.set()
        self.shut = False

    async def async_generate(self, prompt: str | None = None, sampling_params: dict[str, Any] | None = None,
                             input_ids: list[int] | None = None, return_logprob: bool = False,
                             logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                             stream: bool = False, bootstrap_host: str | None = None,
                             bootstrap_port: int | None = None, bootstrap_room: int | None = None,
                             rid: str | None = None) -> Any:
        assert stream and input_ids is not None and sampling_params is not None and rid
        self.calls.append({"input_ids": input_ids, "sampling_params": sampling_params, "rid": rid,
                           "return_logprob": return_logprob, "top_logprobs_num": top_logprobs_num,
                           "bootstrap": (bootstrap_host, bootstrap_port, bootstrap_room)})
        return self._stream(input_ids, sampling_params, return_logprob, top_logprobs_num or 0, bootstrap_room)

    async def _stream(self, ids: list[int], sp: dict[str, Any], lp: bool, k: int, room: int | None) -> Any:
        n = sp["max_new_tokens"]
        toks = [standin_token(ids, i) for i in range(n)]
        out: list[int] = []
        if self.mode == "prefill":
            assert room is not None
            joined, first = self.rooms.slot(room)
            await joined.wait()  # SGLang: the prefill waits for the decode side's reserved slots
            first.set_result(toks[0])
            yield {"output_ids": [toks[0]], "meta_info": self._meta(ids, 1, "length", lp, k, toks)}
            return
        start = 0
        if self.mode == "decode":
            assert room is not None
            joined, first = self.rooms.slot(room)
            joined.set()
            assert await first == toks[0]
            out.append(toks[0])
            start = 1
        for i in range(start, n):
            await self.step.wait()
            out.append(toks[i])
            done = i == n - 1
            yield {"output_ids": out, "meta_info": self._meta(ids, len(out), "length" if done else None, lp, k, toks)}
            await asyncio.sleep(0)

    @staticmethod
    def _meta(ids: list[int], produced: int, reason: str | None, lp: bool, k: int, toks: list[int]) -> dict[str, Any]:
        meta: dict[str, Any] = {"finish_reason": {"type": reason, "length": produced} if reason else None,
                                "prompt_tokens": len(ids), "cached_tokens": 16, "completion_tokens": produced}
        if lp:
            meta["output_token_logprobs"] = [(-0.5 - i, toks[i], None) for i in range(produced)]
            meta["output_top_logprobs"] = [[(-0.5 - i, toks[i], None), (-3.0, 7, None)][:k] for i in range(produced)]
        return meta

    def shutdown(self) -> None:
        self.shut = True



def _engine(mode: str, rooms: Rooms | None = None, **extra: Any) -> SglangEngine:
    args = engine_args("sglang", mode, PAGE)
    kw = {**engine_kwargs(args, mode), **extra}
    return SglangEngine(model_path=args.model, served_model_name="tiny", mode=mode, engine_kwargs=kw,
                        bootstrap_host="10.1.2.3", kv_events=False,
                        engine_factory=lambda **a: StandinSglangEngine(rooms=rooms, **a))



def test_sglang_standin_agg_tokens_sampling_logprobs_and_load() -> None:
    prompt = list(range(20, 60))

    async def main() -> None:
        eng = _engine("agg")
        await eng.start()
        try:
            standin: StandinSglangEngine = eng._engine
            assert standin.kwargs["skip_tokenizer_init"] is True and standin.kwargs["page_size"] == PAGE
            assert "disaggregation_mode" not in standin.kwargs
            sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, seed=5, repetition_penalty=1.1, logprobs=2)
            outs = await collect(eng, GenerateRequest(
                request_id="a1", token_ids=prompt, sampling=sp,
                stop=StopConditions(max_tokens=5, min_tokens=2, stop_token_ids=[3], ignore_eos=False)))
            assert tokens(outs) == [standin_token(prompt, i) for i in range(5)]
            assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
            assert (outs[0].prompt_tokens, outs[0].cached_tokens) == (40, 16)
            lps = [lp for o in outs for lp in o.logprobs or []]
            assert [(lp.token_id, lp.logprob) for lp in lps] == [(standin_token(prompt, i), -0.5 - i) for i in range(5)]
            assert lps[1].top == [(standin_token(prompt, 1), -1.5), (7, -3.0)]
            call = standin.calls[0]
            assert call["sampling_params"] == {
                "max_new_tokens": 5, "min_new_tokens": 2, "temperature": 0.7, "top_p": 0.9, "top_k": -1,
                "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.1,
                "ignore_eos": False, "stop_token_ids": [3], "sampling_seed": 5}
            assert (call["rid"], call["return_logprob"], call["top_logprobs_num"]) == ("a1", True, 2)
            assert call["bootstrap"] == (None, None, None)
            await asyncio.sleep(0.05)  # one poll of the stand-in's load snapshots
            ld = eng.load()
            assert (ld.active_requests, ld.waiting_requests, ld.kv_blocks_used, ld.kv_blocks_total) == (0, 2, 4, 100)
        finally:
            await eng.stop()
        assert standin.shut

    arun(main(), timeout=30)


def test_sglang_standin_prefill_answers_early_and_decode_joins_the_room() -> None:
    prompt = list(range(100, 137))
    want = [standin_token(prompt, i) for i in range(8)]

    async def main() -> None:
        rooms = Rooms()
        pre, dec = _engine("prefill", rooms), _engine("decode", rooms)
        pre.instance_id = "p1"
        await pre.start()
        await dec.start()
        try:
            assert pre._engine.kwargs["disaggregation_mode"] == "prefill"
            assert pre._engine.kwargs["disaggregation_transfer_backend"] == "nixl"
            assert pre._engine.kwargs["host"] == "0.0.0.0"  # the bootstrap server must be reachable
            assert dec._engine.kwargs["disaggregation_mode"] == "decode"
            assert pre.instance_extra == {"bootstrap_host": "10.1.2.3", "bootstrap_port": 8998}
            # The prefill worker answers before SGLang's prefill can finish (it needs the decode partner).
            pouts = await asyncio.wait_for(collect(pre, req("r1-p", prompt, 8, prefill_only=True)), 2)
            assert len(pouts) == 1 and pouts[0].token_ids == [] and pouts[0].finish_reason == "length"
            kt = pouts[0].kv_transfer
            assert kt is not None and kt.instance_id == "p1" and kt.num_tokens == len(prompt)
            assert (kt.opaque["bootstrap_host"], kt.opaque["bootstrap_port"]) == ("10.1.2.3", 8998)
            room = kt.opaque["bootstrap_room"]
            assert 0 <= room < 2**63 and len(pre._handoffs) == 1
            douts = await collect(dec, req("r1", prompt, 8, kv_transfer=kt))
            assert tokens(douts) == want
            assert douts[-1].finish_reason == "length"
            await asyncio.wait_for(asyncio.gather(*pre._handoffs), 2)  # the prefill side completed too
            assert pre._engine.calls[0]["bootstrap"] == ("10.1.2.3", 8998, room)
            assert dec._engine.calls[0]["bootstrap"] == ("10.1.2.3", 8998, room)
            # A room the frontend assigned itself: the prefill side streams SGLang's answer normally.
            given = KvTransferParams(opaque={"bootstrap_host": "10.1.2.3", "bootstrap_port": 8998,
                                             "bootstrap_room": secrets.randbits(63)})
            ptask = asyncio.create_task(collect(pre, req("r2-p", prompt, 8, prefill_only=True, kv_transfer=given)))
            douts = await collect(dec, req("r2", prompt, 8, kv_transfer=given))
            pouts = await ptask
            assert tokens(douts) == want
            assert pouts[-1].token_ids == want[:1] and pouts[-1].kv_transfer is not None
            assert pouts[-1].kv_transfer.opaque == given.opaque
        finally:
            await pre.stop()
            await dec.stop()

    arun(main(), timeout=30)


def test_sglang_standin_decode_needs_bootstrap_parameters() -> None:
    async def main() -> None:
        dec = _engine("decode")
        await dec.start()
        try:
            with pytest.raises(errors.Unavailable, match="bootstrap"):
                await collect(dec, req("d1", [5, 6, 7]))
            # Another engine's hand-off (no bootstrap keys) is no better.
            with pytest.raises(errors.Unavailable, match="bootstrap"):
                await collect(dec, req("d2", [5, 6, 7], kv_transfer=KvTransferParams(block_ids=[1, 2])))
            assert dec._engine.calls == []
        finally:
            await dec.stop()

    arun(main(), timeout=30)


def test_sglang_standin_cancel_aborts_the_request() -> None:
    async def main() -> None:
        eng = _engine("agg")
        await eng.start()
        try:
            standin: StandinSglangEngine = eng._engine
            gen = eng.generate(req("c1", [1, 2, 3, 4], 50))
            first = await gen.__anext__()
            assert len(first.token_ids) == 1 and eng.load().active_requests == 1
            standin.step.clear()
            await gen.aclose()
            assert standin.tokenizer_manager.aborted == ["c1"]
            assert eng.load().active_requests == 0
        finally:
            await eng.stop()

    arun(main(), timeout=30)


def test_sglang_kv_events_map_to_our_block_hashes() -> None:
    """SGLang's event objects (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``, stand-ins with the
    0.5.23 field names) through the adapter's map: our chained hashes, parents, removal, salted blocks left out."""

    class BlockStored(SimpleNamespace):
        pass

    class BlockRemoved(SimpleNamespace):
        pass

    class AllBlocksCleared(SimpleNamespace):
        pass

    toks = list(range(1, 1 + 3 * PAGE))
    ours = kvhash.block_hashes(toks, PAGE)
    m = KvHashMap(PAGE)
    evs = m.translate([
        BlockStored(block_hashes=[-11, -12], parent_block_hash=None, token_ids=toks[: 2 * PAGE], block_size=PAGE,
                    lora_id=None, medium="GPU", cache_salt=None, lora_name=None),
        BlockStored(block_hashes=[-13], parent_block_hash=-12, token_ids=toks[2 * PAGE :], block_size=PAGE,
                    lora_id=None, medium="CPU_PINNED"),
        BlockStored(block_hashes=[-99], parent_block_hash=None, token_ids=toks[:PAGE], block_size=PAGE,
                    lora_id=None, cache_salt="tenant-a"),
        BlockRemoved(block_hashes=[-12, -404], medium="GPU"),
    ])
    assert [(e.kind, e.block_hashes, e.parent_hash, e.tier) for e in evs] == [
        ("stored", ours[:2], None, "primary"), ("stored", ours[2:], ours[1], "host"), ("removed", [ours[1]], None,
                                                                                       "primary")]
    assert sorted(m.cached()) == sorted([ours[0]]) and m.cached("host") == [ours[2]]
    assert [e.kind for e in m.translate([AllBlocksCleared()])] == ["cleared"] and m.cached() == []


def test_sglang_flags_from_the_manifests_parse() -> None:
    """Every sglang worker command line in manifests/ parses, and maps to SGLang's argument names."""
    argvs = worker_argvs("sglang")
    assert len(argvs) >= 6
    for argv in argvs:
        args = parse_args(argv)
        kw = engine_kwargs(args, resolve_mode(args))
        assert kw["tp_size"] == args.tp and kw["ep_size"] == args.ep_size
        if args.mode != "agg":
            assert kw["disaggregation_mode"] == args.mode
        if args.nnodes > 1:
            assert kw["dist_init_addr"] == "10.0.0.1:29500" and kw["node_rank"] == 1
    # SGLang's own --disaggregation-mode (the seed's flag) sets --mode; a contradiction is refused.
    args = parse_args(["--engine", "sglang", "--disaggregation-mode", "decode", "--model", "/m"])
    assert resolve_mode(args) == "decode"
    with pytest.raises(errors.ConfigError, match="--disaggregation-mode"):
        resolve_mode(parse_args(["--engine", "sglang", "--mode", "prefill", "--disaggregation-mode", "decode"]))
