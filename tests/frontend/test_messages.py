"""POST /v1/messages (Anthropic Messages) end to end: real etcd, NATS, a mocker worker and frontend processes,
with the official ``anthropic`` SDK as the client.

The mocker's output is a pure function of the prompt, so a Messages request must give exactly the text of
the equivalent chat request (it runs through the chat path).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from frontend.serving import TEST_FAULT_ENV
from tests.stack import Stack

MODEL = "dynamo-tiny"
NS = "messages"
KEY = "sk-test-messages"


@pytest.fixture(scope="module")
def stacks(etcd_server: object, nats_server: object) -> Iterator[tuple[Stack, Stack, Stack]]:
    """A frontend without an API key, one with ``--api-key`` and one that fails every request after 3 tokens
    (the chat path's test fault hook), one mocker worker."""
    etcd, nats = etcd_server.client_url, nats_server.url  # type: ignore[attr-defined]
    a = Stack(etcd, nats, NS)
    a.add_worker("mocker", "agg", "--speedup", "5", "--eos-probability", "0.1", "--served-model-name", MODEL)
    a.start_frontend()
    b = Stack(etcd, nats, NS)
    b.start_frontend("--api-key", KEY)
    f = Stack(etcd, nats, NS)
    f.env[TEST_FAULT_ENV] = "3"
    f.start_frontend()
    try:
        for st in (a, b, f):
            st.wait_ready(n_instances=1)
        yield a, b, f
    finally:
        f.stop()
        b.stop()
        a.stop()


def client(st: Stack, key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=st.url, api_key=key, max_retries=0, timeout=60)


def chat(st: Stack, messages: list[dict[str, object]], max_tokens: int, **kw: object) -> tuple[str, str, int, int]:
    c = openai.OpenAI(base_url=st.url + "/v1", api_key="none", max_retries=0, timeout=60)
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **kw)  # type: ignore[arg-type,call-overload]
    assert r.usage is not None
    return (r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage.prompt_tokens,
            r.usage.completion_tokens)


def test_create_matches_chat(stacks: tuple[Stack, Stack, Stack]) -> None:
    a, _, _ = stacks
    m = client(a).messages.create(model=MODEL, max_tokens=64, system="Be brief.",
                                  messages=[{"role": "user", "content": "Tell me about the sea."}])
    text, reason, prompt_tokens, completion_tokens = chat(
        a, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}], 64)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == text and text  # type: ignore[union-attr]
    assert m.stop_reason == ("max_tokens" if reason == "length" else "end_turn") and m.stop_sequence is None
    assert m.usage.input_tokens == prompt_tokens and m.usage.output_tokens == completion_tokens


def test_system_blocks_and_content_blocks(stacks: tuple[Stack, Stack, Stack]) -> None:
    """Text blocks in ``system`` and in a message are the same prompt as plain strings."""
    a, _, _ = stacks
    c = client(a)
    blocks = c.messages.create(model=MODEL, max_tokens=32, system=[{"type": "text", "text": "Be brief."}],
                               messages=[{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                      {"type": "text", "text": "there"}]}])
    plain = c.messages.create(model=MODEL, max_tokens=32, system="Be brief.",
                              messages=[{"role": "user", "content": "Hi there"}])
    assert blocks.content == plain.content and blocks.usage.input_tokens == plain.usage.input_tokens


def test_stream_matches_create(stacks: tuple[Stack, Stack, Stack]) -> None:
    a, _, _ = stacks
    c = client(a)
    msgs: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hello there"}]
    plain = c.messages.create(model=MODEL, max_tokens=64, messages=msgs)
    with c.messages.stream(model=MODEL, max_tokens=64, messages=msgs) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == plain.content[0].text  # type: ignore[union-attr]
    assert [b.model_dump(exclude={"parsed_output"}) for b in final.content] == \
        [b.model_dump() for b in plain.content]
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens
    # The raw event sequence.
    events = list(c.messages.create(model=MODEL, max_tokens=64, messages=msgs, stream=True))
    types = [e.type for e in events]
    n = types.count("content_block_delta")
    assert n >= 1
    assert types == (["message_start", "content_block_start"] + ["content_block_delta"] * n
                     + ["content_block_stop", "message_delta", "message_stop"])
    raw = httpx.post(a.url + "/v1/messages", json={"model": MODEL, "max_tokens": 8, "stream": True,
                                                  "messages": msgs}, timeout=60)
    names = [ln[7:] for ln in raw.text.splitlines() if ln.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"] and names[-1] == "message_stop"


def test_stop_sequence(stacks: tuple[Stack, Stack, Stack]) -> None:
    """A stop sequence taken from the middle of the unconstrained output: the text ends before it and the
    response names it, streamed and not."""
    a, _, _ = stacks
    c = client(a)
    for prompt in ("Count with me", "Tell me a story", "Write a long poem", "List ten colours"):
        msgs: list[anthropic.types.MessageParam] = [{"role": "user", "content": prompt}]
        full = c.messages.create(model=MODEL, max_tokens=64, messages=msgs).content[0].text  # type: ignore[union-attr]
        if len(full) >= 12:  # the mocker's output is a function of the prompt: some end early on EOS
            break
    assert len(full) >= 12, full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expect = full[: full.index(stop)]
    m = c.messages.create(model=MODEL, max_tokens=64, messages=msgs, stop_sequences=[stop, "\x00never"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == expect  # type: ignore[union-attr]
    with c.messages.stream(model=MODEL, max_tokens=64, messages=msgs, stop_sequences=[stop]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == expect and final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_tool_use_and_tool_result_reach_the_template(stacks: tuple[Stack, Stack, Stack]) -> None:
    """tool_use / tool_result blocks and tools are the same prompt as the chat request with tool_calls and a
    role=tool message."""
    a, _, _ = stacks
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    m = client(a).messages.create(
        model=MODEL, max_tokens=32,
        tools=[{"name": "get_weather", "description": "Weather of a city", "input_schema": schema}],
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                     "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                "content": "sunny"}]}])
    text, _, prompt_tokens, _ = chat(
        a, [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"},
                                                                             separators=(",", ":"))}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}], 32,
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": schema}}])
    assert m.usage.input_tokens == prompt_tokens
    if m.stop_reason != "tool_use":
        assert m.content[0].text == text  # type: ignore[union-attr]


def test_bad_input_anthropic_errors(stacks: tuple[Stack, Stack, Stack]) -> None:
    a, _, _ = stacks
    c = client(a)
    with pytest.raises(anthropic.BadRequestError) as ei:
        c.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert ei.value.status_code == 400
    assert ei.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "messages.0.content.0: image content blocks are not supported by this server"}}
    with pytest.raises(anthropic.NotFoundError) as nf:
        c.messages.create(model="no-such-model", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as tc:
        c.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}],
                          tool_choice={"type": "auto"}, tools=[{"name": "t", "type": "bash_20250124"}])  # type: ignore[list-item]
    assert tc.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    # No max_tokens (the SDK will not send that): the raw body.
    r = httpx.post(a.url + "/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                   timeout=30)
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    r = httpx.post(a.url + "/v1/messages", content=b"{oops", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_api_key_as_x_api_key(stacks: tuple[Stack, Stack, Stack]) -> None:
    _, b, _ = stacks
    m = client(b, KEY).messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert m.type == "message"
    with pytest.raises(anthropic.AuthenticationError) as ei:
        client(b, "wrong").messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert ei.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "invalid or missing API key"}}
    # The OpenAI routes keep their own error shape, and take x-api-key too.
    r = httpx.get(b.url + "/v1/models", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(b.url + "/v1/models", headers={"x-api-key": KEY}, timeout=30).status_code == 200


def test_failure_mid_stream_is_an_error_event(stacks: tuple[Stack, Stack, Stack]) -> None:
    """A failure after the headers went out: an Anthropic ``error`` event ends the stream (the SDK raises it);
    not streamed, a 500 with Anthropic's api_error body."""
    _, _, f = stacks
    c = client(f)
    msgs: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Tell me a long story"}]
    raw = httpx.post(f.url + "/v1/messages", json={"model": MODEL, "max_tokens": 64, "stream": True,
                                                  "messages": msgs}, timeout=60)
    assert raw.status_code == 200
    frames = [fr for fr in raw.text.split("\n\n") if fr]
    assert frames[0].startswith("event: message_start") and frames[-1] == (
        'event: error\ndata: {"type":"error","error":{"type":"api_error",'
        '"message":"internal error: RuntimeError"}}')
    with pytest.raises(anthropic.APIStatusError) as ei:
        with c.messages.stream(model=MODEL, max_tokens=64, messages=msgs) as s:
            for _ in s:
                pass
    assert ei.value.body == {"type": "error", "error": {"type": "api_error",
                                                         "message": "internal error: RuntimeError"}}
    with pytest.raises(anthropic.InternalServerError) as ne:
        c.messages.create(model=MODEL, max_tokens=64, messages=msgs)
    assert ne.value.status_code == 500 and ne.value.body["error"]["type"] == "api_error"  # type: ignore[index]
