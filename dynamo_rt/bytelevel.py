"""Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, ...): each vocabulary character stands for one byte.

One home for the byte map and the rule that turns a vocabulary entry back into bytes, used by the frontend's
streaming detokenizer (:func:`frontend.preprocess.byte_level_tokens`) and the reference engine's guided
decoding (:func:`workers.reference.guided.token_bytes`).
"""

from __future__ import annotations


def _byte_chars() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS: dict[int, str] = _byte_chars()  # byte -> the printable character that stands for it
_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in BYTE_CHARS.items()})
_DROP_MAPPED = str.maketrans(dict.fromkeys(BYTE_CHARS.values()))


def token_text_bytes(text: str) -> bytes:
    """The bytes a vocabulary entry stands for, as tokenizers' ``ByteLevel`` decoder reads it: every character
    mapped back to its byte or, when one is not a byte character (an added token such as ``<|im_end|>``),
    the entry's own UTF-8."""
    if text.translate(_DROP_MAPPED):
        return text.encode("utf-8")
    return text.translate(_TO_LATIN1).encode("latin-1")
