"""Per-choice post-processing of chat output into ``content`` / ``reasoning_content`` / ``tool_calls``.

:func:`plan` decides once per request, in ``Frontend.prepare``, which parsers apply: the reasoning parser
named by ``--reasoning-parser`` or the model card, and the tool-call parser named by ``--tool-call-parser``
or the card when the request has tools and ``tool_choice`` is not ``none``. When neither applies it
returns None and the serving loop (``frontend/serving.py``) runs exactly as without this module: nothing
is added to the token path of a plain chat.

Otherwise each choice gets a :class:`ChoiceOutput`: the detokenized text deltas go through the reasoning
parser, its content through the tool-call parser (``frontend/parsers/``), and the results become

- non-streamed: ``message.content`` (None when only calls were made), ``message.reasoning_content``,
  ``message.tool_calls = [{id, type: "function", function: {name, arguments}}]`` and
  ``finish_reason: "tool_calls"`` when a call was made (``"length"`` when max_tokens cut a call short);
- streamed: OpenAI's delta shapes, one SSE event each: ``{"reasoning_content": ...}``, ``{"content": ...}``,
  a call's first delta ``{"tool_calls": [{index, id, type, function: {name, arguments: ""}}]}``, then its
  ``{"tool_calls": [{index, function: {arguments}}]}`` fragments. Hermes, DeepSeek, Llama 3 JSON and Mistral's
  ``NAME[ARGS]`` calls stream their arguments as the model writes them; Mistral's JSON list and pythonic
  calls go out once their text is complete, their arguments in one fragment.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from frontend.parsers import REASONING_PARSERS, TOOL_PARSERS, Parsed, ReasoningParser, ToolParser
from frontend.parsers.base import assemble
from frontend.sse import js

if TYPE_CHECKING:
    from prometheus_client import Counter

    from dynamo_rt.protocol import ModelCard, TokenLogprob
    from frontend.metrics import FrontendMetrics
    from frontend.openai_protocol import ChatCompletionRequest
    from frontend.sse import ChunkTemplates

__all__ = ["ChoiceOutput", "OutputPlan", "plan"]

log = logging.getLogger(__name__)

# The format the structured-output grammar makes a model write for tool_choice required / named; parsed
# with it when neither the flag nor the card names a tool-call parser.
FORCED_CALL_PARSER = "hermes"

_warned: set[str] = set()

# Test-only input hook: with this set in the frontend's environment, the choices of a request that gets
# parsers see this text instead of the model's (cut in 5-character deltas, one per model delta, the rest at
# the end), so an end-to-end test drives a known tool call through the real HTTP path with a random-weight
# model (tests/frontend/parsers/test_tools_e2e.py). Read once; nothing sets it outside tests.
TEST_OUTPUT_ENV = "DYN_TEST_CHAT_OUTPUT"
_TEST_OUTPUT = os.environ.get(TEST_OUTPUT_ENV) or None
_TEST_PIECE = 5


def _lookup(name: str, table: dict[str, Any], where: str) -> Any:
    cls = table.get(name)
    if cls is None and name not in _warned:
        _warned.add(name)
        log.warning("%s names unknown parser %r; its output is not parsed", where, name)
    return cls


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """Which parsers one request's choices run through."""

    tool_parser: type[ToolParser] | None
    reasoning_parser: type[ReasoningParser] | None
    parallel_tool_calls: bool = True  # False: the first call only
    test_text: str | None = None  # see TEST_OUTPUT_ENV
    calls_made: Counter | None = None  # dynamo_frontend_tool_calls of the model
    calls_failed: Counter | None = None  # dynamo_frontend_tool_call_parse_failures of the model

    @property
    def keep_special_tokens(self) -> bool:
        """The markers may be special tokens of the model's tokenizer, which detokenization must then keep
        (``<think>`` is one in some reasoning models as well)."""
        return self.reasoning_parser is not None or (
            self.tool_parser is not None and self.tool_parser.keep_special_tokens)

    def new(self) -> ChoiceOutput:
        return ChoiceOutput(self)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The non-streamed ``message`` of a choice and its finish_reason."""
        c = ChoiceOutput(self)
        out = c.feed(text)
        end = c.finish()
        content = out.content + end.content
        msg: dict[str, Any] = {"role": "assistant", "content": content if content or not c.ids else None}
        if self.reasoning_parser is not None:
            msg["reasoning_content"] = (out.reasoning + end.reasoning) or None
        if c.ids:
            calls = assemble(out.calls + end.calls)
            msg["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": call.name,
                                                                               "arguments": call.arguments}}
                                 for cid, call in zip(c.ids, calls, strict=True)]
        return msg, c.reason(finish_reason)


def plan(req: ChatCompletionRequest, card: ModelCard, tool_flag: str | None = None,
         reasoning_flag: str | None = None, metrics: FrontendMetrics | None = None) -> OutputPlan | None:
    """The parsers a chat request's output goes through; None when there are none (the lean path)."""
    tools_on = bool(req.tools) and req.tool_choice != "none"
    tool_cls: type[ToolParser] | None = None
    if tools_on:
        name = tool_flag or card.tool_call_parser
        if name:
            tool_cls = _lookup(name, TOOL_PARSERS, "--tool-call-parser" if tool_flag else f"model card {card.name!r}")
        forced = req.tool_choice == "required" or isinstance(req.tool_choice, dict)
        if tool_cls is None and forced:
            tool_cls = TOOL_PARSERS[FORCED_CALL_PARSER]
    reasoning_cls: type[ReasoningParser] | None = None
    rname = reasoning_flag or card.reasoning_parser
    kwargs = req.chat_template_kwargs or {}
    if kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False:
        rname = ""  # the template closed the think block in the prompt (Qwen3, DeepSeek V3.1): all content
    if rname:
        reasoning_cls = _lookup(rname, REASONING_PARSERS,
                                "--reasoning-parser" if reasoning_flag else f"model card {card.name!r}")
    if tool_cls is None and reasoning_cls is None:
        return None
    made = failed = None
    if metrics is not None and tool_cls is not None:
        made, failed = metrics.tool_calls.labels(card.name), metrics.tool_call_failures.labels(card.name)
    return OutputPlan(tool_cls, reasoning_cls, parallel_tool_calls=req.parallel_tool_calls is not False,
                      test_text=_TEST_OUTPUT, calls_made=made, calls_failed=failed)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ChoiceOutput:
    """One choice's parsers: reasoning first, then tool calls over the content that remains."""

    __slots__ = ("ids", "plan", "reasoning", "test_left", "tools")

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self.test_left = plan.test_text  # the test input not fed yet (None: the model's text is fed)
        self.reasoning = plan.reasoning_parser() if plan.reasoning_parser is not None else None
        self.tools = plan.tool_parser() if plan.tool_parser is not None else None
        self.ids: list[str] = []  # the id of each call begun so far, by index

    # ------------------------------------------------------------------ parsing

    def _tools(self, out: Parsed, final: bool) -> Parsed:
        if self.tools is not None:
            t = self.tools.feed(out.content) if out.content else Parsed()
            if final:
                end = self.tools.finish()
                t.content += end.content
                t.calls += end.calls
            out.content = t.content
            out.calls = t.calls
            if out.calls and not self.plan.parallel_tool_calls:
                out.calls = [d for d in out.calls if d.index == 0]
        for d in out.calls:
            if d.name is not None:
                self.ids.append(new_call_id())
        return out

    def feed(self, text: str) -> Parsed:
        if self.test_left is not None:
            text, self.test_left = self.test_left[:_TEST_PIECE], self.test_left[_TEST_PIECE:]
        out = self.reasoning.feed(text) if self.reasoning is not None else Parsed(content=text)
        return self._tools(out, final=False)

    def finish(self) -> Parsed:
        rest, self.test_left = self.test_left, None
        out = self.feed(rest) if rest else Parsed()
        end = self.reasoning.finish() if self.reasoning is not None else Parsed()
        tail = self._tools(end, final=True)
        p = self.plan
        if p.calls_made is not None and self.ids:
            p.calls_made.inc(len(self.ids))
        if p.calls_failed is not None and self.tools is not None and self.tools.failed:
            p.calls_failed.inc(self.tools.failed)
        out.reasoning += tail.reasoning
        out.content += tail.content
        out.calls += tail.calls
        return out

    def reason(self, finish_reason: str | None) -> str | None:
        # A call cut off by max_tokens mid-arguments leaves "length" (as OpenAI answers): the client must
        # know those arguments are incomplete.
        if not self.ids or (finish_reason == "length" and self.tools is not None and self.tools.cut_off):
            return finish_reason
        return "tool_calls"

    # ------------------------------------------------------------------ streaming

    def _events(self, t: ChunkTemplates, index: int, out: Parsed, lp: bytes | None) -> bytes:
        head = t.head + str(index).encode() + b',"delta":'
        events: list[bytes] = []

        def event(delta: dict[str, Any]) -> None:
            nonlocal lp
            events.append(head + js(delta) + b',"logprobs":' + (lp or b"null") + b',"finish_reason":null}]}\n\n')
            lp = None  # a delta's logprobs go with its first event

        if out.reasoning:
            event({"reasoning_content": out.reasoning})
        if out.content:
            event({"content": out.content})
        for d in out.calls:
            if d.name is not None:
                event({"tool_calls": [{"index": d.index, "id": self.ids[d.index], "type": "function",
                                       "function": {"name": d.name, "arguments": ""}}]})
            if d.arguments:
                event({"tool_calls": [{"index": d.index, "function": {"arguments": d.arguments}}]})
        if lp is not None:  # nothing visible yet (held back): the logprobs still go out
            event({"content": ""})
        return b"".join(events)

    def chunk(self, t: ChunkTemplates, index: int, text: str, lp: bytes | None = None) -> bytes:
        """SSE events for one text delta (b"" while everything is held back)."""
        return self._events(t, index, self.feed(text), lp)

    def flush(self, t: ChunkTemplates, index: int) -> bytes:
        """SSE events for what the end of the text decides."""
        return self._events(t, index, self.finish(), None)

    def finish_chunk(self, t: ChunkTemplates, index: int, finish_reason: str | None) -> bytes:
        return t.finish(index, self.reason(finish_reason) or "stop")

    async def stream(self, t: ChunkTemplates, index: int,
                     deltas: AsyncIterator[tuple[str, list[TokenLogprob] | None]],
                     lp_json: Callable[[list[TokenLogprob]], bytes]) -> AsyncIterator[bytes]:
        """The events of a whole choice (its finish chunk aside), from its text deltas."""
        async for text, lps in deltas:
            chunk = self.chunk(t, index, text, lp_json(lps) if lps else None)
            if chunk:
                yield chunk
        tail = self.flush(t, index)
        if tail:
            yield tail
