"""``POST /v1/messages`` (Anthropic Messages API) as a translation over the chat path.

An Anthropic request becomes a chat-completions body (:func:`to_chat`): ``system`` the system message, content
blocks chat messages (``tool_use`` blocks an assistant's ``tool_calls``, ``tool_result`` blocks ``role: tool``
messages, ``thinking`` blocks ``reasoning_content``), tools with ``input_schema`` chat function tools,
``tool_choice`` any -> required, ``stop_sequences`` stop strings. It runs through :mod:`frontend.translate` (the
chat path in process); the chat message becomes content blocks (:func:`content_blocks`) and the chat chunk
stream Anthropic's event sequence (:class:`EventTranslator`). Every error on this route has Anthropic's shape
``{"type": "error", "error": {"type", "message"}}`` and status (:func:`error_response`), streamed as an
``error`` event.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from dynamo_rt import errors
from frontend.app import Frontend, json_response
from frontend.serving import Prepared
from frontend.translate import (
    EndpointResponse,
    body_schema,
    chat_chunks,
    chat_result,
    prepare_chat,
    sse,
    tenant_of,
)

log = logging.getLogger(__name__)

ENDPOINT = "messages"

# Our status -> Anthropic's error type and status (an overloaded service is 529 there).
_ERRORS: dict[int, tuple[str, int]] = {
    400: ("invalid_request_error", 400),
    401: ("authentication_error", 401),
    403: ("permission_error", 403),
    404: ("not_found_error", 404),
    413: ("request_too_large", 413),
    429: ("rate_limit_error", 429),
    503: ("overloaded_error", 529),
    504: ("timeout_error", 504),
}


def error_obj(exc: errors.DynamoError) -> tuple[dict[str, Any], int]:
    kind, status = _ERRORS.get(exc.status, ("api_error", 500))
    return {"type": "error", "error": {"type": kind, "message": exc.message}}, status


def error_response(exc: errors.DynamoError) -> Response:
    body, status = error_obj(exc)
    headers = None
    if isinstance(exc, errors.Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    return json_response(body, status, headers)


def error_event(exc: errors.DynamoError) -> bytes:
    return sse("error", error_obj(exc)[0])


class MessagesRequest(msgspec.Struct, kw_only=True):
    """The fields of a Messages request this server acts on (others, e.g. metadata, are ignored)."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False


def parse(body: bytes) -> MessagesRequest:
    try:
        return msgspec.json.decode(body, type=MessagesRequest)
    except msgspec.ValidationError as exc:
        raise errors.InvalidRequest(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise errors.InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def _bad(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param)


def _get(block: dict[str, Any], key: str, at: str) -> Any:
    if block.get(key) is None:
        raise _bad(f"{at}.{key}: Field required", f"{at}.{key}")
    return block[key]


def _texts(content: Any, at: str) -> str:
    """Text of a string or of text blocks (a system prompt, a tool result)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{at}: must be a string or a list of content blocks", at)
    out = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise _bad(f"{at}.{j}: content blocks of type {kind!r} are not supported here (only text)",
                       f"{at}.{j}.type")
        out.append(str(_get(block, "text", f"{at}.{j}")))
    return "".join(out)


def chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if req.system:
        msgs.append({"role": "system", "content": _texts(req.system, "system")})
    for i, m in enumerate(req.messages):
        at = f"messages.{i}"
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"{at}.role: must be 'user' or 'assistant', got {role!r}", f"{at}.role")
        content = _get(m, "content", at)
        if isinstance(content, str):
            msgs.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{at}.content: must be a string or a list of content blocks", f"{at}.content")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        thinking: str | None = None
        for j, block in enumerate(content):
            bat = f"{at}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(str(_get(block, "text", bat)))
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": str(_get(block, "id", bat)), "type": "function", "function": {
                    "name": str(_get(block, "name", bat)),
                    "arguments": orjson.dumps(block.get("input") or {}).decode()}})
            elif kind == "tool_result" and role == "user":
                results.append({"role": "tool", "tool_call_id": str(_get(block, "tool_use_id", bat)),
                                "content": _texts(block.get("content", ""), f"{bat}.content")})
            elif kind == "thinking" and role == "assistant":
                thinking = str(block.get("thinking", ""))
            elif kind == "redacted_thinking" and role == "assistant":
                continue  # opaque: nothing a template could render
            elif kind in ("image", "document"):
                raise _bad(f"{bat}: {kind} content blocks are not supported by this server", f"{bat}.type")
            else:
                raise _bad(f"{bat}: content block type {kind!r} is not supported in a {role} message",
                           f"{bat}.type")
        msgs.extend(results)  # a user turn's tool results answer the assistant turn before it: they go first
        if role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning_content"] = thinking
            msgs.append(msg)
        elif texts or not results:
            msgs.append({"role": "user", "content": "".join(texts)})
    return msgs


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        if t.get("type") not in (None, "custom"):
            raise _bad(f"tools.{i}: tools of type {t.get('type')!r} are not supported (only custom tools)",
                       f"tools.{i}.type")
        fn: dict[str, Any] = {"name": str(_get(t, "name", f"tools.{i}"))}
        if t.get("description"):
            fn["description"] = t["description"]
        schema = _get(t, "input_schema", f"tools.{i}")
        if not isinstance(schema, dict):
            raise _bad(f"tools.{i}.input_schema: must be a JSON schema object", f"tools.{i}.input_schema")
        fn["parameters"] = schema  # in OpenAI's key order: templates dump it
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: dict[str, Any]) -> str | dict[str, Any]:
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return str(kind)
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": str(_get(choice, "name", "tool_choice"))}}
    raise _bad(f"tool_choice.type: must be auto, any, tool or none, got {kind!r}", "tool_choice.type")


def to_chat(req: MessagesRequest) -> dict[str, Any]:
    if req.max_tokens < 1:
        raise _bad(f"max_tokens: must be >= 1, got {req.max_tokens}", "max_tokens")
    chat: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "max_tokens": req.max_tokens,
                            "stream": req.stream}
    if req.stream:
        chat["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p", "top_k"):
        if getattr(req, key) is not None:
            chat[key] = getattr(req, key)
    if req.stop_sequences:
        chat["stop"] = req.stop_sequences
        # Anthropic names the stop sequence that matched: the chat path keeps it in the text, we strip it.
        chat["include_stop_str_in_output"] = True
    if req.tools:
        chat["tools"] = chat_tools(req.tools)
    if req.tool_choice is not None:
        chat["tool_choice"] = chat_tool_choice(req.tool_choice)
        if req.tool_choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    return chat


# ------------------------------------------------------------------------------------------- output


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the ``input`` object (``{}`` when they are not an object)."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        log.warning("tool call arguments are not JSON: %.200r", arguments)
        return {}
    return value if isinstance(value, dict) else {}


def split_stop(text: str, stops: list[str] | None) -> tuple[str, str | None]:
    """``text`` without the stop sequence it ends with, and that sequence (None when none)."""
    for s in sorted(stops or [], key=len, reverse=True):
        if s and text.endswith(s):
            return text[: -len(s)], s
    return text, None


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def content_blocks(message: dict[str, Any], text: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if text or not message.get("tool_calls"):
        blocks.append({"type": "text", "text": text})
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function") or {}
        blocks.append({"type": "tool_use", "id": tc.get("id") or new_id("toolu"), "name": fn.get("name", ""),
                       "input": tool_input(fn.get("arguments") or "")})
    return blocks


def message_obj(msg_id: str, model: str, content: list[dict[str, Any]], reason: str | None,
                stop_sequence: str | None, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "content": content, "model": model,
            "stop_reason": reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


# ------------------------------------------------------------------------------------------- streaming


class EventTranslator:
    """Chat chunks in, Anthropic SSE events out (pure: no I/O, so it is tested by feeding chunks).

    One content block is open at a time. With stop sequences, the last characters of text are held back
    until the next chunk (or the end) shows they are not the stop sequence the chat path kept in the text.
    """

    def __init__(self, msg_id: str, model: str, input_tokens: int, stops: list[str] | None = None) -> None:
        self.msg_id = msg_id
        self.model = model
        self.input_tokens = input_tokens
        self.stops = [s for s in stops or [] if s]
        self.hold = max((len(s) for s in self.stops), default=0)
        self.index = -1  # index of the open block
        self.open: str | None = None  # type of the open block
        self.pending = ""  # text held back (stop sequences)
        self.calls: dict[int, int] = {}  # chat tool-call index -> content block index
        self.finish_reason: str | None = None
        self.output_tokens = 0

    def start(self) -> bytes:
        msg = message_obj(self.msg_id, self.model, [], None, None, self.input_tokens, 0)
        return sse("message_start", {"type": "message_start", "message": msg}) + sse("ping", {"type": "ping"})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.open = block["type"]
        return out + sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                                 "content_block": block})

    def _close(self, text_tail: str = "") -> bytes:
        if self.open is None:
            return b""
        out = b""
        if self.open == "text":
            text, self.pending = self.pending + text_tail, ""
            if text:
                out += self._delta({"type": "text_delta", "text": text})
        self.open = None
        return out + sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _text(self, text: str) -> bytes:
        out = b"" if self.open == "text" else self._open({"type": "text", "text": ""})
        buf = self.pending + text
        cut = max(0, len(buf) - self.hold)
        self.pending = buf[cut:]
        if cut:
            out += self._delta({"type": "text_delta", "text": buf[:cut]})
        return out

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if chunk.get("usage"):
            self.output_tokens = int(chunk["usage"].get("completion_tokens", 0))
        out = b""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.open != "thinking":
                    out += self._open({"type": "thinking", "thinking": "", "signature": ""})
                out += self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            if delta.get("content"):
                out += self._text(delta["content"])
            for tc in delta.get("tool_calls") or []:
                index = int(tc.get("index", 0))
                fn = tc.get("function") or {}
                if index not in self.calls:
                    out += self._open({"type": "tool_use", "id": tc.get("id") or new_id("toolu"),
                                       "name": fn.get("name") or "", "input": {}})
                    self.calls[index] = self.index
                if fn.get("arguments"):
                    if self.calls[index] != self.index:
                        # Blocks do not interleave here, and the chat path streams one call after the other.
                        log.warning("tool call %d: arguments after its block closed are dropped", index)
                        continue
                    out += self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]})
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def finish(self) -> bytes:
        stop_sequence = None
        if self.open == "text" and self.finish_reason == "stop":
            self.pending, stop_sequence = split_stop(self.pending, self.stops)
        out = b""
        if self.index < 0:  # nothing generated: still one (empty) text block, as when not streamed
            out += self._open({"type": "text", "text": ""})
        out += self._close()
        delta = {"stop_reason": stop_reason(self.finish_reason, stop_sequence), "stop_sequence": stop_sequence}
        return out + sse("message_delta", {"type": "message_delta", "delta": delta,
                                           "usage": {"output_tokens": self.output_tokens}}) \
            + sse("message_stop", {"type": "message_stop"})


async def event_stream(fe: Frontend, p: Prepared, tr: EventTranslator) -> AsyncIterator[bytes]:
    """The SSE body of a streamed Messages request: it ends with message_stop or an error event."""
    yield tr.start()
    try:
        async for chunk in chat_chunks(fe, p):
            out = tr.feed(chunk)
            if out:
                yield out
        yield tr.finish()
    except errors.DynamoError as exc:
        yield error_event(exc)


# ------------------------------------------------------------------------------------------- route


def attach(app: FastAPI, fe: Frontend) -> None:
    """Add ``POST /v1/messages`` to ``app``."""

    @app.post("/v1/messages", openapi_extra=body_schema(MessagesRequest))
    async def create(request: Request) -> Response:
        try:
            req = parse(await fe.read_body(request))
            p = await prepare_chat(fe, to_chat(req), tenant_of(request))
        except errors.DynamoError as exc:
            fe.metrics.requests.labels(ENDPOINT, str(exc.status)).inc()
            return error_response(exc)
        msg_id = new_id("msg")
        input_tokens = len(p.prompts[0])
        if req.stream:
            tr = EventTranslator(msg_id, req.model, input_tokens, req.stop_sequences)
            return EndpointResponse(fe, ENDPOINT, p, error_response, stream=lambda: event_stream(fe, p, tr),
                                    stream_error=error_event)

        async def run() -> dict[str, Any]:
            out = await chat_result(fe, p)
            choice = out["choices"][0]
            message = choice["message"]
            text, stop_sequence = message.get("content") or "", None
            if choice.get("finish_reason") == "stop":
                text, stop_sequence = split_stop(text, req.stop_sequences)
            usage = out.get("usage") or {}
            return message_obj(msg_id, req.model, content_blocks(message, text),
                               stop_reason(choice.get("finish_reason"), stop_sequence), stop_sequence,
                               int(usage.get("prompt_tokens", input_tokens)), int(usage.get("completion_tokens", 0)))

        return EndpointResponse(fe, ENDPOINT, p, error_response, run=run)
