"""Pythonic tool calls (Llama 4, Llama 3.2 light models, ToolACE): the reply is a Python list of calls::

    [get_weather(city="Paris", unit="celsius"), get_time()]

optionally wrapped in Llama 4's ``<|python_start|>`` / ``<|python_end|>``. Arguments are keyword arguments
with literal values (strings, numbers, booleans, None, lists, dicts), decoded with ``ast`` (never
evaluated). A reply that does not open with such a list is plain content; so is a list that does not
decode to calls.
"""

from __future__ import annotations

import ast
import json
import re

from frontend.parsers.base import Parsed, ToolCall, ToolParser

__all__ = ["PythonicParser"]

# What the opening of a call list looks like; a reply is only held back while it may still be one.
_OPENING = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_OPENING_SO_FAR = re.compile(r"\[\s*(?:[A-Za-z_][\w.]*\s*)?")


def _calls(src: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    out = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = ast.unparse(node.func)
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:  # **kwargs
                return None
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
        try:
            out.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes, a complex number)
            return None
    return out


class _PyScanner:
    """Where a Python list ends: brackets outside of string literals (incremental, like JsonScanner)."""

    def __init__(self) -> None:
        self.pos = 0
        self.depth = 0
        self.quote = ""
        self.esc = False

    def end(self, buf: str) -> int | None:
        i, n = self.pos, len(buf)
        while i < n:
            c = buf[i]
            i += 1
            if self.quote:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == self.quote:
                    self.quote = ""
            elif c in "'\"":
                self.quote = c
            elif c in "([{":
                self.depth += 1
            elif c in ")]}":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i
                    return i
        self.pos = i
        return None


class PythonicParser(ToolParser):
    name = "pythonic"
    start_tag = "<|python_start|>"
    end_tag = "<|python_end|>"
    markers = (start_tag, end_tag)

    def __init__(self) -> None:
        super().__init__()
        self.state = "start"  # start -> list -> after -> plain
        self.tagged = False
        self.scan = _PyScanner()

    def _plain(self, out: Parsed, final: bool, prefix: str = "", failed: bool = False) -> None:
        self.state = "plain"
        self._raw(out, prefix + self.buf, failed)
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
                if not self.tagged and stripped.startswith(self.start_tag):
                    self.tagged = True
                    self.buf = stripped[len(self.start_tag):]
                    continue
                if not final and (not stripped or (not self.tagged and self.start_tag.startswith(stripped))):
                    return
                if _OPENING.match(stripped):
                    self.buf = stripped
                    self.state = "list"
                    continue
                if not final and _OPENING_SO_FAR.fullmatch(stripped):
                    return
                return self._plain(out, final, self.start_tag if self.tagged else "")
            if self.state == "list":
                end = self.scan.end(self.buf)
                if end is None:
                    if final:
                        return self._plain(out, final, self.start_tag if self.tagged else "", failed=True)
                    return
                calls = _calls(self.buf[:end])
                if calls is None:
                    return self._plain(out, final, self.start_tag if self.tagged else "", failed=True)
                for c in calls:
                    self._call(out, c)
                self.buf = self.buf[end:]
                self.state = "after"
                continue
            # after the list: the closing tag (when opened with one), then content
            if self.tagged:
                if stripped.startswith(self.end_tag):
                    self.buf = stripped[len(self.end_tag):]
                elif not final and self.end_tag.startswith(stripped):
                    return
            self.state = "plain"
