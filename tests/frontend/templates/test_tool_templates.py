"""Chat templates of each tool-calling family (written here from the public format descriptions, no model
download): tools and tool results render through our Preprocessor, and an assistant turn with tool calls,
rendered by the family's template, parses back to the same calls with the family's parser. That round trip
ties the parsers to the formats the templates teach the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dynamo_rt.chat_formats import parsers_for_template
from dynamo_rt.local.tinymodel import ensure_tiny_model
from frontend.openai_protocol import parse_chat, template_messages
from frontend.parsers import tool_parser
from frontend.preprocess import Preprocessor

HERE = Path(__file__).parent
# template file -> (parser, end-of-turn text after the assistant's calls)
FAMILIES = {
    "hermes": ("hermes", "<|im_end|>\n"),
    "llama3_json": ("llama3_json", "<|eot_id|>"),
    "mistral": ("mistral", "</s>"),
    "deepseek_v3": ("deepseek_v3", "<｜end▁of▁sentence｜>"),
    "llama4_pythonic": ("pythonic", "<|eot|>"),
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {}}},
]
CALLS = [
    {"id": "call_000000000abc123XYZ", "type": "function",
     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "days": 3, "metric": True})}},
    {"id": "call_000000000def456UVW", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]
USER = {"role": "user", "content": "Weather in Zürich, and the time?"}


@pytest.fixture(scope="module")
def tokenizer_files() -> dict[str, bytes]:
    root = ensure_tiny_model()
    return {name: (root / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}


def pre(files: dict[str, bytes], family: str) -> Preprocessor:
    return Preprocessor.from_files({**files, "chat_template.jinja": (HERE / f"{family}.jinja").read_bytes()})


def msgs(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Through the request parser, as a real request goes (arguments strings become mappings)."""
    body = json.dumps({"model": "m", "messages": list(messages), "tools": TOOLS}).encode()
    return template_messages(parse_chat(body))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tools_and_tool_results_render(family: str, tokenizer_files: dict[str, bytes]) -> None:
    p = pre(tokenizer_files, family)
    conv = msgs(USER, {"role": "assistant", "content": None, "tool_calls": CALLS},
                {"role": "tool", "tool_call_id": CALLS[0]["id"], "content": "21 °C, sunny"},
                {"role": "tool", "tool_call_id": CALLS[1]["id"], "content": "12:30"})
    text = p.apply_chat_template(conv, add_generation_prompt=True, tools=TOOLS)
    for tool in TOOLS:
        assert tool["function"]["name"] in text
    assert "Current time" in text and "21 °C, sunny" in text and "12:30" in text
    assert text.index("21 °C, sunny") < text.index("12:30")  # results in call order
    if family == "mistral":  # the only family here whose results carry the call id
        assert '"call_id": "abc123XYZ"' in text and '"call_id": "def456UVW"' in text
    assert p.encode_chat(conv, add_generation_prompt=True, tools=TOOLS)  # tokenizes as well
    # Without tools the prompt has no tool section.
    plain = p.apply_chat_template(msgs(USER), add_generation_prompt=True, tools=None)
    assert "get_weather" not in plain


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rendered_calls_parse_back(family: str, tokenizer_files: dict[str, bytes]) -> None:
    parser, end = FAMILIES[family]
    p = pre(tokenizer_files, family)
    prompt = p.apply_chat_template(msgs(USER), add_generation_prompt=True, tools=TOOLS)
    full = p.apply_chat_template(msgs(USER, {"role": "assistant", "content": None, "tool_calls": CALLS}),
                                 add_generation_prompt=False, tools=TOOLS)
    assert full.startswith(prompt)
    reply = full[len(prompt):]
    assert reply.endswith(end)
    out = tool_parser(parser)().parse(reply[: -len(end)])  # what the model would write before its stop token
    assert out.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in CALLS]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_card_names_the_family_parser(family: str) -> None:
    template = (HERE / f"{family}.jinja").read_text()
    assert tool_parser(parsers_for_template(template)[0]) is tool_parser(FAMILIES[family][0])
