"""The mocker engine: deterministic outputs, stop rules, real block accounting, KV events, pins, flags."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from dynamo_rt.config import Parser
from dynamo_rt.errors import ConfigError, ErrorCode, InvalidRequest, Unavailable
from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import GenerateRequest, KvEvent, KvTransferParams, SamplingParams, StopConditions
from workers.common.engine import Engine, EngineOutput, ModelInfo
from workers.mocker import MockerEngine
from workers.mocker.flags import add_flags, build_engine, build_engines

T = TypeVar("T")
BS = 16
EOS = 2
INFO = ModelInfo(name="mock", path="", context_length=4096, block_size=BS, eos_token_ids=[EOS], bos_token_id=1)


def run(fn: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), timeout)

    return asyncio.run(main())


def req(rid: str, prompt: list[int], max_tokens: int = 8, **kw: Any) -> GenerateRequest:
    stop_kw = {k: kw.pop(k) for k in ("min_tokens", "stop_token_ids", "ignore_eos") if k in kw}
    return GenerateRequest(request_id=rid, token_ids=prompt, stop=StopConditions(max_tokens=max_tokens, **stop_kw),
                           **kw)


def prompt_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


async def collect(engine: MockerEngine, r: GenerateRequest) -> tuple[list[int], list[EngineOutput]]:
    outs = [o async for o in engine.generate(r)]
    return [t for o in outs for t in o.token_ids], outs


def mocker(**kw: Any) -> MockerEngine:
    kw.setdefault("speedup", 0)
    kw.setdefault("vocab_size", 1000)
    kw.setdefault("num_blocks", 256)
    return MockerEngine(INFO, **kw)


def baseline(e: MockerEngine) -> tuple[int, int, int, int]:
    ld = e.load()
    return ld.active_requests, ld.waiting_requests, ld.kv_blocks_used, ld.active_decode_blocks


def test_is_an_engine() -> None:
    assert isinstance(mocker(), Engine)


def test_deterministic_outputs_across_engines() -> None:
    async def main() -> None:
        a, b, c = mocker(), mocker(), mocker(seed=7)
        for e in (a, b, c):
            await e.start()
        p = prompt_of(40)
        ta, outs = await collect(a, req("r1", p, max_tokens=50))
        tb, _ = await collect(b, req("other-id", p, max_tokens=50))
        tc, _ = await collect(c, req("r1", p, max_tokens=50))
        td, _ = await collect(a, req("r2", p[:-1], max_tokens=50))
        assert ta == tb
        assert len(ta) == 50 and outs[-1].finish_reason == "length"
        assert tc != ta and td != ta
        assert all(o.finish_reason is None for o in outs[:-1])
        assert outs[0].prompt_tokens == 40
        # Special ids (EOS, BOS) never come out, and everything is inside the vocabulary.
        assert all(0 <= t < 1000 and t not in (EOS, 1) for t in ta + tc + td)
        # A shorter max_tokens is a prefix of the longer output.
        te, _ = await collect(b, req("r3", p, max_tokens=5))
        assert te == ta[:5]
        for e in (a, b, c):
            await e.stop()

    run(main)


def test_stop_token_ids_and_min_tokens() -> None:
    async def main() -> None:
        e = mocker()
        await e.start()
        p = prompt_of(20, seed=3)
        full, _ = await collect(e, req("a", p, max_tokens=30))
        k = next(i for i in range(5, 30) if full[i] not in full[:i])
        stopped, outs = await collect(e, req("b", p, max_tokens=30, stop_token_ids=[full[k]]))
        assert stopped == full[: k + 1]  # the stop token is included, as vLLM does
        assert outs[-1].finish_reason == "stop"
        ignored, outs = await collect(e, req("c", p, max_tokens=30, stop_token_ids=[full[k]], min_tokens=k + 2))
        assert ignored == full and outs[-1].finish_reason == "length"
        # min_tokens == k + 1 counts the stop token itself, so it stops there.
        at_min, outs = await collect(e, req("d", p, max_tokens=30, stop_token_ids=[full[k]], min_tokens=k + 1))
        assert at_min == full[: k + 1] and outs[-1].finish_reason == "stop"
        await e.stop()

    run(main)


def test_eos_probability_respects_ignore_eos() -> None:
    async def main() -> None:
        e = mocker(eos_probability=0.2)
        await e.start()
        p = prompt_of(10, seed=4)
        toks, outs = await collect(e, req("a", p, max_tokens=200))
        assert toks[-1] == EOS and EOS not in toks[:-1] and outs[-1].finish_reason == "stop"
        toks2, outs2 = await collect(e, req("b", p, max_tokens=200, ignore_eos=True))
        assert EOS not in toks2 and len(toks2) == 200 and outs2[-1].finish_reason == "length"
        await e.stop()

    run(main)


def test_invalid_requests() -> None:
    async def main() -> None:
        e = mocker()
        with pytest.raises(Unavailable):
            await collect(e, req("x", [5, 6]))
        await e.start()
        with pytest.raises(InvalidRequest) as ei:
            await collect(e, req("x", []))
        assert ei.value.param == "token_ids"
        with pytest.raises(InvalidRequest) as ei:
            await collect(e, req("x", [5] * 4096))
        assert ei.value.code == ErrorCode.CONTEXT_LENGTH
        with pytest.raises(InvalidRequest):
            await collect(e, req("x", [5, 1000]))
        with pytest.raises(InvalidRequest) as ei:
            await collect(e, req("x", [5], max_tokens=0))
        assert ei.value.param == "max_tokens"
        small = mocker(num_blocks=2)
        await small.start()
        with pytest.raises(InvalidRequest):
            await collect(small, req("x", [5] * 40))
        await small.stop()
        await e.stop()

    run(main)


def test_context_length_ends_generation() -> None:
    async def main() -> None:
        e = MockerEngine(ModelInfo(name="m", path="", context_length=40, block_size=BS), speedup=0, vocab_size=1000)
        await e.start()
        toks, outs = await collect(e, req("a", prompt_of(30), max_tokens=100))
        assert len(toks) == 10 and outs[-1].finish_reason == "length"
        await e.stop()

    run(main)


def test_blocks_back_to_baseline_after_finish_and_cancel() -> None:
    async def main() -> None:
        e = mocker(speedup=1000)
        await e.start()
        await collect(e, req("a", prompt_of(100), max_tokens=20))
        assert baseline(e) == (0, 0, 0, 0)
        # aclose after the first output.
        gen = e.generate(req("b", prompt_of(100, seed=1), max_tokens=500))
        first = await gen.__anext__()
        assert first.prompt_tokens == 100
        assert e.load().active_requests == 1 and e.load().kv_blocks_used >= 7
        await gen.aclose()
        assert baseline(e) == (0, 0, 0, 0)
        # A consumer task cancelled mid-stream.
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in e.generate(req("c", prompt_of(300, seed=2), max_tokens=500)):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert baseline(e) == (0, 0, 0, 0)
        # Cancelled while still waiting for a slot.
        e2 = mocker(speedup=1, max_num_seqs=1)
        await e2.start()
        g1 = e2.generate(req("d", prompt_of(20), max_tokens=400))
        await g1.__anext__()
        t2 = asyncio.create_task(collect(e2, req("e", prompt_of(20, seed=9), max_tokens=4)))
        await asyncio.sleep(0.01)
        assert e2.load().waiting_requests == 1
        t2.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t2
        assert e2.load().waiting_requests == 0
        await g1.aclose()
        assert baseline(e2) == (0, 0, 0, 0)
        await e2.stop()
        await e.stop()

    run(main)


def test_prefix_hit_reports_cached_tokens() -> None:
    async def main() -> None:
        e = mocker()
        await e.start()
        p = prompt_of(100, seed=5)
        _, outs = await collect(e, req("a", p, max_tokens=4))
        assert outs[0].cached_tokens == 0
        _, outs = await collect(e, req("b", p, max_tokens=4))
        assert outs[0].cached_tokens == 96  # six full blocks; the partial seventh is recomputed
        _, outs = await collect(e, req("c", p[:64], max_tokens=4))
        assert outs[0].cached_tokens == 48  # a fully cached prompt still computes its last block
        _, outs = await collect(e, req("d", p[:40] + [7] * 60, max_tokens=4))
        assert outs[0].cached_tokens == 32
        assert e.stats["b"].prefill_tokens == 4 and e.stats["d"].prefill_tokens == 68
        await e.stop()

    run(main)


def test_events_match_kvhash() -> None:
    async def main() -> None:
        e = mocker()
        events: list[KvEvent] = []
        e.set_kv_event_sink(events.extend)
        await e.start()
        p = prompt_of(100, seed=6)
        out, _ = await collect(e, req("a", p, max_tokens=20))
        seq = p + out
        # KV exists for every token but the last one produced.
        expect = block_hashes(seq[:-1], BS)
        assert len(expect) == 7
        stored = [ev for ev in events if ev.kind == "stored"]
        assert [h for ev in stored for h in ev.block_hashes] == expect
        assert stored[0].block_hashes == expect[:6] and stored[0].parent_hash is None
        assert stored[1].block_hashes == [expect[6]] and stored[1].parent_hash == expect[5]
        assert sorted(e.cached_block_hashes()) == sorted(expect)
        await e.stop()
        assert events[-1].kind == "cleared"
        assert e.cached_block_hashes() == []

    run(main)


def test_eviction_events_replay_to_cached_state() -> None:
    """Replaying every event reproduces cached_block_hashes() exactly, under eviction pressure."""

    async def main() -> None:
        e = mocker(num_blocks=24, speedup=0)
        held: set[int] = set()

        def sink(evs: list[KvEvent]) -> None:
            for ev in evs:
                if ev.kind == "stored":
                    assert not held.intersection(ev.block_hashes)
                    held.update(ev.block_hashes)
                elif ev.kind == "removed":
                    assert held.issuperset(ev.block_hashes)
                    held.difference_update(ev.block_hashes)
                else:
                    held.clear()

        e.set_kv_event_sink(sink)
        await e.start()
        rng = random.Random(11)
        bases = [prompt_of(48, seed=s) for s in range(4)]

        async def one(i: int) -> None:
            p = rng.choice(bases)[: rng.randrange(17, 48)] + prompt_of(rng.randrange(0, 20), seed=100 + i)
            gen = e.generate(req(f"r{i}", p, max_tokens=rng.randrange(1, 30)))
            try:
                async for _ in gen:
                    if rng.random() < 0.1:
                        break
            finally:
                await gen.aclose()

        await asyncio.gather(*(one(i) for i in range(60)))
        assert held == set(e.cached_block_hashes())
        assert baseline(e) == (0, 0, 0, 0)
        await e.stop()

    run(main)


def test_eviction_is_one_removed_event_per_allocation_tail_first() -> None:
    """As the reference engine (the same workers.common.blocks manager): an admission that evicts says so
    in ONE removed event, and a released prefix loses its tail before its head."""

    async def main() -> None:
        e = mocker(num_blocks=16)
        events: list[KvEvent] = []
        e.set_kv_event_sink(events.extend)
        await e.start()
        a = prompt_of(100, seed=21)
        await collect(e, req("a", a, max_tokens=1))  # 7 blocks, 6 full ones cached
        ha = block_hashes(a, BS)
        assert [(ev.kind, ev.block_hashes, ev.parent_hash) for ev in events] == [("stored", ha, None)]
        events.clear()
        b = prompt_of(200, seed=22)
        await collect(e, req("b", b, max_tokens=1))  # 13 blocks: the 10 free ones and 3 evicted
        assert [(ev.kind, ev.block_hashes) for ev in events] == [
            ("removed", [ha[5], ha[4], ha[3]]), ("stored", block_hashes(b, BS))]
        assert sorted(e.cached_block_hashes()) == sorted(ha[:3] + block_hashes(b, BS))
        await e.stop()

    run(main)


def test_preemption_keeps_outputs_exact() -> None:
    async def main() -> None:
        solo = mocker(block_size=4, num_blocks=64)
        tight = mocker(block_size=4, num_blocks=7)
        await solo.start()
        await tight.start()
        prompts = [prompt_of(8, seed=s) for s in range(3)]
        want = [(await collect(solo, req(f"s{i}", p, max_tokens=14)))[0] for i, p in enumerate(prompts)]
        got = await asyncio.gather(*(collect(tight, req(f"t{i}", p, max_tokens=14)) for i, p in enumerate(prompts)))
        assert [g[0] for g in got] == want
        assert sum(tight.stats[f"t{i}"].preemptions for i in range(3)) >= 1
        assert baseline(tight) == (0, 0, 0, 0)
        await solo.stop()
        await tight.stop()

    run(main)


def test_continuous_batching_load() -> None:
    async def main() -> None:
        e = mocker(speedup=100, max_num_seqs=2)
        await e.start()
        gens = [e.generate(req(f"r{i}", prompt_of(32, seed=i), max_tokens=50)) for i in range(4)]
        tasks = [asyncio.create_task(g.__anext__()) for g in gens]
        await tasks[0]
        ld = e.load()
        assert (ld.active_requests, ld.waiting_requests) == (2, 2)
        assert ld.active_decode_blocks == 6 and ld.kv_blocks_used == 6 and ld.kv_blocks_total == 256
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()
        assert baseline(e) == (0, 0, 0, 0)
        await e.stop()

    run(main)


def test_simulated_timing() -> None:
    async def main() -> None:
        e = mocker(num_blocks=1024)
        await e.start()
        p = prompt_of(1000, seed=8)
        await collect(e, req("cold", p, max_tokens=1))
        await collect(e, req("warm", p, max_tokens=1))
        cold, warm = e.stats["cold"], e.stats["warm"]
        assert cold.prefill_tokens == 1000 and warm.prefill_tokens == 8 and warm.cached_tokens == 992
        assert cold.prefill_ms == e.timing.step_ms(1, 1000) == 10.0 + 0.1 + 2.0 + 70.0
        assert warm.prefill_ms == e.timing.step_ms(1, 8)
        assert cold.ttft_ms > warm.ttft_ms
        # Chunked prefill: a prompt above the token budget takes several steps.
        e2 = mocker(num_blocks=1024, max_num_batched_tokens=256)
        await e2.start()
        steps0 = e2.steps
        await collect(e2, req("long", p, max_tokens=1))
        assert e2.steps - steps0 == 4
        assert e2.stats["long"].prefill_ms == 3 * e2.timing.step_ms(1, 256) + e2.timing.step_ms(1, 232)
        await e.stop()
        await e2.stop()

    run(main)


def test_wall_clock_follows_speedup() -> None:
    async def main() -> None:
        # 20 decode steps of 10.1 simulated ms at speedup 10 take ~20 ms of wall time: only check ordering.
        e = mocker(speedup=10)
        await e.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await collect(e, req("a", prompt_of(16), max_tokens=20))
        assert loop.time() - t0 >= 0.9 * e.stats["a"].total_ms / 10 / 1000
        await e.stop()

    run(main)


def test_prefill_only_pins_and_release() -> None:
    async def main() -> None:
        e = mocker(pin_timeout_s=30)
        await e.start()
        p = prompt_of(50, seed=12)
        toks, outs = await collect(e, req("p", p, max_tokens=64, prefill_only=True))
        kt = outs[-1].kv_transfer
        assert kt is not None and len(toks) == 1 and outs[-1].finish_reason == "length"
        assert kt.num_tokens == 50 and kt.first_token == toks[0] and len(kt.block_ids) == 4 and kt.pin_id
        assert e.load().kv_blocks_used == 4 and e.load().active_requests == 0
        assert await e.release_pin(kt.pin_id) is True
        assert e.load().kv_blocks_used == 0
        assert await e.release_pin(kt.pin_id) is False
        # Unreleased pins expire.
        short = mocker(pin_timeout_s=0.05)
        await short.start()
        _, outs = await collect(short, req("q", p, prefill_only=True))
        assert short.load().kv_blocks_used == 4
        await asyncio.sleep(0.2)
        assert short.load().kv_blocks_used == 0
        assert outs[-1].kv_transfer is not None
        assert await short.release_pin(outs[-1].kv_transfer.pin_id) is False
        await short.stop()
        await e.stop()

    run(main)


def test_disaggregated_output_equals_aggregated() -> None:
    async def main() -> None:
        agg, pre, dec = mocker(), mocker(), mocker(transfer_ms_per_block=0.5)
        for x in (agg, pre, dec):
            await x.start()
        p = prompt_of(70, seed=13)
        want, _ = await collect(agg, req("a", p, max_tokens=12))
        first, pouts = await collect(pre, req("a", p, max_tokens=12, prefill_only=True))
        kt = pouts[-1].kv_transfer
        assert kt is not None and first == want[:1]
        got, douts = await collect(dec, req("a", p, max_tokens=12, kv_transfer=kt))
        assert got == want and douts[-1].finish_reason == "length"
        st = dec.stats["a"]
        assert st.prefill_tokens == 0 and st.transferred_blocks == 5 and st.transfer_ms == 2.5
        assert await pre.release_pin(kt.pin_id)
        # The decode side now caches the prompt: a second transfer only moves what it lacks.
        _, douts = await collect(dec, req("b", p + [9] * 20, max_tokens=3, kv_transfer=KvTransferParams(
            instance_id="x", block_ids=list(range(6)), num_tokens=90, first_token=-1, pin_id="z")))
        assert douts[0].cached_tokens == 64 and dec.stats["b"].transferred_blocks == 2
        assert baseline(dec) == (0, 0, 0, 0)
        for x in (agg, pre, dec):
            await x.stop()

    run(main)


def test_stop_fails_pending_requests() -> None:
    async def main() -> None:
        e = mocker(speedup=1)
        await e.start()
        gen = e.generate(req("a", prompt_of(10), max_tokens=1000))
        await gen.__anext__()
        await e.stop()
        with pytest.raises(Unavailable):
            async for _ in gen:
                pass
        assert baseline(e) == (0, 0, 0, 0)

    run(main)


def test_logprobs() -> None:
    async def main() -> None:
        e = mocker()
        await e.start()
        r = GenerateRequest(request_id="l", token_ids=prompt_of(20), sampling=SamplingParams(logprobs=2),
                            stop=StopConditions(max_tokens=5))
        outs = [o async for o in e.generate(r)]
        lps = [lp for o in outs for lp in (o.logprobs or [])]
        toks = [t for o in outs for t in o.token_ids]
        assert [lp.token_id for lp in lps] == toks
        assert all(lp.logprob < 0 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in lps)
        await e.stop()

    run(main)


def test_flags_env_twins_and_build(tmp_path: Any) -> None:
    p = Parser(env={"DYN_MOCKER_SPEEDUP": "5", "DYN_MOCKER_NUM_BLOCKS": "99"})
    add_flags(p)
    args = p.parse_args(["--num-workers", "3", "--block-size", "32", "--decode-ms-base", "4"])
    assert args.speedup == 5.0 and args.num_blocks == 99 and args.num_workers == 3
    engines = build_engines(args, INFO)
    assert len(engines) == 3 and len({id(x) for x in engines}) == 3
    e = engines[0]
    assert e.block_size == 32 and e.info.block_size == 32 and e.num_blocks == 99 and e.speedup == 5.0
    assert e.timing.decode_ms_base == 4.0 and e.vocab_size == 32000
    assert build_engine(args, INFO).num_blocks == 99
    # With a tokenizer in the model folder, its vocabulary and special ids are used.
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "c": 3, "d": 4}, unk_token="<unk>"))
    tok.add_special_tokens(["<eot>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    info = ModelInfo(name="m", path=str(tmp_path), context_length=64, block_size=16)
    e2 = build_engine(p.parse_args([]), info)
    assert e2.vocab_size == 6

    async def main() -> list[int]:
        await e2.start()
        toks, _ = await collect(e2, req("a", [1, 2, 3], max_tokens=40))
        await e2.stop()
        return toks

    toks = run(main)
    assert set(toks) <= {0, 1, 2, 3, 4} and len(toks) == 40


def test_context_length_flag_overrides_the_card() -> None:
    """--context-length (env DYN_MOCKER_CONTEXT_LENGTH) simulates a long-context model with the same tokenizer:
    the card says so and a prompt past the folder's 4096 is served; without it such a prompt is refused."""
    p = Parser(env={"DYN_MOCKER_CONTEXT_LENGTH": "16384"})
    add_flags(p)
    long_ctx = build_engine(p.parse_args(["--num-blocks", "2048"]), INFO)
    assert long_ctx.info.context_length == 16384 and INFO.context_length == 4096
    p0 = Parser(env={})
    add_flags(p0)
    default = build_engine(p0.parse_args(["--num-blocks", "2048"]), INFO)
    assert default.info.context_length == 4096
    with pytest.raises(ConfigError, match="--context-length: must be at least 1"):
        build_engine(p0.parse_args(["--context-length", "0"]), INFO)

    async def main() -> None:
        for e in (long_ctx, default):
            await e.start()
        toks, outs = await collect(long_ctx, req("a", prompt_of(5000), max_tokens=4))
        assert len(toks) == 4 and outs[-1].finish_reason == "length"
        with pytest.raises(InvalidRequest) as ei:
            await collect(default, req("b", prompt_of(5000), max_tokens=4))
        assert ei.value.code == ErrorCode.CONTEXT_LENGTH
        for e in (long_ctx, default):
            await e.stop()

    run(main)
