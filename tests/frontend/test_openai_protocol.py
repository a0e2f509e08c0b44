"""frontend.openai_protocol: request decoding, validation errors, mapping to sampling structs."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from dynamo_rt.errors import ErrorCode, InvalidRequest
from dynamo_rt.protocol import SamplingParams, StopConditions
from frontend.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    openapi_schemas,
    parse_chat,
    parse_completion,
    prompts,
    resolve_max_tokens,
    template_messages,
    to_sampling,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": USER}
    body.update(fields)
    return json.dumps(body).encode()


def completion(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "prompt": "hello"}
    body.update(fields)
    return json.dumps(body).encode()


def chat_error(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(body)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert info.value.status == 400
    return info.value


def completion_error(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_completion(body)
    assert info.value.status == 400
    return info.value


# --------------------------------------------------------------------------------------------- decoding


def test_minimal_chat_defaults() -> None:
    req = parse_chat(chat())
    assert isinstance(req, ChatCompletionRequest)
    assert req.model == "m"
    assert [(m.role, m.content) for m in req.messages] == [("user", "hi")]
    assert req.stream is False and req.n == 1 and req.max_tokens is None
    s = to_sampling(req)
    assert s.sampling == SamplingParams()
    assert s.stop == StopConditions(max_tokens=0)
    assert s.stop_strings == []


def test_unknown_fields_are_ignored() -> None:
    req = parse_chat(chat(frobnicate={"a": 1}, parallel_tool_calls=True, service_tier="auto"))
    assert req.model == "m"


def test_full_chat_request_maps_to_sampling() -> None:
    body = chat(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=1234, stop=["\n\n", "END"],
        stream=True, stream_options={"include_usage": True}, n=2, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, logprobs=True, top_logprobs=3, ignore_eos=True,
        min_tokens=2, user="u1", stop_token_ids=[5, 6, 5], nvext={"backend_instance_id": "00000000000000ab"},
    )
    req = parse_chat(body)
    assert req.stream and req.stream_options is not None and req.stream_options.include_usage
    assert req.nvext is not None and req.nvext.backend_instance_id == "00000000000000ab"
    s = to_sampling(req)
    assert s.sampling == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=1234, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, logprobs=3,
    )
    assert s.stop == StopConditions(max_tokens=7, min_tokens=2, stop_token_ids=[5, 6], ignore_eos=True)
    assert s.stop_strings == ["\n\n", "END"]


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    req = parse_chat(chat(max_tokens=100, max_completion_tokens=9))
    assert to_sampling(req).stop.max_tokens == 9
    assert resolve_max_tokens(req, 10, 100) == 9


def test_single_stop_string_and_empty_ones() -> None:
    assert to_sampling(parse_chat(chat(stop="###"))).stop_strings == ["###"]
    assert to_sampling(parse_chat(chat(stop=""))).stop_strings == []
    assert to_sampling(parse_chat(chat(stop=["a", "", "a", "b"]))).stop_strings == ["a", "b"]


def test_nvext_fills_gaps() -> None:
    req = parse_chat(chat(temperature=0.8, nvext={
        "greed_sampling": True, "top_k": 5, "repetition_penalty": 1.3, "ignore_eos": True,
        "backend_instance_id": 255, "annotations": ["x"],
    }))
    s = to_sampling(req)
    assert s.sampling.temperature == 0.0
    assert s.sampling.top_k == 5
    assert s.sampling.repetition_penalty == 1.3
    assert s.stop.ignore_eos is True
    # Request-level values win over nvext ones.
    s2 = to_sampling(parse_chat(chat(top_k=3, nvext={"top_k": 5})))
    assert s2.sampling.top_k == 3


def test_top_k_minus_one_means_disabled() -> None:
    assert to_sampling(parse_chat(chat(top_k=-1))).sampling.top_k == 0


def test_chat_logprobs_without_top() -> None:
    assert to_sampling(parse_chat(chat(logprobs=True))).sampling.logprobs == 0
    assert to_sampling(parse_chat(chat(logprobs=False))).sampling.logprobs is None


def test_completion_prompts_and_logprobs() -> None:
    assert prompts(parse_completion(completion())) == ["hello"]
    assert prompts(parse_completion(completion(prompt=["a", "b"]))) == ["a", "b"]
    assert prompts(parse_completion(completion(prompt=[1, 2, 3]))) == [[1, 2, 3]]
    assert prompts(parse_completion(completion(prompt=[[1, 2], [3]]))) == [[1, 2], [3]]
    req = parse_completion(completion(logprobs=2, max_tokens=3))
    assert isinstance(req, CompletionRequest)
    assert to_sampling(req).sampling.logprobs == 2
    assert to_sampling(parse_completion(completion())).sampling.logprobs is None


def test_template_messages() -> None:
    body = chat(messages=[
        {"role": "system", "content": "sys", "name": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": \"é\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "developer", "content": "dev", "reasoning_content": "why"},
    ])
    assert template_messages(parse_chat(body)) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "bob"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": "é"}}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "developer", "content": "dev", "reasoning_content": "why"},
    ]


# --------------------------------------------------------------------------------------------- errors

BAD_CHAT = [
    # (fields, param, message)
    ({"max_tokens": -5}, "max_tokens", "max_tokens must be >= 1, got -5"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be >= 1, got 0"),
    ({"temperature": 2.5}, "temperature", "temperature must be between 0 and 2, got 2.5"),
    ({"temperature": -0.1}, "temperature", "temperature must be between 0 and 2, got -0.1"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -2}, "top_k", "top_k must be -1 (disabled) or >= 0, got -2"),
    ({"min_p": 1.5}, "min_p", "min_p must be between 0 and 1, got 1.5"),
    ({"presence_penalty": 3}, "presence_penalty", "presence_penalty must be between -2 and 2, got 3.0"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "frequency_penalty must be between -2 and 2, got -2.5"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0, got 0.0"),
    ({"n": 0}, "n", "n must be between 1 and 16, got 0"),
    ({"n": 17}, "n", "n must be between 1 and 16, got 17"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be >= 0, got -1"),
    ({"seed": 2**64}, "seed", f"seed must fit in 64 bits, got {2**64}"),
    # Integers past 32 bits (bench/fuzz.py found min_tokens ~2e28 answered 500: an OverflowError encoding it).
    ({"min_tokens": 21960449065458646141152264192}, "min_tokens",
     "invalid value for 'min_tokens': Expected int <= 2147483647"),
    ({"max_tokens": 2**31}, "max_tokens", "invalid value for 'max_tokens': Expected int <= 2147483647"),
    ({"top_k": 2**40}, "top_k", "invalid value for 'top_k': Expected int <= 2147483647"),
    ({"stop_token_ids": [1, 2**63]}, "stop_token_ids[1]",
     "invalid value for 'stop_token_ids[1]': Expected int <= 2147483647"),
    ({"stop": [str(i) for i in range(17)]}, "stop", "stop may hold at most 16 strings, got 17"),
    ({"stop": "x" * 513}, "stop", "stop strings must be at most 512 characters, got 513"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids must be >= 0, got -1"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias values must be between -100 and 100, got 101.0 for 5"),
    ({"top_logprobs": 3}, "top_logprobs", "top_logprobs requires logprobs to be true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs must be between 0 and 20, got 21"),
    ({"response_format": {"type": "yaml"}}, "response_format",
     "response_format type 'yaml' is not supported (text, json_object or json_schema)"),
    ({"model": ""}, "model", "model must be a non-empty string"),
    ({"messages": []}, "messages", "messages must hold at least one message"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role",
     "messages[0].role must be one of system, user, assistant, tool, developer; got 'bot'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content is required for role 'user'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type",
     "messages[0].content[0]: content parts of type 'image_url' are not supported (only 'text')"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
     "messages[0].content[0].text is required for a text part"),
    ({"messages": [USER[0], {"role": "user", "content": "x", "tool_calls": []}]}, "messages[1].tool_calls",
     "messages[1].tool_calls is only allowed on assistant messages"),
    ({"nvext": {"top_k": -3}}, "nvext.top_k", "nvext.top_k must be -1 (disabled) or >= 0, got -3"),
    # Type errors come from msgspec, turned into a message naming the field.
    ({"max_tokens": "5"}, "max_tokens", "invalid value for 'max_tokens': Expected int | null, got str"),
    ({"stream": "yes"}, "stream", "invalid value for 'stream': Expected bool, got str"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "invalid value for 'messages[0].content': Expected str | array | null, got int"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "'messages[0].role' is a required property"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "invalid value for 'stream_options.include_usage': Expected bool, got int"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_CHAT)
def test_chat_validation_errors(fields: dict[str, Any], param: str, message: str) -> None:
    err = chat_error(chat(**fields))
    assert (err.param, err.message) == (param, message)


def test_missing_model_and_messages() -> None:
    err = chat_error(b'{"messages": [{"role": "user", "content": "x"}]}')
    assert (err.param, err.message) == ("model", "'model' is a required property")
    err = chat_error(b'{"model": "m"}')
    assert (err.param, err.message) == ("messages", "'messages' is a required property")


@pytest.mark.parametrize(("body", "message"), [
    (b"", "invalid JSON body: Input data was truncated"),
    (b'{"model": "m",', "invalid JSON body: Input data was truncated"),
    (b"{model: 1}", "invalid JSON body: JSON is malformed: object keys must be strings (byte 1)"),
    (b"[]", "invalid request body: Expected object, got array"),
    (b'{"model": "m", "messages": [], "temperature": 1e999}',
     "invalid value for 'temperature': Number out of range"),
])
def test_malformed_bodies(body: bytes, message: str) -> None:
    err = chat_error(body)
    assert err.message == message


def test_nan_is_rejected() -> None:
    # JSON has no NaN literal; the only way in is a huge number, covered above. Range checks still refuse
    # NaN for callers that build requests in Python.
    req = parse_chat(chat())
    req.temperature = float("nan")
    from frontend.openai_protocol import _validate_common

    with pytest.raises(InvalidRequest, match="temperature must be between 0 and 2, got nan"):
        _validate_common(req)


BAD_COMPLETION = [
    ({"prompt": []}, "prompt", "prompt must not be empty"),
    ({"prompt": ["a", 1]}, "prompt",
     "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids, not a mix"),
    ({"prompt": [[1], []]}, "prompt[1]", "prompt[1] must not be an empty token list"),
    ({"prompt": [[1], [-2]]}, "prompt[1]", "prompt[1] holds a negative token id"),
    ({"prompt": [1, -2]}, "prompt", "prompt holds a negative token id"),
    ({"prompt": ["a"] * 17}, "prompt", "prompt may hold at most 16 prompts, got 17"),
    ({"prompt": [1.5]}, "prompt[0]", "invalid value for 'prompt[0]': Expected int | str | array, got float"),
    ({"prompt": None}, "prompt", "invalid value for 'prompt': Expected str | array, got null"),
    ({"echo": True}, "echo", "echo is not supported"),
    ({"suffix": "x"}, "suffix", "suffix is not supported"),
    ({"best_of": 3}, "best_of", "best_of must equal n (best_of sampling is not supported), got 3"),
    ({"logprobs": 6}, "logprobs", "logprobs must be between 0 and 5, got 6"),
    ({"logprobs": True}, "logprobs", "invalid value for 'logprobs': Expected int | null, got bool"),
    ({"max_tokens": -5}, "max_tokens", "max_tokens must be >= 1, got -5"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_COMPLETION)
def test_completion_validation_errors(fields: dict[str, Any], param: str, message: str) -> None:
    err = completion_error(completion(**fields))
    assert (err.param, err.message) == (param, message)


def test_completion_missing_prompt() -> None:
    err = completion_error(b'{"model": "m"}')
    assert (err.param, err.message) == ("prompt", "'prompt' is a required property")


def test_completion_long_token_prompt_is_one_prompt() -> None:
    # A flat list of ids is one prompt however long it is (the prompt-count cap is for batches).
    assert prompts(parse_completion(completion(prompt=list(range(100))))) == [list(range(100))]


# --------------------------------------------------------------------------------------------- max tokens


def test_resolve_max_tokens() -> None:
    req = parse_chat(chat())
    assert resolve_max_tokens(req, 10, 100) == 90
    assert resolve_max_tokens(parse_chat(chat(max_tokens=90)), 10, 100) == 90


def test_resolve_max_tokens_too_long_completion() -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_max_tokens(parse_chat(chat(max_tokens=91)), 10, 100)
    err = info.value
    assert err.code == ErrorCode.CONTEXT_LENGTH and err.status == 400 and err.param == "max_tokens"
    assert err.message == (
        "This model's maximum context length is 100 tokens. However, you requested 101 tokens "
        "(10 in the messages, 91 in the completion). Please reduce the length of the messages or completion."
    )
    with pytest.raises(InvalidRequest) as info:
        resolve_max_tokens(parse_completion(completion(max_tokens=95)), 10, 100)
    assert info.value.message == (
        "This model's maximum context length is 100 tokens. However, you requested 105 tokens "
        "(10 in the prompt, 95 in the completion). Please reduce the length of the prompt or completion."
    )
    with pytest.raises(InvalidRequest) as info:
        resolve_max_tokens(parse_chat(chat(max_completion_tokens=95)), 10, 100)
    assert info.value.param == "max_completion_tokens"


def test_resolve_max_tokens_prompt_fills_context() -> None:
    for prompt_len in (100, 150):
        with pytest.raises(InvalidRequest) as info:
            resolve_max_tokens(parse_chat(chat()), prompt_len, 100)
        assert info.value.code == ErrorCode.CONTEXT_LENGTH
        assert info.value.param == "messages"
        assert info.value.message == (
            f"This model's maximum context length is 100 tokens. However, your messages resulted in "
            f"{prompt_len} tokens. Please reduce the length of the messages."
        )


# --------------------------------------------------------------------------------------------- schema


def test_openapi_schemas_validate_requests() -> None:
    comps = openapi_schemas()
    assert {"ChatCompletionRequest", "CompletionRequest", "ChatMessage", "ContentPart", "NvExt",
            "StreamOptions"} <= set(comps)
    chat_props = comps["ChatCompletionRequest"]["properties"]
    assert {"minimum": 0, "maximum": 2} .items() <= chat_props["temperature"]["anyOf"][0].items()
    assert comps["ChatMessage"]["properties"]["role"]["enum"] == [
        "system", "user", "assistant", "tool", "developer"]
    assert set(comps["ChatCompletionRequest"]["required"]) == {"model", "messages"}
    doc = {"components": {"schemas": comps}}
    resolver_schema = {"$ref": "#/components/schemas/ChatCompletionRequest", **doc}
    jsonschema.validate(json.loads(chat(max_tokens=3, temperature=1.0)), resolver_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(chat(temperature=3.0)), resolver_schema)
    comp_schema = {"$ref": "#/components/schemas/CompletionRequest", **doc}
    jsonschema.validate(json.loads(completion(prompt=[[1, 2]])), comp_schema)
    json.dumps(comps)  # plain JSON, ready for /openapi.json
