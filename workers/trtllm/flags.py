"""The TensorRT-LLM engine's spec: its command-line flags (each with an env twin) and the factory the worker calls.

Place: :data:`SPEC` is what the engine registry (``workers.registry``) loads for ``--engine trtllm``: the worker's
parser hands the flags it does not know to a parser of :func:`add_flags`, then builds with :func:`build_engines`.
This module must stay cheap to import (every worker CLI imports it; TensorRT-LLM is not installable on CPU hosts):
TensorRT-LLM is imported only when the engine starts.

The common flags map to the LLM API's arguments (``tensorrt_llm.LLM(**kwargs)``, PyTorch backend, names of
TensorRT-LLM 1.x ``tensorrt_llm/llmapi/llm_args.py``): ``--tp`` -> ``tensor_parallel_size``, ``--ep-size`` ->
``moe_expert_parallel_size``, ``--max-model-len`` -> ``max_seq_len``, ``--gpu-memory-utilization`` ->
``kv_cache_config.free_gpu_memory_fraction``, ``--block-size`` -> ``kv_cache_config.tokens_per_block`` (where
this TensorRT-LLM has it), ``--enforce-eager`` -> ``cuda_graph_config=None``, ``--model-dtype`` -> ``dtype``.
Prefill / decode workers get ``cache_transceiver_config.backend`` (``--cache-transceiver-backend``, NIXL by
default); prefill workers run without the overlap scheduler, as TensorRT-LLM's disaggregated examples do.
Multi-node instances are launched by MPI (``mpirun ... trtllm-llmapi-launch python -m workers --engine
trtllm``): ``--nnodes`` / ``--node-rank`` are not used by this engine. ``--extra-engine-args`` (JSON) is
applied last, as is.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dynamo_rt.config import flag
from workers.common.engine import ModelInfo
from workers.common.gpu_flags import add_gpu_engine_flags, extra_engine_args, model_dtype
from workers.registry import EngineSpec

if TYPE_CHECKING:
    from workers.trtllm.engine import TrtllmEngine


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_gpu_engine_flags(parser)  # --block-size, --model-dtype, --max-model-len, ... (as the other adapters)
    flag(parser, "--cache-transceiver-backend", env="DYN_TRTLLM_CACHE_TRANSCEIVER_BACKEND", default="NIXL",
         choices=["DEFAULT", "NIXL", "UCX", "MPI"],
         help="TRT-LLM prefill / decode workers: the KV cache transceiver's backend")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``tensorrt_llm.LLM`` keyword arguments from parsed flags (pure: no TensorRT-LLM import).

    ``kv_cache_config`` is a plain dict here; the engine drops ``tokens_per_block`` where this TensorRT-LLM's
    ``KvCacheConfig`` does not have it, and turns on what KV events need.
    """
    kv_cache: dict[str, Any] = {"enable_block_reuse": True, "tokens_per_block": args.block_size}
    if getattr(args, "gpu_memory_utilization", None) is not None:
        kv_cache["free_gpu_memory_fraction"] = args.gpu_memory_utilization
    kw: dict[str, Any] = {
        "model": args.model,
        "tokenizer": args.model,
        "tensor_parallel_size": args.tp,
        "dtype": model_dtype(args),
        "kv_cache_config": kv_cache,
        # Iteration stats feed our load metrics (get_stats_async).
        "enable_iter_perf_stats": True,
        # Structured outputs (GuidedDecodingParams) need a grammar backend chosen up front.
        "guided_decoding_backend": "xgrammar",
    }
    if args.ep_size > 1:
        kw["moe_expert_parallel_size"] = args.ep_size
    if getattr(args, "max_model_len", None):
        kw["max_seq_len"] = args.max_model_len
    if getattr(args, "enforce_eager", False):
        kw["cuda_graph_config"] = None
    if args.mode != "agg":
        kw["cache_transceiver_config"] = {"backend": args.cache_transceiver_backend}
        if args.mode == "prefill":
            kw["disable_overlap_scheduler"] = True
    kw.update(extra_engine_args(args))
    return kw


def build_engine(args: argparse.Namespace) -> TrtllmEngine:
    from workers.trtllm.engine import TrtllmEngine

    return TrtllmEngine(model_path=args.model, served_model_name=args.served_model_name, mode=args.mode,
                        engine_kwargs=engine_kwargs(args), kv_events=bool(args.kv_events))


def build_engines(args: argparse.Namespace, info: ModelInfo) -> list[TrtllmEngine]:
    """One engine; it reads its model card from the folder."""
    return [build_engine(args)]


SPEC = EngineSpec(
    name="trtllm",
    description="TensorRT-LLM's LLM API in the worker process (GPU hosts); its cache transceiver hand-off",
    add_flags=add_flags,
    build=build_engines,
    has_manifests=True,
)
