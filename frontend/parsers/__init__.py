"""Output parsers of chat text: tool calls and reasoning, streamed and not, by format name.

Map:
- ``base``: result types (``Parsed``, ``ToolCall``, ``ToolCallDelta``: a call's name first, then argument
  fragments), the marker hold-back rule, incremental JSON scanning, the ``ToolParser`` base
  (feed / finish / parse).
- ``delimited``: ``hermes`` (Hermes / Qwen ``<tool_call>``) and ``deepseek_v3``.
- ``jsonish``: ``llama3_json`` and ``mistral``.
- ``pythonic``: ``pythonic`` (Llama 4 and other ``[f(a=1)]`` models).
- ``reasoning``: ``deepseek_r1`` and ``qwen3`` ``<think>`` parsers.

``frontend/chat_output.py`` runs them per choice and shapes OpenAI messages and stream deltas; the names
here are what ``--tool-call-parser`` / ``--reasoning-parser`` and the model card's fields accept.
"""

from __future__ import annotations

from dynamo_rt.errors import ConfigError
from frontend.parsers.base import Parsed, ToolCall, ToolParser
from frontend.parsers.delimited import DeepSeekV3Parser, HermesParser
from frontend.parsers.jsonish import Llama3JsonParser, MistralParser
from frontend.parsers.pythonic import PythonicParser
from frontend.parsers.reasoning import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningParser

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "Parsed",
    "ReasoningParser",
    "ToolCall",
    "ToolParser",
    "reasoning_parser",
    "tool_parser",
]

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen": HermesParser,  # Qwen 2.5 / 3 write Hermes' format
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "deepseek_v3": DeepSeekV3Parser,
    "pythonic": PythonicParser,
    "llama4_pythonic": PythonicParser,
}

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def tool_parser(name: str, flag: str = "--tool-call-parser") -> type[ToolParser]:
    """The tool-call parser class of a name; ConfigError naming ``flag`` when there is none."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ConfigError(flag, f"unknown tool-call parser {name!r}; one of {', '.join(sorted(TOOL_PARSERS))}")
    return cls


def reasoning_parser(name: str, flag: str = "--reasoning-parser") -> type[ReasoningParser]:
    cls = REASONING_PARSERS.get(name)
    if cls is None:
        raise ConfigError(flag, f"unknown reasoning parser {name!r}; one of {', '.join(sorted(REASONING_PARSERS))}")
    return cls
