"""Tool calls between a start and an end marker: Hermes / Qwen ``<tool_call>`` and DeepSeek V3.

Hermes (Qwen 2.5 / Qwen 3, NousResearch Hermes, this project's tiny model)::

    text <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

DeepSeek V3 (R1 and V3.1 as well) wraps its calls in ``<｜tool▁calls▁begin｜>`` ... ``<｜tool▁calls▁end｜>``; a
call is ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>`` (V3 / R1)
or ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`` (V3.1).

A body that does not decode to a call goes out as content, markers and all: the client sees what the model
wrote rather than losing it. A call cut off by the end of the text (the model stopped before its end marker)
still counts when its body decodes.
"""

from __future__ import annotations

import json
from typing import ClassVar

from frontend.parsers.base import Parsed, ToolCall, ToolParser, releasable, tool_call

__all__ = ["DeepSeekV3Parser", "DelimitedParser", "HermesParser"]


class DelimitedParser(ToolParser):
    """Text, then calls each between ``start`` and ``end``; ``silent`` markers outside calls are dropped."""

    start: ClassVar[str] = ""
    end: ClassVar[str] = ""
    silent: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.in_call = False
        self._outside = (self.start, *self.silent)

    def _body(self, body: str) -> ToolCall | None:
        raise NotImplementedError

    def _step(self, out: Parsed, *, final: bool) -> None:
        while True:
            buf = self.buf
            if not self.in_call:
                hit, at = "", -1
                for m in self._outside:
                    i = buf.find(m)
                    if i >= 0 and (at < 0 or i < at):
                        hit, at = m, i
                if at < 0:
                    n = len(buf) if final else releasable(buf, self._outside)
                    self._text(out, buf[:n])
                    self.buf = buf[n:]
                    if final:
                        self._end(out)
                    return
                if at:
                    self._text(out, buf[:at])
                self.buf = buf[at + len(hit):]
                self.in_call = hit == self.start
                continue
            j = buf.find(self.end)
            if j < 0:
                if final:
                    call = self._body(buf)
                    if call is not None:
                        self._call(out, call)
                    else:
                        self._raw(out, self.start + buf)
                    self.buf = ""
                    self._end(out)
                return
            call = self._body(buf[:j])
            if call is not None:
                self._call(out, call)
            else:
                self._raw(out, self.start + buf[: j + len(self.end)])
            self.buf = buf[j + len(self.end):]
            self.in_call = False


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


class HermesParser(DelimitedParser):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    markers = (start, end)

    def _body(self, body: str) -> ToolCall | None:
        return tool_call(_json(body.strip()), "arguments", "parameters")


class DeepSeekV3Parser(DelimitedParser):
    name = "deepseek_v3"
    start = "<｜tool▁call▁begin｜>"
    end = "<｜tool▁call▁end｜>"
    sep = "<｜tool▁sep｜>"
    silent = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    markers = (start, end, sep, *silent)

    def _body(self, body: str) -> ToolCall | None:
        head, found, rest = body.partition(self.sep)
        if not found:
            return None
        fence = rest.find("\n```json\n")
        if fence >= 0:  # V3 / R1: the type before the separator, then the name, then a fenced JSON block
            name, args = rest[:fence].strip(), rest[fence + len("\n```json\n"):].rstrip()
            if not args.endswith("```"):
                return None
            args = args[:-3]
        else:  # V3.1: the name before the separator, the JSON after
            name, args = head.strip(), rest
        if not name or any(c.isspace() for c in name):
            return None
        return tool_call({"name": name, "arguments": _json(args.strip())}, "arguments")
