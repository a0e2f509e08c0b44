"""What every output parser shares: the result types, the marker hold-back rule and incremental scanners.

A parser is an incremental state machine over the text of one choice: ``feed(delta)`` returns what is now
certain (content, reasoning, tool-call deltas: a call's name once known, then its argument text as it
comes), ``finish()`` flushes what the end of the text decides.
The one rule that keeps markers out of ``content`` when a marker is split across stream chunks: text is only
released when no marker can still start inside it, so a buffer tail that is a prefix of a marker waits for
the next delta (:func:`releasable`). Non-streamed output is ``feed(text)`` + ``finish()`` on the same
machine, which is what makes the streamed and non-streamed results equal by construction (the property
tests in tests/frontend/parsers/ split real outputs at every offset to hold that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "JsonScanner",
    "Parsed",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "assemble",
    "releasable",
    "split_ws_tail",
    "tool_call",
]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One finished call: the function name and its arguments as JSON text (OpenAI sends a string)."""

    name: str
    arguments: str


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of call ``index``: its first delta carries the name, later ones more argument text."""

    index: int
    name: str | None
    arguments: str


@dataclass(slots=True)
class Parsed:
    """What one ``feed`` / ``finish`` made certain."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)


def assemble(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Whole calls from their deltas, in index order (what a client builds from a stream)."""
    names: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for d in deltas:
        if d.name is not None:
            names[d.index] = d.name
        args.setdefault(d.index, []).append(d.arguments)
    return [ToolCall(names[i], "".join(args[i])) for i in sorted(names)]


def releasable(buf: str, markers: tuple[str, ...]) -> int:
    """How much of ``buf`` can be released: all of it but the longest tail that is a proper prefix of a
    marker (that tail may still become the marker when the next delta comes)."""
    n = len(buf)
    keep = 0
    for m in markers:
        # A held tail starts with the marker's first character, within its length of the end: usually one
        # C-level find per marker and no slicing (this runs on every delta).
        i = buf.find(m[0], max(0, n - len(m) + 1))
        while i >= 0:
            if n - i <= keep:
                break
            if m.startswith(buf[i:]):
                keep = n - i
                break
            i = buf.find(m[0], i + 1)
    return n - keep


def split_ws_tail(text: str) -> tuple[str, str]:
    """``text`` as (everything up to its trailing whitespace, the trailing whitespace)."""
    body = text.rstrip()
    return body, text[len(body):]


def tool_call(obj: Any, *arg_keys: str) -> ToolCall | None:
    """A ToolCall from a decoded ``{"name": ..., <arg_key>: {...}}`` object; None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = {}
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models send the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


class JsonScanner:
    """Finds where a JSON object or array ends, resuming where the last call stopped (no rescans of a long
    argument list on every token). Strings and escapes are tracked; validity is left to ``json.loads``."""

    __slots__ = ("depth", "esc", "in_str", "pos", "start")

    def __init__(self, start: int) -> None:
        self.start = start  # index of the opening bracket
        self.pos = start
        self.depth = 0
        self.in_str = False
        self.esc = False

    def end(self, buf: str, limit: int | None = None) -> int | None:
        """Index just past the value's closing bracket, or None while it is still open (looking no further
        than ``limit``)."""
        i, n = self.pos, len(buf) if limit is None else limit
        depth, in_str, esc = self.depth, self.in_str, self.esc
        while i < n:
            c = buf[i]
            i += 1
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    self.pos, self.depth, self.in_str, self.esc = i, depth, in_str, esc
                    return i
        self.pos, self.depth, self.in_str, self.esc = i, depth, in_str, esc
        return None


class Incremental:
    """The driver every parser shares: text goes into ``buf``; ``_step`` moves what is certain into a
    :class:`Parsed` and keeps the rest (a possible marker's prefix) for the next chunk; ``finish`` flushes."""

    buf: str
    done: bool

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        self._step(out, final=False)
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        if not self.done:
            self.done = True
            self._step(out, final=True)
        return out

    def parse(self, text: str) -> Parsed:
        """The whole text at once (non-streamed): the same machine, fed once."""
        out = self.feed(text)
        end = self.finish()
        out.content += end.content
        out.reasoning += end.reasoning
        out.calls += end.calls
        return out

    def _step(self, out: Parsed, *, final: bool) -> None:
        raise NotImplementedError


class ToolParser(Incremental):
    """Base of the tool-call parsers: a text buffer and a ``_step`` that consumes what is certain.

    ``keep_special_tokens``: the format's markers are special tokens in some of its models' tokenizers
    (``[TOOL_CALLS]``, ``<|python_tag|>``, and ``<tool_call>`` in some Hermes-format models), so the frontend
    must not skip special tokens when it detokenizes or the parser never sees them. Stop tokens stay out of
    the text either way.
    """

    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()  # what must never reach content (tests check this)
    keep_special_tokens: ClassVar[bool] = True

    def __init__(self) -> None:
        self.buf = ""
        self.done = False
        self.calls = 0  # calls made so far
        self._ws = ""  # whitespace at the end of the content so far, held until text follows it
        self._strip_lead = False  # just after a call: whitespace before the next text is dropped
        self.failed = 0  # would-be calls (a marker, an opening) that did not decode: sent as content
        self.cut_off = False  # the text ended inside a call's arguments (the call is incomplete)

    # Whitespace that only separates content from calls ("text\n\n<tool_call>", newlines between calls) is
    # not content: trailing whitespace is held until non-space text follows it and dropped when the text ends
    # after a call; the whitespace that starts the text right after a call is dropped. Output with no call
    # keeps every character.

    def _text(self, out: Parsed, seg: str) -> None:
        """Release ``seg`` (known not to hold a marker) as content, under the whitespace rule."""
        if self._strip_lead:
            seg = seg.lstrip()
            if not seg:
                return
            self._strip_lead = False
        body, tail = split_ws_tail(self._ws + seg)
        out.content += body
        self._ws = tail

    def _call(self, out: Parsed, call: ToolCall) -> None:
        """A whole call at once."""
        out.calls.append(ToolCallDelta(self.calls, call.name, call.arguments))
        self._close()

    def _open(self, out: Parsed, name: str) -> None:
        """The start of a call whose arguments follow in pieces (``_args``) until ``_close``."""
        out.calls.append(ToolCallDelta(self.calls, name, ""))

    def _args(self, out: Parsed, text: str) -> None:
        if not text:
            return
        last = out.calls[-1] if out.calls else None
        if last is not None and last.index == self.calls:
            last.arguments += text  # one delta per feed is enough
        else:
            out.calls.append(ToolCallDelta(self.calls, None, text))

    def _close(self) -> None:
        self._strip_lead = True
        self.calls += 1

    def _raw(self, out: Parsed, text: str, failed: bool = True) -> None:
        """A would-be call that is not one (``failed``), or text that never looked like one: the model's text
        goes out as content, as written."""
        self.failed += failed
        self._strip_lead = False
        self._text(out, text)

    def _end(self, out: Parsed) -> None:
        if not self.calls:
            out.content += self._ws
        self._ws = ""
