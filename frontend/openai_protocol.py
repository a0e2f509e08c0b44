"""OpenAI request bodies: decode, validate, and map to the internal sampling structs.

The HTTP layer (``frontend/app.py``) hands the raw request body to :func:`parse_chat` or
:func:`parse_completion`; they decode it straight into msgspec structs (one C call, unknown fields ignored as
the OpenAI API does), then check ranges in plain Python so a bad field comes back as
:class:`~dynamo_rt.errors.InvalidRequest` naming the field. No pydantic on this path: pydantic is only used
by FastAPI for the docs, and :func:`openapi_schemas` gives those the JSON schema of these same structs.

After parsing, :func:`template_messages` turns the chat messages into the plain dicts a chat template expects,
:func:`to_sampling` gives the :class:`~dynamo_rt.protocol.SamplingParams` / ``StopConditions`` / stop
strings a worker and the frontend's stop checker need, and :func:`resolve_max_tokens` fixes ``max_tokens``
once the prompt length is known.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, NamedTuple

import msgspec

from dynamo_rt.errors import ErrorCode, InvalidRequest
from dynamo_rt.protocol import SamplingParams, StopConditions
from frontend import structured

__all__ = [
    "MAX_N",
    "MAX_STOPS",
    "MAX_STOP_LEN",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "NvExt",
    "Sampling",
    "StreamOptions",
    "openapi_schemas",
    "parse_chat",
    "parse_completion",
    "prompts",
    "requested_max_tokens",
    "resolve_max_tokens",
    "stop_strings",
    "template_messages",
    "to_sampling",
]

# Caps that keep one request from costing the frontend more than a request should.
# Counts and token ids are 32-bit on every engine. A larger JSON integer is a 400 when the body is decoded,
# not an OverflowError when the request is encoded for the worker (msgpack holds 64 bits at most). An
# instance id stays unbounded: it becomes a hex string, and one that names no instance is a 404.
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
MAX_N = 16  # choices per request
MAX_STOPS = 16  # OpenAI allows 4; we accept more but bound the per-token stop search
MAX_STOP_LEN = 512  # characters per stop string: the stop checker holds back up to this much text
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
ROLES = ("system", "user", "assistant", "tool", "developer")


class ContentPart(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One element of a list-valued ``content``; only ``{"type": "text"}`` parts are served."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # role "tool": which call this answers
    tool_calls: list[dict[str, Any]] | None = None  # role "assistant": handed to the chat template as given
    reasoning_content: str | None = None  # some templates render an assistant's earlier reasoning


class StreamOptions(msgspec.Struct, kw_only=True, omit_defaults=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage in every chunk (a vLLM / Dynamo extension)


class NvExt(msgspec.Struct, kw_only=True, omit_defaults=True):
    """NVIDIA Dynamo's extension object (``"nvext": {...}``)."""

    backend_instance_id: str | int | None = None  # route to this worker instance; int ids are shown as hex
    ignore_eos: bool | None = None
    top_k: Int32 | None = None
    repetition_penalty: float | None = None
    greed_sampling: bool | None = None  # force greedy decoding
    annotations: list[str] | None = None
    # Structured outputs, as the top-level fields of the same names (frontend/structured.py).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class _Common(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: Int32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int32] | None = None  # a vLLM extension: extra token ids that end the generation
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int32 = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Int32 = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    cache_salt: str | None = None  # vLLM's field: mixed into the tenant's prefix-cache salt (frontend/tenants.py)
    nvext: NvExt | None = None
    # vLLM's structured-output extension fields (frontend/structured.py)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_Common, kw_only=True, omit_defaults=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: Int32 | None = None  # the newer name of max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: Int32 | None = None
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template; calls parsed by chat_output.py
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None  # False: at most one call per choice (also under a grammar)
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables (e.g. enable_thinking)


class CompletionRequest(_Common, kw_only=True, omit_defaults=True):
    """``POST /v1/completions``."""

    prompt: str | list[str | Int32 | list[Int32]]
    logprobs: Int32 | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Int32 | None = None


class Sampling(NamedTuple):
    """What :func:`to_sampling` returns: engine sampling, stop conditions, and the stop strings the frontend
    checks itself (workers only see token ids)."""

    sampling: SamplingParams
    stop: StopConditions  # max_tokens is the requested value, or 0 when resolve_max_tokens must choose it
    stop_strings: list[str]


# --------------------------------------------------------------------------------------------- decoding

_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

# msgspec says where a wrong value sits as a JSON path: "Expected `int`, got `str` - at `$.messages[0].role`"
_PATH_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING_RE = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")


def _decode_error(exc: msgspec.DecodeError) -> InvalidRequest:
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return InvalidRequest(f"invalid JSON body: {text}")
    m = _PATH_RE.match(text)
    msg = m.group("msg") if m else text
    path = (m.group("path") or "") if m else ""
    path = path[1:] if path.startswith(".") else path
    missing = _MISSING_RE.match(msg)
    if missing:
        field = missing.group("field")
        param = f"{path}.{field}" if path else field
        return InvalidRequest(f"'{param}' is a required property", param=param)
    msg = msg.replace("`", "")
    if not path:
        return InvalidRequest(f"invalid request body: {msg}")
    return InvalidRequest(f"invalid value for '{path}': {msg}", param=path)


def parse_chat(body: bytes) -> ChatCompletionRequest:
    """Decode and validate a chat completion request body; raises :class:`InvalidRequest`."""
    try:
        req = _chat_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise _decode_error(exc) from None
    _validate_common(req)
    _validate_chat(req)
    return req


def parse_completion(body: bytes) -> CompletionRequest:
    """Decode and validate a text completion request body; raises :class:`InvalidRequest`."""
    try:
        req = _completion_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise _decode_error(exc) from None
    _validate_common(req)
    _validate_completion(req)
    return req


# --------------------------------------------------------------------------------------------- validation


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


# Range checks are written as `not (lo <= x <= hi)` so that NaN fails them too.
def _check_range(value: float | None, name: str, lo: float, hi: float) -> None:
    if value is not None and not (lo <= value <= hi):
        raise _bad(f"{name} must be between {lo:g} and {hi:g}, got {value!r}", name)


def _validate_common(req: ChatCompletionRequest | CompletionRequest) -> None:
    if not req.model:
        raise _bad("model must be a non-empty string", "model")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise _bad(f"max_tokens must be >= 1, got {req.max_tokens}", "max_tokens")
    _check_range(req.temperature, "temperature", 0.0, 2.0)
    if req.top_p is not None and not (0.0 < req.top_p <= 1.0):
        raise _bad(f"top_p must be in (0, 1], got {req.top_p!r}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise _bad(f"top_k must be -1 (disabled) or >= 0, got {req.top_k}", "top_k")
    _check_range(req.min_p, "min_p", 0.0, 1.0)
    _check_range(req.presence_penalty, "presence_penalty", -2.0, 2.0)
    _check_range(req.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    if req.repetition_penalty is not None and not (0.0 < req.repetition_penalty < float("inf")):
        raise _bad(f"repetition_penalty must be > 0, got {req.repetition_penalty!r}", "repetition_penalty")
    if req.seed is not None and not (-(2**63) <= req.seed < 2**64):
        raise _bad(f"seed must fit in 64 bits, got {req.seed}", "seed")
    if not (1 <= req.n <= MAX_N):
        raise _bad(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    if req.min_tokens < 0:
        raise _bad(f"min_tokens must be >= 0, got {req.min_tokens}", "min_tokens")
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if len(stops) > MAX_STOPS:
            raise _bad(f"stop may hold at most {MAX_STOPS} strings, got {len(stops)}", "stop")
        for s in stops:
            if len(s) > MAX_STOP_LEN:
                raise _bad(f"stop strings must be at most {MAX_STOP_LEN} characters, got {len(s)}", "stop")
    if req.stop_token_ids is not None:
        if len(req.stop_token_ids) > 64:
            raise _bad(f"stop_token_ids may hold at most 64 ids, got {len(req.stop_token_ids)}", "stop_token_ids")
        for t in req.stop_token_ids:
            if t < 0:
                raise _bad(f"stop_token_ids must be >= 0, got {t}", "stop_token_ids")
    if isinstance(req, ChatCompletionRequest):
        _validate_tools(req)  # before the constraint built from tool_choice, so its errors are these
    # Structured outputs and logit_bias: checked now (before tokenizing), built again by to_sampling.
    structured.logit_bias(req)
    structured.constraint(req)
    ext = req.nvext
    if ext is not None:
        if ext.top_k is not None and ext.top_k < -1:
            raise _bad(f"nvext.top_k must be -1 (disabled) or >= 0, got {ext.top_k}", "nvext.top_k")
        rp = ext.repetition_penalty
        if rp is not None and not (0.0 < rp < float("inf")):
            raise _bad(f"nvext.repetition_penalty must be > 0, got {rp!r}", "nvext.repetition_penalty")
        if isinstance(ext.backend_instance_id, int) and ext.backend_instance_id < 0:
            raise _bad("nvext.backend_instance_id must be >= 0", "nvext.backend_instance_id")


def _validate_chat(req: ChatCompletionRequest) -> None:
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise _bad(
            f"max_completion_tokens must be >= 1, got {req.max_completion_tokens}", "max_completion_tokens"
        )
    if not req.messages:
        raise _bad("messages must hold at least one message", "messages")
    for i, msg in enumerate(req.messages):
        if msg.role not in ROLES:
            raise _bad(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {msg.role!r}", f"messages[{i}].role"
            )
        content = msg.content
        if content is None:
            if not (msg.role == "assistant" and msg.tool_calls):
                raise _bad(f"messages[{i}].content is required for role {msg.role!r}", f"messages[{i}].content")
        elif not isinstance(content, str):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise _bad(
                        f"messages[{i}].content[{j}]: content parts of type {part.type!r} are not supported "
                        "(only 'text')",
                        f"messages[{i}].content[{j}].type",
                    )
                if part.text is None:
                    raise _bad(
                        f"messages[{i}].content[{j}].text is required for a text part",
                        f"messages[{i}].content[{j}].text",
                    )
        if msg.tool_calls is not None and msg.role != "assistant":
            raise _bad(
                f"messages[{i}].tool_calls is only allowed on assistant messages", f"messages[{i}].tool_calls"
            )
    if req.top_logprobs is not None:
        if not (0 <= req.top_logprobs <= MAX_TOP_LOGPROBS_CHAT):
            raise _bad(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS_CHAT}, got {req.top_logprobs}",
                "top_logprobs",
            )
        if not req.logprobs:
            raise _bad("top_logprobs requires logprobs to be true", "top_logprobs")


_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")


def _validate_tools(req: ChatCompletionRequest) -> None:
    """tools, tool_choice and the tool parts of messages, as OpenAI checks them (400 naming the field)."""
    names: list[str] = []
    for i, tool in enumerate(req.tools or ()):
        where = f"tools[{i}]"
        if tool.get("type") != "function":
            raise _bad(f"{where}.type must be 'function', got {tool.get('type')!r}", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function must be an object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _bad(f"{where}.function.name must be 1-64 characters of a-z, A-Z, 0-9, '_', '-' or '.', "
                       f"got {name!r}", f"{where}.function.name")
        if name in names:
            raise _bad(f"{where}.function.name {name!r} is declared twice", f"{where}.function.name")
        names.append(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise _bad(f"{where}.function.description must be a string", f"{where}.function.description")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        if "strict" in fn and not isinstance(fn["strict"], bool | None):
            raise _bad(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
    choice = req.tool_choice
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _bad(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a function object, got {choice!r}",
                       "tool_choice")
        if choice == "required" and not names:
            raise _bad("tool_choice 'required' needs at least one tool in tools", "tool_choice")
    elif choice is not None:
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _bad('tool_choice must be {"type": "function", "function": {"name": ...}}', "tool_choice")
        if name not in names:
            raise _bad(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    for i, msg in enumerate(req.messages):
        if msg.role == "tool" and not msg.tool_call_id:
            raise _bad(f"messages[{i}].tool_call_id is required for role 'tool'", f"messages[{i}].tool_call_id")
        for j, call in enumerate(msg.tool_calls or ()):
            where = f"messages[{i}].tool_calls[{j}]"
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(f"{where}.function.name is required", f"{where}.function.name")
            if not isinstance(fn.get("arguments", ""), str | dict):
                raise _bad(f"{where}.function.arguments must be a JSON string", f"{where}.function.arguments")


def _validate_completion(req: CompletionRequest) -> None:
    p = req.prompt
    if isinstance(p, list):
        if not p:
            raise _bad("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            if any(x < 0 for x in p if isinstance(x, int)):
                raise _bad("prompt holds a negative token id", "prompt")
            return _validate_completion_rest(req)
        if not (all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p)):
            raise _bad(
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                "token ids, not a mix",
                "prompt",
            )
        if len(p) > MAX_N:
            raise _bad(f"prompt may hold at most {MAX_N} prompts, got {len(p)}", "prompt")
        for i, x in enumerate(p):
            if isinstance(x, list):
                if not x:
                    raise _bad(f"prompt[{i}] must not be an empty token list", f"prompt[{i}]")
                if min(x) < 0:
                    raise _bad(f"prompt[{i}] holds a negative token id", f"prompt[{i}]")
    _validate_completion_rest(req)


def _validate_completion_rest(req: CompletionRequest) -> None:
    if req.echo:
        raise _bad("echo is not supported", "echo")
    if req.suffix:
        raise _bad("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _bad(f"best_of must equal n (best_of sampling is not supported), got {req.best_of}", "best_of")
    if req.logprobs is not None and not (0 <= req.logprobs <= MAX_LOGPROBS_COMPLETION):
        raise _bad(
            f"logprobs must be between 0 and {MAX_LOGPROBS_COMPLETION}, got {req.logprobs}", "logprobs"
        )


# --------------------------------------------------------------------------------------------- mapping


def prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request, each a string or a list of token ids (one choice set each)."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [[x for x in p if isinstance(x, int)]]
    return [x for x in p if not isinstance(x, int)]


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # OpenAI sends function arguments as a JSON string; HF templates expect a mapping (they `tojson` it).
    out = []
    for call in calls:
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = None
            if isinstance(args, dict):
                call = {**call, "function": {**fn, "arguments": args}}
        out.append(call)
    return out


def template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as plain dicts for a chat template: absent fields left out (as ``transformers`` drops
    None-valued keys), tool-call arguments parsed to mappings, list content kept as OpenAI text parts
    (``Preprocessor`` joins them into a string for templates that only render string content)."""
    out: list[dict[str, Any]] = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role}
        if m.content is not None:
            c = m.content
            d["content"] = c if isinstance(c, str) else [{"type": "text", "text": p.text or ""} for p in c]
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls is not None:
            d["tool_calls"] = _tool_calls(m.tool_calls)
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


def requested_max_tokens(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def stop_strings(req: ChatCompletionRequest | CompletionRequest) -> list[str]:
    if req.stop is None:
        return []
    stops = [req.stop] if isinstance(req.stop, str) else req.stop
    # An empty stop string would end every generation before its first character; clients that send ""
    # mean "no stop string".
    return [s for s in dict.fromkeys(stops) if s]


def to_sampling(req: ChatCompletionRequest | CompletionRequest) -> Sampling:
    """Map a validated request to the worker's sampling and stop structs plus the frontend's stop strings.

    ``stop.max_tokens`` is the requested value, or 0 when the request left it out: call
    :func:`resolve_max_tokens` once the prompt is tokenized and store its result there.
    """
    ext = req.nvext
    temperature = 1.0 if req.temperature is None else req.temperature
    top_k = req.top_k
    repetition_penalty = req.repetition_penalty
    ignore_eos = req.ignore_eos
    if ext is not None:
        if ext.greed_sampling:
            temperature = 0.0
        if ext.top_k is not None and top_k is None:
            top_k = ext.top_k
        if ext.repetition_penalty is not None and repetition_penalty is None:
            repetition_penalty = ext.repetition_penalty
        if ext.ignore_eos:
            ignore_eos = True
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    sampling = SamplingParams(
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if top_k is None or top_k < 0 else top_k,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        logprobs=logprobs,
        logit_bias=structured.logit_bias(req),
        guided=structured.constraint(req),
    )
    stop = StopConditions(
        max_tokens=requested_max_tokens(req) or 0,
        min_tokens=req.min_tokens,
        stop_token_ids=list(dict.fromkeys(req.stop_token_ids or ())),
        ignore_eos=ignore_eos,
    )
    return Sampling(sampling, stop, stop_strings(req))


def resolve_max_tokens(
    req: ChatCompletionRequest | CompletionRequest, prompt_len: int, context_length: int
) -> int:
    """The number of tokens to generate: the requested value, or the rest of the context when none was
    requested. Raises :class:`InvalidRequest` (``context_length_exceeded``) with OpenAI's wording when the
    prompt, or prompt plus completion, does not fit."""
    where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    requested = requested_max_tokens(req)
    if prompt_len >= context_length:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens. However, your {where} resulted "
            f"in {prompt_len} tokens. Please reduce the length of the {where}.",
            code=ErrorCode.CONTEXT_LENGTH,
            param=where,
        )
    if requested is None:
        return context_length - prompt_len
    if prompt_len + requested > context_length:
        field = (
            "max_completion_tokens"
            if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None
            else "max_tokens"
        )
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {where}, {requested} in the completion). "
            f"Please reduce the length of the {where} or completion.",
            code=ErrorCode.CONTEXT_LENGTH,
            param=field,
        )
    return requested


# --------------------------------------------------------------------------------------------- docs

# Ranges checked in _validate_*, repeated here so the OpenAPI page shows them.
_BOUNDS: dict[str, dict[str, Any]] = {
    "max_tokens": {"minimum": 1},
    "max_completion_tokens": {"minimum": 1},
    "temperature": {"minimum": 0, "maximum": 2},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1},
    "min_p": {"minimum": 0, "maximum": 1},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "repetition_penalty": {"exclusiveMinimum": 0},
    "n": {"minimum": 1, "maximum": MAX_N},
    "min_tokens": {"minimum": 0},
    "top_logprobs": {"minimum": 0, "maximum": MAX_TOP_LOGPROBS_CHAT},
}
_ENUMS: dict[str, dict[str, list[str]]] = {"ChatMessage": {"role": list(ROLES)}}


def openapi_schemas(ref_template: str = "#/components/schemas/{name}") -> dict[str, dict[str, Any]]:
    """JSON schemas of both request bodies and every struct they use, keyed by name, for
    ``components.schemas`` of ``/openapi.json`` (refs point there). ``ChatCompletionRequest`` and
    ``CompletionRequest`` are the two request bodies."""
    _, components = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest], ref_template=ref_template
    )
    for name, schema in components.items():
        props = schema.get("properties", {})
        for field, bounds in _BOUNDS.items():
            if field not in props:
                continue
            prop = props[field]
            for alt in prop.get("anyOf", [prop]):
                if alt.get("type") in ("integer", "number"):
                    alt.update(bounds)
        for field, values in _ENUMS.get(name, {}).items():
            props[field]["enum"] = values
    return components
