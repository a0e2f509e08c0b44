"""Flags and flag helpers shared by the adapters of third-party engines (vLLM, SGLang, TensorRT-LLM).

Place: ``workers.{vllm,sglang,trtllm}.flags`` call :func:`add_gpu_engine_flags` from their ``add_flags`` (so
each of the three parsers declares these flags once, with the same default and env twin) and
:func:`extra_engine_args` from their ``engine_kwargs``; each maps the parsed values to its engine's own argument
names. The worker (``workers.main``) checks ``--extra-engine-args`` with :func:`extra_engine_args` whatever the
engine. Cheap to import (no engine import): every worker CLI imports it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dynamo_rt.config import flag
from dynamo_rt.errors import ConfigError


def add_gpu_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every third-party engine maps."""
    flag(parser, "--block-size", env="DYN_BLOCK_SIZE", type=int, default=16,
         help="tokens per KV block (the engine's page size, so its KV events hash the blocks the router hashes)")
    flag(parser, "--model-dtype", env="DYN_MODEL_DTYPE", default="auto",
         help="vLLM / SGLang / TRT-LLM dtype (auto, float32, bfloat16, float16); float32 on CPU")
    flag(parser, "--max-model-len", env="DYN_MAX_MODEL_LEN", type=int, default=None,
         help="vLLM / SGLang / TRT-LLM context length (default: the model's)")
    flag(parser, "--enforce-eager", env="DYN_ENFORCE_EAGER", is_bool=True, default=False,
         help="vLLM / SGLang / TRT-LLM: no CUDA graphs (faster start, slower steps)")
    flag(parser, "--gpu-memory-utilization", env="DYN_GPU_MEMORY_UTILIZATION", type=float, default=None,
         help="vLLM / SGLang / TRT-LLM: fraction of GPU memory for weights + KV cache (default: the engine's)")
    flag(parser, "--kv-events", env="DYN_KV_EVENTS", is_bool=True, default=True,
         help="vLLM / SGLang / TRT-LLM: publish KV block events to the router (as our chained block hashes)")


def model_dtype(args: argparse.Namespace) -> str:
    """``--model-dtype`` ("auto" when not given)."""
    return str(getattr(args, "model_dtype", "auto") or "auto")


def extra_engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--extra-engine-args`` as a dict ({} when not given); applied last, as is, by each adapter."""
    if not args.extra_engine_args:
        return {}
    try:
        extra = json.loads(args.extra_engine_args)
    except json.JSONDecodeError as exc:
        raise ConfigError("--extra-engine-args", f"not JSON ({exc})") from exc
    if not isinstance(extra, dict):
        raise ConfigError("--extra-engine-args", f"a JSON object is expected, not {args.extra_engine_args}")
    return extra
