"""Structured outputs in the frontend: a request's output constraint and ``logit_bias``, checked and mapped to
:class:`~dynamo_rt.protocol.GuidedDecoding` / ``SamplingParams.logit_bias``.

Place: :func:`frontend.openai_protocol.to_sampling` calls :func:`constraint` and :func:`logit_bias`. The
worker's engine enforces the constraint (the reference engine with a token mask per step,
:mod:`workers.reference.guided`; vLLM / SGLang / TensorRT-LLM with their own structured-output parameters).

Sources of a constraint, at most one per request (else 400):
  * ``response_format``: ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}`` (``"text"`` is no constraint);
  * vLLM-style extension fields, top level or under ``nvext``: ``guided_json`` (a schema, object or JSON
    text), ``guided_regex``, ``guided_choice`` (strings), ``guided_grammar`` (EBNF, xgrammar's dialect);
  * ``tool_choice`` ``"required"`` or ``{"type": "function", "function": {"name"}}``: the output must be one
    (``parallel_tool_calls`` true: one or more, separated by a newline) Hermes tool call
    ``<tool_call>\\n{"name": "<name>", "arguments": <object valid for that tool's parameters>}\\n</tool_call>``,
    the tool-call format of the tiny model's chat template, which the frontend's tool-call parser reads. It is
    an xgrammar structural tag (kind ``structural_tag``), which vLLM, SGLang and TensorRT-LLM also take.

A bad constraint is a 400 naming the parameter. What this module can check cheaply it checks here (shape,
JSON, the JSON Schema meta-schema when ``jsonschema`` is installed, Python's regex parser). Compiling is the
worker's job: xgrammar imports torch and transformers (seconds, and 270 MB, that a CPU-only frontend should
not pay), so a grammar the engine cannot compile or a schema feature it does not support comes back from the
worker as ``invalid_request``, a 400 too (its message names the parameter).
"""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

from dynamo_rt.errors import InvalidRequest
from dynamo_rt.protocol import GuidedDecoding

if TYPE_CHECKING:
    from frontend.openai_protocol import ChatCompletionRequest, CompletionRequest

MAX_LOGIT_BIAS = 1024  # entries per request
MAX_CHOICES = 256
MAX_SPEC_CHARS = 200_000  # a schema / grammar / regex larger than this is refused before compiling
TOOL_CALL_BEGIN = '<tool_call>\n{"name": '
TOOL_CALL_END = "}\n</tool_call>"
TOOL_CALL_SEPARATOR = "\n"


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def logit_bias(req: ChatCompletionRequest | CompletionRequest) -> dict[int, float] | None:
    """``logit_bias`` (token id strings -> -100..100) as ids -> floats. The worker refuses ids outside its
    vocabulary (a 400 too)."""
    raw = req.logit_bias
    if not raw:
        return None
    if len(raw) > MAX_LOGIT_BIAS:
        raise _bad(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(raw)}", "logit_bias")
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            tid = int(key)
        except ValueError:
            raise _bad(f"logit_bias keys must be token ids (integer strings), got {key!r}", "logit_bias") from None
        if not 0 <= tid < 2**31:
            raise _bad(f"logit_bias names token id {tid}, outside the vocabulary", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise _bad(f"logit_bias values must be between -100 and 100, got {value!r} for {key}", "logit_bias")
        out[tid] = float(value)
    return out


def constraint(req: ChatCompletionRequest | CompletionRequest) -> GuidedDecoding | None:
    """The request's output constraint (see the module docstring), checked; None when there is none."""
    found: list[tuple[str, GuidedDecoding]] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None:
        g = _response_format(fmt)
        if g is not None:
            found.append(("response_format", g))
    for prefix, src in (("", req), ("nvext.", req.nvext)):
        if src is None:
            continue
        if src.guided_json is not None:
            found.append((prefix + "guided_json", _json_schema(src.guided_json, prefix + "guided_json")))
        if src.guided_regex is not None:
            found.append((prefix + "guided_regex", _regex(src.guided_regex, prefix + "guided_regex")))
        if src.guided_choice is not None:
            found.append((prefix + "guided_choice", _choice(src.guided_choice, prefix + "guided_choice")))
        if src.guided_grammar is not None:
            found.append((prefix + "guided_grammar", _grammar(src.guided_grammar, prefix + "guided_grammar")))
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if choice is not None:
        g = tool_call_constraint(tools, choice, parallel=getattr(req, "parallel_tool_calls", None) is not False)
        if g is not None:
            found.append(("tool_choice", g))
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise _bad(f"only one output constraint may be given per request, got {names}", found[1][0])
    return found[0][1] if found else None


def _response_format(fmt: dict[str, Any]) -> GuidedDecoding | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding(kind="json_object")
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("response_format.json_schema must be an object with name and schema",
                       "response_format.json_schema")
        name = js.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise _bad("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
                       "response_format.json_schema.name")
        if "strict" in js and not isinstance(js["strict"], bool | None):
            raise _bad("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
        # Strict or not, the output is held to the schema: a constrained decoder has no cheaper mode.
        return _json_schema(js.get("schema", {}), "response_format.json_schema.schema")
    raise _bad(f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
               "response_format")


def _json_schema(schema: object, param: str) -> GuidedDecoding:
    if isinstance(schema, str):
        if len(schema) > MAX_SPEC_CHARS:
            raise _bad(f"{param} is over {MAX_SPEC_CHARS} characters", param)
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise _bad(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(schema, dict | bool):
        raise _bad(f"{param} must be a JSON schema (an object)", param)
    _check_meta_schema(schema, param)
    spec = json.dumps(schema, separators=(",", ":"), sort_keys=False)
    if len(spec) > MAX_SPEC_CHARS:
        raise _bad(f"{param} is over {MAX_SPEC_CHARS} characters", param)
    return GuidedDecoding(kind="json", spec=spec)


def _check_meta_schema(schema: dict[str, Any] | bool, param: str) -> None:
    problem = _meta_schema_problem(json.dumps(schema, sort_keys=True))
    if problem:
        raise _bad(f"{param} is not a valid JSON schema: {problem}", param)


@functools.lru_cache(maxsize=256)
def _meta_schema_problem(spec: str) -> str:
    """Why the schema ``spec`` (JSON text) breaks its JSON Schema meta-schema ("" if it does not), by spec: a
    request is checked at parse time and again when mapped, and clients repeat their schemas."""
    try:
        import jsonschema
    except ImportError:  # a slim frontend image: the engine's compile is the check
        return ""
    schema = json.loads(spec)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        return str(e.message) + (f" (at {where})" if where else "")
    return ""


def _regex(pattern: object, param: str) -> GuidedDecoding:
    if not isinstance(pattern, str) or not pattern:
        raise _bad(f"{param} must be a non-empty string", param)
    if len(pattern) > MAX_SPEC_CHARS:
        raise _bad(f"{param} is over {MAX_SPEC_CHARS} characters", param)
    try:
        re.compile(pattern)
    except re.error as e:
        raise _bad(f"{param} is not a valid regular expression: {e}", param) from None
    return GuidedDecoding(kind="regex", spec=pattern)


def _choice(choices: object, param: str) -> GuidedDecoding:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise _bad(f"{param} must be a non-empty list of non-empty strings", param)
    if len(choices) > MAX_CHOICES:
        raise _bad(f"{param} may hold at most {MAX_CHOICES} strings, got {len(choices)}", param)
    return GuidedDecoding(kind="choice", choices=list(dict.fromkeys(choices)))


def _grammar(text: object, param: str) -> GuidedDecoding:
    if not isinstance(text, str) or not text.strip():
        raise _bad(f"{param} must be a non-empty grammar (EBNF)", param)
    if len(text) > MAX_SPEC_CHARS:
        raise _bad(f"{param} is over {MAX_SPEC_CHARS} characters", param)
    return GuidedDecoding(kind="grammar", spec=text)


# --------------------------------------------------------------------------------------------- tool calls


def tool_call_constraint(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any], *,
                         parallel: bool = True) -> GuidedDecoding | None:
    """``tool_choice`` ``"required"`` / named -> the structural tag that makes the model emit Hermes tool
    calls with schema-valid arguments; None for ``"auto"`` / ``"none"``."""
    if choice in ("auto", "none"):
        return None
    functions = _functions(tools)
    if choice == "required":
        if not functions:
            raise _bad('tool_choice "required" needs at least one tool in tools', "tool_choice")
        chosen = functions
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _bad('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}', "tool_choice")
        chosen = [f for f in functions if f[0] == name]
        if not chosen:
            raise _bad(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    else:
        raise _bad(f'tool_choice must be "none", "auto", "required" or a named function, got {choice!r}',
                   "tool_choice")
    tags = [{"type": "tag", "begin": TOOL_CALL_BEGIN + json.dumps(name) + ', "arguments": ',
             # One whitespace character at most between JSON tokens: a random-weight model would pad forever.
             "content": {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": 1},
             "end": TOOL_CALL_END}
            for name, params in chosen]
    spec = json.dumps({"type": "structural_tag", "format": {
        "type": "tags_with_separator", "tags": tags, "separator": TOOL_CALL_SEPARATOR,
        "at_least_one": True, "stop_after_first": not parallel}})
    return GuidedDecoding(kind="structural_tag", spec=spec)


def _functions(tools: list[dict[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each function tool, checked."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                       f"tools[{i}]")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            param = f"tools[{i}].function.parameters"
            raise _bad(f"{param} must be a JSON schema object", param)
        _check_meta_schema(params, f"tools[{i}].function.parameters")
        out.append((fn["name"], params))
    return out
