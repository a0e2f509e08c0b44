"""Tool calls written as bare JSON: Llama 3.x and Mistral.

Llama 3.1 / 3.2 / 3.3 (JSON-based tool calling): the whole reply is the call, optionally after
``<|python_tag|>``, several separated by ``;``::

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

A reply that does not open with ``{`` or the tag is plain content; text after the last call that is not
another call goes out as content. A call that opens with its name streams its parameters as they come.

Mistral: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (v0.3 tokenizers), or, in the
newer tokenizers (v11+), ``[TOOL_CALLS]NAME[ARGS]{...}`` once per call (an optional ``[CALL_ID]id`` after
the name is dropped: ids are ours).
"""

from __future__ import annotations

import json
import re

from frontend.parsers.base import JsonScanner, Parsed, ToolParser, releasable, tool_call

__all__ = ["Llama3JsonParser", "MistralParser"]

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _decode(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    tag = "<|python_tag|>"
    markers = (tag,)

    # {"name": "NAME", "parameters": {   (the name first, as Llama's instruction asks): the call streams
    _head = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)+)"\s*,\s*"(?:parameters|arguments)"\s*:\s*\{')

    def __init__(self) -> None:
        super().__init__()
        self.state = "start"  # start -> calls <-> sep; any -> plain (the rest is content)
        self.scan: JsonScanner | None = None  # the call object in progress
        self.args: JsonScanner | None = None  # its arguments, while they stream
        self.args_done = False
        self.sent = 0

    def _plain(self, out: Parsed, final: bool, failed: bool = False) -> None:
        self.state = "plain"
        self._raw(out, self.buf, failed)
        self.buf = ""
        if final:
            self._end(out)

    def _step(self, out: Parsed, *, final: bool) -> None:
        while True:
            if self.state == "plain":
                self._text(out, self.buf)
                self.buf = ""
                if final:
                    self._end(out)
                return
            stripped = self.buf.lstrip()
            if self.state == "start":
                if stripped.startswith(self.tag):
                    self.buf = stripped[len(self.tag):]
                    self.state = "calls"
                    continue
                if stripped.startswith("{"):
                    self.buf = stripped
                    self.state = "calls"
                    continue
                if not final and (not stripped or self.tag.startswith(stripped)):
                    return  # may still become the tag
                return self._plain(out, final)
            if self.state == "sep":
                if stripped.startswith(";"):
                    self.buf = stripped[1:]
                    self.state = "calls"
                    continue
                if stripped.startswith("{"):
                    self.buf = stripped
                    self.state = "calls"
                    continue
                if not stripped and not final:
                    return
                self.buf = stripped  # the text after the calls, less the whitespace that separated it
                return self._plain(out, final)
            # calls: a JSON object, then a separator
            if self.scan is None:
                if not stripped:
                    if final:
                        self.buf = ""
                        self._end(out)
                    return
                if not stripped.startswith("{"):
                    return self._plain(out, final, failed=True)
                self.buf = stripped
                self.scan = JsonScanner(0)
            if self.args is None:
                m = self._head.match(self.buf)
                name = _decode('"' + m.group(1) + '"') if m else None
                if m and isinstance(name, str):
                    self._open(out, name)
                    self.args = JsonScanner(m.end() - 1)
                    self.sent = m.end() - 1
                    self.args_done = False
            if self.args is not None:
                if not self.args_done:
                    self.args_done = self.args.end(self.buf) is not None
                    self._args(out, self.buf[self.sent:self.args.pos])
                    self.sent = self.args.pos
                end = self.scan.end(self.buf)  # the call object, around its arguments
                if end is None and not final:
                    return
                if end is None:
                    self.cut_off = not self.args_done
                self._close()
                self.buf = self.buf[end:] if end is not None else ""
                self.scan = self.args = None
                self.state = "sep"
                continue
            end = self.scan.end(self.buf)
            if end is None:
                if final:
                    return self._plain(out, final, failed=True)
                return
            call = tool_call(_decode(self.buf[:end]), "parameters", "arguments")
            self.scan = None
            if call is None:
                return self._plain(out, final, failed=True)
            self._call(out, call)
            self.buf = self.buf[end:]
            self.state = "sep"


class MistralParser(ToolParser):
    name = "mistral"
    tag = "[TOOL_CALLS]"
    args_tag = "[ARGS]"
    id_tag = "[CALL_ID]"
    markers = (tag, args_tag, id_tag)

    def __init__(self) -> None:
        super().__init__()
        self.state = "text"  # text -> after_tag -> (list | name -> args) -> text
        self.scan: JsonScanner | None = None
        self.raw = ""  # the would-be call so far, for content if it turns out not to be one
        self.call_name = ""
        self.sent = 0  # streamed argument text ends here (an index into buf)

    def _name_so_far(self, buf: str) -> bool:
        """Whether ``buf`` can still grow into ``NAME[CALL_ID]id[ARGS]`` (a name is short and plain)."""
        head = buf[: releasable(buf, (self.args_tag, self.id_tag))]
        name, found, call_id = head.partition(self.id_tag)
        if name and not _NAME.fullmatch(name):
            return False
        return not found or call_id == "" or (call_id.isalnum() and len(call_id) <= 64)

    def _fail(self, out: Parsed) -> None:
        self._raw(out, self.tag + self.raw + self.buf)
        self.buf = self.raw = ""
        self.scan = None
        self.state = "text"

    def _step(self, out: Parsed, *, final: bool) -> None:
        while True:
            buf = self.buf
            if self.state == "text":
                at = buf.find(self.tag)
                if at < 0:
                    n = len(buf) if final else releasable(buf, (self.tag,))
                    self._text(out, buf[:n])
                    self.buf = buf[n:]
                    if final:
                        self._end(out)
                    return
                self._text(out, buf[:at])
                self.buf = buf[at + len(self.tag):]
                self.raw = ""
                self.state = "after_tag"
                continue
            if self.state == "after_tag":
                stripped = buf.lstrip()
                if not stripped:
                    if final:
                        self._fail(out)
                        continue
                    return
                self.raw += buf[: len(buf) - len(stripped)]
                self.buf = stripped
                self.state = "list" if stripped[0] == "[" else "name"
                self.scan = JsonScanner(0) if self.state == "list" else None
                continue
            if self.state == "list":
                assert self.scan is not None
                end = self.scan.end(buf)
                if end is None:
                    if final:
                        self._fail(out)
                        continue
                    return
                items = _decode(buf[:end])
                calls = [tool_call(x, "arguments", "parameters") for x in items] if isinstance(items, list) else []
                if not calls or any(c is None for c in calls):
                    self.buf = buf[:end]
                    tail = buf[end:]
                    self._fail(out)
                    self.buf = tail
                    continue
                for c in calls:
                    assert c is not None
                    self._call(out, c)
                self.buf = buf[end:]
                self.scan = None
                self.state = "text"
                continue
            if self.state == "name":
                at = buf.find(self.args_tag)
                if at < 0:
                    if final or not self._name_so_far(buf):
                        self._fail(out)
                        continue
                    return
                name, _, call_id = buf[:at].partition(self.id_tag)
                if not _NAME.fullmatch(name) or not (call_id == "" or call_id.isalnum()):
                    self._fail(out)
                    continue
                self.raw += buf[: at + len(self.args_tag)]
                self.buf = buf[at + len(self.args_tag):]
                self.call_name = name
                self.state = "args"
                continue
            # args: one JSON object, streamed as it comes once its opening brace is seen
            if self.scan is None:
                stripped = buf.lstrip()
                if not stripped:
                    if final:
                        self._fail(out)
                        continue
                    return
                if stripped[0] != "{":
                    self._fail(out)
                    continue
                self.buf = buf = stripped
                self.scan = JsonScanner(0)
                self._open(out, self.call_name)
            end = self.scan.end(buf)
            self._args(out, buf[self.sent:self.scan.pos])
            self.sent = self.scan.pos
            if end is None and not final:
                return
            self.cut_off = end is None
            self._close()
            self.buf = buf[end:] if end is not None else ""
            self.scan = None
            self.sent = 0
            self.raw = ""
            self.state = "text"
