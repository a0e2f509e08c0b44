"""Which output parsers a model's chat template implies, so a worker's model card can name them.

A worker publishes its model card (``dynamo_rt/protocol.py`` ``ModelCard``); the frontend parses tool calls
and reasoning with the parsers the card names (``frontend/parsers/``) unless its own ``--tool-call-parser``
/ ``--reasoning-parser`` say otherwise. The template is the one place that tells which format the model was
trained to write, so the names come from the markers it renders.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["parsers_for_model_dir", "parsers_for_template"]

# Marker in the template -> tool-call parser. Order matters: a template may mention several.
_TOOL_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<|python_start|>", "pythonic"),
    ("[func_name1(", "pythonic"),  # the instruction Meta's Llama 3.2 / 4 templates give for calls
    ("<|python_tag|>", "llama3_json"),
    ('"parameters": dictionary of argument name', "llama3_json"),  # Llama 3.1's JSON-call instruction
)


def parsers_for_template(template: str) -> tuple[str, str]:
    """(tool-call parser, reasoning parser) names for a chat template; "" where none applies."""
    tool = next((name for marker, name in _TOOL_MARKERS if marker in template), "")
    reasoning = ""
    if "</think>" in template:
        # A template that writes an open <think> into the generation prompt has opened the block for the
        # model: its reply starts inside it (deepseek_r1). Otherwise (Qwen3's empty "<think></think>" when
        # thinking is off included) the model opens it itself (qwen3).
        at = template.rfind("add_generation_prompt")
        tail = template[at:at + 400] if at >= 0 else ""
        reasoning = "deepseek_r1" if "<think>" in tail and "</think>" not in tail else "qwen3"
    return tool, reasoning


def parsers_for_model_dir(path: str | Path | None) -> tuple[str, str]:
    """The same for a Hugging Face model folder (``chat_template.jinja``, else tokenizer_config.json's)."""
    if not path:
        return "", ""
    root = Path(path)
    template = ""
    if (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    elif (root / "tokenizer_config.json").is_file():
        try:
            ct = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            ct = None
        if isinstance(ct, str):
            template = ct
        elif isinstance(ct, list):
            template = "\n".join(str(t.get("template", "")) for t in ct if isinstance(t, dict))
    return parsers_for_template(template)
