"""frontend.preprocess: chat templates and tokenization, token for token against transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import transformers  # the test extra: a missing install fails, never skips

from dynamo_rt.errors import DynamoError, InvalidRequest
from frontend.openai_protocol import parse_chat, template_messages
from frontend.preprocess import TOKENIZER_FILES, Preprocessor
from tests.frontend import tokenizer_dir

KINDS = ["tiny", "chatml", "llama3", "inst"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {kind: tokenizer_dir(kind, root) for kind in KINDS}


@pytest.fixture(scope="module")
def pre(model_dirs: dict[str, Path]) -> dict[str, Preprocessor]:
    return {kind: Preprocessor.from_dir(d) for kind, d in model_dirs.items()}


@pytest.fixture(scope="module")
def hf(model_dirs: dict[str, Path]) -> dict[str, Any]:
    return {kind: transformers.AutoTokenizer.from_pretrained(str(d)) for kind, d in model_dirs.items()}


def hf_chat_ids(tok: Any, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    ids = out if isinstance(out, list) else out["input_ids"]
    return list(ids)


def msgs(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages as the frontend produces them: a request body through parse_chat + template_messages."""
    body = json.dumps({"model": "m", "messages": list(messages)}).encode()
    return template_messages(parse_chat(body))


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": msgs({"role": "user", "content": "Hello there, how are you?"}),
    "system+user": msgs(
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three boats."},
    ),
    "multi-turn": msgs(
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Where is the library?"},
        {"role": "assistant", "content": "At the end of the lane."},
        {"role": "user", "content": "And the cat?"},
    ),
    "unicode": msgs(
        {"role": "user", "content": "Café in Zürich 日本語 こんにちは 😀👍🏽👨‍👩‍👧 🇯🇵 Привет ∑≠€"},
        {"role": "assistant", "content": "  déjà vu 🚀  "},
        {"role": "user", "content": "مرحبا\n\n\ttabs and\r\nnewlines "},
    ),
    "content-parts": msgs(
        {"role": "system", "content": [{"type": "text", "text": "System part."}]},
        {"role": "user", "content": [{"type": "text", "text": "first part"},
                                     {"type": "text", "text": "second part 日本"}]},
    ),
    "tool": msgs(
        {"role": "user", "content": "What is the weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\", \"unit\": \"°C\"}"},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 °C, sunny"},
    ),
    "special-text": msgs(
        {"role": "user", "content": "ignore <|im_end|> and <|eot_id|> and </s> in text"},
    ),
    "developer": msgs(
        {"role": "developer", "content": "Developer note."},
        {"role": "user", "content": "hi"},
    ),
    "two-systems": msgs(
        {"role": "system", "content": "one"},
        {"role": "user", "content": "x"},
        {"role": "system", "content": "two"},
    ),
}


def for_hf(p: Preprocessor, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What to hand transformers: it passes list content to the template as is, so for templates that only
    render strings the test joins the parts as the Preprocessor does (newline-joined text parts)."""
    from frontend.preprocess import _content_format

    if _content_format(p._template(None)) == "openai":
        return messages
    return [
        {**m, "content": "\n".join(part["text"] for part in m["content"])} if isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_tokens_equal_transformers(
    kind: str, conv: str, gen: bool, pre: dict[str, Preprocessor], hf: dict[str, Any]
) -> None:
    p, tok = pre[kind], hf[kind]
    messages = CONVERSATIONS[conv]
    try:
        want = hf_chat_ids(tok, for_hf(p, messages), add_generation_prompt=gen)
    except Exception as exc:  # the template refuses this conversation: so must we, as a 400
        with pytest.raises(InvalidRequest) as info:
            p.encode_chat(messages, add_generation_prompt=gen)
        assert info.value.status == 400 and info.value.param == "messages"
        assert str(exc) in info.value.message
        return
    assert p.encode_chat(messages, add_generation_prompt=gen) == want
    text = tok.apply_chat_template(for_hf(p, messages), add_generation_prompt=gen, tokenize=False)
    assert p.apply_chat_template(messages, add_generation_prompt=gen) == text


def test_every_template_served_most_conversations(pre: dict[str, Preprocessor]) -> None:
    # Guard against the equality test above passing only because everything raised.
    for kind, p in pre.items():
        ok = 0
        for messages in CONVERSATIONS.values():
            try:
                p.encode_chat(messages)
                ok += 1
            except InvalidRequest:
                pass
        assert ok >= 6, kind


def test_template_errors_become_invalid_request(pre: dict[str, Preprocessor]) -> None:
    with pytest.raises(InvalidRequest) as info:
        pre["llama3"].encode_chat(CONVERSATIONS["two-systems"])
    assert info.value.message == "chat template error: Unsupported role: system"
    with pytest.raises(InvalidRequest) as info:
        pre["inst"].encode_chat(CONVERSATIONS["tool"])
    assert info.value.message == "chat template error: Only user, system and assistant roles are supported!"
    with pytest.raises(InvalidRequest, match="messages must hold at least one message"):
        pre["chatml"].encode_chat([])


@pytest.mark.parametrize("kind", ["tiny", "chatml"])
def test_tools_reach_the_template(kind: str, pre: dict[str, Preprocessor], hf: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Wetter für eine Stadt",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}]
    messages = CONVERSATIONS["user"]
    want = hf_chat_ids(hf[kind], messages, tools=tools, add_generation_prompt=True)
    got = pre[kind].encode_chat(messages, tools=tools)
    assert got == want
    assert "Wetter für" in pre[kind].apply_chat_template(messages, tools=tools)  # tojson keeps non-ASCII
    assert got != pre[kind].encode_chat(messages)


def test_template_kwargs(pre: dict[str, Preprocessor], hf: dict[str, Any]) -> None:
    p = pre["llama3"]
    # Extra variables reach the template; reserved names cannot be overridden.
    messages = CONVERSATIONS["user"]
    assert p.encode_chat(messages, template_kwargs={"bos_token": ""}) == hf_chat_ids(
        hf["llama3"], messages, add_generation_prompt=True, bos_token=""
    )
    assert p.encode_chat(messages, template_kwargs={"messages": [], "add_generation_prompt": False}) == (
        p.encode_chat(messages)
    )


PROMPTS = [
    "Hello world",
    " leading space and trailing space ",
    "café 日本語 😀 👍🏽 👨‍👩‍👧",
    "text with <|im_end|> and <|begin_of_text|> and <s> special strings",
    "\n\nnewlines\tand tabs\r\n",
    "x",
]


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tokens_equal_transformers(kind: str, pre: dict[str, Preprocessor], hf: dict[str, Any]) -> None:
    p, tok = pre[kind], hf[kind]
    for text in PROMPTS:
        assert p.encode_prompt(text) == tok(text)["input_ids"], text
    assert p.encode_prompts(PROMPTS) == [tok(t)["input_ids"] for t in PROMPTS]
    # encode_chat never adds BOS on top of what the template wrote.
    ids = p.encode_chat(CONVERSATIONS["user"])
    if p.bos_token_id is not None and kind == "llama3":
        assert ids[0] == p.bos_token_id and ids[1] != p.bos_token_id



@pytest.mark.parametrize("kind", KINDS)
def test_long_texts_tokenize_the_same(kind: str, pre: dict[str, Preprocessor], hf: dict[str, Any]) -> None:
    """Texts from LONG_TEXT_CHARS on take the GIL-releasing path: the ids equal transformers' exactly, on
    both sides of the threshold."""
    from frontend.preprocess import LONG_TEXT_CHARS

    p, tok = pre[kind], hf[kind]
    unit = "Hello wörld, a long prompt 123! "
    base = unit * (LONG_TEXT_CHARS // len(unit) + 2)
    for n in (LONG_TEXT_CHARS - 1, LONG_TEXT_CHARS, LONG_TEXT_CHARS + 1, 3 * LONG_TEXT_CHARS):
        text = (base * 3)[:n]
        assert p.encode_prompt(text) == tok(text)["input_ids"], n
    long_chat = [{"role": "user", "content": base * 2}]
    assert p.encode_chat(long_chat) == tok.apply_chat_template(long_chat, add_generation_prompt=True,
                                                                tokenize=True, return_dict=False)

def test_llama3_prompt_gets_bos(pre: dict[str, Preprocessor]) -> None:
    p = pre["llama3"]
    assert p.encode_prompt("hi")[0] == p.bos_token_id == p.tokenizer.token_to_id("<|begin_of_text|>")
    assert pre["chatml"].encode_prompt("hi")[0] != pre["chatml"].tokenizer.token_to_id("<|endoftext|>")


def test_empty_prompt_is_rejected(pre: dict[str, Preprocessor]) -> None:
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        pre["chatml"].encode_prompt("")
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        pre["chatml"].encode_prompts(["a", ""])
    assert pre["llama3"].encode_prompt("") == [pre["llama3"].bos_token_id]  # BOS alone is a prompt


@pytest.mark.parametrize("kind", KINDS)
def test_model_facts(
    kind: str, pre: dict[str, Preprocessor], hf: dict[str, Any], model_dirs: dict[str, Path]
) -> None:
    p, tok = pre[kind], hf[kind]
    assert p.eos_token_ids[0] == tok.eos_token_id
    assert p.bos_token_id == (tok.bos_token_id if kind != "chatml" else None)
    assert p.vocab_size == len(tok)
    # transformers may add per-class defaults (Qwen2Tokenizer's unk_token), which we do not mirror; the
    # tokens the files name must agree.
    assert p.special_tokens.items() <= tok.special_tokens_map.items()
    gen_path = model_dirs[kind] / "generation_config.json"
    if gen_path.exists():
        gen_eos = json.loads(gen_path.read_text())["eos_token_id"]
        assert set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) <= set(p.eos_token_ids)
    assert p.context_length == {"tiny": 4096, "chatml": 1024, "llama3": 131072, "inst": 4096}[kind]
    assert p.has_chat_template


def test_exact_eos_lists(pre: dict[str, Preprocessor]) -> None:
    t = pre["llama3"].tokenizer
    assert pre["llama3"].eos_token_ids == [t.token_to_id("<|eot_id|>"), t.token_to_id("<|end_of_text|>")]
    t = pre["chatml"].tokenizer
    assert pre["chatml"].eos_token_ids == [t.token_to_id("<|im_end|>"), t.token_to_id("<|endoftext|>")]
    assert pre["inst"].eos_token_ids == [pre["inst"].tokenizer.token_to_id("</s>")]


def test_from_files_equals_from_dir(model_dirs: dict[str, Path], pre: dict[str, Preprocessor]) -> None:
    d = model_dirs["llama3"]
    files = {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}
    p = Preprocessor.from_files(files)
    for messages in CONVERSATIONS.values():
        if messages is CONVERSATIONS["two-systems"]:
            continue
        assert p.encode_chat(messages) == pre["llama3"].encode_chat(messages)
    assert p.eos_token_ids == pre["llama3"].eos_token_ids


def _files(d: Path, **override: bytes | None) -> dict[str, bytes]:
    files = {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}
    for name, value in override.items():
        name = name.replace("__", ".")
        if value is None:
            files.pop(name, None)
        else:
            files[name] = value
    return files


def test_no_chat_template(model_dirs: dict[str, Path]) -> None:
    p = Preprocessor(_files(model_dirs["chatml"], chat_template__jinja=None))
    assert not p.has_chat_template
    with pytest.raises(InvalidRequest, match="this model has no chat template; use /v1/completions"):
        p.encode_chat(CONVERSATIONS["user"])
    assert p.encode_prompt("hi")  # completions still work


def test_unusable_model_files(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(DynamoError, match=r"tokenizer\.json is required") as info:
        Preprocessor({})
    assert info.value.status == 500 and not isinstance(info.value, InvalidRequest)
    with pytest.raises(DynamoError, match=r"tokenizer\.json cannot be loaded"):
        Preprocessor({"tokenizer.json": b"{}"})
    with pytest.raises(DynamoError, match=r"tokenizer_config\.json is not valid JSON"):
        Preprocessor(_files(model_dirs["chatml"], tokenizer_config__json=b"{"))


def test_bad_template_fails_at_load(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(DynamoError, match="the model's chat template does not compile"):
        Preprocessor(_files(model_dirs["chatml"], chat_template__jinja=b"{% for x in %}"))


def test_template_sandbox(model_dirs: dict[str, Path]) -> None:
    evil = b"{{ messages.__class__.__mro__[1].__subclasses__() }}"
    p = Preprocessor(_files(model_dirs["chatml"], chat_template__jinja=evil))
    with pytest.raises(InvalidRequest, match="chat template error: access to attribute '__class__'"):
        p.apply_chat_template(CONVERSATIONS["user"])
    mutate = b"{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}"
    p = Preprocessor(_files(model_dirs["chatml"], chat_template__jinja=mutate))
    with pytest.raises(InvalidRequest, match="chat template error"):
        p.apply_chat_template(CONVERSATIONS["user"])


def test_named_templates(model_dirs: dict[str, Path], pre: dict[str, Preprocessor]) -> None:
    cfg = json.loads((model_dirs["chatml"] / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
        {"name": "tool_use", "template": "TOOLS{% for m in messages %}{{ m.content }}{% endfor %}"},
    ]
    p = Preprocessor(_files(model_dirs["chatml"], chat_template__jinja=None,
                            tokenizer_config__json=json.dumps(cfg).encode()))
    assert p.apply_chat_template(CONVERSATIONS["user"]) == "Hello there, how are you?"
    assert p.apply_chat_template(CONVERSATIONS["user"], tools=[]) == "TOOLSHello there, how are you?"
    cfg["chat_template"] = [{"name": "other", "template": "x"}]
    p = Preprocessor(_files(model_dirs["chatml"], chat_template__jinja=None,
                            tokenizer_config__json=json.dumps(cfg).encode()))
    with pytest.raises(InvalidRequest, match="none is named 'default'"):
        p.apply_chat_template(CONVERSATIONS["user"])


def test_check_token_ids(pre: dict[str, Preprocessor]) -> None:
    p = pre["chatml"]  # config.json says vocab_size 768, above the tokenizer's 700
    assert p.max_token_id == 767
    p.check_token_ids([0, 767])
    with pytest.raises(InvalidRequest, match=r"token id 768 is out of range \[0, 767\]"):
        p.check_token_ids([1, 768])
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        p.check_token_ids([])


def test_decode_round_trip(pre: dict[str, Preprocessor], hf: dict[str, Any]) -> None:
    for kind in KINDS:
        p = pre[kind]
        ids = p.encode_chat(CONVERSATIONS["unicode"])
        assert p.decode(ids) == hf[kind].decode(ids, skip_special_tokens=True)
        assert p.decode(ids, skip_special_tokens=False) == hf[kind].decode(ids)


def _long_chat(turns: int, seed: int) -> list[list[dict[str, Any]]]:
    """The request of every turn of one long conversation (a ~3k-character system prompt; each turn adds a
    user and an assistant message), some messages quoting special-token strings."""
    import random

    from tests.frontend import training_lines

    rng = random.Random(seed)
    lines = training_lines(300, seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(lines) for _ in range(n))

    history = [{"role": "system", "content": text(40)}]
    out = []
    for t in range(turns):
        quote = " <|im_end|> <|eot_id|>[INST]</s>" if t % 3 == 1 else ""
        history.append({"role": "user", "content": text(rng.randint(3, 12)) + quote})
        out.append(msgs(*history))
        history.append({"role": "assistant", "content": text(2) + ("\n\n  " if t % 2 else "")})
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_long_chats_tokenize_piecewise_like_transformers(
    kind: str, model_dirs: dict[str, Path], hf: dict[str, Any]
) -> None:
    """Long chat prompts are tokenized piece by piece between special tokens, the pieces cached across
    requests: every turn of two interleaved conversations (sharing nothing but the template) gives exactly
    transformers' ids, the later turns from the cache."""
    from frontend.preprocess import SEGMENT_MIN_CHARS

    p = Preprocessor.from_dir(model_dirs[kind])  # a fresh, empty cache
    assert p._splitter is not None  # byte-level BPE without prefix space: piecewise is exact
    tok = hf[kind]
    a, b = _long_chat(8, seed=1), _long_chat(8, seed=2)
    for turn in range(8):
        for conv in (a[turn], b[turn]):
            want = hf_chat_ids(tok, for_hf(p, conv), add_generation_prompt=True)
            assert len(p.apply_chat_template(conv)) >= SEGMENT_MIN_CHARS
            assert p.encode_chat(conv) == want, (kind, turn)
    assert len(p._pieces) > 0 and p._pieces.chars > 0


@pytest.mark.parametrize("kind", ["tiny", "llama3"])
def test_chat_ids_are_an_array_the_garbage_collector_does_not_walk(
    kind: str, model_dirs: dict[str, Path], hf: dict[str, Any]
) -> None:
    """What a request keeps (encode_chat_ids): transformers' ids in an ``array("i")``, through which the cyclic
    collector visits no object, for a short chat, a long one tokenized piecewise, and the same long one again
    from the piece cache; through a list of 32k ids every collection would visit 32k ints while it lives."""
    import gc
    from array import array

    p = Preprocessor.from_dir(model_dirs[kind])
    tok = hf[kind]
    for conv in (CONVERSATIONS["multi-turn"], _long_chat(3, seed=5)[2], _long_chat(3, seed=5)[2]):
        ids = p.encode_chat_ids(conv)
        assert isinstance(ids, array) and ids.typecode == "i"
        assert gc.get_referents(ids) in ([], [array])  # its type at most (a heap type since 3.11)
        assert len(gc.get_referents(list(ids))) == len(ids) > 0
        assert list(ids) == hf_chat_ids(tok, for_hf(p, conv), add_generation_prompt=True) == p.encode_chat(conv)
    hits, _, _ = p.piece_cache_stats() or (0, 0, 0)
    assert hits > 0  # the third conversation came from the cache


def test_piecewise_off_when_position_matters(model_dirs: dict[str, Path], hf: dict[str, Any]) -> None:
    """A tokenizer whose pieces would not encode the same on their own (a pre-tokenizer that prefixes a
    space; a special token that strips the whitespace beside it) keeps whole-text encoding, and so still
    equals transformers."""
    d = model_dirs["chatml"]
    spec = json.loads((d / "tokenizer.json").read_text())
    prefixed = json.loads(json.dumps(spec))
    prefixed["pre_tokenizer"]["add_prefix_space"] = True
    stripping = json.loads(json.dumps(spec))
    for t in stripping["added_tokens"]:
        if t["content"] == "<|im_end|>":
            t["rstrip"] = True
    conv = _long_chat(3, seed=3)[-1]
    for variant in (prefixed, stripping):
        body = json.dumps(variant).encode()
        p = Preprocessor(_files(d, tokenizer__json=body))
        assert p._splitter is None
        text = p.apply_chat_template(conv)
        from tokenizers import Tokenizer

        assert p.encode_chat(conv) == Tokenizer.from_str(body.decode()).encode(text, add_special_tokens=False).ids
    assert Preprocessor.from_dir(d)._splitter is not None


def test_piece_cache_is_bounded() -> None:
    from array import array

    from frontend.preprocess import _PieceCache

    def ids(*v: int) -> array[int]:
        return array("i", v)

    c = _PieceCache(max_chars=10)
    c.put("aaaa", ids(1))
    c.put("bbbb", ids(2))
    assert c.get("aaaa") == ids(1)  # now most recent
    c.put("cccc", ids(3))  # 12 chars > 10: the least recent ("bbbb") goes
    assert c.get("bbbb") is None and c.get("aaaa") == ids(1) and c.get("cccc") == ids(3)
    assert c.chars == 8 and len(c) == 2
    assert (c.hits, c.misses) == (3, 1)
    c.put("x" * 11, ids(4))  # larger than the whole cache: not kept
    assert len(c) == 2 and c.chars == 8


# --------------------------------------------------------------------------- long new pieces in chunks

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_THEN_BYTES = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _random_prose(rng: Any, n: int) -> str:
    """Text that exercises the pre-tokenizer regexes: words, digits, contractions, punctuation runs, repeated
    spaces and newlines, accents and CJK."""
    words = ["harbour", "Keeper's", "don't", "x1", "22", "4096", "naïve", "café", "日本語", "(paren)", "a.b", "a_b",
             "--", "...", "'quoted'", "I'm", "ÜBER", "tab\there", "line\nbreak", "two  spaces", "\n\n", "é", "ok!"]
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.mark.parametrize("pre_tokenizer", ["byte-level regex", "split then bytes"])
def test_chunk_points_cut_where_the_ids_do_not_change(
    pre_tokenizer: str, model_dirs: dict[str, Path]
) -> None:
    """Cutting a text at chunk_points (before a space between a letter or digit and a letter) and encoding the
    chunks gives the whole text's ids, for GPT-2's ByteLevel regex and a Llama-3-style Split regex, at every
    chunk count, on random prose."""
    import random

    from tokenizers import Tokenizer

    from frontend.preprocess import _chunk_safe, chunk_points

    spec = json.loads((model_dirs["tiny"] / "tokenizer.json").read_text())
    if pre_tokenizer == "split then bytes":
        spec["pre_tokenizer"] = SPLIT_THEN_BYTES
    assert _chunk_safe(spec["pre_tokenizer"]) is True
    tok = Tokenizer.from_str(json.dumps(spec))
    rng = random.Random(11)
    cuts = 0
    for _ in range(30):
        text = _random_prose(rng, rng.randint(20, 400))
        whole = tok.encode(text, add_special_tokens=False).ids
        for n in (2, 3, 7, 50):
            chunks = chunk_points(text, n, reach=64)
            assert "".join(chunks) == text and len(chunks) <= n
            for c in chunks[1:]:
                assert c[0] == " " and c[1].isalpha()
            cuts += len(chunks) - 1
            ids = [i for c in chunks for i in tok.encode(c, add_special_tokens=False).ids]
            assert ids == whole, (n, chunks)
    assert cuts > 500


def test_chunk_safe_accepts_only_pre_tokenizers_it_can_reason_about() -> None:
    from frontend.preprocess import _chunk_safe

    assert _chunk_safe({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) is True
    assert _chunk_safe(SPLIT_THEN_BYTES) is True
    assert _chunk_safe(None) is None  # no pre-tokenizer: the whole text is one word to the model
    assert not _chunk_safe({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})
    assert not _chunk_safe({"type": "ByteLevel", "add_prefix_space": False, "use_regex": False})
    assert _chunk_safe({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}) is False
    lookbehind = {"type": "Split", "pattern": {"Regex": r"(?<=\w) "}, "behavior": "Isolated", "invert": False}
    assert _chunk_safe(lookbehind) is False
    assert _chunk_safe({**SPLIT_THEN_BYTES["pretokenizers"][0], "behavior": "MergedWithPrevious"}) is False
    assert _chunk_safe({"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated"}) is False
    assert _chunk_safe({"type": "Sequence", "pretokenizers": [lookbehind, SPLIT_THEN_BYTES]}) is False


@pytest.mark.parametrize("kind", KINDS)
def test_long_new_pieces_tokenize_in_chunks_like_transformers(
    kind: str, model_dirs: dict[str, Path], hf: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new chat piece over PARALLEL_MIN_CHARS is tokenized in chunks on the tokenizer threads (counted in
    parallel_pieces; three chunks here, even on a 1-CPU machine) and the prompt is exactly transformers'
    ids; once cached it is not tokenized again."""
    import random

    from frontend import offload
    from frontend.preprocess import PARALLEL_MIN_CHARS

    monkeypatch.setattr(offload, "tokenizer_threads", lambda: 2)
    p = Preprocessor.from_dir(model_dirs[kind])
    assert p._chunkable
    rng = random.Random(kind)
    system = _random_prose(rng, 6000)
    assert len(system) > PARALLEL_MIN_CHARS
    conv = msgs({"role": "system", "content": system}, {"role": "user", "content": "Summarise the log."})
    want = hf_chat_ids(hf[kind], for_hf(p, conv), add_generation_prompt=True)
    assert p.encode_chat(conv) == want and p.parallel_pieces == 1
    assert p.encode_chat(conv) == want and p.parallel_pieces == 1  # the piece came from the cache
