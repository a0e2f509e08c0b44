"""Structured outputs end to end: response_format json_schema / json_object, guided regex / choice / grammar,
tool_choice required / named, logit_bias and their 400s, through a real frontend and reference worker on the
tiny model (random weights: every document is valid only because the grammar makes it so)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from tokenizers import Tokenizer

from dynamo_rt.local.tinymodel import ensure_tiny_model
from tests.conftest import arun
from tests.stack import Stack

MODEL = "dynamo-tiny"
# Bounded (maxLength, enum, maxItems, integer ranges): under a grammar a random-weight model closes a string
# or an array only when the schema bounds it.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lagos"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}}}
CALL_RE = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "structured")  # type: ignore[attr-defined]
    st.add_worker("reference", "agg", "--kv-cache-blocks", "2048", "--max-num-seqs", "64")
    st.start_frontend()
    try:
        st.wait_ready(1)
        yield st
    finally:
        st.stop()


def _chat(st: Stack, content: str = "hello", **body: Any) -> httpx.Response:
    return httpx.post(st.url + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": [{"role": "user", "content": content}], **body})


def _ok(r: httpx.Response) -> tuple[str, str, dict[str, Any]]:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"].get("content") or "", choice["finish_reason"], choice["message"]


def test_json_schema_100_seeded_requests_validate(stack: Stack) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    async def main() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=300) as c:
            async def one(i: int) -> dict[str, Any]:
                r = await c.post(stack.url + "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": f"person {i}"}], "seed": i,
                    "temperature": 1.0, "max_tokens": 200, "response_format": fmt})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]  # type: ignore[no-any-return]
            return await asyncio.gather(*[one(i) for i in range(100)])

    choices = arun(main(), 600)
    docs = []
    for ch in choices:
        assert ch["finish_reason"] == "stop", ch
        doc = json.loads(ch["message"]["content"])
        jsonschema.validate(doc, PERSON)
        docs.append(json.dumps(doc))
    assert len(set(docs)) > 50  # seeds really sample different documents
    # Seeded: the same seed gives the same document.
    again, _, _ = _ok(_chat(stack, "person 7", seed=7, temperature=1.0, max_tokens=200, response_format=fmt))
    assert again == choices[7]["message"]["content"]


def test_guided_json_extension_field_and_streaming(stack: Stack) -> None:
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
             "required": ["ok", "n"], "additionalProperties": False}
    text, reason, _ = _ok(_chat(stack, guided_json=small, temperature=0, max_tokens=50))
    assert reason == "stop"
    jsonschema.validate(json.loads(text), small)
    nv, _, _ = _ok(_chat(stack, nvext={"guided_json": json.dumps(small)}, temperature=0, max_tokens=50))
    assert nv == text
    streamed = ""
    finish = None
    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "guided_json": small,
            "temperature": 0, "max_tokens": 50, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                for ch in ev["choices"]:
                    streamed += ch["delta"].get("content") or ""
                    finish = ch.get("finish_reason") or finish
    assert (streamed, finish) == (text, "stop")


def test_json_object(stack: Stack) -> None:
    for seed in range(4):
        text, reason, _ = _ok(_chat(stack, response_format={"type": "json_object"}, seed=seed, max_tokens=400))
        assert text.startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # unbounded strings: the document may still be open at max_tokens
            assert reason == "length"


def test_regex_choice_grammar(stack: Stack) -> None:
    rx = r"[a-z]{3,8}-[0-9]{2,4}"
    for seed in range(3):
        text, reason, _ = _ok(_chat(stack, guided_regex=rx, seed=seed, max_tokens=40))
        assert reason == "stop" and re.fullmatch(rx, text), text
    choices = ["red", "green", "blue sky"]
    for seed in range(4):
        text, reason, _ = _ok(_chat(stack, guided_choice=choices, seed=seed, max_tokens=20))
        assert reason == "stop" and text in choices
    grammar = 'root ::= "(" item ("," item){0,3} ")"\nitem ::= [0-9] | "x" [a-c]'
    for seed in range(3):
        text, reason, _ = _ok(_chat(stack, nvext={"guided_grammar": grammar}, seed=seed, max_tokens=40))
        assert reason == "stop" and re.fullmatch(r"\((?:[0-9]|x[a-c])(?:,(?:[0-9]|x[a-c])){0,3}\)", text), text


def _calls(message: dict[str, Any], content: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of each tool call, as the frontend's tool-call parser (hermes, named by the tiny
    model's card) returned them: the grammar's output parses whole, nothing is left in content."""
    assert message.get("tool_calls") and not content, message
    assert not CALL_RE.search(content or "")
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


def test_tool_choice_required_and_named(stack: Stack) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    names = set()
    for seed in range(4):
        content, reason, msg = _ok(_chat(stack, "weather?", tools=[WEATHER, TIME], tool_choice="required",
                                         parallel_tool_calls=False, seed=seed, max_tokens=120))
        calls = _calls(msg, content)
        assert len(calls) == 1, content
        name, args = calls[0]
        jsonschema.validate(args, schemas[name])
        names.add(name)
        assert reason == "tool_calls"
    for seed in range(3):
        content, _, msg = _ok(_chat(stack, "time?", tools=[WEATHER, TIME], seed=seed, max_tokens=200,
                                    tool_choice={"type": "function", "function": {"name": "get_time"}}))
        calls = _calls(msg, content)
        assert calls and all(n == "get_time" for n, _ in calls)
        for _, args in calls:
            jsonschema.validate(args, schemas["get_time"])


def test_logit_bias(stack: Stack) -> None:
    tok = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json"))
    tid = tok.token_to_id("Paris") or tok.encode(" the").ids[0]
    base, _, _ = _ok(_chat(stack, temperature=0, max_tokens=6))
    forced, _, _ = _ok(_chat(stack, temperature=0, max_tokens=6, logit_bias={str(tid): 100}))
    assert forced == tok.decode([tid] * 6)
    assert base != forced
    # -100 on every token of the greedy answer's first step changes it.
    first = tok.encode(base).ids[0]
    other, _, _ = _ok(_chat(stack, temperature=0, max_tokens=6, logit_bias={str(first): -100}))
    assert not other.startswith(tok.decode([first]))


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"nvext": {"guided_grammar": "this is not ebnf"}}, "nvext.guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),  # outside the vocabulary: the worker refuses it
])
def test_bad_input_is_400_naming_the_param(stack: Stack, body: dict[str, Any], param: str) -> None:
    r = _chat(stack, max_tokens=5, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if err["param"] is None:  # compiled (and refused) by the worker: its error frame names it in the message
        assert param.rsplit(".", 1)[-1] in err["message"], err
    else:
        assert err["param"] == param, err
    assert stack.frontend is not None
    assert "Traceback" not in stack.frontend.output()
    assert all("Traceback" not in w.output() for w in stack.workers)
