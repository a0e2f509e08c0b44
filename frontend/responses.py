"""``POST /v1/responses`` (OpenAI Responses API) as a translation over the chat path, plus GET / DELETE.

A Responses request becomes a chat-completions body (:func:`to_chat`): ``instructions`` the system message,
``input`` items chat messages (``function_call`` items an assistant's ``tool_calls``, ``function_call_output``
items ``role: tool`` messages), flat function tools the chat shape, ``text.format`` ``response_format``,
``max_output_tokens`` ``max_tokens``. It then runs through :mod:`frontend.translate` (the chat path in process).
The chat message becomes output items (:func:`output_items`: reasoning, message with ``output_text``,
``function_call``); the chat chunk stream becomes the Responses event sequence (:class:`EventTranslator`).
With ``store`` (the default) the response and its conversation go to :class:`~frontend.response_store.
ResponseStore`, where ``previous_response_id`` finds them from any frontend replica. Errors are OpenAI's shape.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from starlette.responses import Response

from dynamo_rt import errors
from frontend.app import Frontend, error_response, json_response
from frontend.response_store import ResponseStore
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

ENDPOINT = "responses"


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """The fields of a Responses request this server acts on (others are ignored, as OpenAI's API does)."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


def parse(body: bytes) -> ResponsesRequest:
    try:
        return msgspec.json.decode(body, type=ResponsesRequest)
    except msgspec.ValidationError as exc:
        raise errors.InvalidRequest(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise errors.InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _bad(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param)


def _field(item: dict[str, Any], key: str, param: str) -> Any:
    if key not in item or item[key] is None:
        raise _bad(f"{param}.{key} is required", f"{param}.{key}")
    return item[key]


def _text(content: Any, param: str) -> str:
    """The text of a message's content: a string, or input_text / output_text parts (joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{param} must be a string or a list of content parts", param)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise _bad(f"{param}[{j}]: content parts of type {kind!r} are not supported "
                       "(only input_text and output_text)", f"{param}[{j}].type")
        out.append(str(_field(part, "text", f"{param}[{j}]")))
    return "".join(out)


def input_messages(inp: str | list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """Responses input items as chat messages. Consecutive function calls (and an assistant message before
    them) become one assistant message with ``tool_calls``; a reasoning item goes with the assistant turn
    that follows it as ``reasoning_content``."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    msgs: list[dict[str, Any]] = []
    reasoning: str | None = None
    for i, item in enumerate(inp):
        at = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{at} must be an object", at)
        kind = item.get("type", "message")
        if kind == "message":
            role = _field(item, "role", at)
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{at}.role must be user, system, developer or assistant; got {role!r}", f"{at}.role")
            msg: dict[str, Any] = {"role": role, "content": _text(_field(item, "content", at), f"{at}.content")}
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            msgs.append(msg)
        elif kind == "function_call":
            call = {"id": str(_field(item, "call_id", at)), "type": "function",
                    "function": {"name": str(_field(item, "name", at)), "arguments": str(item.get("arguments", ""))}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant" and reasoning is None:
                last.setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning is not None:
                    msg["reasoning_content"], reasoning = reasoning, None
                msgs.append(msg)
        elif kind == "function_call_output":
            output = _field(item, "output", at)
            msgs.append({"role": "tool", "tool_call_id": str(_field(item, "call_id", at)),
                         "content": _text(output, f"{at}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)) \
                if isinstance(parts, list) else ""
        else:
            raise _bad(f"{at}: input items of type {kind!r} are not supported (message, function_call, "
                       "function_call_output and reasoning are)", f"{at}.type")
    return msgs


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses' flat function tools in the chat shape ``{"type": "function", "function": {...}}``."""
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise _bad(f"tools[{i}]: tools of type {t.get('type')!r} are not supported (only 'function')",
                       f"tools[{i}].type")
        _field(t, "name", f"tools[{i}]")
        if not isinstance(t.get("parameters", {}), dict | None):
            raise _bad(f"tools[{i}].parameters must be a JSON schema object", f"tools[{i}].parameters")
        out.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}})
    return out


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(f"tool_choice must be none, auto, required or a function; got {choice!r}", "tool_choice")
        return choice
    if choice.get("type") != "function":
        raise _bad(f"tool_choice of type {choice.get('type')!r} is not supported (only 'function')",
                   "tool_choice.type")
    return {"type": "function", "function": {"name": str(_field(choice, "name", "tool_choice"))}}


def response_format(fmt: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None for plain text)."""
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text.format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad(f"text.format of type {kind!r} is not supported (text, json_object, json_schema)",
               "text.format.type")


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chat body of ``req`` after ``history`` (a stored conversation), and the conversation it continues
    (history + this input, without ``instructions``: OpenAI does not carry them over to a continuation)."""
    conv = history + input_messages(req.input)
    msgs = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conv
    chat: dict[str, Any] = {"model": req.model, "messages": msgs, "stream": req.stream}
    if req.stream:
        chat["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if getattr(req, key) is not None:
            chat[key] = getattr(req, key)
    if req.max_output_tokens is not None:
        if req.max_output_tokens < 1:
            raise _bad(f"max_output_tokens must be >= 1, got {req.max_output_tokens}", "max_output_tokens")
        chat["max_tokens"] = req.max_output_tokens
    if req.tools:
        chat["tools"] = chat_tools(req.tools)
    if req.tool_choice is not None:
        chat["tool_choice"] = chat_tool_choice(req.tool_choice)
    if req.text and req.text.get("format"):
        rf = response_format(req.text["format"])
        if rf is not None:
            chat["response_format"] = rf
    return chat, conv


# ------------------------------------------------------------------------------------------- output


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(message: dict[str, Any], status: str = "completed") -> list[dict[str, Any]]:
    """A chat ``message`` as output items: reasoning, then the text message, then one item per tool call."""
    items = []
    if message.get("reasoning_content"):
        items.append(reasoning_item(new_id("rs"), message["reasoning_content"]))
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if content or not calls:
        items.append(message_item(new_id("msg"), content or "", status))
    for tc in calls:
        fn = tc.get("function") or {}
        items.append(function_call_item(new_id("fc"), tc.get("id") or new_id("call"), fn.get("name", ""),
                                        fn.get("arguments") or ""))
    return items


def usage_obj(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if u is None:
        return None
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached,
                                                                          "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": u["total_tokens"]}


def finish_status(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


class Turn:
    """One Responses request being served: its ids, the response object's fixed fields, and its store."""

    def __init__(self, req: ResponsesRequest, conv: list[dict[str, Any]], store: ResponseStore,
                 tenant: str | None = None) -> None:
        self.req = req
        self.tenant = tenant or ""
        self.conv = conv
        self.store = store
        self.id = new_id("resp")
        self.created = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 incomplete: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": error,
            "incomplete_details": incomplete, "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens, "model": r.model, "output": output,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id, "temperature": r.temperature, "top_p": r.top_p,
            "tool_choice": r.tool_choice if r.tool_choice is not None else "auto", "tools": r.tools or [],
            "text": {"format": (r.text or {}).get("format") or {"type": "text"}},
            "metadata": r.metadata or {}, "store": r.store, "truncation": "disabled", "usage": usage,
            "user": r.user,
        }

    async def save(self, resp: dict[str, Any]) -> None:
        if self.req.store:
            # The output items are valid input items: the stored conversation is this turn's input plus them.
            await self.store.put(self.id, {"response": resp, "tenant": self.tenant, "messages": self.conv
                                           + input_messages(resp["output"], "output")})


# ------------------------------------------------------------------------------------------- streaming


class EventTranslator:
    """Chat chunks in, Responses SSE events out (pure: no I/O, so it is tested by feeding chunks).

    One output item is open at a time: reasoning text, message text and each tool call open their own item
    and close the one before; :meth:`finish` closes the last and emits the terminal event.
    """

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # output items, in output_index order (done ones complete)
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _ev(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(kind, data)

    def start(self) -> bytes:
        r = self.turn.response("in_progress", [])
        return self._ev("response.created", response=r) + self._ev("response.in_progress", response=r)

    def _open(self, item: dict[str, Any]) -> bytes:
        out = self._close()
        self.items.append(item)
        self.open = item
        idx = len(self.items) - 1
        out += self._ev("response.output_item.added", output_index=idx, item=_copy(item))
        part = {"message": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                "reasoning": {"type": "reasoning_text", "text": ""}}.get(item["type"])
        if part is not None:
            out += self._ev("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                            part=part)
        return out

    def _close(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        idx = self.items.index(item)
        # A message cut at max_output_tokens is incomplete, as the non-streamed output says.
        item["status"] = "incomplete" if item["type"] == "message" and self.finish_reason == "length" \
            else "completed"
        out = b""
        if item["type"] == "message":
            part = item["content"][0]
            out += self._ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                            text=part["text"], logprobs=[])
            out += self._ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                            part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            out += self._ev("response.reasoning_text.done", item_id=item["id"], output_index=idx,
                            content_index=0, text=part["text"])
            out += self._ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                            part=part)
        else:
            out += self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                            name=item["name"], arguments=item["arguments"])
        return out + self._ev("response.output_item.done", output_index=idx, item=_copy(item))

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = b""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                text = delta["reasoning_content"]
                if self.open is None or self.open["type"] != "reasoning":
                    out += self._open(reasoning_item(new_id("rs"), "", "in_progress"))
                assert self.open is not None
                self.open["content"][0]["text"] += text
                out += self._ev("response.reasoning_text.delta", item_id=self.open["id"],
                                output_index=len(self.items) - 1, content_index=0, delta=text)
            if delta.get("content"):
                text = delta["content"]
                if self.open is None or self.open["type"] != "message":
                    out += self._open(message_item(new_id("msg"), "", "in_progress"))
                assert self.open is not None
                self.open["content"][0]["text"] += text
                out += self._ev("response.output_text.delta", item_id=self.open["id"],
                                output_index=len(self.items) - 1, content_index=0, delta=text, logprobs=[])
            for tc in delta.get("tool_calls") or []:
                out += self._tool_delta(tc)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def _tool_delta(self, tc: dict[str, Any]) -> bytes:
        out = b""
        index = int(tc.get("index", 0))
        fn = tc.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            item = function_call_item(new_id("fc"), tc.get("id") or new_id("call"), fn.get("name") or "", "",
                                      "in_progress")
            self.calls[index] = item
            out += self._open(item)
        elif fn.get("name") and not item["name"]:
            item["name"] = fn["name"]
        args = fn.get("arguments")
        if args:
            item["arguments"] += args
            out += self._ev("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=self.items.index(item), delta=args)
        return out

    def finish(self) -> tuple[bytes, dict[str, Any]]:
        """Close the last item; the terminal event and the final response object (to store before it)."""
        out = self._close()
        if not any(i["type"] == "message" for i in self.items) and not self.calls:
            # Nothing was generated: the response still has its (empty) message, as when not streamed.
            out += self._open(message_item(new_id("msg"), "", "in_progress")) + self._close()
        status, incomplete = finish_status(self.finish_reason)
        resp = self.turn.response(status, [_copy(i) for i in self.items], usage_obj(self.usage), incomplete)
        return out, resp

    def terminal(self, resp: dict[str, Any]) -> bytes:
        kind = "response.completed" if resp["status"] == "completed" else "response.incomplete"
        return self._ev(kind, response=resp)

    def failed(self, exc: errors.DynamoError) -> bytes:
        """The ``error`` event, then ``response.failed`` carrying the response so far."""
        code = "rate_limit_exceeded" if exc.status == 429 else "server_error"
        out = self._ev("error", code=str(exc.code), message=exc.message, param=exc.param)
        resp = self.turn.response("failed", [_copy(i) for i in self.items], usage_obj(self.usage),
                                  error={"code": code, "message": exc.message})
        return out + self._ev("response.failed", response=resp)


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {k: ([dict(c) for c in v] if isinstance(v, list) else v) for k, v in item.items()}


async def event_stream(fe: Frontend, p: Prepared, tr: EventTranslator) -> AsyncIterator[bytes]:
    """The SSE body of a streamed Responses request; it always ends with a terminal event."""
    turn = tr.turn
    yield tr.start()
    try:
        async for chunk in chat_chunks(fe, p):
            out = tr.feed(chunk)
            if out:
                yield out
        tail, resp = tr.finish()
        await turn.save(resp)  # stored before the client learns the id is complete
        yield tail + tr.terminal(resp)
    except errors.DynamoError as exc:
        yield tr.failed(exc)


# ------------------------------------------------------------------------------------------- routes


def attach(app: FastAPI, fe: Frontend, store: ResponseStore) -> None:
    """Add ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}`` to ``app``."""

    async def lookup(response_id: str, request: Request) -> dict[str, Any] | None:
        """The stored record, or None when there is none or another tenant stored it (API keys set)."""
        rec = await store.get(response_id)
        if rec is None or rec.get("tenant", "") != (tenant_of(request) or ""):
            return None
        return rec

    async def history(req: ResponsesRequest, request: Request) -> list[dict[str, Any]]:
        if req.previous_response_id is None:
            return []
        rec = await lookup(req.previous_response_id, request)
        if rec is None:
            raise errors.NotFound(f"Previous response with id '{req.previous_response_id}' not found.",
                                  param="previous_response_id")
        msgs: list[dict[str, Any]] = rec["messages"]
        return msgs

    @app.post("/v1/responses", openapi_extra=body_schema(ResponsesRequest))
    async def create(request: Request) -> Response:
        try:
            req = parse(await fe.read_body(request))
            chat, conv = to_chat(req, await history(req, request))
            p = await prepare_chat(fe, chat, tenant_of(request))
        except errors.DynamoError as exc:
            fe.metrics.requests.labels(ENDPOINT, str(exc.status)).inc()
            return error_response(exc)
        turn = Turn(req, conv, store, tenant_of(request))
        if req.stream:
            tr = EventTranslator(turn)
            return EndpointResponse(fe, ENDPOINT, p, error_response, stream=lambda: event_stream(fe, p, tr),
                                    stream_error=tr.failed)

        async def run() -> dict[str, Any]:
            out = await chat_result(fe, p)
            choice = out["choices"][0]
            status, incomplete = finish_status(choice.get("finish_reason"))
            resp = turn.response(status, output_items(choice["message"], status), usage_obj(out.get("usage")),
                                 incomplete)
            await turn.save(resp)
            return resp

        return EndpointResponse(fe, ENDPOINT, p, error_response, run=run)

    @app.get("/v1/responses/{response_id}")
    async def get(response_id: str, request: Request) -> Response:
        rec = await lookup(response_id, request)
        if rec is None:
            raise errors.NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return json_response(rec["response"])

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request) -> Response:
        if await lookup(response_id, request) is None or not await store.delete(response_id):
            raise errors.NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return json_response({"id": response_id, "object": "response", "deleted": True})
