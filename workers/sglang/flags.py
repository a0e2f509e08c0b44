"""The SGLang engine's spec: its command-line flags (each with an env twin) and the factory the worker calls.

Place: :data:`SPEC` is what the engine registry (``workers.registry``) loads for ``--engine sglang``: the worker's
parser hands the flags it does not know to a parser of :func:`add_flags`, then builds with :func:`build_engines`.
This module must stay cheap to import (every worker CLI imports it; SGLang is not installed on CPU hosts): SGLang is
imported only when the engine starts.

The common flags map to SGLang's ``ServerArgs`` fields (names of SGLang 0.5.23,
``sglang/srt/arg_groups/fields/*.py``; the same names since 0.4): ``--tp`` -> ``tp_size``, ``--ep-size`` ->
``ep_size``, ``--dp-size`` -> ``dp_size``, ``--nnodes`` / ``--node-rank`` / ``--dist-init-addr`` -> ``nnodes``
/ ``node_rank`` / ``dist_init_addr``, ``--block-size`` -> ``page_size`` (so SGLang's KV events hash the
blocks our router hashes), ``--max-model-len`` -> ``context_length``, ``--gpu-memory-utilization`` ->
``mem_fraction_static``, ``--enforce-eager`` -> ``disable_cuda_graph``, ``--model-dtype`` -> ``dtype``. SGLang's
own host KV tier is ``--extra-engine-args '{"enable_hierarchical_cache": true, "hicache_size": GB}'`` (pinned
host memory, sized against the pod's memory limit); the reference engine's ``--kv-host-tier-*`` flags are not
SGLang's. ``--mode prefill|decode`` ->
``disaggregation_mode``; SGLang's own ``--disaggregation-mode`` (the seed's flag) is accepted too and sets
``--mode``. ``--extra-engine-args`` (JSON) is applied last, as is.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dynamo_rt.config import flag
from dynamo_rt.errors import ConfigError
from workers.common.engine import ModelInfo
from workers.common.gpu_flags import add_gpu_engine_flags, extra_engine_args, model_dtype
from workers.registry import EngineSpec

if TYPE_CHECKING:
    from workers.sglang.engine import SglangEngine

_MODES = {"null": "agg", "prefill": "prefill", "decode": "decode"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_gpu_engine_flags(parser)  # --block-size, --model-dtype, --max-model-len, ... (as the other adapters)
    flag(parser, "--disaggregation-mode", env="DYN_SGLANG_DISAGGREGATION_MODE", default=None,
         choices=sorted(_MODES), help="SGLang's name for --mode (null = agg); must agree with --mode if both given")
    flag(parser, "--disaggregation-transfer-backend", env="DYN_SGLANG_TRANSFER_BACKEND", default="nixl",
         help="SGLang KV transfer backend of prefill / decode workers (nixl, mooncake, ...)")
    flag(parser, "--disaggregation-bootstrap-port", env="DYN_SGLANG_BOOTSTRAP_PORT", type=int, default=8998,
         help="SGLang prefill worker: port of its bootstrap server (decode workers connect to it)")
    flag(parser, "--disaggregation-ib-device", env="DYN_SGLANG_IB_DEVICE", default=None,
         help="SGLang: InfiniBand device(s) for the KV transfer (default: the backend's choice)")
    flag(parser, "--bootstrap-host", env="DYN_SGLANG_BOOTSTRAP_HOST", default=None,
         help="SGLang prefill worker: the address decode workers reach its bootstrap server at "
              "(default: this host's address; in Kubernetes pass the pod IP)")


def resolve_mode(args: argparse.Namespace) -> str:
    """Our mode from ``--mode`` and SGLang's ``--disaggregation-mode`` (which sets ``--mode`` when it is agg)."""
    dm = getattr(args, "disaggregation_mode", None)
    if dm is None:
        return str(args.mode)
    mode = _MODES[dm]
    if args.mode not in ("agg", mode):
        raise ConfigError("--disaggregation-mode", f"{dm} contradicts --mode {args.mode}")
    return mode


def engine_kwargs(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """``sglang.Engine`` keyword arguments from parsed flags (pure: no SGLang import, so tests can check it).

    The KV events config and the bootstrap bind host are added by the engine (they need a socket bound at
    start and the mode).
    """
    kw: dict[str, Any] = {
        "model_path": args.model,
        "tp_size": args.tp,
        "ep_size": args.ep_size,
        "dp_size": args.dp_size,
        "page_size": args.block_size,
        "dtype": model_dtype(args),
        # Token ids in, token ids out: the frontend tokenizes and detokenizes.
        "skip_tokenizer_init": True,
        "log_level": "warning",
    }
    if args.served_model_name:
        kw["served_model_name"] = args.served_model_name
    if getattr(args, "max_model_len", None):
        kw["context_length"] = args.max_model_len
    if getattr(args, "gpu_memory_utilization", None) is not None:
        kw["mem_fraction_static"] = args.gpu_memory_utilization
    if getattr(args, "enforce_eager", False):
        kw["disable_cuda_graph"] = True
    if args.nnodes > 1:
        if not args.dist_init_addr:
            raise ConfigError("--dist-init-addr", "--nnodes > 1 needs the leader's HOST:PORT")
        kw.update(nnodes=args.nnodes, node_rank=args.node_rank, dist_init_addr=args.dist_init_addr)
    if mode != "agg":
        kw["disaggregation_mode"] = mode
        kw["disaggregation_transfer_backend"] = args.disaggregation_transfer_backend
        kw["disaggregation_bootstrap_port"] = args.disaggregation_bootstrap_port
        if args.disaggregation_ib_device:
            kw["disaggregation_ib_device"] = args.disaggregation_ib_device
    kw.update(extra_engine_args(args))
    return kw


def build_engine(args: argparse.Namespace) -> SglangEngine:
    from workers.sglang.engine import SglangEngine

    # The runtime registers the instance with args.mode: SGLang's --disaggregation-mode must reach it.
    args.mode = resolve_mode(args)
    return SglangEngine(
        model_path=args.model,
        served_model_name=args.served_model_name,
        mode=args.mode,
        engine_kwargs=engine_kwargs(args, args.mode),
        bootstrap_host=args.bootstrap_host,
        kv_events=bool(args.kv_events),
    )


def build_engines(args: argparse.Namespace, info: ModelInfo) -> list[SglangEngine]:
    """One engine; it reads its model card from the folder (and SGLang's server args once started)."""
    return [build_engine(args)]


SPEC = EngineSpec(
    name="sglang",
    description="sglang.Engine in the worker process (GPU hosts); SGLang's bootstrap-room KV hand-off",
    add_flags=add_flags,
    build=build_engines,
    has_manifests=True,
)
