"""Reasoning parsers: split a model's thinking (``reasoning_content``) from its answer (``content``).

- ``deepseek_r1``: DeepSeek R1 and the templates that open ``<think>`` in the prompt (R1-0528, QwQ,
  Qwen3-Thinking): everything before ``</think>`` is reasoning, with or without an opening ``<think>`` in
  the output; a reply cut off before ``</think>`` is all reasoning.
- ``qwen3``: Qwen3 hybrid models: reasoning only when the reply opens ``<think>`` itself (with
  ``enable_thinking=False`` the template writes an empty think block into the prompt and the reply is all
  content).

Both are incremental like the tool parsers: a tail that may still become a marker waits for the next delta.
"""

from __future__ import annotations

from typing import ClassVar

from frontend.parsers.base import Incremental, Parsed, releasable

__all__ = ["DeepSeekR1ReasoningParser", "Qwen3ReasoningParser", "ReasoningParser"]


class ReasoningParser(Incremental):
    name: ClassVar[str] = ""
    open_tag: ClassVar[str] = "<think>"
    close_tag: ClassVar[str] = "</think>"
    markers: ClassVar[tuple[str, ...]] = (open_tag, close_tag)
    starts_in_reasoning: ClassVar[bool] = False  # the prompt already opened the think block

    def __init__(self) -> None:
        self.buf = ""
        self.state = "start"  # start -> reasoning -> content
        self.done = False

    def _step(self, out: Parsed, *, final: bool) -> None:
        while True:
            buf = self.buf
            if self.state == "content":
                out.content += buf
                self.buf = ""
                return
            if self.state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(self.open_tag):
                    self.buf = stripped[len(self.open_tag):]
                    self.state = "reasoning"
                    continue
                if not final and self.open_tag.startswith(stripped):
                    return  # only whitespace or a prefix of <think> so far
                self.state = "reasoning" if self.starts_in_reasoning else "content"
                continue
            at = buf.find(self.close_tag)
            if at >= 0:
                out.reasoning += buf[:at]
                self.buf = buf[at + len(self.close_tag):]
                self.state = "content"
                continue
            n = len(buf) if final else releasable(buf, (self.close_tag,))
            out.reasoning += buf[:n]
            self.buf = buf[n:]
            return


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
