"""Reference engine structured outputs in-process on the tiny model: grammar masks, the grammar cache, replay over
``output_offset`` (migration), a grammar that ends under ``ignore_eos``, ``logit_bias``, and the token masks
that make up for xgrammar's control-byte and surrogate gaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from dynamo_rt.errors import InvalidRequest
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, GuidedDecoding, SamplingParams, StopConditions
from tests.conftest import arun
from workers.reference.engine import ReferenceEngine
from workers.reference.guided import TokenMasks, constrain
from workers.reference.sampler import SampleSpec

PROMPT = [17, 401, 93, 1200, 55, 760, 31, 1501, 99, 250]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "k": {"enum": ["a", "b"]}},
          "required": ["name", "n", "k"], "additionalProperties": False}
JSON = GuidedDecoding(kind="json", spec=json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_tiny_model()


def _req(rid: str, prompt: list[int] | None = None, *, max_tokens: int = 80, ignore_eos: bool = False,
         output_offset: int = 0, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=list(prompt or PROMPT), sampling=SamplingParams(**sampling),
                           stop=StopConditions(max_tokens=max_tokens, ignore_eos=ignore_eos),
                           output_offset=output_offset)


async def _run(eng: ReferenceEngine, req: GenerateRequest) -> tuple[list[int], str | None]:
    outs = [o async for o in eng.generate(req)]
    return [t for o in outs for t in o.token_ids], outs[-1].finish_reason


def _with_engine(tiny: Path, fn: Any) -> Any:
    async def main() -> Any:
        eng = ReferenceEngine(tiny, num_blocks=128)
        await eng.start()
        try:
            return await fn(eng)
        finally:
            await eng.stop()

    return arun(main(), 180)


def test_json_schema_outputs_validate_and_grammars_are_cached(tiny: Path) -> None:
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))

    async def fn(eng: ReferenceEngine) -> None:
        for seed in range(8):
            ids, reason = await _run(eng, _req(f"j{seed}", temperature=1.0, seed=seed, guided=JSON))
            assert reason == "stop"
            assert ids[-1] in eng.info.eos_token_ids  # the grammar ended: only EOS was allowed
            jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), SCHEMA)
        assert eng.grammars is not None and eng.grammars.compiles == 1

    _with_engine(tiny, fn)


def test_output_offset_replays_the_grammar(tiny: Path) -> None:
    """A migrated request (prompt + output so far, ``output_offset``) continues the same document: greedy, the
    continuation is exactly the rest of the uninterrupted output."""
    async def fn(eng: ReferenceEngine) -> None:
        full, reason = await _run(eng, _req("full", temperature=0.0, guided=JSON))
        assert reason == "stop" and len(full) > 10
        for k in (1, 5, len(full) - 2):
            rest, reason = await _run(eng, _req(f"m{k}", PROMPT + full[:k], output_offset=k, max_tokens=80 - k,
                                                temperature=0.0, guided=JSON))
            assert full[:k] + rest == full and reason == "stop"
        # Without the replay the grammar would restart at "{": the same prompt gives another document.
        fresh, _ = await _run(eng, _req("fresh", PROMPT + full[:5], max_tokens=75, temperature=0.0, guided=JSON))
        assert full[:5] + fresh != full
        # Output that does not fit the grammar cannot be resumed.
        bad = [*PROMPT, full[1], full[0]]
        with pytest.raises(InvalidRequest) as e:
            await _run(eng, _req("bad", bad, output_offset=2, temperature=0.0, guided=JSON))
        assert e.value.param == "output_offset"

    _with_engine(tiny, fn)


def test_grammar_end_stops_even_with_ignore_eos_and_bad_grammar_is_invalid(tiny: Path) -> None:
    async def fn(eng: ReferenceEngine) -> None:
        ids, reason = await _run(eng, _req("c", ignore_eos=True, temperature=0.0,
                                           guided=GuidedDecoding(kind="choice", choices=["yes", "no"])))
        assert reason == "stop" and ids[-1] in eng.info.eos_token_ids and len(ids) <= 4
        with pytest.raises(InvalidRequest) as e:
            await _run(eng, _req("g", guided=GuidedDecoding(kind="grammar", spec="root ::= nothing_here")))
        assert e.value.param == "guided_grammar"
        with pytest.raises(InvalidRequest) as e:
            await _run(eng, _req("k", guided=GuidedDecoding(kind="yaml")))
        assert e.value.param == "guided"

    _with_engine(tiny, fn)


def test_logit_bias(tiny: Path) -> None:
    async def fn(eng: ReferenceEngine) -> None:
        greedy, _ = await _run(eng, _req("g", temperature=0.0, max_tokens=8, ignore_eos=True))
        forced, _ = await _run(eng, _req("f", temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={42: 100.0}))
        assert forced == [42] * 8
        banned, _ = await _run(eng, _req("b", temperature=0.0, max_tokens=8, ignore_eos=True,
                                         logit_bias={greedy[0]: -100.0}))
        assert banned[0] != greedy[0]
        with pytest.raises(InvalidRequest) as e:
            await _run(eng, _req("x", logit_bias={eng.vocab_size: 1.0}))
        assert e.value.param == "logit_bias"

    _with_engine(tiny, fn)


def test_rows_without_grammar_or_bias_pay_nothing() -> None:
    logits = torch.randn(3, 64)
    before = logits.clone()
    specs = [SampleSpec(temperature=0.0), SampleSpec(temperature=1.0), SampleSpec(temperature=0.5)]
    assert constrain(logits, specs) is logits and torch.equal(logits, before)  # untouched
    specs[1].bias = (torch.tensor([3]), torch.tensor([5.0]))
    out = constrain(logits, specs)  # in place
    assert out is logits
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    assert out[1, 3] == before[1, 3] + 5.0
    keep = torch.arange(64) != 3
    assert torch.equal(out[1, keep], before[1, keep])


def test_token_masks() -> None:
    table = [b"a", b"\xed\xa0\x80", b"x\xed", b"\xa5b", b"\x01", b"\n", b"\xed\x9f\xbf"]
    m = TokenMasks(table)
    assert m.bad_utf8 == {1}  # ED A0 80 encodes a surrogate; ED 9F BF is U+D7FF
    assert m.control == {4}  # control bytes but newline
    assert m.ends_ed == {2}
    allowed_after_ed = [i for i in range(len(table)) if (int(m.after_ed[i // 32]) >> (i % 32)) & 1]
    assert allowed_after_ed == [0, 1, 2, 4, 5, 6]  # a continuation byte A0..BF cannot follow a dangling ED


def test_left_out_tokens_are_never_allowed(tiny: Path) -> None:
    """Tokens with a control byte are out of the JSON kinds' tables (and in the others'), surrogates out of all."""
    import xgrammar as xgr

    from workers.reference.guided import GrammarCache

    gc = GrammarCache(tiny, 2048, [2, 0])
    json_guide = gc.guide(GuidedDecoding(kind="json", spec='{"type": "string"}'))
    regex_guide = gc.guide(GuidedDecoding(kind="regex", spec="[\\x00-\\x7f]*"))
    masks = json_guide.masks
    assert masks.control and masks.ends_ed

    def allowed(g: Any) -> set[int]:
        mask = xgr.allocate_token_bitmask(1, 2048)
        g.matcher.fill_next_token_bitmask(mask, 0)
        return {i for i in range(2048) if (int(mask[0, i // 32]) >> (i % 32)) & 1}

    assert json_guide.accept(8)  # the opening quote
    inside = allowed(json_guide)
    assert inside and not inside & (masks.control | masks.bad_utf8)
    assert allowed(regex_guide) & masks.control  # a regex may want a tab
