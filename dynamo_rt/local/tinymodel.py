"""Build the tiny model: a small random-weight Llama with a real tokenizer, reproducible to the byte.

It is the embedded default model of ``dynamo-rt up`` and the model every test runs (reference engine,
vLLM worker, frontend tokenization). ``dynamo-rt make-tiny-model DIR`` writes it in Hugging Face layout:

- ``config.json``: ``LlamaForCausalLM``, float32, untied ``lm_head`` (``tie_word_embeddings: false``).
- ``model.safetensors``: weights drawn from ``numpy`` PCG64 raw bits with integer arithmetic and one float
  multiply per value, so the bytes are the same on every machine and numpy version.
- ``tokenizer.json``: byte-level BPE trained (deterministically) on ``dynamo_rt/local/data/tiny_corpus.txt``.
- ``tokenizer_config.json`` / ``special_tokens_map.json``: ChatML special tokens and the chat template
  (``dynamo_rt/local/data/chat_template.jinja``).
- ``generation_config.json``: greedy, stops on ``<|im_end|>`` or ``<|endoftext|>``.

The weights are scaled so that attention and MLP outputs are as large as the residual stream: the next
token depends on the whole context, which is what lets tests catch KV-cache bugs by token mismatch. The
``lm_head`` rows of the special tokens are zero, so (greedy) generation never emits one and a request
always runs to ``max_tokens``; stop behaviour is tested with stop strings / stop token ids instead.

:func:`ensure_tiny_model` builds once into a per-user cache folder named by a fingerprint of everything
that shapes the output (this file, the data files, the build parameters, the tokenizers version), so a
change to the builder yields a new folder; concurrent callers (test workers, local stack processes) are
serialised by a file lock and the folder appears atomically by rename.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dynamo_rt.config import flag

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
CORPUS_FILE = DATA_DIR / "tiny_corpus.txt"
CHAT_TEMPLATE_FILE = DATA_DIR / "chat_template.jinja"

# Fixed ids (the trainer puts special tokens first, in this order).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Markup for tool calls and reasoning: single ids, but not "special" (they survive skip_special_tokens,
# so a tool-call / reasoning parser downstream still sees them in the text).
MARKUP_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ALL_ADDED = SPECIAL_TOKENS + MARKUP_TOKENS
BOS_ID, EOS_ID, PAD_ID = 0, 2, 0  # bos = pad = <|endoftext|>, eos = <|im_end|>

# The files a finished model folder holds, in the order they are written.
MODEL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
)

# Weight init scales, relative to 1/sqrt(fan_in). Embeddings have unit std so the residual stream starts at
# the same scale as what each block adds; q is sharpened so attention is peaked (context-dependent) rather
# than a flat average; lm_head gives logits of std ~3, far from ties, so fp32 engines agree token for token.
EMBED_STD = 1.0
Q_GAIN = 2.0
PROJ_GAIN = 1.0
LM_HEAD_GAIN = 3.0

ProgressFn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TinyModelParams:
    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 4096
    name: str = "dynamo-tiny"


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 2048,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 688,
    max_position_embeddings: int = 4096,
    name: str = "dynamo-tiny",
    progress: ProgressFn | None = None,
) -> Path:
    """Write the tiny model into ``out_dir`` (created if missing; our files in it are overwritten)."""
    p = TinyModelParams(seed, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                        intermediate_size, max_position_embeddings, name)
    _check_params(p)
    say = progress or log.info
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    say(f"[1/4] training byte-level BPE tokenizer (target vocab {p.vocab_size}) on {CORPUS_FILE.name}")
    tok_json = _train_tokenizer(p.vocab_size)
    n_tokens = len(json.loads(tok_json)["model"]["vocab"])
    # Embedding rows padded to a multiple of 64; the padding rows are never produced by the tokenizer and
    # their lm_head rows are zero, so the model never predicts them either.
    vocab_padded = -(-n_tokens // 64) * 64
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")

    say(f"[2/4] writing tokenizer config and chat template ({n_tokens} tokens, config vocab {vocab_padded})")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(p))
    _write_json(out / "special_tokens_map.json", _special_tokens_map())

    say("[3/4] writing config.json and generation_config.json")
    _write_json(out / "config.json", _model_config(p, vocab_padded))
    _write_json(out / "generation_config.json", _generation_config())

    say(f"[4/4] drawing weights (seed {p.seed}) into model.safetensors")
    n_params = _write_weights(out / "model.safetensors", p, vocab_padded, n_tokens)
    size_mb = sum((out / f).stat().st_size for f in MODEL_FILES) / 1e6
    say(f"done: {out} ({n_params / 1e6:.2f}M params, {size_mb:.1f} MB, {time.perf_counter() - t0:.2f} s)")
    return out


def default_model_dir(cache_root: str | Path | None = None) -> Path:
    """Where :func:`ensure_tiny_model` keeps the default model.

    ``cache_root``, else ``$DYN_MODEL_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/dynamo-rt/models``;
    the folder inside is ``dynamo-tiny-<fingerprint>``.
    """
    if cache_root is None:
        env = os.environ.get("DYN_MODEL_CACHE")
        if env:
            cache_root = env
        else:
            xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            cache_root = Path(xdg) / "dynamo-rt" / "models"
    return Path(cache_root).expanduser() / f"{TinyModelParams().name}-{fingerprint()}"


def ensure_tiny_model(cache_root: str | Path | None = None, progress: ProgressFn | None = None) -> Path:
    """Return the default tiny model's folder, building it on first use.

    Safe when several processes race: they take an exclusive lock beside the folder, the first builds into
    a temporary sibling and renames it into place, the others find it done. A crashed build leaves only a
    temporary folder, never a half-written model folder; the next build clears it.
    """
    final = default_model_dir(cache_root)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{final.name}.lock"):
        if _complete(final):
            return final
        # Holding the lock, any temporary sibling is a crashed build's, and an incomplete folder is damage
        # (files deleted by hand): clear both. The folder is renamed away first so it vanishes at once.
        for junk in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(junk, ignore_errors=True)
        if final.exists():
            os.rename(final, tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            for junk in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(junk, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            make_tiny_model(tmp, progress=progress)
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            try:
                os.rename(tmp, final)
            except OSError:
                # Lost to a builder that does not see our lock (a filesystem without flock): theirs is as good.
                if not _complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def fingerprint(params: TinyModelParams | None = None) -> str:
    """12 hex digits naming a build: this file, the data files, the parameters, the tokenizers version."""
    import tokenizers

    h = hashlib.sha256()
    for blob in (
        Path(__file__).read_bytes(),
        CORPUS_FILE.read_bytes(),
        CHAT_TEMPLATE_FILE.read_bytes(),
        json.dumps(asdict(params or TinyModelParams()), sort_keys=True).encode(),
        tokenizers.__version__.encode(),
    ):
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()[:12]


# --- CLI ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dynamo-rt make-tiny-model``."""
    parser.add_argument("dir", nargs="?", default=None,
                        help="output folder (default: build once into the model cache and print its path)")
    flag(parser, "--seed", env="DYN_TINY_MODEL_SEED", type=int, default=0, help="weight seed")


def main(args: argparse.Namespace) -> int:
    """Run ``dynamo-rt make-tiny-model``: progress on stderr, the model folder on stdout."""

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.dir is None:
        if args.seed != 0:
            say("--seed needs DIR: the cached default model is built with seed 0")
            return 2
        path = ensure_tiny_model(progress=say)
    else:
        path = make_tiny_model(args.dir, seed=args.seed, progress=say)
    print(path)
    return 0


# --- building blocks -------------------------------------------------------------------------------------


def _check_params(p: TinyModelParams) -> None:
    if p.hidden_size % p.num_heads:
        raise ValueError(f"hidden_size {p.hidden_size} is not a multiple of num_heads {p.num_heads}")
    if p.num_heads % p.num_kv_heads:
        raise ValueError(f"num_heads {p.num_heads} is not a multiple of num_kv_heads {p.num_kv_heads}")
    if (p.hidden_size // p.num_heads) % 2:
        raise ValueError("head_dim must be even (RoPE rotates pairs)")
    if p.vocab_size < 256 + len(ALL_ADDED) + 1:
        raise ValueError(f"vocab_size {p.vocab_size} is smaller than the byte alphabet plus special tokens")


def _train_tokenizer(vocab_size: int) -> str:
    """Train the BPE and return tokenizer.json's text.

    Determinism: the corpus is fed in file order and the trainer's result does not depend on thread count
    or per-process hash seeds (checked with 1-3 rayon threads and TOKENIZERS_PARALLELISM=false); the
    tests build in fresh processes and compare bytes to hold it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Offsets only; adds no tokens (no BOS), so encode(text) is exactly the text's tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=t in SPECIAL_TOKENS, normalized=False) for t in ALL_ADDED],
    )
    lines = CORPUS_FILE.read_text(encoding="utf-8").split("\n\n")
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # The trainer marks every token it reserves as special; the markup tokens must not be (see above).
    spec = json.loads(tok.to_str())
    for entry in spec["added_tokens"]:
        entry["special"] = entry["content"] in SPECIAL_TOKENS
    return Tokenizer.from_str(json.dumps(spec)).to_str(pretty=True)


def _tokenizer_config(p: TinyModelParams) -> dict[str, object]:
    template = CHAT_TEMPLATE_FILE.read_text(encoding="utf-8").rstrip("\n")
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": t in SPECIAL_TOKENS}
        for i, t in enumerate(ALL_ADDED)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": p.max_position_embeddings,
        "split_special_tokens": False,
        "chat_template": template,
    }


def _special_tokens_map() -> dict[str, object]:
    return {
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "additional_special_tokens": [IM_START, IM_END],
    }


def _model_config(p: TinyModelParams, vocab: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": p.name,
        "vocab_size": vocab,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.hidden_size // p.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def _generation_config() -> dict[str, object]:
    return {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "pad_token_id": PAD_ID,
            "do_sample": False}


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _Draw:
    """Approximately normal float32 values whose bits depend only on the seed.

    Each value is an Irwin-Hall sum of four 16-bit uniforms cut from one raw PCG64 output (integer
    arithmetic), centred and scaled with a single float64 multiply, then rounded to float32. Raw PCG64
    bits are fixed by the algorithm and SeedSequence; numpy's own normal samplers are not promised to keep
    their streams across versions.
    """

    _UNIT = 1.0 / math.sqrt(4 * (65536.0**2 - 1) / 12.0)

    def __init__(self, seed: int) -> None:
        self._bits = np.random.PCG64(seed)

    def normal(self, shape: tuple[int, ...], std: float) -> npt.NDArray[np.float32]:
        n = math.prod(shape)
        raw = self._bits.random_raw(n).astype(np.uint64)
        mask = np.uint64(0xFFFF)
        total = (raw & mask).astype(np.int64)
        for shift in (16, 32, 48):
            total += ((raw >> np.uint64(shift)) & mask).astype(np.int64)
        centred = (total - 2 * 65535).astype(np.float64)  # exact: |value| < 2**18
        return (centred * (std * self._UNIT)).astype(np.float32).reshape(shape)


def _weights(p: TinyModelParams, vocab: int, n_tokens: int) -> Iterator[tuple[str, npt.NDArray[np.float32]]]:
    h, hd = p.hidden_size, p.hidden_size // p.num_heads
    q_out, kv_out = p.num_heads * hd, p.num_kv_heads * hd
    draw = _Draw(p.seed)

    def lin(out_f: int, in_f: int, gain: float = PROJ_GAIN) -> npt.NDArray[np.float32]:
        return draw.normal((out_f, in_f), gain / math.sqrt(in_f))

    ones = np.ones(h, dtype=np.float32)
    yield "model.embed_tokens.weight", draw.normal((vocab, h), EMBED_STD)
    for i in range(p.num_layers):
        pre = f"model.layers.{i}."
        yield pre + "input_layernorm.weight", ones
        yield pre + "self_attn.q_proj.weight", lin(q_out, h, Q_GAIN)
        yield pre + "self_attn.k_proj.weight", lin(kv_out, h)
        yield pre + "self_attn.v_proj.weight", lin(kv_out, h)
        yield pre + "self_attn.o_proj.weight", lin(h, q_out)
        yield pre + "post_attention_layernorm.weight", ones
        yield pre + "mlp.gate_proj.weight", lin(p.intermediate_size, h)
        yield pre + "mlp.up_proj.weight", lin(p.intermediate_size, h)
        yield pre + "mlp.down_proj.weight", lin(h, p.intermediate_size)
    yield "model.norm.weight", ones
    lm_head = lin(vocab, h, LM_HEAD_GAIN)
    lm_head[: len(ALL_ADDED)] = 0.0  # never predict special / markup tokens (see module docstring)
    lm_head[n_tokens:] = 0.0  # nor padding rows
    yield "lm_head.weight", lm_head


def _write_weights(path: Path, p: TinyModelParams, vocab: int, n_tokens: int) -> int:
    from safetensors.numpy import save_file

    tensors = dict(_weights(p, vocab, n_tokens))
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600; the cache folder may be shared read-only with others
    return sum(t.size for t in tensors.values())


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


if __name__ == "__main__":  # python -m dynamo_rt.local.tinymodel DIR: the same as dynamo-rt make-tiny-model
    from dynamo_rt.config import Parser

    _parser = Parser(prog="dynamo-rt make-tiny-model", description=__doc__.split("\n")[0] if __doc__ else None)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
