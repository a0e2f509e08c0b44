"""The mocker's engine spec: its command-line flags (each with a ``DYN_MOCKER_*`` twin) and the engine factory.

Place: :data:`SPEC` is what the engine registry (``workers.registry``) loads for ``--engine mocker``: the
worker's parser hands the flags it does not know to a parser of :func:`add_flags`, then calls
:func:`build_engines`; ``--num-workers N`` gives N independent engines in one process, each registered as its
own instance. :func:`timing_model` is the timing model these flags describe (the profiler's analytic figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from dynamo_rt.config import flag
from dynamo_rt.errors import ConfigError
from workers.common.engine import ModelInfo
from workers.mocker.engine import MockerEngine, TimingModel
from workers.registry import EngineSpec

log = logging.getLogger(__name__)

DEFAULT_VOCAB = 32000


def add_flags(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--speedup", env="DYN_MOCKER_SPEEDUP", type=float, default=1.0,
         help="simulated time runs this many times faster than wall time (0: as fast as possible)")
    flag(parser, "--num-workers", env="DYN_MOCKER_NUM_WORKERS", type=int, default=1,
         help="mocker engines in this process, each its own instance")
    flag(parser, "--prefill-ms-per-token", env="DYN_MOCKER_PREFILL_MS_PER_TOKEN", type=float, default=0.07,
         help="simulated prefill cost per uncached prompt token")
    flag(parser, "--prefill-base-ms", env="DYN_MOCKER_PREFILL_BASE_MS", type=float, default=2.0,
         help="extra simulated cost of a step that prefills")
    flag(parser, "--decode-ms-base", env="DYN_MOCKER_DECODE_MS_BASE", type=float, default=10.0,
         help="simulated cost of one forward step")
    flag(parser, "--decode-ms-per-seq", env="DYN_MOCKER_DECODE_MS_PER_SEQ", type=float, default=0.1,
         help="simulated extra step cost per running sequence")
    flag(parser, "--transfer-ms-per-block", env="DYN_MOCKER_TRANSFER_MS_PER_BLOCK", type=float, default=0.08,
         help="simulated KV transfer time per block (disaggregated decode)")
    flag(parser, "--num-blocks", env="DYN_MOCKER_NUM_BLOCKS", type=int, default=16384,
         help="KV blocks in each engine's pool")
    flag(parser, "--max-num-seqs", env="DYN_MOCKER_MAX_NUM_SEQS", type=int, default=256,
         help="most requests running at once")
    flag(parser, "--max-num-batched-tokens", env="DYN_MOCKER_MAX_NUM_BATCHED_TOKENS", type=int, default=8192,
         help="token budget of one step (longer prompts are prefilled in chunks)")
    flag(parser, "--block-size", env="DYN_MOCKER_BLOCK_SIZE", type=int, default=16,
         help="tokens per KV block")
    flag(parser, "--vocab-size", env="DYN_MOCKER_VOCAB_SIZE", type=int, default=None,
         help=f"output token ids are drawn below this (default: the tokenizer's, else {DEFAULT_VOCAB})")
    flag(parser, "--eos-probability", env="DYN_MOCKER_EOS_PROBABILITY", type=float, default=0.0,
         help="chance per generated token of emitting EOS (0: only max_tokens / stop ids end a request)")
    flag(parser, "--mocker-seed", env="DYN_MOCKER_SEED", type=int, default=0,
         help="seed of the simulated outputs (equal seeds give equal outputs)")
    flag(parser, "--context-length", env="DYN_MOCKER_CONTEXT_LENGTH", type=int, default=None,
         help="the simulated model's context length, published in the model card (default: the model "
              "folder's max_position_embeddings): the tiny model's tokenizer with a long-context model's limits")


def tokenizer_vocab(path: str) -> tuple[int, list[int]] | None:
    """Vocabulary size and special-token ids of ``path/tokenizer.json``, if there is one."""
    file = os.path.join(path, "tokenizer.json") if path else ""
    if not file or not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(file)
    specials = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    return tok.get_vocab_size(with_added_tokens=True), specials


def build_engines(args: argparse.Namespace, info: ModelInfo) -> list[MockerEngine]:
    """``args.num_workers`` engines from parsed flags; vocabulary from the model folder when present."""
    vocab = args.vocab_size
    specials: list[int] = []
    found = tokenizer_vocab(info.path)
    if found is not None:
        tok_vocab, specials = found
        if vocab is None:
            vocab = tok_vocab
    if vocab is None:
        vocab = _config_vocab(info.path) or DEFAULT_VOCAB
    if args.num_workers < 1:
        raise ConfigError("--num-workers", f"must be at least 1, not {args.num_workers}")
    info = dataclasses.replace(info, block_size=args.block_size)
    context = getattr(args, "context_length", None)
    if context is not None:
        if context < 1:
            raise ConfigError("--context-length", f"must be at least 1, not {context}")
        info = dataclasses.replace(info, context_length=context)
    return [
        MockerEngine(
            info,
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            prefill_ms_per_token=args.prefill_ms_per_token,
            prefill_base_ms=args.prefill_base_ms,
            decode_ms_base=args.decode_ms_base,
            decode_ms_per_seq=args.decode_ms_per_seq,
            speedup=args.speedup,
            transfer_ms_per_block=args.transfer_ms_per_block,
            vocab_size=vocab,
            eos_probability=args.eos_probability,
            special_token_ids=specials,
            seed=args.mocker_seed,
        )
        for _ in range(args.num_workers)
    ]


def build_engine(args: argparse.Namespace, info: ModelInfo) -> MockerEngine:
    """The first engine of :func:`build_engines` (``--num-workers`` ignored)."""
    ns = argparse.Namespace(**{**vars(args), "num_workers": 1})
    return build_engines(ns, info)[0]


def timing_model(args: argparse.Namespace) -> TimingModel:
    """The timing model of parsed mocker flags (at speedup 1)."""
    return TimingModel(prefill_ms_per_token=args.prefill_ms_per_token, prefill_base_ms=args.prefill_base_ms,
                       decode_ms_base=args.decode_ms_base, decode_ms_per_seq=args.decode_ms_per_seq,
                       transfer_ms_per_block=args.transfer_ms_per_block)


def _config_vocab(path: str) -> int | None:
    file = os.path.join(path, "config.json") if path else ""
    if not file or not os.path.isfile(file):
        return None
    with open(file) as f:
        v = json.load(f).get("vocab_size")
    return int(v) if isinstance(v, int) else None


SPEC = EngineSpec(
    name="mocker",
    description="simulated engine: a timing model and real KV block accounting (router, planner and load tests)",
    add_flags=add_flags,
    build=build_engines,
    runs_on_cpu=True,
)
