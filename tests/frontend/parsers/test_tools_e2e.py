"""Tool calls end to end: real etcd, NATS, a mocker worker serving the tiny model, a frontend process, the
``openai`` SDK as the client.

The random-weight model never writes a tool call by itself, so the frontend runs with the test-only input
hook (``frontend/chat_output.py`` ``TEST_OUTPUT_ENV``): the choices that get parsers see a known Hermes text
in place of the model's, cut into deltas as the model's tokens arrive. Everything else is the real path:
request validation, the worker's model card naming ``hermes`` (from the tiny model's chat template; the
frontend has no --tool-call-parser), the serving hook, SSE framing and the SDK's delta assembly. A request
without tools shows the model's own text: the hook is off there. (The full end-to-end test, where the tiny
model itself writes the call under the structured-output grammar of tool_choice required, belongs with
that grammar.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from frontend.chat_output import TEST_OUTPUT_ENV
from tests.stack import Stack

MODEL = "dynamo-tiny"
TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
CALLS = [("get_weather", {"city": "Zürich", "days": 2}), ("get_time", {})]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
MESSAGES: list[Any] = [{"role": "user", "content": "Weather in Zürich?"}]


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "tools")  # type: ignore[attr-defined]
    st.env[TEST_OUTPUT_ENV] = TEXT
    st.add_worker("mocker", "agg", "--speedup", "5", "--served-model-name", MODEL)
    st.start_frontend()
    try:
        st.wait_ready(n_instances=1)
        yield st
    finally:
        st.stop()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="none", timeout=60)


def test_non_streamed_tool_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=8)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "Let me check."
    calls = ch.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == CALLS  # type: ignore[union-attr]
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)


def test_streamed_tool_calls_assemble_to_the_same(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=8,
                                            stream=True)
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        ch = chunk.choices[0]
        reasons.append(ch.finish_reason)
        if ch.delta.content:
            content.append(ch.delta.content)
        for tc in ch.delta.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.function and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function is not None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert "".join(content) == "Let me check."
    for piece in content:  # no marker, nor the start of one, in any content delta
        assert "<" not in piece
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == CALLS
    assert reasons[-1] == "tool_calls" and all(r is None for r in reasons[:-1])


def test_calls_are_counted(stack: Stack, client: openai.OpenAI) -> None:
    before = stack.metric("dynamo_frontend_tool_calls_total")
    client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=4)
    assert stack.metric("dynamo_frontend_tool_calls_total") == before + 2
    assert stack.metric("dynamo_frontend_tool_call_parse_failures_total") == 0


def test_two_streamed_choices_each_get_the_calls(stack: Stack) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 6, "n": 2, "stream": True,
            "parallel_tool_calls": False}
    r = httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    names: dict[int, list[str]] = {0: [], 1: []}
    finish: dict[int, str] = {}
    for line in r.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ch = json.loads(line[6:])["choices"][0]
        for tc in ch["delta"].get("tool_calls", []):
            if "id" in tc:
                names[ch["index"]].append(tc["function"]["name"])
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert names == {0: ["get_weather"], 1: ["get_weather"]}  # parallel_tool_calls false: the first call only
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    assert r.text.endswith("data: [DONE]\n\n")


def test_without_tools_the_model_text_is_untouched(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and ch.message.tool_calls is None
    assert ch.message.content and ch.message.content != TEXT[: len(ch.message.content)]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_bad_tool_choice_is_a_400_error_body(stack: Stack) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    r = httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "tool_choice names function 'nope', which is not in tools",
                                  "type": "invalid_request_error", "param": "tool_choice",
                                  "code": "invalid_request"}}


THINKING = "<think>The user wants weather.</think>" + TEXT


@pytest.fixture(scope="module")
def reasoning_stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    """A frontend with --reasoning-parser qwen3 (the card names none) over its own mocker worker."""
    st = Stack(etcd_server.client_url, nats_server.url, "toolsreason")  # type: ignore[attr-defined]
    st.env[TEST_OUTPUT_ENV] = THINKING
    st.add_worker("mocker", "agg", "--speedup", "5", "--served-model-name", MODEL)
    st.start_frontend("--reasoning-parser", "qwen3")
    try:
        st.wait_ready(n_instances=1)
        yield st
    finally:
        st.stop()


def test_reasoning_and_calls_streamed_and_not(reasoning_stack: Stack) -> None:
    client = openai.OpenAI(base_url=reasoning_stack.url + "/v1", api_key="none", timeout=60)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=8)
    msg = r.choices[0].message
    assert getattr(msg, "reasoning_content", None) == "The user wants weather."
    assert msg.content == "Let me check." and len(msg.tool_calls or []) == 2
    reasoning = content = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=8,
                                                stream=True):
        d = chunk.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        piece = d.content or ""
        assert "<" not in piece  # neither a think nor a tool-call marker, nor the start of one
        content += piece
    assert (reasoning, content) == ("The user wants weather.", "Let me check.")
