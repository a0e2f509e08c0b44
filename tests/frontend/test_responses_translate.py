"""The /v1/responses translation, both ways, without a stack: Responses input items -> chat messages, chat
results / chat chunks (with tool calls and reasoning, in the chat path's OpenAI shape) -> output items and the
Responses event sequence, every event and response checked against the openai SDK's own types."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from dynamo_rt import errors
from frontend import responses as R

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def req(**kw: Any) -> R.ResponsesRequest:
    return R.parse(orjson.dumps({"model": "m", "input": "hi", **kw}))


def turn(**kw: Any) -> R.Turn:
    return R.Turn(req(**kw), [], None)  # type: ignore[arg-type]


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in raw.split(b"\n\n"):
        if not frame:
            continue
        name, data = frame.split(b"\n")
        ev = orjson.loads(data[6:])
        assert name == b"event: " + ev["type"].encode()
        EVENT.validate_python(ev)  # the SDK's own model of the event, strictly
        out.append(ev)
    return out


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}


USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 0}}


def test_input_items_to_chat_messages() -> None:
    items = [
        {"type": "message", "role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text",
                                                                                    "text": "Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "t", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "12:00"}]},
    ]
    assert R.input_messages(items) == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
    ]
    # A function call with no assistant message before it opens its own assistant turn.
    assert R.input_messages([{"role": "user", "content": "x"},
                             {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])[1] == \
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def test_request_to_chat_body() -> None:
    r = req(instructions="sys", input="hi", stream=True, max_output_tokens=9, temperature=0.5, top_p=0.9,
            parallel_tool_calls=False,
            tools=[{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"},
                    "strict": True}],
            tool_choice={"type": "function", "name": "f"},
            text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": True}})
    chat, conv = R.to_chat(r, [{"role": "user", "content": "before"}, {"role": "assistant", "content": "ok"}])
    assert conv == [{"role": "user", "content": "before"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "hi"}]
    assert chat == {
        "model": "m", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "sys"}, *conv],
        "temperature": 0.5, "top_p": 0.9, "parallel_tool_calls": False, "max_tokens": 9,
        "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                                                    "parameters": {"type": "object"}, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"},
                                                                   "strict": True}},
    }
    assert R.to_chat(req(text={"format": {"type": "json_object"}}), [])[0]["response_format"] == \
        {"type": "json_object"}
    assert "response_format" not in R.to_chat(req(text={"format": {"type": "text"}}), [])[0]
    assert R.to_chat(req(tool_choice="required"), [])[0]["tool_choice"] == "required"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "web_search"}}, "tool_choice.type"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
])
def test_bad_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as ei:
        R.to_chat(req(**body), [])
    assert ei.value.param == param and ei.value.status == 400


def test_missing_model_or_input_is_400() -> None:
    for body in (b'{"input": "x"}', b'{"model": "m"}', b"[1]", b"{"):
        with pytest.raises(errors.InvalidRequest):
            R.parse(body)


MESSAGE = {"role": "assistant", "content": "Let me check.", "reasoning_content": "The user wants weather.",
           "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "w", "arguments": '{"c":1}'}},
                          {"id": "call_b", "type": "function", "function": {"name": "t", "arguments": "{}"}}]}


def strip_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in i.items() if k != "id"} for i in items]


def test_chat_message_to_output_items_and_back() -> None:
    items = R.output_items(MESSAGE)
    assert [i["id"][:3] for i in items] == ["rs_", "msg", "fc_", "fc_"]
    assert strip_ids(items) == [
        {"type": "reasoning", "summary": [], "status": "completed",
         "content": [{"type": "reasoning_text", "text": "The user wants weather."}]},
        {"type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "call_id": "call_a", "name": "w", "arguments": '{"c":1}', "status": "completed"},
        {"type": "function_call", "call_id": "call_b", "name": "t", "arguments": "{}", "status": "completed"},
    ]
    resp = turn().response("completed", items, R.usage_obj(USAGE))
    Response.model_validate(resp)  # the SDK's model of a response, strictly
    # What is stored for previous_response_id: the output as input items is the chat message again.
    assert R.input_messages(items) == [MESSAGE]
    # Tool calls only: no empty message item.
    only = R.output_items({"role": "assistant", "content": None, "tool_calls": MESSAGE["tool_calls"]})
    assert [i["type"] for i in only] == ["function_call", "function_call"]


def feed_all(tr: R.EventTranslator, chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    raw = tr.start()
    for c in chunks:
        raw += tr.feed(c)
    tail, resp = tr.finish()
    raw += tail + tr.terminal(resp)
    return events(raw), resp


def test_stream_reasoning_text_and_tool_calls() -> None:
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
    evs, resp = feed_all(R.EventTranslator(turn(stream=True)), chunks)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    assert [e["output_index"] for e in evs if e["type"] == "response.output_item.added"] == [0, 1, 2, 3]
    args_done = [e for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"]) for e in args_done] == [("w", '{"c":1}'), ("t", "{}")]
    # Streamed and non-streamed give the same output (ids aside) and the same usage.
    assert strip_ids(resp["output"]) == strip_ids(R.output_items(MESSAGE))
    assert evs[-1]["response"] == resp and resp["status"] == "completed"
    assert resp["usage"]["input_tokens"] == 7 and resp["usage"]["output_tokens"] == 5
    # Each item's id is the same in its added / done events and in the final response.
    added = [e["item"]["id"] for e in evs if e["type"] == "response.output_item.added"]
    done = [e["item"]["id"] for e in evs if e["type"] == "response.output_item.done"]
    assert added == done == [i["id"] for i in resp["output"]]
    Response.model_validate(resp)


def test_stream_length_is_incomplete() -> None:
    evs, resp = feed_all(R.EventTranslator(turn(max_output_tokens=2)),
                         [chunk({"role": "assistant", "content": ""}), chunk({"content": "ab"}),
                          chunk({}, finish="length"), chunk(None, usage=USAGE)])
    assert evs[-1]["type"] == "response.incomplete"
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["output"][0]["status"] == "incomplete"
    item_done = [e for e in evs if e["type"] == "response.output_item.done"]
    assert [e["item"]["status"] for e in item_done] == ["incomplete"]  # as in the final response


def test_stream_nothing_generated_still_has_a_message() -> None:
    evs, resp = feed_all(R.EventTranslator(turn()), [chunk({"role": "assistant", "content": ""}),
                                                     chunk({}, finish="stop")])
    assert [i["type"] for i in resp["output"]] == ["message"]
    assert resp["output"][0]["content"][0]["text"] == ""
    assert evs[-1]["type"] == "response.completed"


def test_stream_failure_events() -> None:
    tr = R.EventTranslator(turn())
    raw = tr.start() + tr.feed(chunk({"content": "partial"}))
    raw += tr.failed(errors.Unavailable("worker gone"))
    evs = events(raw)
    assert [e["type"] for e in evs][-2:] == ["error", "response.failed"]
    assert evs[-2]["message"] == "worker gone" and evs[-2]["code"] == "unavailable"
    failed = evs[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error", "message": "worker gone"}
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))


TOOL_CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "The user wants weather."}),
    chunk({"content": "Let me check."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                           "function": {"name": "w", "arguments": '{"c":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
    chunk({}, finish="tool_calls"),
    chunk(None, usage=USAGE),
]


def test_sdk_stream_helper_assembles_the_translated_events() -> None:
    """The openai SDK's own stream accumulator (``responses.stream``), fed our translated events over an
    in-process transport, assembles the same response as the non-streamed translation."""
    tr = R.EventTranslator(turn(stream=True))
    body = tr.start() + b"".join(tr.feed(c) for c in TOOL_CHUNKS)
    tail, resp = tr.finish()
    body += tail + tr.terminal(resp)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(base_url="http://frontend/v1", api_key="none",
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with client.responses.stream(model="m", input="hi") as s:
        deltas = [e.type for e in s]
        final = s.get_final_response()
    assert deltas[-1] == "response.completed"
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Let me check."
    call = final.output[2]
    assert call.type == "function_call" and (call.call_id, call.name, call.arguments) == ("call_a", "w", '{"c":1}')
    expected = R.output_items({"role": "assistant", "content": "Let me check.",
                               "reasoning_content": "The user wants weather.",
                               "tool_calls": [{"id": "call_a", "type": "function",
                                               "function": {"name": "w", "arguments": '{"c":1}'}}]})
    assert strip_ids([o.model_dump(exclude_none=True) for o in final.output]) == strip_ids(expected)
