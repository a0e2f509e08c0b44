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
import re
from typing import ClassVar

from frontend.parsers.base import JsonScanner, Parsed, ToolCall, ToolParser, releasable, tool_call

__all__ = ["DeepSeekV3Parser", "DelimitedParser", "HermesParser"]


class DelimitedParser(ToolParser):
    """Text, then calls each between ``start`` and ``end``; ``silent`` markers outside calls are dropped.

    A call streams: once its body shows the name and the opening brace of the arguments
    (:meth:`_args_start`), the name goes out, then the argument text as it arrives, up to the closing brace
    (an end marker inside a JSON string is argument text). A body of another shape waits for the end marker
    and is decoded whole (:meth:`_body`).
    """

    start: ClassVar[str] = ""
    end: ClassVar[str] = ""
    silent: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.in_call = False
        self._outside = (self.start, *self.silent)
        self.scan: JsonScanner | None = None  # set while a call's arguments stream
        self.sent = 0  # argument text sent so far ends here (an index into buf)
        self.closed = False  # the arguments' closing brace has been seen

    def _body(self, body: str) -> ToolCall | None:
        raise NotImplementedError

    def _args_start(self, body: str) -> tuple[str, int] | None:
        """(name, index of the arguments' opening brace) once ``body`` shows both; stable as it grows."""
        return None

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
            if self.scan is not None:
                if self._stream_args(out, final):
                    continue
                return
            j = buf.find(self.end)
            head = self._args_start(buf if j < 0 else buf[:j])
            if head is not None:
                name, brace = head
                self._open(out, name)
                self.scan = JsonScanner(brace)
                self.sent = brace
                self.closed = False
                continue
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

    def _stream_args(self, out: Parsed, final: bool) -> bool:
        """Send what is certain of a streaming call's arguments; True when the call ended."""
        scan = self.scan
        assert scan is not None
        buf = self.buf
        while not self.closed:
            j = buf.find(self.end, scan.pos)
            limit = j if j >= 0 else (len(buf) if final else max(scan.pos, releasable(buf, (self.end,))))
            self.closed = scan.end(buf, limit) is not None
            self._args(out, buf[self.sent:scan.pos])
            self.sent = scan.pos
            if self.closed:
                break
            if j >= 0 and scan.in_str:  # the marker is text inside a JSON string: argument text
                scan.end(buf, j + len(self.end))
                continue
            if j >= 0 or final:  # cut off before the closing brace: the call ends with what it has
                self.cut_off = j < 0
                return self._end_call(j if j >= 0 else len(buf))
            return False
        j = buf.find(self.end, scan.pos)
        k = buf.find(self.start, scan.pos)
        if k >= 0 and (j < 0 or k < j):  # the next call began without this one's end marker
            return self._end_call(k, consume=False)
        if j >= 0 or final:  # what sits between the closing brace and the end marker is the format's
            return self._end_call(j if j >= 0 else len(buf))
        return False

    def _end_call(self, at: int, consume: bool = True) -> bool:
        self.buf = self.buf[at + len(self.end) * consume:] if at < len(self.buf) else ""
        self.scan = None
        self.in_call = False
        self._close()
        return True


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

    # {"name": "NAME", "arguments": {   (the name first, as the format's instruction shows it)
    _head = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{')

    def _args_start(self, body: str) -> tuple[str, int] | None:
        m = self._head.match(body)
        if m is None:
            return None
        name = _json('"' + m.group(1) + '"')
        return (name, m.end() - 1) if isinstance(name, str) and name else None

    def _body(self, body: str) -> ToolCall | None:
        return tool_call(_json(body.strip()), "arguments", "parameters")


class DeepSeekV3Parser(DelimitedParser):
    name = "deepseek_v3"
    start = "<｜tool▁call▁begin｜>"
    end = "<｜tool▁call▁end｜>"
    sep = "<｜tool▁sep｜>"
    silent = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    markers = (start, end, sep, *silent)

    # V3 / R1: "function<｜tool▁sep｜>NAME\n```json\n{";  V3.1: "NAME<｜tool▁sep｜>{"
    _head_v3 = re.compile(r"\s*\w*<｜tool▁sep｜>([^\s<]+)\n```json\n\s*\{")
    _head_v31 = re.compile(r"\s*([^\s<]+)<｜tool▁sep｜>\s*\{")

    def _args_start(self, body: str) -> tuple[str, int] | None:
        m = self._head_v3.match(body) or self._head_v31.match(body)
        return (m.group(1), m.end() - 1) if m else None

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
