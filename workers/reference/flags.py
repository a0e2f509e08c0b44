"""The reference engine's spec: its command-line flags and the factory the worker calls.

Place: :data:`SPEC` is what the engine registry (``workers.registry``) loads for ``--engine reference``: the
worker's parser hands the flags it does not know to a parser of :func:`add_flags`, then calls
:func:`build_engine` with the parsed namespace (``args.model`` is the resolved model folder,
``args.served_model_name`` the public name). Every flag has an environment twin (:func:`dynamo_rt.config.flag`).
Cheap to import: torch is imported when the engine is built.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dynamo_rt.config import flag
from workers.common.engine import ModelInfo
from workers.registry import EngineSpec

if TYPE_CHECKING:  # the engine imports torch: only `--engine reference` pays for that
    from workers.reference.engine import ReferenceEngine


def add_flags(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--device", env="DYN_REF_DEVICE", default="cpu",
         help="torch device of the reference engine (cpu, cuda, cuda:1)")
    flag(parser, "--dtype", env="DYN_REF_DTYPE", default="float32",
         choices=["float32", "bfloat16", "float16", "float64"],
         help="weights / activations / KV dtype (float64: bit-exact replay after a migration, ~2x the compute)")
    flag(parser, "--block-size", env="DYN_BLOCK_SIZE", type=int, default=16, help="tokens per KV block")
    flag(parser, "--kv-cache-blocks", env="DYN_KV_CACHE_BLOCKS", type=int, default=None,
         help="KV pool size in blocks (default: from --kv-cache-memory, or 0.8 of free GPU memory)")
    flag(parser, "--num-gpu-blocks", env="DYN_NUM_GPU_BLOCKS", type=int, default=None,
         help="alias of --kv-cache-blocks (vLLM's name)")
    flag(parser, "--kv-cache-memory", env="DYN_KV_CACHE_MEMORY", type=float, default=None,
         help="KV pool size in GiB when no block count is given (CPU default 0.5)")
    flag(parser, "--max-num-seqs", env="DYN_MAX_NUM_SEQS", type=int, default=128,
         help="most sequences running at once")
    flag(parser, "--max-batch-tokens", env="DYN_MAX_BATCH_TOKENS", type=int, default=512,
         help="token budget of one step (decode tokens + prefill chunks)")
    flag(parser, "--threads", env="DYN_TORCH_THREADS", type=int, default=None,
         help="CPU threads of the engine: torch intra-op and the native decode step's (default on CPU: the usable "
              "cores minus one, left to the event loop)")
    flag(parser, "--native-decode", env="DYN_REF_NATIVE", default=True, is_bool=True,
         help="decode steps on CPU in fp32 as one native call (workers/reference/decode.c, compiled with the "
              "system C compiler on first use); --no-native-decode: torch operators only")
    flag(parser, "--pin-timeout", env="DYN_PIN_TIMEOUT", type=float, default=60.0,
         help="seconds a prefill worker keeps blocks pinned for a decode worker that never releases them")
    # KV block manager tiers (workers.reference.kvbm): below the primary pool, keyed by block hash.
    flag(parser, "--kv-host-tier-path", env="DYN_KV_HOST_TIER_PATH", default=None,
         help="host KV tier: a file in shared memory (e.g. /dev/shm/dynamo-kv-host) that outlives the "
              "process; a worker restarted on it serves its prefixes again (unset: no host tier)")
    flag(parser, "--kv-host-tier-gib", env="DYN_KV_HOST_TIER_GIB", type=float, default=4.0,
         help="host KV tier file size in GiB, index included (keep it below the volume's size)")
    flag(parser, "--kv-host-tier-blocks", env="DYN_KV_HOST_TIER_BLOCKS", type=int, default=None,
         help="host KV tier size in blocks (overrides --kv-host-tier-gib)")
    flag(parser, "--kv-disk-tier-path", env="DYN_KV_DISK_TIER_PATH", default=None,
         help="disk KV tier: a folder for its file (host-tier blocks evicted are spilled there; unset: none)")
    flag(parser, "--kv-disk-tier-gib", env="DYN_KV_DISK_TIER_GIB", type=float, default=32.0,
         help="disk KV tier file size in GiB, index included")
    flag(parser, "--kv-disk-tier-blocks", env="DYN_KV_DISK_TIER_BLOCKS", type=int, default=None,
         help="disk KV tier size in blocks (overrides --kv-disk-tier-gib)")
    flag(parser, "--kv-onboard-min-blocks", env="DYN_KV_ONBOARD_MIN_BLOCKS", type=int, default=1,
         help="fewest blocks a prompt must find in the host / disk tiers to load them instead of recomputing")
    flag(parser, "--kv-onboard-sync-mib", env="DYN_KV_ONBOARD_SYNC_MIB", type=float, default=8.0,
         help="host-tier runs up to this size are copied in by the step thread at admission (a memcpy beats "
              "the hand-off to the copy thread, which delays the request one step); larger runs and disk reads "
              "go through the copy / disk threads (0: always)")


def build_engine(args: argparse.Namespace) -> ReferenceEngine:
    from workers.reference.engine import ReferenceEngine

    blocks = getattr(args, "kv_cache_blocks", None)
    if blocks is None:
        blocks = getattr(args, "num_gpu_blocks", None)
    model = getattr(args, "model_path", None) or args.model
    return ReferenceEngine(
        model,
        served_model_name=getattr(args, "served_model_name", None),
        device=getattr(args, "device", "cpu") or "cpu",
        dtype=getattr(args, "dtype", "float32") or "float32",
        block_size=getattr(args, "block_size", 16) or 16,
        num_blocks=blocks,
        kv_cache_memory=getattr(args, "kv_cache_memory", None),
        max_batch_tokens=getattr(args, "max_batch_tokens", 512) or 512,
        max_num_seqs=getattr(args, "max_num_seqs", 128) or 128,
        threads=getattr(args, "threads", None),
        native=getattr(args, "native_decode", None),
        pin_timeout=getattr(args, "pin_timeout", 60.0),
        host_tier_path=getattr(args, "kv_host_tier_path", None) or None,
        host_tier_bytes=_gib(getattr(args, "kv_host_tier_gib", None)),
        host_tier_blocks=getattr(args, "kv_host_tier_blocks", None),
        disk_tier_path=getattr(args, "kv_disk_tier_path", None) or None,
        disk_tier_bytes=_gib(getattr(args, "kv_disk_tier_gib", None)),
        disk_tier_blocks=getattr(args, "kv_disk_tier_blocks", None),
        onboard_min_blocks=getattr(args, "kv_onboard_min_blocks", 1) or 1,
        onboard_sync_bytes=int(getattr(args, "kv_onboard_sync_mib", 8.0) * 2**20),
    )


def build_engines(args: argparse.Namespace, info: ModelInfo) -> list[ReferenceEngine]:
    """One engine; it reads its model card from the folder itself (``info`` is not needed)."""
    return [build_engine(args)]


def _gib(v: float | None) -> int | None:
    return None if v is None else int(v * 2**30)


SPEC = EngineSpec(
    name="reference",
    description="our torch engine (paged KV cache, continuous batching, prefix caching; CPU and CUDA)",
    add_flags=add_flags,
    build=build_engines,
    runs_on_cpu=True,
)
