"""frontend.detok: streamed text equals the full decode, stop strings and stop ids end a choice exactly."""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.detok import HAVE_DECODE_STREAM, IncrementalDetokenizer, OutputProcessor, StopChecker
from frontend.openai_protocol import parse_chat, resolve_max_tokens, to_sampling
from frontend.preprocess import Preprocessor
from tests.frontend import build_chatml, build_llama3, tokenizer_dir

# The three implementations: the byte table (byte-level tokenizers, what the frontend uses for them),
# tokenizers' DecodeStream (Rust; other tokenizers) and the Python window, which is the last fallback.
PATHS = ["table", "decodestream", "python"]
if not HAVE_DECODE_STREAM:
    PATHS.remove("decodestream")

TEXTS = [
    "Café naïve crème brûlée, Zürich and smörgåsbord: déjà vu!",
    "日本語のテキスト、こんにちは。東京 中文测试 漢字 한국어 안녕하세요",
    "Emoji 😀🚀 👍🏽 👨‍👩‍👧 🇯🇵 ❤️ and symbols ∑ ≠ € £",
    "Mixed: The boats came back 日本 😀 one by one, Привет мир, مرحبا, हिन्दी, ไทย.\n\nEnd.",
]

_PRE: dict[str, Preprocessor] = {}
_TMP = tempfile.TemporaryDirectory(prefix="detok-")  # removed when the test process exits


def pre(kind: str) -> Preprocessor:
    """Preprocessors built once per test session (hypothesis tests cannot take function fixtures)."""
    if kind not in _PRE:
        root = Path(_TMP.name)
        d = tokenizer_dir("tiny", root) if kind == "tiny" else {"chatml": build_chatml, "llama3": build_llama3}[
            kind](root / kind)
        _PRE[kind] = Preprocessor.from_dir(d)
    return _PRE[kind]


KINDS = ["tiny", "chatml", "llama3"]


def make(p: Preprocessor, path: str, prompt: Sequence[int] = (), skip_special_tokens: bool = True
         ) -> IncrementalDetokenizer:
    if path == "table":
        table = p.token_bytes_skipping if skip_special_tokens else p.token_bytes
        assert table is not None  # every fixture tokenizer is byte-level
        return IncrementalDetokenizer(p.tokenizer, prompt, skip_special_tokens, table=table)
    return IncrementalDetokenizer(p.tokenizer, prompt, skip_special_tokens, use_decode_stream=path == "decodestream")


def processor_path(path: str) -> bool | None:
    """OutputProcessor's use_decode_stream for a path: None picks the table for a byte-level tokenizer."""
    return None if path == "table" else path == "decodestream"


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int] | None = None
) -> list[str]:
    pieces = []
    i = 0
    sizes = iter(chunks or ())
    while i < len(ids):
        n = next(sizes, 1)
        pieces.append(detok.push(ids[i : i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


def cut_inside_char(p: Preprocessor, text: str = TEXTS[2]) -> tuple[list[int], int]:
    """The ids of ``text`` and the first cut after which the decode ends inside a character."""
    ids = list(p.tokenizer.encode(text, add_special_tokens=False).ids)
    return ids, next(k for k in range(1, len(ids)) if p.decode(ids[:k]).endswith("\ufffd"))


def random_chunks(rng: random.Random, n: int) -> list[int]:
    out: list[int] = []
    while sum(out) < n:
        out.append(rng.choice((1, 1, 2, 3, 5, 8)))
    return out


# --------------------------------------------------------------------------------------------- detokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_fixtures_split_characters_over_tokens(kind: str) -> None:
    # The tests below only mean something if some characters really are split over byte-level tokens.
    p = pre(kind)
    ids = p.tokenizer.encode(TEXTS[1] + TEXTS[2], add_special_tokens=False).ids
    assert sum("\ufffd" in p.decode([i]) for i in ids) >= 3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_one_token_at_a_time(kind: str, text: str, path: str) -> None:
    p = pre(kind)
    ids = p.tokenizer.encode(text, add_special_tokens=False).ids
    pieces = stream(make(p, path), ids)
    assert "".join(pieces) == p.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[-1] == ""  # nothing left for flush: the text ends on a whole character


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_random_chunks(kind: str, path: str) -> None:
    p = pre(kind)
    rng = random.Random(1)
    for text in TEXTS:
        ids = p.tokenizer.encode(text, add_special_tokens=False).ids
        for _ in range(10):
            detok = make(p, path)
            pieces = stream(detok, ids, random_chunks(rng, len(ids)))
            assert "".join(pieces) == text
            assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("path", PATHS)
def test_character_is_held_until_complete(path: str) -> None:
    p = pre("chatml")
    ids = p.tokenizer.encode(" 😀👍🏽", add_special_tokens=False).ids
    detok = make(p, path)
    out = []
    for k, i in enumerate(ids):
        piece = detok.push([i])
        out.append(piece)
        full_so_far = p.decode(ids[: k + 1])
        # Emitted text is always a prefix of the decode so far without its trailing broken character.
        assert full_so_far.rstrip("\ufffd").startswith("".join(out))
    assert "".join(out) + detok.flush() == " 😀👍🏽"


@pytest.mark.parametrize("path", PATHS)
def test_flush_of_an_unfinished_character(path: str) -> None:
    p = pre("chatml")
    ids, cut = cut_inside_char(p)
    detok = make(p, path)
    pieces = [detok.push(ids[:cut]), detok.flush()]
    assert "".join(pieces) == p.decode(ids[:cut])  # the full decode shows U+FFFD too
    assert pieces[-1].endswith("\ufffd")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tail_context(kind: str, path: str) -> None:
    p = pre(kind)
    prompt = p.encode_chat([{"role": "user", "content": "Hi 日本"}])
    for text in TEXTS:
        ids = p.tokenizer.encode(text, add_special_tokens=False).ids
        pieces = stream(make(p, path, prompt), ids)
        assert "".join(pieces) == text


@pytest.mark.parametrize("path", PATHS)
def test_prompt_tail_ending_inside_a_character(path: str) -> None:
    # A raw token-id prompt can stop in the middle of a character; its bytes must not glue onto the output.
    p = pre("chatml")
    ids, cut = cut_inside_char(p)
    gen = p.tokenizer.encode("boats 日本", add_special_tokens=False).ids
    pieces = stream(make(p, path, ids[:cut]), gen)
    assert "".join(pieces) == p.decode(gen)


@pytest.mark.parametrize("path", PATHS)
def test_special_tokens(path: str) -> None:
    p = pre("tiny")
    ids = p.tokenizer.encode("<|im_start|>assistant\nhi <think>x</think> there<|im_end|>",
                             add_special_tokens=False).ids
    skip = "".join(stream(make(p, path), ids))
    keep = "".join(stream(make(p, path, skip_special_tokens=False), ids))
    assert skip == p.decode(ids) == "assistant\nhi <think>x</think> there"
    assert keep == p.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_ids_stream_equals_decode(path: str, data: st.DataObject) -> None:
    # Random ids (what a random-weight model emits) make invalid UTF-8 and special tokens in any order.
    kind = data.draw(st.sampled_from(KINDS))
    p = pre(kind)
    ids = data.draw(st.lists(st.integers(0, p.vocab_size - 1), max_size=40))
    chunks = data.draw(st.lists(st.integers(1, 6), max_size=40))
    skip = data.draw(st.booleans())
    detok = make(p, path, skip_special_tokens=skip)
    pieces = stream(detok, ids, chunks)
    full = p.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_table_emits_what_decodestream_emits_push_by_push(data: st.DataObject) -> None:
    """The byte table is a faster DecodeStream for byte-level tokenizers: the same text out of every push."""
    other = "decodestream" if HAVE_DECODE_STREAM else "python"
    p = pre(data.draw(st.sampled_from(KINDS)))
    ids = data.draw(st.lists(st.integers(0, p.vocab_size - 1), max_size=40))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=40))
    skip = data.draw(st.booleans())
    assert stream(make(p, "table", skip_special_tokens=skip), ids, chunks) == stream(
        make(p, other, skip_special_tokens=skip), ids, chunks)


def test_the_frontend_streams_byte_level_tokenizers_by_table() -> None:
    for kind in KINDS:
        p = pre(kind)
        proc = OutputProcessor(p)
        assert proc._detok._table is p.token_bytes_skipping is not None
        assert OutputProcessor(p, skip_special_tokens=False)._detok._table is p.token_bytes


# --------------------------------------------------------------------------------------------- stop strings


def stop_reference(text: str, stops: Sequence[str], include: bool = False) -> tuple[str, str | None]:
    """Brute force: scan the text one character at a time, as a generator checking after each character
    would, and stop at the first position where a stop string ends (ties: the longer stop string)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


def run_checker(checker: StopChecker, text: str, cuts: Sequence[int]) -> tuple[str, list[str]]:
    pieces = []
    pos = 0
    for c in [*sorted(set(cuts)), len(text)]:
        if c <= pos or c > len(text):
            continue
        out, stopped = checker.feed(text[pos:c])
        pieces.append(out)
        pos = c
        if stopped:
            break
    pieces.append(checker.flush())
    return "".join(pieces), pieces


def test_stop_string_across_chunks() -> None:
    c = StopChecker(["END"])
    assert c.feed("Hello E") == ("Hello ", False)  # "E" could start END: held back
    assert c.feed("N") == ("", False)
    assert c.feed("Dless text") == ("", True)
    assert c.stop_string == "END"
    assert c.feed("more") == ("", True)
    assert c.flush() == ""


def test_false_alarm_is_released() -> None:
    c = StopChecker(["END"])
    assert c.feed("Hello EN") == ("Hello ", False)
    assert c.feed("o and E") == ("ENo and ", False)
    assert c.flush() == "E"


def test_include_stop_string() -> None:
    c = StopChecker(["\n\n", "###"], include_stop_str_in_output=True)
    assert c.feed("a #") == ("a ", False)
    assert c.feed("##b") == ("###", True)
    assert c.stop_string == "###"


def test_earliest_end_wins() -> None:
    # "c" completes before "abcd" could; of two ending together the longer one is cut.
    assert StopChecker(["abcd", "c"]).feed("xabcd") == ("xab", True)
    c = StopChecker(["bc", "abc"])
    assert c.feed("xabcz") == ("x", True) and c.stop_string == "abc"


def test_unchecked_text_passes_through() -> None:
    c = StopChecker(["END"])
    assert c.feed("xE") == ("x", False)
    assert c.feed("ND y", check=False) == ("END y", False)
    assert c.feed(" END") == (" ", True)


def test_no_stop_strings_is_a_pass_through() -> None:
    c = StopChecker([])
    assert not c.active
    assert c.feed("anything END") == ("anything END", False)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc d\u00e9\U0001f600", max_size=40),
    stops=st.lists(st.text(alphabet="abc d\u00e9\U0001f600", min_size=1, max_size=5), max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=12),
    include=st.booleans(),
)
def test_stop_checker_matches_reference(text: str, stops: list[str], cuts: list[int], include: bool) -> None:
    checker = StopChecker(stops, include_stop_str_in_output=include)
    got, pieces = run_checker(checker, text, cuts)
    want, stop = stop_reference(text, stops, include)
    assert got == want
    assert checker.stop_string == stop
    assert checker.stopped == (stop is not None)
    # Nothing emitted is ever taken back: each piece is a contiguous part of the final text.
    assert "".join(pieces) == want


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stop=st.text(alphabet="ab c", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_single_stop_string_cuts_at_first_occurrence(text: str, stop: str, cuts: list[int]) -> None:
    # With one stop string, "first to complete" is "first occurrence": emit the text before it.
    got, _ = run_checker(StopChecker([stop]), text, cuts)
    i = text.find(stop)
    assert got == (text if i < 0 else text[:i])


# --------------------------------------------------------------------------------------------- output processor


def run_processor(proc: OutputProcessor, ids: Sequence[int], chunks: Sequence[int] = ()) -> tuple[str, str | None]:
    text = []
    reason = None
    i = 0
    sizes = iter(chunks)
    while i < len(ids) and reason is None:
        n = next(sizes, 1)
        delta, reason = proc.process(ids[i : i + n])
        text.append(delta)
        i += n
    if reason is None:
        text.append(proc.finish("length"))
        reason = proc.finish_reason
    return "".join(text), reason


def encode(p: Preprocessor, text: str) -> list[int]:
    return list(p.tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("path", PATHS)
def test_processor_stop_string_over_tokens(path: str) -> None:
    p = pre("chatml")
    ids = encode(p, "The boats 日本 came back. STOP here and more")
    rng = random.Random(3)
    for chunks in [[], *[random_chunks(rng, len(ids)) for _ in range(10)]]:
        proc = OutputProcessor(p, ["STOP"], use_decode_stream=processor_path(path))
        assert run_processor(proc, ids, chunks) == ("The boats 日本 came back. ", "stop")
        assert proc.stop_reason == "STOP"
        assert proc.process(ids[:2]) == ("", None)  # reported once


def test_processor_stop_on_eos() -> None:
    p = pre("llama3")
    eot = p.eos_token_ids[0]
    assert eot == p.tokenizer.token_to_id("<|eot_id|>")
    body = encode(p, "Hello 😀 world")
    ids = [*body, eot, *encode(p, "ignored")]
    for chunks in ([], [100], [2, 3, 100]):
        proc = OutputProcessor(p)
        assert run_processor(proc, ids, chunks) == ("Hello 😀 world", "stop")
        assert proc.stop_reason is None  # EOS, not a requested stop id
        assert proc.num_tokens == len(body) + 1


def test_processor_stop_token_ids_and_ignore_eos() -> None:
    p = pre("tiny")
    eos = p.eos_token_ids[0]
    a, b = encode(p, "first part"), encode(p, " second part")
    proc = OutputProcessor(p, stop_token_ids=[b[0]], ignore_eos=True)
    # EOS is ignored (its text skipped as a special token), the requested stop id ends the choice.
    assert run_processor(proc, [*a, eos, *b]) == (p.decode(a), "stop")
    assert proc.stop_reason == b[0]
    assert proc.num_tokens == len(a) + 2


def test_processor_max_tokens() -> None:
    p = pre("chatml")
    ids = encode(p, "one two three four five six seven")
    for chunks in ([], [4, 100], [3, 3, 3, 3]):
        proc = OutputProcessor(p, max_tokens=5)
        assert run_processor(proc, ids, chunks) == (p.decode(ids[:5]), "length")
        assert proc.num_tokens == 5
    # A stop id on the last allowed token is a stop; one past it is not looked at.
    eos = p.eos_token_ids[0]
    assert run_processor(OutputProcessor(p, max_tokens=3), [*ids[:2], eos, 7], [4]) == (p.decode(ids[:2]), "stop")
    assert run_processor(OutputProcessor(p, max_tokens=3), [*ids[:3], eos], [4]) == (p.decode(ids[:3]), "length")


def test_processor_length_cut_inside_a_character() -> None:
    p = pre("chatml")
    ids, cut = cut_inside_char(p)
    assert run_processor(OutputProcessor(p, max_tokens=cut), ids) == (p.decode(ids[:cut]), "length")


def test_processor_min_tokens() -> None:
    p = pre("chatml")
    eos = p.eos_token_ids[0]
    ids = encode(p, "ab STOP cd STOP ef")
    # EOS and the first STOP come before min_tokens and are passed over.
    first_stop_end = next(k for k in range(len(ids)) if "STOP" in p.decode(ids[: k + 1]))
    proc = OutputProcessor(p, ["STOP"], min_tokens=first_stop_end + 2)
    text, reason = run_processor(proc, [eos, *ids])
    assert (text, reason) == ("ab STOP cd ", "stop")


def test_processor_finish_releases_held_text() -> None:
    p = pre("chatml")
    ids = encode(p, "the end is near EN")
    proc = OutputProcessor(p, ["END"])
    text = "".join(proc.process([i])[0] for i in ids)
    assert text == "the end is near "  # "EN" held: it could still become END
    assert proc.finish("length") == "EN"
    assert proc.finish_reason == "length"
    assert proc.finish("stop") == "" and proc.finish_reason == "length"


def test_processor_for_request() -> None:
    p = pre("tiny")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["boats"], "min_tokens": 0}
    req = parse_chat(json.dumps(body).encode())
    sampling = to_sampling(req)
    prompt = p.encode_chat([{"role": "user", "content": "x"}])
    sampling.stop.max_tokens = resolve_max_tokens(req, len(prompt), p.context_length)
    proc = OutputProcessor.for_request(p, sampling, prompt)
    ids = encode(p, "The fishing boats came back")
    assert run_processor(proc, ids, [3, 3, 3, 3, 3]) == ("The fishing ", "stop")


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_processor_matches_reference(path: str, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    p = pre(kind)
    words = ["the", " boats", " 日本", " 😀", "é", " END", "EN", "D", " café", "\n\n", " 👍🏽", "##"]
    text = "".join(data.draw(st.lists(st.sampled_from(words), max_size=15)))
    stops = data.draw(st.lists(st.sampled_from(["END", "\n\n", "é ", "😀", "##", "boats 日"]), max_size=3))
    include = data.draw(st.booleans())
    ids = encode(p, text)
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=30))
    proc = OutputProcessor(p, stops, include_stop_str_in_output=include, use_decode_stream=processor_path(path))
    got, reason = run_processor(proc, ids, chunks)
    want, stop = stop_reference(p.decode(ids), stops, include)
    assert got == want
    assert reason == ("stop" if stop is not None else "length")
    assert proc.stop_reason == stop


def test_decode_stream_failure_falls_back_to_python() -> None:
    # DecodeStream raises when a window does not extend its prefix (not seen with byte-level tokenizers,
    # possible with others); the detokenizer then carries on in Python without losing or repeating text.
    class Refusing:
        def step(self, tokenizer: object, ids: object) -> str:
            raise RuntimeError("InvalidPrefix")

    p = pre("chatml")
    ids, cut = cut_inside_char(p)
    detok = IncrementalDetokenizer(p.tokenizer, use_decode_stream=True)
    first = detok.push(ids[:cut])
    detok._stream = Refusing()
    rest = stream(detok, ids[cut:])
    assert first + "".join(rest) == TEXTS[2]
