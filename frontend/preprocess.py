"""Prompt preprocessing: the model's chat template and tokenizer, without ``transformers``.

The frontend builds one :class:`Preprocessor` per served model from the tokenizer files a worker publishes
(``tokenizer.json``, ``tokenizer_config.json`` and, when present, ``chat_template.jinja``,
``generation_config.json``, ``config.json``, ``special_tokens_map.json``). It renders chat messages with the
template and tokenizes the result exactly as ``transformers``' ``apply_chat_template(tokenize=True)`` does
(same Jinja environment and globals, template output encoded without adding special tokens again), and
encodes completion prompts as ``tokenizer(text)`` does. Only ``tokenizers`` (Rust) and ``jinja2`` are used,
so the frontend stays light; ``transformers`` is a test dependency that checks we match it token for token.

The streaming side (detokenization, stop strings) lives in ``frontend/detok.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from dynamo_rt.bytelevel import token_text_bytes
from dynamo_rt.errors import DynamoError, InvalidRequest
from frontend import offload

__all__ = ["TOKENIZER_FILES", "Preprocessor"]

log = logging.getLogger(__name__)

# The files a Preprocessor reads; a worker publishes those it has (tokenizer.json is required).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
    "special_tokens_map.json",
)

# The named special tokens transformers hands to a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' "no limit" model_max_length is int(1e30); anything this large means "unknown".
_HUGE = 10**9
# Texts from this long on are tokenized with the GIL released (about 1 ms of work and up).
LONG_TEXT_CHARS = 8192
# Chat prompts from this long on are tokenized piece by piece between special tokens, with the pieces
# cached (see Preprocessor._init_splitter): a multi-turn chat resends its system prompt and history on
# every turn, and only the new messages need the tokenizer.
SEGMENT_MIN_CHARS = 2048
# Pieces shorter than this are tokenized every time (cheap; keeps the cache for what is worth keeping).
SEGMENT_CACHE_MIN_PIECE = 64
# A new chat prompt piece from this long on (~4k tokens, ~3 ms of tokenizer) is tokenized in chunks of at
# least PARALLEL_CHUNK_CHARS side by side, one per CPU (frontend/offload.py), where the pre-tokenizer makes
# that exact (Preprocessor._init_chunker).
PARALLEL_MIN_CHARS = 16384
PARALLEL_CHUNK_CHARS = 8192
# Text the piece cache keeps, in characters (LRU; ids kept as 4-byte ints: ~6 bytes of memory per character
# of English text measured, key included, so ~100 MB when full).
SEGMENT_CACHE_CHARS = 16 * 2**20
# Template variables a request may not override through chat_template_kwargs.
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


# --------------------------------------------------------------------------------------------- jinja


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in some
    templates; for serving it only has to render its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters and forces ASCII; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    # Chat templates are untrusted code from model repositories: the immutable sandbox, as transformers uses.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


# --------------------------------------------------------------------------------------------- helpers

# A template that loops over a message's content or tests its type renders OpenAI content-part lists itself;
# any other template gets list content joined into one string first (vLLM's "auto" content format).
_PARTS_RE = re.compile(
    r"""for\s+\w+\s+in\s+[\w.\[\]'"]*content\b"""
    r"""|content['"]?\]?\s+is\s+(?:not\s+)?(?:string|iterable|sequence|mapping)\b"""
    r"""|content['"]?\]?\s*\|\s*(?:map|selectattr|first|last)\b"""
)


@functools.lru_cache(maxsize=64)
def _content_format(template: str) -> str:
    return "openai" if _PARTS_RE.search(template) else "string"


def _join_parts(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            # Newline-joined text parts: what vLLM's "string" content format renders, so a request
            # gives the same prompt on both.
            text = "\n".join(p.get("text") or "" for p in c if isinstance(p, dict) and p.get("type") == "text")
            m = {**m, "content": text}
        out.append(m)
    return out



def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chunk_safe(pre: Any) -> bool | None:
    """Whether cutting a text before a space that follows a letter or digit and precedes a letter leaves every
    pre-token whole, so the chunks encode to the text's ids: True for a pre-tokenizer that splits by a
    GPT-2-style regex (ByteLevel with its regex, or a Split regex without lookbehind that isolates its matches:
    no such pattern matches a letter or digit followed by a space, and a scan from " x" does not look back),
    None for a step that only maps what it is given (ByteLevel without its regex, Digits), False otherwise."""
    if pre is None:
        return None
    kind = pre.get("type")
    if kind == "Sequence":
        steps = [_chunk_safe(p) for p in pre.get("pretokenizers") or []]
        return False if False in steps else (True if True in steps else None)
    if kind == "ByteLevel":
        return True if pre.get("use_regex", True) and not pre.get("add_prefix_space", True) else (
            None if not pre.get("use_regex", True) else False)
    if kind == "Digits":
        return None
    if kind == "Split":
        regex = (pre.get("pattern") or {}).get("Regex")
        return (isinstance(regex, str) and bool(regex) and "(?<" not in regex and pre.get("behavior") == "Isolated"
                and not pre.get("invert"))
    return False


def chunk_points(text: str, n: int, reach: int = 4096) -> list[str]:
    """``text`` in up to ``n`` chunks of about equal length, each cut just before a space that follows a letter or
    digit and precedes a letter (within ``reach`` characters after the even cut; else no cut there)."""
    size = len(text)
    out: list[str] = []
    start = 0
    for k in range(1, n):
        target = max(start + 1, k * size // n)
        i = text.find(" ", target, target + reach)
        while i != -1 and not (text[i - 1].isalnum() and i + 1 < size and text[i + 1].isalpha()):
            i = text.find(" ", i + 1, target + reach)
        if i > start:
            out.append(text[start:i])
            start = i
    out.append(text[start:])
    return out


def _position_free(pre: Any) -> bool:
    """Whether a tokenizer.json pre-tokenizer encodes a piece the same wherever it sits in the text."""
    if pre is None:
        return True
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_position_free(p) for p in pre.get("pretokenizers") or [])
    if kind == "ByteLevel":
        return not pre.get("add_prefix_space", True)
    return kind in ("Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "UnicodeScripts")


class _PieceCache:
    """LRU of text piece -> token ids, bounded by the characters it keeps; shared by the request threads.

    Keyed by (tenant salt, piece): a piece one tenant sent is not a (faster) hit for another."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self.hits = 0  # lookups (pieces of SEGMENT_CACHE_MIN_PIECE chars and up) found / not found
        self.misses = 0
        self._d: OrderedDict[tuple[str, str], array[int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, piece: str, salt: str = "") -> array[int] | None:
        key = (salt, piece)
        with self._lock:
            ids = self._d.get(key)
            if ids is None:
                self.misses += 1
            else:
                self.hits += 1
                self._d.move_to_end(key)
            return ids

    def put(self, piece: str, ids: array[int], salt: str = "") -> None:
        if len(piece) > self.max_chars:
            return
        key = (salt, piece)
        with self._lock:
            if key in self._d:
                return
            self._d[key] = ids
            self.chars += len(piece)
            while self.chars > self.max_chars:
                (_, old), _ = self._d.popitem(last=False)
                self.chars -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.chars = 0

    def __len__(self) -> int:
        return len(self._d)


def _load_json(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    raw = files.get(name)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise DynamoError(f"{name} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------- preprocessor


class Preprocessor:
    """Chat template + tokenizer of one model. Immutable after construction, so one instance serves every
    request (``tokenizers`` encode/decode are thread-safe and release the GIL).

    Unusable model files raise :class:`DynamoError` (a server-side problem, status 500); everything a
    request can get wrong raises :class:`InvalidRequest`.
    """

    def __init__(self, files: Mapping[str, bytes]) -> None:
        if "tokenizer.json" not in files:
            raise DynamoError("tokenizer.json is required to build a preprocessor")
        config = _load_json(files, "tokenizer_config.json")
        model_config = _load_json(files, "config.json")
        gen_config = _load_json(files, "generation_config.json")

        try:
            self.tokenizer: Tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:  # tokenizers raises bare Exception for a file it cannot read
            raise DynamoError(f"tokenizer.json cannot be loaded: {exc}") from None
        # tokenizer.json may carry padding/truncation; transformers turns both off for a plain call.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

        special: dict[str, str] = {}
        for name in _NAMED_TOKENS:
            tok = _token_str(config.get(name))
            if tok is not None:
                special[name] = tok
        extra = [t for t in map(_token_str, config.get("additional_special_tokens") or []) if t]
        extra += [t for t in map(_token_str, config.get("extra_special_tokens") or []) if t]
        if "added_tokens_decoder" not in config and "special_tokens_map.json" in files:
            # transformers only reads the legacy special_tokens_map.json when the config has no
            # added_tokens_decoder, and then lets it override the config.
            for name, value in _load_json(files, "special_tokens_map.json").items():
                tok = _token_str(value)
                if name in _NAMED_TOKENS and tok is not None:
                    special[name] = tok
        # The strings the chat template sees as bos_token, eos_token, ...
        self.special_tokens: dict[str, str] = special

        # transformers adds named special tokens missing from the vocabulary (as special tokens).
        missing = [t for t in [*special.values(), *extra] if self.tokenizer.token_to_id(t) is None]
        if missing:
            self.tokenizer.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )

        self.bos_token_id: int | None = self._id(special.get("bos_token"))
        if self.bos_token_id is None:
            self.bos_token_id = next(iter(_ids(model_config.get("bos_token_id"))), None)
        eos = self._id(special.get("eos_token"))
        eos_ids = ([] if eos is None else [eos]) + _ids(gen_config.get("eos_token_id"))
        eos_ids += _ids(model_config.get("eos_token_id"))
        # Every id that ends a generation when the client did not ask for ignore_eos.
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_ids))

        # Special tokens of completion prompts come from tokenizer.json's post-processor alone:
        # transformers (v5) ignores add_bos_token/add_eos_token in the config when tokenizer.json exists.

        self.vocab_size: int = self.tokenizer.get_vocab_size(with_added_tokens=True)
        # Upper bound for token ids a client may send: the model's embedding size when known.
        model_vocab = model_config.get("vocab_size")
        self.max_token_id: int = (
            max(model_vocab, self.vocab_size) if isinstance(model_vocab, int) else self.vocab_size
        ) - 1
        self.context_length: int = self._context_length(config, model_config)  # 0: unknown

        # Each token id's bytes, for streaming detokenization by table lookup (frontend/detok.py); None when
        # the tokenizer's decoder is not plain byte-level BPE (then tokenizers' DecodeStream streams).
        self.token_bytes: list[bytes] | None = byte_level_tokens(self.tokenizer)
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)
        # ... with the special ids' bytes empty: for skip_special_tokens
        self.token_bytes_skipping: list[bytes] | None = None if self.token_bytes is None else [
            b"" if i in self.special_ids else b for i, b in enumerate(self.token_bytes)]
        # tokenizers >= 0.21: the same ids without offsets (~10 us less for a 40-token chat prompt, 2-core box).
        self._encode_fast: Any = getattr(self.tokenizer, "encode_batch_fast", None)
        self._pieces = _PieceCache(SEGMENT_CACHE_CHARS)
        self._splitter: re.Pattern[str] | None = None
        self._split_ids: dict[str, int] = {}
        self.parallel_pieces = 0  # new pieces tokenized in chunks side by side (tests and /metrics read it)
        self._chunkable = False
        self._init_splitter()
        self._init_chunker()

        self.chat_templates: dict[str, str] = self._templates(files, config)
        for t in self.chat_templates.values():
            try:
                _compile(t)  # fail at load time, not on the first request
            except jinja2.TemplateError as exc:
                raise DynamoError(f"the model's chat template does not compile: {exc}") from None

    # ------------------------------------------------------------------------------------------ build

    @classmethod
    def from_dir(cls, path: str | Path) -> Preprocessor:
        """Read the tokenizer files present in a model folder."""
        root = Path(path)
        files = {name: (root / name).read_bytes() for name in TOKENIZER_FILES if (root / name).is_file()}
        return cls(files)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> Preprocessor:
        """Build from file name -> content (what the NATS object store holds)."""
        return cls(files)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @staticmethod
    def _context_length(config: dict[str, Any], model_config: dict[str, Any]) -> int:
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
            v = model_config.get(key)
            if isinstance(v, int) and v > 0:
                return v
        v = config.get("model_max_length")
        if isinstance(v, (int, float)) and 0 < v < _HUGE:
            return int(v)
        return 0

    @staticmethod
    def _templates(files: Mapping[str, bytes], config: dict[str, Any]) -> dict[str, str]:
        # chat_template.jinja wins over the config's entry, as in transformers.
        if "chat_template.jinja" in files:
            return {"default": files["chat_template.jinja"].decode("utf-8")}
        ct = config.get("chat_template")
        if isinstance(ct, str):
            return {"default": ct}
        if isinstance(ct, list):
            return {
                str(t["name"]): str(t["template"])
                for t in ct
                if isinstance(t, dict) and "name" in t and "template" in t
            }
        return {}

    # ------------------------------------------------------------------------------------------ chat

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    def _template(self, tools: Sequence[Mapping[str, Any]] | None) -> str:
        t = self.chat_templates
        if tools is not None and "tool_use" in t:
            return t["tool_use"]
        if "default" in t:
            return t["default"]
        if not t:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        raise InvalidRequest(
            f"this model has several chat templates and none is named 'default': {sorted(t)}",
            param="messages",
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render the chat template (``transformers``' ``apply_chat_template(tokenize=False)``).

        ``messages`` are plain dicts (see ``openai_protocol.template_messages``). Template errors
        (``raise_exception`` in the template, or a template that cannot handle the input) become
        :class:`InvalidRequest`.
        """
        if not messages:
            raise InvalidRequest("messages must hold at least one message", param="messages")
        template = self._template(tools)
        compiled = _compile(template)
        if _content_format(template) == "string" and any(isinstance(m.get("content"), list) for m in messages):
            messages = _join_parts(messages)
        variables: dict[str, Any] = dict(self.special_tokens)
        if template_kwargs:
            variables.update((k, v) for k, v in template_kwargs.items() if k not in _RESERVED)
        try:
            return compiled.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"chat template error: {exc}", param="messages") from None
        except Exception as exc:  # a template tripping over unusual input is still the input's problem
            raise InvalidRequest(f"chat template failed on these messages: {exc!r}", param="messages") from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        *,
        cache_salt: str = "",
    ) -> list[int]:
        """Token ids of the rendered chat: ``apply_chat_template(..., tokenize=True)``. The template writes
        its own BOS when the model wants one, so no special tokens are added here. ``cache_salt`` (the
        tenant's) keys the piece cache."""
        return list(self.encode_chat_ids(messages, add_generation_prompt, tools, template_kwargs,
                                         cache_salt=cache_salt))

    def encode_chat_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        *,
        cache_salt: str = "",
    ) -> array[int]:
        """:meth:`encode_chat` as an ``array("i")``, which is what a request keeps: through a list of 32k token
        ids every garbage collection pass visits 32k Python ints (16 ms per pass with 100 such prompts in
        flight, measured); through an array it visits nothing."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, template_kwargs)
        if self._splitter is not None and len(text) >= SEGMENT_MIN_CHARS:
            return self._encode_pieces(text, cache_salt)
        return array("i", self._encode(text, add_special_tokens=False))

    def _init_splitter(self) -> None:
        """Set up piecewise chat tokenization when it provably gives the same ids as one ``encode``.

        ``tokenizers`` first splits the text on its added tokens matched in raw text (``normalized: false``),
        then normalizes, pre-tokenizes and encodes every other piece on its own: so the ids of a text are the
        ids of its pieces, concatenated, provided no such token strips the whitespace beside it
        (``lstrip`` / ``rstrip`` / ``single_word``) and no step depends on where a piece sits in the text (a
        normalizer, or a pre-tokenizer that prefixes a space, as Metaspace and ByteLevel with
        ``add_prefix_space`` do). Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, this project's tiny
        model) qualify; for any other the cache stays off. A probe text is checked both ways as well."""
        pre = self.tokenizer.pre_tokenizer
        try:  # the component's own JSON (its pickle state), not the whole tokenizer's
            pre_spec = None if pre is None else json.loads(pre.__getstate__())
        except (ValueError, TypeError, AttributeError):
            return
        if self.tokenizer.normalizer is not None or not _position_free(pre_spec):
            return
        raw: dict[str, int] = {}
        for tid, tok in self.tokenizer.get_added_tokens_decoder().items():
            if tok.normalized:
                continue
            if tok.lstrip or tok.rstrip or tok.single_word:
                return
            raw[tok.content] = tid
        if not raw:
            return
        # Leftmost-longest, as tokenizers matches added tokens.
        pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(raw, key=len, reverse=True)) + ")")
        self._splitter, self._split_ids = pattern, raw
        marks = sorted(raw)[:4]
        probe = "".join(f"{m} Hello wörld\n  x{i}  日本 {m}{m}\t" for i, m in enumerate(marks)) + " tail"
        probe = probe * (SEGMENT_CACHE_MIN_PIECE // len(probe) + 2)
        whole = self.tokenizer.encode(probe, add_special_tokens=False).ids
        if list(self._encode_pieces(probe)) != whole or list(self._encode_pieces(probe)) != whole:
            log.warning("piecewise tokenization disagrees with the tokenizer on a probe: cache off")
            self._splitter, self._split_ids = None, {}
            self._pieces.clear()

    def _init_chunker(self) -> None:
        """Tokenize long new pieces in chunks side by side when :func:`_chunk_safe` says the pre-tokenizer allows
        it and the chat pieces are cached (the same conditions on normalizer and added tokens), and a probe cut
        at every such point encodes to the same ids as the whole."""
        if self._splitter is None:
            return
        try:
            pre_spec = json.loads(self.tokenizer.pre_tokenizer.__getstate__())
        except (ValueError, TypeError, AttributeError):
            return
        if not _chunk_safe(pre_spec):
            return
        probe = ("It's the keeper's log: 12 boats, 3.5 tons; naïve café Ünïcode 日本語 text!  Two  spaces\n"
                 "new line\tTab x1 y22 z333 'quoted' don't (paren) [br] a-b a_b a.b \u00e9t\u00e9 ok ") * 8
        cut = re.split(r"(?<=[^\W_]) (?=[^\W\d_])", probe)  # every point chunk_points may cut at
        pieces = [cut[0]] + [" " + c for c in cut[1:]]
        assert "".join(pieces) == probe
        enc = self._encode_fast or self.tokenizer.encode_batch
        whole = enc([probe], add_special_tokens=False)[0].ids
        if [i for e in enc(pieces, add_special_tokens=False) for i in e.ids] != whole:
            log.warning("chunked tokenization disagrees with the tokenizer on a probe: long prompts stay whole")
            return
        self._chunkable = True

    def _encode_new(self, texts: list[str]) -> list[Sequence[int]]:
        """Token ids of each of ``texts`` (no special tokens added); a text of PARALLEL_MIN_CHARS and up is cut
        into chunks that the CPUs tokenize side by side (the tokenizer releases the GIL), when exact."""
        batch = self._encode_fast or self.tokenizer.encode_batch
        if not self._chunkable or max(map(len, texts)) < PARALLEL_MIN_CHARS or offload.tokenizer_threads() == 0:
            return [e.ids for e in batch(texts, add_special_tokens=False)]
        cpus = offload.tokenizer_threads() + 1
        flat: list[str] = []
        spans: list[tuple[int, int]] = []
        for t in texts:
            n = min(cpus, len(t) // PARALLEL_CHUNK_CHARS) if len(t) >= PARALLEL_MIN_CHARS else 1
            chunks = chunk_points(t, n) if n > 1 else [t]
            if len(chunks) > 1:
                self.parallel_pieces += 1
            spans.append((len(flat), len(flat) + len(chunks)))
            flat += chunks
        ids = offload.parallel_map(lambda c: batch([c], add_special_tokens=False)[0].ids, flat)
        out: list[Sequence[int]] = []
        for a, b in spans:
            if b - a == 1:
                out.append(ids[a])
            else:
                joined = array("i")
                for part in ids[a:b]:
                    joined.extend(part)
                out.append(joined)
        return out

    def piece_cache_stats(self) -> tuple[int, int, int] | None:
        """(hits, misses, characters kept) of the chat prompt piece cache; None when it is off."""
        if self._splitter is None:
            return None
        c = self._pieces
        return c.hits, c.misses, c.chars

    def _encode_pieces(self, text: str, salt: str = "") -> array[int]:
        """``encode(text, add_special_tokens=False).ids``, piece by piece between raw added tokens, long
        pieces from the cache; the pieces the cache lacks are encoded in one GIL-releasing batch. As an
        ``array("i")``: a cached piece joins by one copy, not one Python int per token."""
        assert self._splitter is not None
        parts = self._splitter.split(text)  # odd indices: the added tokens
        ids_of: list[Sequence[int] | None] = []
        todo: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids_of.append([self._split_ids[part]])
            elif not part:
                ids_of.append([])
            else:
                got = self._pieces.get(part, salt) if len(part) >= SEGMENT_CACHE_MIN_PIECE else None
                ids_of.append(got)
                if got is None:
                    todo.append(i)
        if todo:
            for i, ids in zip(todo, self._encode_new([parts[i] for i in todo]), strict=True):
                ids_of[i] = ids
                if len(parts[i]) >= SEGMENT_CACHE_MIN_PIECE:
                    self._pieces.put(parts[i], ids if isinstance(ids, array) else array("i", ids), salt)
        out = array("i")
        for piece_ids in ids_of:
            assert piece_ids is not None  # every slot is filled above
            out.extend(piece_ids)
        return out

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch releases the GIL while the Rust side works (encode holds it): for a long text, other
        # threads (the event loop, when this runs in a worker thread) keep running. Same ids either way.
        if len(text) >= LONG_TEXT_CHARS:
            batch = self._encode_fast or self.tokenizer.encode_batch
            long_ids: list[int] = batch([text], add_special_tokens=add_special_tokens)[0].ids
            return long_ids
        fast = self._encode_fast
        if fast is not None:
            ids: list[int] = fast([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    # ------------------------------------------------------------------------------------------ text

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a completion prompt: ``tokenizer(text)``, special tokens (BOS...) included as the
        tokenizer's post-processor says."""
        ids = self._encode(text, add_special_tokens=True)
        if not ids:
            raise InvalidRequest("prompt is empty", param="prompt")
        return ids

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode_prompt` for several prompts in one call (the Rust side runs them in parallel)."""
        out = [e.ids for e in (self._encode_fast or self.tokenizer.encode_batch)(list(texts), add_special_tokens=True)]
        if any(not ids for ids in out):
            raise InvalidRequest("prompt is empty", param="prompt")
        return out

    def check_token_ids(self, ids: Sequence[int], param: str = "prompt") -> None:
        """Reject client-sent token ids the model cannot embed."""
        if not ids:
            raise InvalidRequest("prompt is empty", param=param)
        hi = max(ids)
        if hi > self.max_token_id or min(ids) < 0:
            bad = hi if hi > self.max_token_id else min(ids)
            raise InvalidRequest(f"token id {bad} is out of range [0, {self.max_token_id}]", param=param)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text


def byte_level_tokens(tok: Tokenizer, check: int = 2048) -> list[bytes] | None:
    """The bytes of every token id (``b""`` for ids with no token), as tokenizers' ``ByteLevel`` decoder
    produces them (:func:`dynamo_rt.bytelevel.token_text_bytes`). Then the text of any ids is the UTF-8
    decode of their bytes joined, which streams without re-decoding a window.

    None unless the decoder is exactly ``ByteLevel``; also None (with a warning) if a spot check of
    ``check`` ids against ``tok.decode`` disagrees, so a tokenizer this misreads keeps the slow path."""
    if type(tok.decoder).__name__ != "ByteLevel":
        return None
    vocab = tok.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        table[i] = token_text_bytes(token)
    step = max(1, len(table) // check)
    probe = {*range(0, len(table), step), *tok.get_added_tokens_decoder()}
    for i in sorted(probe):
        want = tok.decode([i], skip_special_tokens=False)
        if table[i].decode("utf-8", "replace") != want:
            log.warning("byte-level token table disagrees with the tokenizer at id %d (%r vs %r): streaming "
                        "detokenization stays on DecodeStream", i, table[i], want)
            return None
    return table
