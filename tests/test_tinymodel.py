"""The tiny model builder: reproducible bytes, loads in transformers, a usable tokenizer and chat template,
and a cache that survives racing processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_rt.local import tinymodel
from dynamo_rt.local.tinymodel import MODEL_FILES, ensure_tiny_model, make_tiny_model

# sha256 of model.safetensors for seed 0 and the default shape. It depends only on PCG64's raw bits, integer
# arithmetic and the safetensors layout, so it must hold on every machine. If you change the weight init
# on purpose, update it here.
WEIGHTS_SHA256 = "e66af0641c3f1265bd3bc9b947edd169cf7858a2cef0f44e345991d7a59e1663"

PROMPTS = ["Hello, how are you?", "The river flooded in the spring", "def fibonacci(n):", "你好！今天天气很好"]
MULTIBYTE = [
    "héllo wörld 你好 🚀",
    "Zażółć gęślą jaźń — ½ € ≠ ∞",
    "家族: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👋🏽 ok ✅",
    "  leading spaces, tabs\tand\nnewlines\r\n",
    "مرحبا שלום नमस्ते สวัสดี",
]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", progress=lambda _: None)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Iterator[tuple[Any, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.eval()
        yield tok, model


def _greedy(model: Any, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, len(ids):]]


def test_two_builds_in_fresh_processes_are_byte_identical(tmp_path: Path, model_dir: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ra = _run(["-m", "dynamo_rt.local.tinymodel", str(a)])
    rb = _run(["-m", "dynamo_rt.local.tinymodel", str(b), "--seed", "0"], env={"TOKENIZERS_PARALLELISM": "false"})
    assert ra.stdout == f"{a}\n" and rb.stdout == f"{b}\n"
    assert "[4/4]" in ra.stderr and "done:" in ra.stderr
    da, db = _digests(a), _digests(b)
    assert sorted(da) == sorted(MODEL_FILES)
    assert da == db == _digests(model_dir)
    assert da["model.safetensors"] == WEIGHTS_SHA256


def test_seed_changes_weights_only(tmp_path: Path, model_dir: Path) -> None:
    other = _digests(make_tiny_model(tmp_path / "s1", seed=1, progress=lambda _: None))
    base = _digests(model_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in base.items() if k != "model.safetensors"}


def test_fingerprint_names_the_build() -> None:
    fp = tinymodel.fingerprint()
    assert len(fp) == 12 and fp == tinymodel.fingerprint(tinymodel.TinyModelParams())
    assert tinymodel.fingerprint(tinymodel.TinyModelParams(seed=1)) != fp
    assert tinymodel.default_model_dir("/x").as_posix() == f"/x/dynamo-tiny-{fp}"


def test_config_and_files(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    n_vocab = len(tok["model"]["vocab"])
    assert n_vocab == 2048
    assert cfg["vocab_size"] == n_vocab  # already a multiple of 64: no padding rows
    assert (cfg["architectures"], cfg["model_type"], cfg["torch_dtype"]) == (["LlamaForCausalLM"], "llama",
                                                                              "float32")
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 0)
    assert gen == {"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": False}
    added = [(t["id"], t["content"], t["special"]) for t in tok["added_tokens"]]
    assert added == [(0, "<|endoftext|>", True), (1, "<|im_start|>", True), (2, "<|im_end|>", True),
                     (3, "<tool_call>", False), (4, "</tool_call>", False), (5, "<think>", False),
                     (6, "</think>", False)]
    size = (model_dir / "model.safetensors").stat().st_size
    assert 10_000_000 < size < 16_500_000


def test_small_vocab_is_padded_to_64(tmp_path: Path, hf: tuple[Any, Any]) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = make_tiny_model(tmp_path / "v1000", vocab_size=1000, progress=lambda _: None)
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 1024
    assert len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]) == 1000
    lm_head = load_file(str(d / "model.safetensors"))["lm_head.weight"]
    assert lm_head.shape == (1024, 256) and not lm_head[1000:].any() and lm_head[7:1000].any(axis=1).all()
    tok = AutoTokenizer.from_pretrained(d)
    out = _greedy(AutoModelForCausalLM.from_pretrained(d), tok("Hello there")["input_ids"], 8)
    assert all(7 <= t < 1000 for t in out)


def test_transformers_greedy_is_deterministic_and_varied(hf: tuple[Any, Any]) -> None:
    tok, model = hf
    runs = []
    for _ in range(2):
        runs.append([_greedy(model, tok(p)["input_ids"], 8) for p in PROMPTS])
    assert runs[0] == runs[1]
    outs = runs[0]
    assert all(len(o) == 8 for o in outs)
    # Not degenerate: many distinct tokens per continuation, different continuations per prompt.
    assert all(len(set(o)) >= 6 for o in outs)
    assert len({tuple(o) for o in outs}) == len(PROMPTS)
    # lm_head rows of special / markup tokens are zero: greedy never emits them (runs to max_tokens).
    assert all(t >= len(tinymodel.ALL_ADDED) for o in outs for t in o)


def test_output_depends_on_early_context(hf: tuple[Any, Any]) -> None:
    # Engines' KV-cache tests rely on this: a wrong cached token far back must change what comes out.
    tok, model = hf
    ids = tok("The river flooded in the spring of that year, and the town council met every evening")[
        "input_ids"]
    assert len(ids) > 12
    changed = [ids[0] + 5, *ids[1:]]
    assert _greedy(model, ids, 8) != _greedy(model, changed, 8)


def test_chat_template(hf: tuple[Any, Any]) -> None:
    tok, _ = hf
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs[:2], tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    ids = tok.apply_chat_template(msgs[1:2], add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]
    nl = tok.encode("\n", add_special_tokens=False)
    assert ids == [1, *tok.encode("user", add_special_tokens=False), *nl,
                   *tok.encode("Hi", add_special_tokens=False), 2, *nl,
                   1, *tok.encode("assistant", add_special_tokens=False), *nl]


def test_chat_template_tools_and_parts(hf: tuple[Any, Any]) -> None:
    tok, _ = hf
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Zürich?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 4}'},
    ]
    text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou may call the functions below. To call one, reply with <tool_call>\n"
        '{"name": <name>, "arguments": <object>}\n</tool_call>\n<tools>\n'
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n'
        "</tools><|im_end|>\n"
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>tool\n{"temp": 4}<|im_end|>\n'
        "<|im_start|>assistant\n")


def test_special_tokens_are_single_ids(model_dir: Path, hf: tuple[Any, Any]) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok, _ = hf
    for i, t in enumerate(tinymodel.ALL_ADDED):
        assert raw.encode(t).ids == [i]
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert raw.encode(f"ab{t}cd").ids == [*raw.encode("ab").ids, i, *raw.encode("cd").ids]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 0)
    # No BOS/EOS is added on encode: the tokens are exactly the text's.
    assert raw.encode("hello").ids == tok.encode("hello") == tok.encode("hello", add_special_tokens=False)
    # Markup tokens are not special: they survive skip_special_tokens (tool-call / reasoning parsers).
    assert tok.decode([1, 3, 5, 6, 4, 2, 0], skip_special_tokens=True) == "<tool_call><think></think></tool_call>"
    assert raw.decode([1, 3, 2], skip_special_tokens=True) == "<tool_call>"


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_roundtrip(model_dir: Path, hf: tuple[Any, Any], text: str) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok, _ = hf
    ids = raw.encode(text).ids
    assert raw.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == text


def test_corpus_roundtrips_exactly(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = tinymodel.CORPUS_FILE.read_text(encoding="utf-8")
    ids = raw.encode(text).ids
    assert raw.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # the merges learned something


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    first = ensure_tiny_model(tmp_path, progress=lambda _: None)
    assert first == tinymodel.default_model_dir(tmp_path)
    assert first.name == f"dynamo-tiny-{tinymodel.fingerprint()}"
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    built: list[str] = []
    assert ensure_tiny_model(tmp_path, progress=built.append) == first
    assert built == []  # found, not rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp
    assert _digests(first)["model.safetensors"] == WEIGHTS_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, f".{first.name}.lock"])


def test_ensure_clears_crashed_build_and_damaged_folder(tmp_path: Path) -> None:
    final = tinymodel.default_model_dir(tmp_path)
    junk = tmp_path / f".{final.name}.tmp-crashed"
    junk.mkdir()
    (junk / "tokenizer.json").write_text("{")
    final.mkdir()
    (final / "config.json").write_text("{")  # incomplete: ensure must not trust it
    assert ensure_tiny_model(tmp_path, progress=lambda _: None) == final
    assert _digests(final)["model.safetensors"] == WEIGHTS_SHA256
    assert sorted(_digests(final)) == sorted(MODEL_FILES)
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, f".{final.name}.lock"])


def test_cli_without_dir_uses_the_cache(tmp_path: Path) -> None:
    r = _run(["-m", "dynamo_rt.local.tinymodel"], env={"DYN_MODEL_CACHE": str(tmp_path)})
    assert r.stdout == f"{tinymodel.default_model_dir(tmp_path)}\n"
    bad = subprocess.run([sys.executable, "-m", "dynamo_rt.local.tinymodel", "--seed", "1"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "DYN_MODEL_CACHE": str(tmp_path)})
    assert bad.returncode == 2 and "--seed needs DIR" in bad.stderr


def test_ensure_concurrent_processes(tmp_path: Path) -> None:
    code = ("import sys; from dynamo_rt.local.tinymodel import ensure_tiny_model; "
            "print(ensure_tiny_model(progress=lambda s: print(s, file=sys.stderr)))")
    env = {**os.environ, "DYN_MODEL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs, errs = [], []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out)
        errs.append(err)
    assert sum(e.count("done:") for e in errs) == 1  # one built, the others waited on the lock
    final = tinymodel.default_model_dir(tmp_path)
    assert outs == [f"{final}\n"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, f".{final.name}.lock"])
    assert _digests(final)["model.safetensors"] == WEIGHTS_SHA256
    assert sorted(_digests(final)) == sorted(MODEL_FILES)
