"""frontend/chat_output.py: which parsers a request gets, the non-streamed message, and the streamed SSE
events, which reassemble (as an OpenAI client does) into the same content, reasoning and tool calls."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from dynamo_rt.protocol import ModelCard
from frontend.chat_output import OutputPlan, plan
from frontend.openai_protocol import parse_chat
from frontend.parsers import TOOL_PARSERS, reasoning_parser, tool_parser
from frontend.serving import ChunkTemplates
from tests.frontend.parsers.cases import CASES

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time"}}]


def card(tool: str = "", reasoning: str = "") -> ModelCard:
    return ModelCard(name="m", context_length=64, kv_block_size=16, tokenizer_bucket="b", tokenizer_files={},
                     tokenizer_digest="d", tool_call_parser=tool, reasoning_parser=reasoning)


def req(**fields: Any) -> Any:
    return parse_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode())


def test_plan_is_none_without_tools_or_reasoning() -> None:
    # The serving loop then runs unchanged: nothing on the token path.
    assert plan(req(), card("hermes")) is None
    assert plan(req(tools=TOOLS, tool_choice="none"), card("hermes")) is None
    assert plan(req(tools=TOOLS), card()) is None  # no parser known for the model
    assert plan(req(tools=[]), card("hermes")) is None


def test_plan_picks_card_then_flag() -> None:
    p = plan(req(tools=TOOLS), card("hermes"))
    assert p is not None and p.tool_parser is TOOL_PARSERS["hermes"] and p.reasoning_parser is None
    p = plan(req(tools=TOOLS), card("hermes"), tool_flag="mistral")
    assert p is not None and p.tool_parser is TOOL_PARSERS["mistral"] and p.keep_special_tokens
    p = plan(req(), card(reasoning="qwen3"))
    assert p is not None and p.tool_parser is None and p.reasoning_parser is reasoning_parser("qwen3")
    p = plan(req(), card(reasoning="qwen3"), reasoning_flag="deepseek_r1")
    assert p is not None and p.reasoning_parser is reasoning_parser("deepseek_r1")
    assert plan(req(tools=TOOLS), card("no-such-parser")) is None  # warned once, output left as is
    for off in ({"enable_thinking": False}, {"thinking": False}):
        assert plan(req(chat_template_kwargs=off), card(reasoning="deepseek_r1")) is None


def test_forced_tool_choice_parses_the_grammar_format_without_a_named_parser() -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        p = plan(req(tools=TOOLS, tool_choice=choice), card())
        assert p is not None and p.tool_parser is TOOL_PARSERS["hermes"]


HERMES_TWO = ('<think>plan it</think>Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def test_message_shape() -> None:
    p = OutputPlan(tool_parser("hermes"), reasoning_parser("qwen3"))
    msg, reason = p.message(HERMES_TWO, "stop")
    assert reason == "tool_calls"
    assert msg["role"] == "assistant" and msg["content"] == "Checking." and msg["reasoning_content"] == "plan it"
    calls = msg["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) == 29 for c in calls)
    assert len({c["id"] for c in calls}) == 2
    # Only calls: content is null, as OpenAI sends it.
    msg, reason = OutputPlan(tool_parser("hermes"), None).message(HERMES_TWO.split("</think>")[1][10:], "stop")
    assert msg["content"] is None and reason == "tool_calls" and "reasoning_content" not in msg
    # Cut off by max_tokens: "length" stays, the last call's arguments are what was written.
    msg, reason = OutputPlan(tool_parser("hermes"), None).message(HERMES_TWO[:-15], "length")
    assert reason == "length" and msg["tool_calls"][1]["function"]["arguments"] == "{"
    # No call: the finish reason stays.
    msg, reason = OutputPlan(tool_parser("hermes"), None).message("plain", "length")
    assert msg == {"role": "assistant", "content": "plain"} and reason == "length"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    p = OutputPlan(tool_parser("hermes"), None, parallel_tool_calls=False)
    msg, _ = p.message(HERMES_TWO, "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    assert plan(req(tools=TOOLS, parallel_tool_calls=False), card("hermes")).parallel_tool_calls is False  # type: ignore[union-attr]


def templates() -> ChunkTemplates:
    p = SimpleNamespace(request_id="chatcmpl-x", kind="chat", created=1, model=SimpleNamespace(name="m"))
    return ChunkTemplates(p)  # type: ignore[arg-type]


def reassemble(body: bytes) -> tuple[str, str, list[dict[str, Any]], list[str | None]]:
    """What an OpenAI client builds from the deltas: content, reasoning, calls by index, finish reasons."""
    content = reasoning = ""
    calls: dict[int, dict[str, Any]] = {}
    reasons: list[str | None] = []
    for line in body.decode().split("\n\n"):
        if not line:
            continue
        assert line.startswith("data: ")
        ev = json.loads(line[6:])
        assert ev["object"] == "chat.completion.chunk"
        ch = ev["choices"][0]
        reasons.append(ch["finish_reason"])
        d = ch["delta"]
        content += d.get("content") or ""
        reasoning += d.get("reasoning_content") or ""
        for tc in d.get("tool_calls", []):
            i = tc["index"]
            if i not in calls:
                # The first delta of a call: index, id, type, name, empty arguments.
                assert set(tc) == {"index", "id", "type", "function"} and tc["type"] == "function"
                assert tc["function"]["arguments"] == ""
                calls[i] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[i]["arguments"] += tc["function"]["arguments"]
    return content, reasoning, [calls[i] for i in sorted(calls)], reasons


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_reassembles_to_the_message(name: str) -> None:
    t = templates()
    p = OutputPlan(tool_parser(name), reasoning_parser("deepseek_r1"))
    for text, _, _ in CASES[name]:
        full = "reason first</think>" + text
        msg, reason = p.message(full, "stop")
        for size in (1, 2, 5, 17):
            c = p.new()
            body = b"".join(c.chunk(t, 0, full[k:k + size]) for k in range(0, len(full), size))
            body += c.flush(t, 0) + c.finish_chunk(t, 0, "stop")
            content, reasoning, calls, reasons = reassemble(body)
            assert content == (msg["content"] or "")
            assert reasoning == msg["reasoning_content"]
            assert [(x["name"], x["arguments"]) for x in calls] == \
                [(x["function"]["name"], x["function"]["arguments"]) for x in msg.get("tool_calls", [])]
            assert reasons[-1] == reason and all(r is None for r in reasons[:-1])
            for marker in (*tool_parser(name).markers, "</think>"):
                if calls:
                    assert marker not in content


def test_logprobs_are_never_dropped() -> None:
    t = templates()
    c = OutputPlan(tool_parser("hermes"), None).new()
    held = c.chunk(t, 0, "<tool", b'{"content":[]}')  # held back, but its logprobs go out
    ev = json.loads(held.decode()[6:])
    assert ev["choices"][0]["delta"] == {"content": ""} and ev["choices"][0]["logprobs"] == {"content": []}


def test_counters_tell_calls_from_fallbacks() -> None:
    from frontend.metrics import FrontendMetrics

    m = FrontendMetrics()
    p = plan(req(tools=TOOLS), card("hermes"), metrics=m)
    assert p is not None
    msg, _ = p.message(HERMES_TWO + "<tool_call>not a call</tool_call>", "stop")
    assert len(msg["tool_calls"]) == 2 and msg["content"].endswith("<tool_call>not a call</tool_call>")
    assert m.tool_calls.labels("m")._value.get() == 2
    assert m.tool_call_failures.labels("m")._value.get() == 1
    c = p.new()  # streamed: counted when the choice ends
    c.chunk(templates(), 0, HERMES_TWO)
    assert m.tool_calls.labels("m")._value.get() == 2
    c.flush(templates(), 0)
    assert m.tool_calls.labels("m")._value.get() == 4
