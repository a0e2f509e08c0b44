"""frontend/structured.py in-process: which request fields become which GuidedDecoding / logit_bias, and the
tool-call structural tag (compiled here by xgrammar, as the worker would, and walked with a real call)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo_rt.errors import InvalidRequest
from dynamo_rt.protocol import GuidedDecoding
from frontend.openai_protocol import parse_chat, parse_completion, to_sampling

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "get", "parameters": SCHEMA}}


def _chat(**body: Any) -> GuidedDecoding | None:
    req = parse_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **body}).encode())
    return to_sampling(req).sampling.guided


def test_sources_of_a_constraint() -> None:
    spec = json.dumps(SCHEMA, separators=(",", ":"))
    assert _chat() is None
    assert _chat(response_format={"type": "text"}) is None
    assert _chat(response_format={"type": "json_object"}) == GuidedDecoding(kind="json_object")
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    assert _chat(response_format=fmt) == GuidedDecoding(kind="json", spec=spec)
    assert _chat(guided_json=SCHEMA) == GuidedDecoding(kind="json", spec=spec)
    assert _chat(nvext={"guided_json": json.dumps(SCHEMA)}) == GuidedDecoding(kind="json", spec=spec)
    assert _chat(guided_regex="a+") == GuidedDecoding(kind="regex", spec="a+")
    assert _chat(nvext={"guided_choice": ["a", "b", "a"]}) == GuidedDecoding(kind="choice", choices=["a", "b"])
    assert _chat(guided_grammar='root ::= "x"') == GuidedDecoding(kind="grammar", spec='root ::= "x"')
    assert _chat(tools=[TOOL], tool_choice="auto") is None
    assert _chat(tools=[TOOL], tool_choice="none") is None
    comp = parse_completion(json.dumps({"model": "m", "prompt": "x", "guided_regex": "[0-9]"}).encode())
    assert to_sampling(comp).sampling.guided == GuidedDecoding(kind="regex", spec="[0-9]")


def test_logit_bias_mapping() -> None:
    req = parse_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                 "logit_bias": {"5": -100, "17": 2.5}}).encode())
    assert to_sampling(req).sampling.logit_bias == {5: -100.0, 17: 2.5}


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format.json_schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": {"type": 5}}, "guided_json"),
    ({"nvext": {"guided_regex": "("}}, "nvext.guided_regex"),
    ({"guided_grammar": "  "}, "guided_grammar"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tools": [TOOL], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0].function"),
    ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
])
def test_bad_constraints(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        _chat(**body)
    assert e.value.param == param


def test_tool_call_structural_tag_accepts_hermes_calls_only() -> None:
    import xgrammar as xgr  # the engine extra, which make test installs
    weather = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"]}}}

    def accepts(g: GuidedDecoding, text: str) -> bool:
        grammar = xgr.Grammar.from_structural_tag(g.spec)
        matcher = xgr.testing._get_matcher_from_grammar(grammar)  # a byte-level matcher (no tokenizer)
        return bool(matcher.accept_string(text) and matcher.is_terminated())

    one = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    two = one + "\n" + '<tool_call>\n{"name": "get", "arguments": {"a": 3}}\n</tool_call>'
    single = _chat(tools=[weather, TOOL], tool_choice="required", parallel_tool_calls=False)
    multi = _chat(tools=[weather, TOOL], tool_choice="required")
    named = _chat(tools=[weather, TOOL], tool_choice={"type": "function", "function": {"name": "get"}})
    assert single is not None and multi is not None and named is not None
    assert single.kind == "structural_tag"
    assert accepts(single, one) and not accepts(single, two)
    assert accepts(multi, two)
    assert not accepts(single, one.replace("Oslo", "Paris"))  # arguments follow the tool's schema
    assert not accepts(named, one) and accepts(named, '<tool_call>\n{"name": "get", "arguments": {"a": 3}}\n'
                                                       "</tool_call>")
