"""The agent-facing API end to end against ``dynamo-rt up`` (reference engine, the built-in tiny model, its
hermes chat template and card), with the official ``openai`` and ``anthropic`` SDKs as the clients.

The tiny model has random weights, so every tool call and document here is produced under a grammar:
``tool_choice`` required / named / Anthropic's ``any`` and ``tool`` compile the tools' JSON schemas into the
worker's token mask (frontend/structured.py), the frontend's hermes parser (named by the model card, no flag)
turns the text into tool calls, and the SDKs parse what comes back. A pydantic model goes through
``chat.completions.parse``; its fields are bounded (enum, max_length) so a random-weight model closes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.stack import ROOT, free_port, read_until_ready

WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
    "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": False}
TIME_SCHEMA = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
               "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "description": "time in a zone",
                                           "parameters": TIME_SCHEMA}}]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}


class Pet(BaseModel):
    kind: Literal["cat", "dog", "owl"]
    name: str = Field(max_length=6)
    legs: Literal[2, 4]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    port = free_port()
    state: Path = tmp_path_factory.mktemp("sdk") / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_rt", "up", "--engine", "reference", "--http-port", str(port),
         "--state-dir", str(state)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        ready, lines = read_until_ready(proc, 240)
        assert ready is not None, "".join(lines)[-3000:]
        model = ready.rsplit("(model ", 1)[1].rstrip(")")
        yield f"http://127.0.0.1:{port}", model
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _oa(up: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=up[0] + "/v1", api_key="unused", timeout=120, max_retries=0)


def _check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_openai_tool_choice_required_non_streamed_then_tool_result(up: tuple[str, str]) -> None:
    c = _oa(up)
    msgs: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = c.chat.completions.create(model=up[1], messages=msgs, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                  parallel_tool_calls=False, seed=1, max_tokens=120)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and not ch.message.content
    calls = ch.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].type == "function"
    fn = calls[0].function  # type: ignore[union-attr]
    _check_call(fn.name, fn.arguments)
    # The call and its result go back through the chat template; the model answers in text.
    msgs += [ch.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 3}'}]
    r2 = c.chat.completions.create(model=up[1], messages=msgs, tools=TOOLS, max_tokens=6, seed=1)  # type: ignore[arg-type]
    assert r2.choices[0].finish_reason == "length" and r2.usage is not None
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # type: ignore[union-attr]


def test_openai_named_tool_streamed(up: tuple[str, str]) -> None:
    c = _oa(up)
    stream = c.chat.completions.create(
        model=up[1], messages=[{"role": "user", "content": "time?"}], tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=3, max_tokens=200, stream=True)
    calls: dict[int, dict[str, str]] = {}
    reason = None
    content = ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            if tc.id:
                assert not slot["id"]  # id and name come once, first
                slot["id"], slot["name"] = tc.id, tc.function.name or ""  # type: ignore[union-attr]
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        reason = chunk.choices[0].finish_reason or reason
    assert reason == "tool_calls" and content == "" and calls
    for call in calls.values():
        assert call["name"] == "get_time" and call["id"].startswith("call_")
        _check_call(call["name"], call["arguments"])


def test_openai_parse_pydantic_model(up: tuple[str, str]) -> None:
    c = _oa(up)
    for seed in range(3):
        r = c.chat.completions.parse(model=up[1], messages=[{"role": "user", "content": "a pet"}],
                                     response_format=Pet, seed=seed, max_tokens=80)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and r.choices[0].finish_reason == "stop", r.choices[0].message.content


def test_openai_responses_function_call(up: tuple[str, str]) -> None:
    c = _oa(up)
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    r = c.responses.create(model=up[1], input="weather in Lima?", tools=tools, tool_choice="required",  # type: ignore[arg-type]
                           parallel_tool_calls=False, max_output_tokens=120)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1, r.output
    _check_call(calls[0].name, calls[0].arguments)
    # The call's result continues the stored conversation.
    r2 = c.responses.create(model=up[1], previous_response_id=r.id, max_output_tokens=4, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 20}'}])
    assert r2.status == "incomplete" and r2.output_text is not None


def test_anthropic_tool_use_non_streamed_and_streamed(up: tuple[str, str]) -> None:
    c = anthropic.Anthropic(base_url=up[0], api_key="unused", timeout=120, max_retries=0)
    tools: list[Any] = [{"name": t["function"]["name"], "description": t["function"]["description"],
                         "input_schema": t["function"]["parameters"]} for t in TOOLS]
    msg = c.messages.create(model=up[1], max_tokens=120, tools=tools, tool_choice={"type": "any"},
                            messages=[{"role": "user", "content": "weather?"}])
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and uses, msg.content
    for b in uses:
        assert b.name in SCHEMAS
        jsonschema.validate(b.input, SCHEMAS[b.name])
    with c.messages.stream(model=up[1], max_tokens=200, tools=tools,
                           tool_choice={"type": "tool", "name": "get_time"},
                           messages=[{"role": "user", "content": "time?"}]) as s:
        final = s.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and uses and all(b.name == "get_time" for b in uses)
    for b in uses:
        jsonschema.validate(b.input, TIME_SCHEMA)
    # The tool_result goes back as a user turn; the answer is text.
    reply = c.messages.create(model=up[1], max_tokens=5, tools=tools, messages=[
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_time",
                                           "input": uses[0].input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "12:00"}]}])
    assert reply.stop_reason == "max_tokens" and reply.content[0].type == "text"
