"""Grammar-constrained decoding and ``logit_bias`` for the reference engine (structured outputs).

Place: before a guided request is queued, :func:`workers.reference.requests.attach_guide` asks the engine's
:class:`GrammarCache` (off the event loop) for the compiled grammar of its
:class:`~dynamo_rt.protocol.GuidedDecoding` and gives it a :class:`Guide` (its own matcher, advanced over
``output_offset`` tokens after a migration); :func:`workers.reference.sampler.sample` calls :func:`constrain` on
the step thread, which adds each row's ``logit_bias`` and masks each guided row to the tokens its grammar
allows; the step thread's post-processing then :meth:`Guide.step`\\ s the sampled token (a decode worker its
first token, sampled under the mask by the prefill worker). Rows with neither pay one attribute test each.

The library is xgrammar: on the tiny model's tokenizer its mask costs about 34 us per token for a bounded
JSON schema (llguidance: a 137 us median with multi-millisecond spikes while its lexer warms up; see
bench/structured_output.py for the engine-level cost). Its token table is built from ``tokenizer.json``
alone (no ``transformers``); special tokens get an empty string, which xgrammar never allows inside a
document, so the text the frontend detokenizes (special tokens skipped) is exactly what the grammar saw.

JSON is compiled without free whitespace (``any_whitespace=False``): a random-weight model would otherwise
pad a document with whitespace until ``max_tokens``. xgrammar 0.2's length-bounded strings (``maxLength``) let
raw control characters through, which ``json.loads`` rejects, so the JSON kinds (and tool calls) compile against
a token table without the tokens holding a byte below 0x20 but newline (JSON without free whitespace never has
one); and its character classes admit UTF-8-encoded surrogates, which no strict decoder accepts, so every kind
is kept from producing one (:class:`TokenMasks`). Leaving tokens out of the table costs nothing per step.

A grammar that has ended allows only the end-of-sequence ids, and accepting one ends the request with ``stop``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dynamo_rt.bytelevel import token_text_bytes
from dynamo_rt.errors import InvalidRequest
from dynamo_rt.protocol import GuidedDecoding

if TYPE_CHECKING:
    from collections.abc import Sequence

    import xgrammar

    from workers.reference.sampler import SampleSpec

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept per engine (a compiled grammar is some KB to a few MB)
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
CLEAN_KINDS = ("json", "json_object", "structural_tag")  # tokens with a control byte left out (TokenMasks)


class GrammarCache:
    """Compiles and keeps grammars by spec for one model's tokenizer. Thread-safe (requests compile on
    ``asyncio.to_thread`` workers, one compile at a time)."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_ids = [t for t in eos_ids if 0 <= t < vocab_size]
        self._compilers: dict[bool, xgrammar.GrammarCompiler] = {}  # by "JSON kind" (see TokenMasks)
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...]], xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # cache misses (tests)
        self._masks: TokenMasks | None = None

    def _get_compiler(self, json_kind: bool) -> xgrammar.GrammarCompiler:
        """The compiler whose token table leaves out the tokens no document of this kind may hold (an empty
        string is a token xgrammar never allows), so those cost nothing per step."""
        comp = self._compilers.get(json_kind)
        if comp is None:
            import xgrammar as xgr

            masks = self._token_masks_locked()
            table = token_table(self.model_dir, self.vocab_size)
            for i in masks.bad_utf8 | (masks.control if json_kind else frozenset()):
                table[i] = ""
            info = xgr.TokenizerInfo(table, xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                     stop_token_ids=self.eos_ids or None)
            comp = self._compilers[json_kind] = xgr.GrammarCompiler(info, max_threads=1)
        return comp

    def compiled(self, g: GuidedDecoding) -> xgrammar.CompiledGrammar:
        """The compiled grammar of ``g``; :class:`InvalidRequest` (param ``guided``) if it does not compile."""
        key = (g.kind, g.spec, tuple(g.choices))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            comp = self._get_compiler(g.kind in CLEAN_KINDS)
            try:
                cg = _compile(comp, g)
            except InvalidRequest:
                raise
            except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
                # The message names the parameter: an error frame carries no param field to the frontend.
                param = PARAM_OF_KIND.get(g.kind, "guided")
                raise InvalidRequest(f"{param}: the {g.kind} constraint does not compile: {_first_line(e)}",
                                     param=param) from None
            self.compiles += 1
            self._cache[key] = cg
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return cg

    def guide(self, g: GuidedDecoding) -> Guide:
        cg = self.compiled(g)
        with self._lock:
            masks = self._token_masks_locked()
        return Guide(cg, self.eos_ids, masks)

    def _token_masks_locked(self) -> TokenMasks:
        if self._masks is None:
            self._masks = TokenMasks(token_bytes(self.model_dir, self.vocab_size))
        return self._masks


class TokenMasks:
    """What makes up for two xgrammar 0.2 gaps (see the module docstring). Tokens with a control byte but
    newline (``control``: left out of JSON kinds' token table) and tokens holding a UTF-8 surrogate
    (``ED A0..BF``, ``bad_utf8``: left out of every table), which xgrammar's character classes admit and a
    strict UTF-8 decoder refuses. A surrogate split across two tokens is caught per step: after a token ending
    in ``ED`` (``ends_ed``), the tokens starting with ``A0..BF`` are masked (``after_ed``, a bitmask row)."""

    def __init__(self, table: list[bytes]) -> None:
        import xgrammar as xgr

        self.control = frozenset(i for i, b in enumerate(table) if any(c < 0x20 and c != 0x0A for c in b))
        self.bad_utf8 = frozenset(i for i, b in enumerate(table) if re.search(rb"\xed[\xa0-\xbf]", b))
        self.ends_ed = frozenset(i for i, b in enumerate(table) if b.endswith(b"\xed"))
        self.after_ed = xgr.allocate_token_bitmask(1, len(table))[0]  # all ones
        for i, b in enumerate(table):
            if b and 0xA0 <= b[0] <= 0xBF:
                _clear(self.after_ed, i)


def _clear(row: torch.Tensor, i: int) -> None:
    row[i // 32] &= ~(1 << (i % 32))


def token_bytes(model_dir: Path, vocab_size: int) -> list[bytes]:
    """Every id's bytes (byte-level BPE: each vocabulary character stands for one byte); special tokens and
    ids the tokenizer lacks are empty."""
    return [token_text_bytes(text) for text in token_table(model_dir, vocab_size)]


PARAM_OF_KIND = {"json": "response_format", "json_object": "response_format", "regex": "guided_regex",
                 "choice": "guided_choice", "grammar": "guided_grammar", "structural_tag": "tool_choice"}


def _compile(comp: xgrammar.GrammarCompiler, g: GuidedDecoding) -> xgrammar.CompiledGrammar:
    if g.kind == "json":
        try:
            schema = json.loads(g.spec)
        except ValueError as e:
            raise InvalidRequest(f"the JSON schema is not JSON: {e}", param="response_format") from None
        return comp.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    if g.kind == "json_object":
        return comp.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if g.kind == "regex":
        return comp.compile_regex(g.spec)
    if g.kind == "choice":
        if not g.choices:
            raise InvalidRequest("guided_choice needs at least one choice", param="guided_choice")
        return comp.compile_grammar(choice_grammar(g.choices))
    if g.kind == "grammar":
        return comp.compile_grammar(g.spec)
    if g.kind == "structural_tag":
        return comp.compile_structural_tag(g.spec)
    raise InvalidRequest(f"unknown guided decoding kind {g.kind!r} (one of {', '.join(KINDS)})", param="guided")


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices``."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def token_table(model_dir: Path, vocab_size: int) -> list[str]:
    """Every id's raw vocabulary string from ``tokenizer.json`` (byte-level BPE); special tokens and ids the
    tokenizer lacks are "" (never allowed in a document)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    table = [""] * vocab_size
    for text, i in tok.get_vocab(with_added_tokens=False).items():
        if 0 <= i < vocab_size:
            table[i] = text
    for i, added in tok.get_added_tokens_decoder().items():
        if 0 <= i < vocab_size:
            table[i] = "" if added.special else added.content
    return table


class Guide:
    """One request's grammar state. The step thread fills its mask and accepts its tokens."""

    __slots__ = ("after_ed", "ended", "eos_ids", "masks", "matcher", "rejected")

    def __init__(self, compiled: xgrammar.CompiledGrammar, eos_ids: Sequence[int], masks: TokenMasks) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.eos_ids = frozenset(eos_ids)
        self.masks = masks
        self.ended = False  # the document is complete and its end-of-sequence token accepted
        self.after_ed = False  # the last token ended with byte ED: a surrogate must not follow
        self.rejected = False

    @property
    def done(self) -> bool:
        return self.ended

    def accept(self, token: int) -> bool:
        """Advance over ``token``; False (and stay put) if the grammar does not allow it."""
        ok = bool(self.matcher.accept_token(token))
        if not ok:
            self.rejected = True
        else:
            self.after_ed = token in self.masks.ends_ed
            # xgrammar ends a document only on a stop token: ask (a few microseconds) only then.
            self.ended = token in self.eos_ids and bool(self.matcher.is_terminated())
        return ok

    def step(self, token: int) -> bool:
        """Accept the sampled ``token``; True when the document has ended (the request stops here)."""
        if self.done:
            return True
        if not self.accept(token):
            log.warning("token %d was sampled against the grammar (min_tokens suppressing its end?)", token)
            return False
        return self.done

    def replay(self, tokens: Sequence[int]) -> None:
        """Advance over output another worker already produced (a migration); InvalidRequest if it does not
        fit the grammar."""
        for k, t in enumerate(tokens):
            if self.done or not self.accept(t):
                raise InvalidRequest(f"output token {k} ({t}) of the migrated request does not fit its grammar",
                                     param="output_offset")


_BUFFERS = threading.local()  # per thread (engines in one process each have a step thread): a buffer per shape


def _fill(live: list[tuple[int, Guide]], n: int) -> torch.Tensor:
    bufs: dict[tuple[int, int], torch.Tensor] = _BUFFERS.__dict__.setdefault("by_shape", {})
    words = live[0][1].masks.after_ed.shape[0]
    mask = bufs.get((n, words))
    if mask is None:
        mask = bufs[(n, words)] = torch.empty(n, words, dtype=torch.int32)  # rows are filled before use
    for i, g in live:
        g.matcher.fill_next_token_bitmask(mask, i)
        if g.after_ed:
            mask[i] &= g.masks.after_ed
    return mask


def constrain(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> torch.Tensor:
    """Add each row's ``logit_bias`` and mask each guided row to its grammar's tokens, IN PLACE (the sampler
    took the raw logprobs first, and nothing reads a step's logits after sampling); returns ``logits``. Rows
    with neither are not touched, and a batch without any costs one attribute test per row.

    The masks are filled here, after the forward: filling them on a helper thread during the forward (they
    depend only on the tokens accepted so far) measured no faster on the 2-core CPU host, where that thread
    competes with the event loop for the GIL and the second core; on a GPU it would be worth revisiting."""
    rows = [i for i, s in enumerate(specs) if s.guide is not None or s.bias is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    live: list[tuple[int, Guide]] = []
    for i in rows:
        s = specs[i]
        if s.bias is not None:
            ids, vals = s.bias
            logits[i, ids] += vals
        g = s.guide
        if g is None:
            continue
        if g.done:
            # Ended (ignore_eos kept it going): only end-of-sequence tokens.
            logits[i] = float("-inf")
            logits[i, list(g.eos_ids)] = 0.0
            continue
        live.append((i, g))
    if live:
        mask = _fill(live, len(logits))
        xgr.apply_token_bitmask_inplace(logits, mask.to(logits.device), indices=[i for i, _ in live])
    return logits


def bias_tensors(bias: dict[int, float] | None, vocab_size: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``logit_bias`` as (ids, values) tensors; InvalidRequest for an id outside the vocabulary."""
    if not bias:
        return None
    bad = next((t for t in bias if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"logit_bias names token id {bad}, outside the vocabulary (0..{vocab_size - 1})",
                             param="logit_bias")
    ids = torch.tensor(list(bias), dtype=torch.long, device=device)
    vals = torch.tensor([min(100.0, max(-100.0, float(v))) for v in bias.values()], dtype=torch.float32,
                        device=device)
    return ids, vals
