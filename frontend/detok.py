"""Token ids -> streamed text: incremental detokenization, stop strings, finish reasons.

The frontend's streaming loop gets token ids from a worker in batches (one or more per NATS message) and
feeds each batch to one :class:`OutputProcessor` per choice, which returns the text to send and, once, why
the choice finished. It is built from two parts that are usable alone:

* :class:`IncrementalDetokenizer` turns ids into text without ever emitting a broken character: a UTF-8
  sequence split over byte-level tokens is held back until its last byte arrives. Byte-level BPE tokenizers
  (GPT-2, Llama 3, Qwen, ...) stream by table: each id's bytes (:func:`frontend.preprocess.byte_level_tokens`)
  are appended and decoded as UTF-8, no window re-decoded; other tokenizers use ``tokenizers``'
  ``DecodeStream`` in Rust when available, else the prefix/read-offset window in Python.
* :class:`StopChecker` finds stop strings across chunk boundaries, holding back only the text that could
  still become a stop string, and cuts the stop string and everything after it.

Per token the work is a list index and a UTF-8 decode (byte-level tokenizers), else one Rust call, plus a
few set and string operations. DecodeStream re-decodes a window per step: 1.7-3.5 us per token alone on a
quiet 2-core box, ~10 us inside the frontend under 64 paced streams (cProfile), against ~0.3 us by table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers.decoders
from tokenizers import Tokenizer

from dynamo_rt.protocol import FinishReason
from frontend.openai_protocol import Sampling
from frontend.preprocess import Preprocessor

# tokenizers >= 0.21 streams in Rust; older versions get the same algorithm in Python.
_DecodeStream: Any = getattr(tokenizers.decoders, "DecodeStream", None)

__all__ = ["HAVE_DECODE_STREAM", "IncrementalDetokenizer", "OutputProcessor", "StopChecker"]

HAVE_DECODE_STREAM = _DecodeStream is not None
_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context, so decoders that drop a leading space at the start of a decode
# (SentencePiece "▁") render the first generated word as it reads after the prompt.
PROMPT_TAIL = 4


class IncrementalDetokenizer:
    """Streams the text of generated token ids.

    ``push(ids)`` returns the text that is final so far (possibly ``""``); ``flush()`` returns what was held
    back at the end (an incomplete character then decodes to U+FFFD, as a full decode would). The text of
    all pushes plus the flush equals ``tokenizer.decode(all ids)`` for byte-level tokenizers.
    """

    __slots__ = ("_ctx", "_ctx_text", "_held", "_pending", "_skip", "_stream", "_table", "_tok")

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_tail: Sequence[int] = (),
        skip_special_tokens: bool = True,
        use_decode_stream: bool | None = None,
        table: Sequence[bytes] | None = None,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # Byte-level tokenizers: every id's bytes (special ids empty when skipped), and the bytes pushed but
        # not out yet because they end inside a character. No left context is needed: byte-level decoding
        # does not depend on what came before.
        self._table = table
        self._pending = b""
        ctx = list(prompt_tail[-PROMPT_TAIL:]) if prompt_tail else []
        ctx_text = self._decode(ctx)
        # A tail that ends inside a character (raw token-id prompts can) would glue the prompt's bytes to
        # the first generated ones; start without context then.
        if ctx_text.endswith(_REPLACEMENT):
            ctx, ctx_text = [], ""
        if use_decode_stream is None:
            use_decode_stream = HAVE_DECODE_STREAM
        if use_decode_stream and _DecodeStream is None:
            raise RuntimeError("tokenizers.decoders.DecodeStream is not available")
        self._stream: Any = (
            _DecodeStream(ids=ctx, skip_special_tokens=skip_special_tokens) if use_decode_stream else None
        )
        # The Python path's state, which flush() also needs with DecodeStream: `_ctx` are the ids emitted
        # last (they end on a character boundary) and give left context to `_held`, the ids pushed since,
        # whose text is not out yet.
        self._ctx: list[int] = ctx
        self._ctx_text: str = ctx_text  # Python path only: decode(_ctx)
        self._held: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        table = self._table
        if table is not None:
            try:
                data = table[token_ids[0]] if len(token_ids) == 1 else b"".join([table[i] for i in token_ids])
            except IndexError:  # an id past the vocabulary has no text (as in a full decode)
                data = b"".join([table[i] for i in token_ids if i < len(table)])
            if self._pending:
                data = self._pending + data
            try:
                text = data.decode()
            except UnicodeDecodeError:  # ends inside a character (or invalid bytes: U+FFFD, as decode gives)
                text = data.decode(errors="replace")
            if text[-1:] == _REPLACEMENT:  # held until the character completes, as DecodeStream does
                self._pending = data
                return ""
            self._pending = b""
            return text
        if self._stream is not None:
            try:
                text = self._stream.step(self._tok, token_ids if type(token_ids) is list else list(token_ids))
            except Exception:  # DecodeStream refuses windows it cannot prefix-match; go on in Python
                self._stream = None
                self._ctx_text = self._decode(self._ctx)
                return self._push_py(token_ids)
            if text is None:
                self._held.extend(token_ids)
                return ""
            self._ctx = [*self._held, *token_ids]
            self._held = []
            return str(text)
        return self._push_py(token_ids)

    def _push_py(self, token_ids: Sequence[int]) -> str:
        self._held.extend(token_ids)
        text = self._decode([*self._ctx, *self._held])
        prefix = self._ctx_text
        # Emit only once the text grew and does not end inside a character.
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return ""
        self._ctx, self._held = self._held, []
        self._ctx_text = self._decode(self._ctx)
        return text[len(prefix) :]

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes to U+FFFD, as in a full decode)."""
        if self._table is not None:
            data, self._pending = self._pending, b""
            return data.decode(errors="replace")
        if not self._held:
            return ""
        text = self._decode([*self._ctx, *self._held])
        prefix = self._decode(self._ctx)
        self._ctx, self._held = self._held, []
        self._ctx_text = self._decode(self._ctx)
        if self._stream is not None:
            self._stream = _DecodeStream(ids=self._ctx, skip_special_tokens=self._skip)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


def _table(tokenizer: Preprocessor | Tokenizer, skip_special_tokens: bool) -> list[bytes] | None:
    """The Preprocessor's byte table (None: not a byte-level tokenizer, or a bare Tokenizer)."""
    if not isinstance(tokenizer, Preprocessor):
        return None
    return tokenizer.token_bytes_skipping if skip_special_tokens else tokenizer.token_bytes


class StopChecker:
    """Cuts generated text at the first stop string, across chunk boundaries.

    ``feed(text)`` returns ``(text safe to send, stopped)``. The stop that wins is the one completed
    earliest in the text (ties: the longer one), which is what a generator checking after every character
    would see, so the result does not depend on how the text was chunked. Text that might be the start of a
    stop string is held back until it is known not to be; :meth:`flush` releases it at the end.
    """

    __slots__ = ("_held", "_include", "_stops", "_tail_chars", "stop_string", "stopped")

    def __init__(self, stop_strings: Iterable[str], include_stop_str_in_output: bool = False) -> None:
        self._stops: tuple[str, ...] = tuple(s for s in dict.fromkeys(stop_strings) if s)
        self._include = include_stop_str_in_output
        # Characters that can end a proper prefix of some stop: text ending in any other character
        # holds nothing back (the common, one-lookup case).
        self._tail_chars = frozenset(c for s in self._stops for c in s[:-1])
        self._held = ""
        self.stopped = False
        self.stop_string: str | None = None  # which stop string matched

    @property
    def active(self) -> bool:
        return bool(self._stops)

    def feed(self, text: str, check: bool = True) -> tuple[str, bool]:
        """``check=False`` passes text through unchecked (before ``min_tokens`` is reached)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text if self._held else text
        if not check:
            self._held = ""
            return buf, False
        best_end = -1
        best: str | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0:
                end = i + len(s)
                if best is None or end < best_end or (end == best_end and len(s) > len(best)):
                    best_end, best = end, s
        if best is not None:
            self.stopped = True
            self.stop_string = best
            self._held = ""
            return (buf[:best_end] if self._include else buf[: best_end - len(best)]), True
        hold = self._hold(buf)
        if hold:
            self._held = buf[-hold:]
            return buf[:-hold], False
        self._held = ""
        return buf, False

    def _hold(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        if not buf or buf[-1] not in self._tail_chars:
            return 0
        last = buf[-1]
        best = 0
        for s in self._stops:
            # Candidate prefix lengths end at an occurrence of `last` inside s[:-1]; try longest first.
            j = s.rfind(last, 0, min(len(s) - 1, len(buf)))
            while j >= 0 and j + 1 > best:
                if buf.endswith(s[: j + 1]):
                    best = j + 1
                    break
                j = s.rfind(last, 0, j)
        return best

    def flush(self) -> str:
        """Release the held-back text when generation ends without a stop string."""
        if self.stopped:
            return ""
        out, self._held = self._held, ""
        return out


class OutputProcessor:
    """Per-choice output pipeline: token ids -> text deltas and a finish reason.

    ``process(ids)`` takes one batch (any number of ids) and returns ``(text_delta, finish_reason)``;
    ``finish_reason`` is ``"stop"`` (a stop token id, EOS unless ``ignore_eos``, or a stop string) or
    ``"length"`` (``max_tokens`` reached), reported exactly once; later calls return ``("", None)``. A stop
    token's own text is never emitted, nor anything after a stop string (the stop string itself only with
    ``include_stop_str_in_output``). When the worker ends the stream, ``finish(reason)`` returns the text
    still held back. ``stop_reason`` says what matched (the stop string, a requested stop token id, or None
    for EOS) and ``num_tokens`` counts the ids consumed, up to and including the one that stopped.
    """

    __slots__ = (
        "_any_stop",
        "_detok",
        "_eos",
        "_max_tokens",
        "_min_tokens",
        "_plain",
        "_stop_ids",
        "_stops",
        "finish_reason",
        "num_tokens",
        "stop_reason",
    )

    def __init__(
        self,
        tokenizer: Preprocessor | Tokenizer,
        stop_strings: Iterable[str] = (),
        stop_token_ids: Iterable[int] = (),
        *,
        eos_token_ids: Iterable[int] | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        max_tokens: int | None = None,  # None or 0: no limit here (the worker enforces its own)
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        use_decode_stream: bool | None = None,
    ) -> None:
        # With a Preprocessor, the model's EOS ids are the default stop ids.
        if isinstance(tokenizer, Preprocessor):
            tok = tokenizer.tokenizer
            if eos_token_ids is None:
                eos_token_ids = tokenizer.eos_token_ids
        else:
            tok = tokenizer
        if eos_token_ids is None:
            eos_token_ids = ()
        self._eos = frozenset(() if ignore_eos else eos_token_ids)
        self._stop_ids = frozenset(stop_token_ids)
        self._any_stop = self._eos | self._stop_ids
        table = _table(tokenizer, skip_special_tokens) if use_decode_stream is None else None
        self._detok = IncrementalDetokenizer(
            tok, prompt_ids[-PROMPT_TAIL:], skip_special_tokens, use_decode_stream=use_decode_stream, table=table
        )
        self._stops = StopChecker(stop_strings, include_stop_str_in_output)
        self._plain = not self._stops.active  # no stop strings to look for
        self._min_tokens = min_tokens
        self._max_tokens = max_tokens if max_tokens and max_tokens > 0 else None
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @classmethod
    def for_request(
        cls,
        tokenizer: Preprocessor | Tokenizer,
        sampling: Sampling,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> OutputProcessor:
        """Build from ``openai_protocol.to_sampling(req)`` (after ``stop.max_tokens`` is resolved)."""
        stop = sampling.stop
        return cls(
            tokenizer,
            sampling.stop_strings,
            stop.stop_token_ids,
            ignore_eos=stop.ignore_eos,
            min_tokens=stop.min_tokens,
            max_tokens=stop.max_tokens or None,
            prompt_ids=prompt_ids,
            skip_special_tokens=skip_special_tokens,
            include_stop_str_in_output=include_stop_str_in_output,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, token_ids: Sequence[int]) -> tuple[str, str | None]:
        if self.finish_reason is not None or not token_ids:
            return "", None
        n0 = self.num_tokens
        # The common step: under max_tokens, no stop id, no stop strings: the text of the ids, as below.
        if self._plain and (self._max_tokens is None or n0 + len(token_ids) < self._max_tokens) \
                and self._any_stop.isdisjoint(token_ids):
            self.num_tokens = n0 + len(token_ids)
            return self._detok.push(token_ids), None
        ids = token_ids
        reason: str | None = None
        # Ids past max_tokens are not looked at (the worker stops there too).
        if self._max_tokens is not None and n0 + len(ids) >= self._max_tokens:
            ids = ids[: self._max_tokens - n0]
            reason = FinishReason.LENGTH.value
        consumed = len(ids)
        # Stop ids are rare: one C-level set test for the whole batch, a scan only when it hits.
        if not self._any_stop.isdisjoint(ids):
            for k, t in enumerate(ids):
                if n0 + k + 1 > self._min_tokens and (t in self._stop_ids or t in self._eos):
                    ids = ids[:k]
                    consumed = k + 1
                    reason = FinishReason.STOP.value
                    self.stop_reason = t if t in self._stop_ids else None
                    break
        self.num_tokens = n0 + consumed
        text = self._detok.push(ids) if ids else ""
        if reason is not None:
            text += self._detok.flush()
        stops = self._stops
        if stops.active:
            text, stopped = stops.feed(text, check=self.num_tokens >= self._min_tokens)
            if stopped:
                self.finish_reason = FinishReason.STOP.value
                self.stop_reason = stops.stop_string
                return text, self.finish_reason
            if reason is not None:
                text += stops.flush()
        if reason is not None:
            self.finish_reason = reason
        return text, reason

    def finish(self, reason: str | None = None) -> str:
        """The worker ended the stream (``reason`` from its final frame): return the held-back text and
        record the reason unless one was already reported."""
        if self.finish_reason is not None:
            return ""
        text = self._detok.flush()
        if self._stops.active:
            text, stopped = self._stops.feed(text, check=self.num_tokens >= self._min_tokens)
            if stopped:
                self.stop_reason = self._stops.stop_string
                self.finish_reason = FinishReason.STOP.value
                return text
            text += self._stops.flush()
        self.finish_reason = reason or FinishReason.STOP.value
        return text
