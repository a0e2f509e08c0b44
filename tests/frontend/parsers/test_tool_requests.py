"""The request side of tools: tools / tool_choice / parallel_tool_calls / role=tool validation (400 naming
the field), the --tool-call-parser / --reasoning-parser flags and their env twins, and the parser names a
worker's model card takes from its chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dynamo_rt.chat_formats import parsers_for_model_dir, parsers_for_template
from dynamo_rt.errors import ConfigError, InvalidRequest
from dynamo_rt.local.tinymodel import CHAT_TEMPLATE_FILE
from frontend.main import check_args, parse_args
from frontend.openai_protocol import parse_chat

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "d",
                                         "parameters": {"type": "object", "properties": {}}, "strict": True}}
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


def test_valid_tool_requests_parse() -> None:
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        req = parse_chat(chat(tools=[TOOL], tool_choice=choice, parallel_tool_calls=False))
        assert req.tool_choice == choice and req.parallel_tool_calls is False
    parse_chat(chat(tools=[], tool_choice="auto"))  # an empty list is "no tools"
    parse_chat(chat(tool_choice="none"))
    parse_chat(chat(messages=[
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ], tools=[TOOL]))


BAD = [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "tools[0].type must be 'function', got 'retrieval'"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "tools[0].function must be an object"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name",
     "tools[0].function.name must be 1-64 characters of a-z, A-Z, 0-9, '_', '-' or '.', got 'bad name'"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name", "tools[1].function.name 'get_weather' is declared twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters", "tools[0].function.parameters must be a JSON schema object"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice",
     "tool_choice must be one of none, auto, required or a function object, got 'sometimes'"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs at least one tool in tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names function 'nope', which is not in tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     "tool_choice names function 'get_weather', which is not in tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice",
     'tool_choice must be {"type": "function", "function": {"name": ...}}'),
    ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id",
     "messages[1].tool_call_id is required for role 'tool'"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]},
     "messages[1].tool_calls[0].function.name", "messages[1].tool_calls[0].function.name is required"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD)
def test_bad_tool_fields_are_400_naming_the_field(fields: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(chat(**fields))
    assert (info.value.status, info.value.param, info.value.message) == (400, param, message)


def test_parallel_tool_calls_must_be_a_boolean() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(chat(parallel_tool_calls="yes"))
    assert info.value.param == "parallel_tool_calls"


def test_parser_flags_and_env_twins() -> None:
    args = parse_args(["--tool-call-parser", "mistral"], env={"DYN_REASONING_PARSER": "qwen3"})
    check_args(args)
    assert (args.tool_call_parser, args.reasoning_parser) == ("mistral", "qwen3")
    assert parse_args([], env={}).tool_call_parser is None
    for argv, flag in ((["--tool-call-parser", "nope"], "--tool-call-parser"),
                       (["--reasoning-parser", "nope"], "--reasoning-parser")):
        with pytest.raises(ConfigError) as err:
            check_args(parse_args(argv, env={}))
        assert err.value.flag == flag and "unknown" in err.value.message


def test_card_parsers_come_from_the_chat_template(tmp_path: Path) -> None:
    assert parsers_for_template(CHAT_TEMPLATE_FILE.read_text()) == ("hermes", "")
    assert parsers_for_template("{{ '[TOOL_CALLS]' }}") == ("mistral", "")
    assert parsers_for_template("<｜tool▁calls▁begin｜>{% set c = content.split('</think>')[-1] %}"
                                "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
                                ) == ("deepseek_v3", "deepseek_r1")
    assert parsers_for_template("<think></think>{% if add_generation_prompt %}<|im_start|>assistant\n"
                                "{% endif %}") == ("", "qwen3")
    qwen3_hybrid = ("<tool_call></think>{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
                    "{%- if enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}")
    assert parsers_for_template(qwen3_hybrid) == ("hermes", "qwen3")
    assert parsers_for_template("{{ messages }}") == ("", "")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|python_tag|>"}))
    assert parsers_for_model_dir(tmp_path) == ("llama3_json", "")
    (tmp_path / "chat_template.jinja").write_text("<tool_call>")
    assert parsers_for_model_dir(tmp_path) == ("hermes", "")
    assert parsers_for_model_dir("") == ("", "")
