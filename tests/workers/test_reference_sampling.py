"""Reference engine sampling and stop conditions on the tiny model: seeds, stop ids, EOS, min/max tokens,
top-k / top-p limits, penalties (sampler unit checks on crafted logits)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from tests.conftest import arun
from workers.common.engine import EngineOutput
from workers.reference.engine import ReferenceEngine
from workers.reference.sampler import SampleSpec, sample, stream_uniform

PROMPT = [17, 401, 93, 1200, 55, 760, 31, 1501, 99, 250, 1000, 7, 1777]


def _req(rid: str, *, max_tokens: int = 24, stop_ids: list[int] | None = None, min_tokens: int = 0,
         ignore_eos: bool = False, prompt: list[int] | None = None, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid, token_ids=list(prompt or PROMPT), sampling=SamplingParams(**sampling),
        stop=StopConditions(max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=stop_ids or [],
                            ignore_eos=ignore_eos))


async def _run(eng: ReferenceEngine, req: GenerateRequest) -> tuple[list[int], list[EngineOutput]]:
    outs = [o async for o in eng.generate(req)]
    return [t for o in outs for t in o.token_ids], outs


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_tiny_model()


def _with_engine(tiny: Path, fn: Any, **kw: Any) -> Any:
    kw.setdefault("num_blocks", 64)

    async def main() -> Any:
        eng = ReferenceEngine(tiny, **kw)
        await eng.start()
        try:
            return await fn(eng)
        finally:
            await eng.stop()

    return arun(main())


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny: Path) -> None:
    async def fn(eng: ReferenceEngine) -> None:
        kw: dict[str, Any] = {"temperature": 1.5, "top_p": 0.95, "top_k": 50}
        a, _ = await _run(eng, _req("a", seed=1234, ignore_eos=True, **kw))
        # Same seed, now sharing steps with other (unseeded and seeded) requests.
        res = await asyncio.gather(_run(eng, _req("b", seed=1234, ignore_eos=True, **kw)),
                                   _run(eng, _req("c", seed=99, ignore_eos=True, **kw)),
                                   _run(eng, _req("d", ignore_eos=True, **kw)))
        b, c = res[0][0], res[1][0]
        assert len(a) == 24
        assert a == b
        assert a != c
        greedy, _ = await _run(eng, _req("g", temperature=0.0, ignore_eos=True))
        assert a != greedy  # temperature 1.5 really samples

    _with_engine(tiny, fn)


def test_top_k_one_and_tiny_top_p_are_greedy(tiny: Path) -> None:
    async def fn(eng: ReferenceEngine) -> None:
        greedy, _ = await _run(eng, _req("g", temperature=0.0, ignore_eos=True))
        k1, _ = await _run(eng, _req("k", temperature=2.0, top_k=1, seed=5, ignore_eos=True))
        p0, _ = await _run(eng, _req("p", temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True))
        assert k1 == greedy
        assert p0 == greedy

    _with_engine(tiny, fn)


def test_stop_ids_max_tokens_min_tokens_and_eos(tiny: Path) -> None:
    async def fn(eng: ReferenceEngine) -> None:
        full, _ = await _run(eng, _req("full", temperature=0.0, max_tokens=20))
        assert len(full) == 20
        # max_tokens ends with "length" at exactly max_tokens.
        toks, outs = await _run(eng, _req("len", temperature=0.0, max_tokens=7))
        assert toks == full[:7] and outs[-1].finish_reason == "length"
        # A stop id ends generation with "stop"; the stop token is the last one returned.
        stop_tok = full[5]
        i = full.index(stop_tok)
        toks, outs = await _run(eng, _req("stop", temperature=0.0, max_tokens=20, stop_ids=[stop_tok]))
        assert toks == full[: i + 1] and outs[-1].finish_reason == "stop"
        # min_tokens keeps it from being produced before min_tokens outputs.
        toks, outs = await _run(eng, _req("min", temperature=0.0, max_tokens=20, stop_ids=[stop_tok],
                                          min_tokens=i + 3))
        assert toks[:i] == full[:i]
        assert stop_tok not in toks[: i + 2]
        assert len(toks) >= i + 3
        assert outs[-1].finish_reason == ("stop" if toks[-1] == stop_tok else "length")
        # The model's EOS stops too, unless ignore_eos (the tiny model never emits its real EOS, so make
        # the greedy token at position i the EOS of this engine).
        eng.info.eos_token_ids = [stop_tok]
        toks, outs = await _run(eng, _req("eos", temperature=0.0, max_tokens=20))
        assert toks == full[: i + 1] and outs[-1].finish_reason == "stop"
        toks, outs = await _run(eng, _req("ign", temperature=0.0, max_tokens=20, ignore_eos=True))
        assert toks == full and outs[-1].finish_reason == "length"

    _with_engine(tiny, fn)


def test_context_limit_ends_with_length(tiny: Path) -> None:
    async def fn(eng: ReferenceEngine) -> None:
        ctx = eng.info.context_length
        prompt = (PROMPT * (ctx // len(PROMPT) + 1))[: ctx - 3]
        toks, outs = await _run(eng, _req("ctx", temperature=0.0, max_tokens=50, prompt=prompt,
                                          ignore_eos=True))
        assert len(toks) == 3 and outs[-1].finish_reason == "length"
        assert outs[0].prompt_tokens == ctx - 3

    _with_engine(tiny, fn, max_batch_tokens=1024, num_blocks=260)


# --------------------------------------------------------------------------------------------- sampler


def test_sampler_penalties_and_suppression() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, 0.0]])
    spec = SampleSpec(temperature=0.0, tokens=[7, 0], prompt_len=1)  # prompt [7], output [0]
    assert sample(logits, [spec])[0] == [0]
    spec.presence_penalty = 1.5  # 5 - 1.5 < 4
    assert sample(logits, [spec])[0] == [1]
    spec.presence_penalty = 0.0
    spec.frequency_penalty = 0.6
    spec.tokens = [7, 0, 0]  # 5 - 2*0.6 = 3.8 < 4
    assert sample(logits, [spec])[0] == [1]
    rep = SampleSpec(temperature=0.0, tokens=[0, 1], prompt_len=2, repetition_penalty=2.0)
    assert sample(logits, [rep])[0] == [2]  # 5/2, 4/2 < 3
    neg = SampleSpec(temperature=0.0, tokens=[3], prompt_len=1, repetition_penalty=2.0)
    assert sample(torch.tensor([[-1.0, -3.0, -4.0, -0.6, -5.0]]), [neg])[0] == [0]  # -0.6*2 < -1
    sup = SampleSpec(temperature=0.0, suppress=(0, 1))
    toks, lps = sample(logits, [sup])
    assert toks == [2] and lps == [None]


def test_sampler_top_k_min_p_limits_and_logprobs() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, -10.0, 1.6]]).repeat(200, 1)
    specs = [SampleSpec(temperature=1.0, top_k=2, seed=i) for i in range(200)]
    toks, _ = sample(logits, specs)
    assert set(toks) == {0, 1}
    specs = [SampleSpec(temperature=1.0, min_p=0.95) for _ in range(200)]
    toks, _ = sample(logits, specs)
    assert set(toks) <= {0, 1} and 0 in toks  # p1/p0 = e^-0.1 = 0.905 < 0.95 -> only token 0
    assert set(toks) == {0}
    toks, lps = sample(logits[:1], [SampleSpec(temperature=0.0, logprobs=2)])
    ref = torch.log_softmax(logits[0], -1)
    lp = lps[0]
    assert lp is not None and lp.token_id == 0
    assert lp.logprob == pytest.approx(ref[0].item(), abs=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]


def test_random_stream_is_splitmix64_and_depends_on_seed_position_only() -> None:
    # splitmix64 seeded with 0: its first output is 0xE220A8397B1DCDAF (the published test vector).
    assert stream_uniform(0, 0) == (0xE220A8397B1DCDAF >> 11) / 2.0**53
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    alone = [sample(logits[i:i + 1], [SampleSpec(temperature=0.9, top_p=0.9, seed=11, position=i)])[0][0]
             for i in range(6)]
    batched = sample(logits, [SampleSpec(temperature=0.9, top_p=0.9, seed=11, position=i) for i in range(6)])[0]
    assert alone == batched  # the batch around a row does not move its draw
    mixed = [SampleSpec(temperature=0.0)] + [SampleSpec(temperature=0.9, top_p=0.9, seed=11, position=i)
                                            for i in range(1, 6)]
    assert sample(logits, mixed)[0][1:] == batched[1:]


def test_inverse_cdf_draw_runs_in_token_id_order_and_follows_the_distribution() -> None:
    # Token-id order, whatever the probabilities: u in [0, .25) -> 0, [.25, .75) -> 1, [.75, 1) -> 3.
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.0, 0.25]]))
    n = 4000
    toks = sample(logits.repeat(n, 1), [SampleSpec(temperature=1.0, seed=5, position=i) for i in range(n)])[0]
    for i, tok in enumerate(toks):
        u = stream_uniform(5, i)
        assert tok == (0 if u < 0.25 else 1 if u < 0.75 else 3), (u, tok)
    assert abs(toks.count(0) / n - 0.25) < 0.03 and abs(toks.count(1) / n - 0.5) < 0.03
    assert 2 not in toks


def test_resume_at_output_offset_equals_the_uninterrupted_run(tiny: Path) -> None:
    """What a migration sends: prompt + the first k outputs with output_offset=k, to an agg worker or as a
    prefill-only request plus a decode request that continues from its first token. In float64 (the
    replayable mode) tokens and logprobs equal the uninterrupted run's bit for bit; the presence / frequency
    penalties are strong, so counting the tail as prompt would show."""
    sp: dict[str, Any] = {"temperature": 1.1, "top_p": 0.9, "seed": 4242, "logprobs": 2,
                          "presence_penalty": 1.5, "frequency_penalty": 1.0}

    async def run(eng: ReferenceEngine, rid: str, toks: list[int], off: int, n: int,
                  **kw: Any) -> tuple[list[int], list[Any], Any]:
        req = GenerateRequest(request_id=rid, token_ids=toks, output_offset=off, sampling=SamplingParams(**sp),
                              stop=StopConditions(max_tokens=n, ignore_eos=True), **kw)
        outs = [o async for o in eng.generate(req)]
        kt = next((o.kv_transfer for o in outs if o.kv_transfer is not None), None)
        return [t for o in outs for t in o.token_ids], [lp for o in outs for lp in o.logprobs or []], kt

    async def fn(eng: ReferenceEngine) -> None:
        n = 40
        base, base_lp, _ = await run(eng, "base", PROMPT, 0, n)
        for k in (1, 9, 23):
            got, lp, _ = await run(eng, f"agg{k}", PROMPT + base[:k], k, n - k)
            assert got == base[k:] and lp == base_lp[k:], k
            first, first_lp, kt = await run(eng, f"pre{k}", PROMPT + base[:k], k, n - k, prefill_only=True)
            assert first == base[k:k + 1] and first_lp == base_lp[k:k + 1] and kt is not None
            got, _, _ = await run(eng, f"dec{k}", PROMPT + base[:k], k, n - k, kv_transfer=kt)
            assert got == base[k:], k
        as_prompt, _, _ = await run(eng, "noff", PROMPT + base[:9], 0, n - 9)
        assert as_prompt != base[9:]  # the same tokens as prompt: other penalties, other draws

    _with_engine(tiny, fn, dtype="float64")
