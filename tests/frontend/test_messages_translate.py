"""The /v1/messages translation, both ways, without a stack: Anthropic content blocks -> chat messages, chat
results / chat chunks (tool calls and reasoning in the chat path's OpenAI shape) -> content blocks and the
Anthropic event sequence, every event and message checked against the anthropic SDK's own types."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import orjson
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent

from dynamo_rt import errors
from frontend import messages as M

try:  # newer anthropic SDKs run on httpx2 and refuse httpx objects
    import httpx2 as httpx
except ImportError:
    import httpx  # type: ignore[no-redef]

EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)


def req(**kw: Any) -> M.MessagesRequest:
    return M.parse(orjson.dumps({"model": "m", "max_tokens": 16,
                                 "messages": [{"role": "user", "content": "hi"}], **kw}))


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in raw.split(b"\n\n"):
        if not frame:
            continue
        name, data = frame.split(b"\n")
        ev = orjson.loads(data[6:])
        assert name == b"event: " + ev["type"].encode()
        if ev["type"] not in ("ping", "error"):
            EVENT.validate_python(ev)
        out.append(ev)
    return out


def rebuild(evs: list[dict[str, Any]]) -> dict[str, Any]:
    """The message a client assembles from the events (what the SDK's stream helper does)."""
    msg: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for e in evs:
        if e["type"] == "message_start":
            msg = dict(e["message"], content=[])
        elif e["type"] == "content_block_start":
            assert e["index"] == len(msg["content"])
            msg["content"].append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            block, d = msg["content"][e["index"]], e["delta"]
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                block["thinking"] += d["thinking"]
            else:
                partial[e["index"]] = partial.get(e["index"], "") + d["partial_json"]
        elif e["type"] == "content_block_stop" and e["index"] in partial:
            msg["content"][e["index"]]["input"] = json.loads(partial[e["index"]])
        elif e["type"] == "message_delta":
            msg.update(e["delta"])
            msg["usage"]["output_tokens"] = e["usage"]["output_tokens"]
    return msg


def test_blocks_to_chat_messages() -> None:
    r = req(system=[{"type": "text", "text": "sys"}], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "need a tool", "signature": "x"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "t", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "12:00"}]},
            {"type": "text", "text": "Thanks"}]},
    ])
    assert M.chat_messages(r) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "need a tool", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "12:00"},
        {"role": "user", "content": "Thanks"},
    ]


def test_request_to_chat_body() -> None:
    r = req(stream=True, temperature=0.2, top_p=0.8, top_k=5, stop_sequences=["END"],
            tools=[{"name": "w", "description": "weather", "input_schema": {"type": "object"}}],
            tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert M.to_chat(r) == {
        "model": "m", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "top_p": 0.8, "top_k": 5,
        "stop": ["END"], "include_stop_str_in_output": True,
        "tools": [{"type": "function", "function": {"name": "w", "description": "weather",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required", "parallel_tool_calls": False,
    }
    assert M.chat_tool_choice({"type": "tool", "name": "w"}) == {"type": "function", "function": {"name": "w"}}
    assert M.chat_tool_choice({"type": "none"}) == "none"
    assert M.chat_tool_choice({"type": "auto"}) == "auto"


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages.0.content.0: image content blocks are not supported by this server"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
     "messages.0.content.0: content block type 'tool_use' is not supported in a user message"),
    ({"messages": [{"role": "system", "content": "x"}]},
     "messages.0.role: must be 'user' or 'assistant', got 'system'"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages.0.content.0.tool_use_id: Field required"),
    ({"tools": [{"name": "x"}]}, "tools.0.input_schema: Field required"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools.0: tools of type 'web_search_20250305' are not supported (only custom tools)"),
    ({"tool_choice": {"type": "maybe"}}, "tool_choice.type: must be auto, any, tool or none, got 'maybe'"),
    ({"max_tokens": 0}, "max_tokens: must be >= 1, got 0"),
])
def test_bad_requests(body: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidRequest) as ei:
        M.to_chat(req(**body))
    assert ei.value.message == message
    assert M.error_obj(ei.value) == ({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": message}}, 400)


def test_error_mapping() -> None:
    cases = [(errors.NotFound("x"), "not_found_error", 404), (errors.Unauthorized("x"), "authentication_error", 401),
             (errors.Overloaded("x"), "rate_limit_error", 429), (errors.Unavailable("x"), "overloaded_error", 529),
             (errors.DeadlineExceeded("x"), "timeout_error", 504), (errors.DynamoError("x"), "api_error", 500)]
    for exc, kind, status in cases:
        body, got = M.error_obj(exc)
        assert (body["error"]["type"], got) == (kind, status)
    assert M.error_response(errors.Overloaded("x", retry_after=3)).headers["retry-after"] == "3"
    assert M.error_event(errors.Unavailable("gone")) == \
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"gone"}}\n\n'


MESSAGE = {"role": "assistant", "content": "Let me check.", "reasoning_content": "The user wants weather.",
           "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "w", "arguments": '{"c":1}'}},
                          {"id": "call_b", "type": "function", "function": {"name": "t", "arguments": "{}"}}]}


def test_chat_message_to_content_blocks() -> None:
    blocks = M.content_blocks(MESSAGE, MESSAGE["content"])
    assert blocks == [{"type": "thinking", "thinking": "The user wants weather.", "signature": ""},
                      {"type": "text", "text": "Let me check."},
                      {"type": "tool_use", "id": "call_a", "name": "w", "input": {"c": 1}},
                      {"type": "tool_use", "id": "call_b", "name": "t", "input": {}}]
    msg = M.message_obj("msg_1", "m", blocks, M.stop_reason("tool_calls", None), None, 7, 5)
    Message.model_validate(msg)
    assert msg["stop_reason"] == "tool_use"
    assert M.stop_reason("length", None) == "max_tokens" and M.stop_reason("stop", None) == "end_turn"
    assert M.stop_reason("stop", "END") == "stop_sequence"
    assert M.split_stop("abcEND", ["END", "D"]) == ("abc", "END")


def feed_all(tr: M.EventTranslator, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raw = tr.start()
    for c in chunks:
        raw += tr.feed(c)
    return events(raw + tr.finish())


USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_stream_thinking_text_and_tool_use() -> None:
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "The user "}), chunk({"reasoning_content": "wants weather."}),
        chunk({"content": "Let me "}), chunk({"content": "check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "w", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"c":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "t", "arguments": "{}"}}]}),
        chunk({}, finish="tool_calls"),
        chunk(None, usage=USAGE),
    ]
    evs = feed_all(M.EventTranslator("msg_1", "m", 7), chunks)
    assert [e["type"] for e in evs] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert [e["delta"]["type"] for e in evs if e["type"] == "content_block_delta"] == [
        "thinking_delta", "thinking_delta", "text_delta", "text_delta", "input_json_delta", "input_json_delta",
        "input_json_delta"]
    msg = rebuild(evs)
    # Streamed and non-streamed give the same message.
    assert msg == M.message_obj("msg_1", "m", M.content_blocks(MESSAGE, MESSAGE["content"]), "tool_use", None, 7, 5)
    Message.model_validate(msg)


def test_stream_holds_back_the_stop_sequence() -> None:
    stream = [chunk({"content": "abc"}), chunk({"content": "deS"}), chunk({"content": "TOP"}),
              chunk({}, finish="stop"), chunk(None, usage=USAGE)]
    evs = feed_all(M.EventTranslator("msg_1", "m", 7, ["STOP"]), stream)
    texts = [e["delta"]["text"] for e in evs if e["type"] == "content_block_delta"]
    assert "".join(texts) == "abcde" and all("S" not in t for t in texts)
    assert evs[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
    # No stop sequence at the end: the held-back text is sent, end_turn.
    evs = feed_all(M.EventTranslator("msg_1", "m", 7, ["STOP"]),
                   [chunk({"content": "abcST"}), chunk({}, finish="stop"), chunk(None, usage=USAGE)])
    assert "".join(e["delta"]["text"] for e in evs if e["type"] == "content_block_delta") == "abcST"
    assert evs[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    # At max_tokens the text is the text even if it ends like a stop sequence.
    evs = feed_all(M.EventTranslator("msg_1", "m", 7, ["STOP"]),
                   [chunk({"content": "xSTOP"}), chunk({}, finish="length"), chunk(None, usage=USAGE)])
    assert rebuild(evs)["content"] == [{"type": "text", "text": "xSTOP"}]
    assert evs[-2]["delta"]["stop_reason"] == "max_tokens"


def test_stream_nothing_generated() -> None:
    evs = feed_all(M.EventTranslator("msg_1", "m", 7), [chunk({"role": "assistant", "content": ""}),
                                                        chunk({}, finish="stop"), chunk(None, usage=USAGE)])
    assert rebuild(evs)["content"] == [{"type": "text", "text": ""}]
    assert evs[-2]["delta"]["stop_reason"] == "end_turn" and evs[-2]["usage"] == {"output_tokens": 5}


def test_sdk_stream_helper_assembles_the_translated_events() -> None:
    """The anthropic SDK's own stream accumulator (``messages.stream``), fed our translated events over an
    in-process transport, assembles the same message as the non-streamed translation."""
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "The user wants weather."}),
              chunk({"content": "Let me check."}),
              chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                     "function": {"name": "w", "arguments": '{"c":'}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                     "function": {"name": "t", "arguments": "{}"}}]}),
              chunk({}, finish="tool_calls"), chunk(None, usage=USAGE)]
    tr = M.EventTranslator("msg_1", "m", 7)
    body = tr.start() + b"".join(tr.feed(c) for c in chunks) + tr.finish()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = anthropic.Anthropic(base_url="http://frontend", api_key="none",
                                 http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with client.messages.stream(model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    got = final.model_dump(exclude_none=True)
    for block in got["content"]:
        block.pop("parsed_output", None)
    want = M.message_obj("msg_1", "m", M.content_blocks(MESSAGE, MESSAGE["content"]), "tool_use", None, 7, 5)
    assert got == {k: v for k, v in want.items() if v is not None}  # exclude_none dropped stop_sequence
