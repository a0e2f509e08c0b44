"""The vLLM engine's spec: its command-line flags (each with an env twin) and the factory the worker calls.

Place: :data:`SPEC` is what the engine registry (``workers.registry``) loads for ``--engine vllm``: the worker's
parser hands the flags it does not know to a parser of :func:`add_flags`, then builds with :func:`build_engines`.
This module must stay cheap to import (every worker CLI imports it, with or without vLLM installed): vLLM is
imported only by ``workers.vllm.engine`` when the engine starts.

The common flags map to vLLM's ``AsyncEngineArgs`` (field names of vLLM 0.32.0, ``vllm/engine/arg_utils.py``):
``--tp`` -> ``tensor_parallel_size``, ``--dp-size`` -> ``data_parallel_size``, ``--ep-size`` > 1 ->
``enable_expert_parallel`` (vLLM's expert-parallel size is TP x DP), ``--nnodes`` / ``--node-rank`` /
``--dist-init-addr`` -> ``nnodes`` / ``node_rank`` / ``master_addr`` + ``master_port``, ``--block-size`` ->
``block_size`` (rounded up to a multiple of 32 on CPU, which vLLM's CPU attention needs). ``--extra-engine-args``
(JSON) is applied last, as is: it is the way to any other vLLM argument (``max_num_seqs``,
``max_num_batched_tokens``...).

vLLM reads some settings from its environment only: ``VLLM_NIXL_SIDE_CHANNEL_HOST`` / ``_PORT`` come from
``--nixl-side-channel-host`` / ``--nixl-side-channel-port`` (the engine exports them for its own processes);
``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache on CPU) and ``VLLM_CPU_OMP_THREADS_BIND`` (cores of one CPU
instance) are set by whoever starts the worker.
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
    from workers.vllm.engine import VllmEngine


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_gpu_engine_flags(parser)  # --block-size, --model-dtype, --max-model-len, ... (as the other adapters)
    flag(parser, "--kv-connector", env="DYN_VLLM_KV_CONNECTOR", default="NixlConnector",
         help="vLLM KV connector of prefill / decode workers")
    flag(parser, "--kv-buffer-device", env="DYN_VLLM_KV_BUFFER_DEVICE", default=None,
         help="vLLM NixlConnector buffer device (default: the platform's; cpu on a CPU host)")
    flag(parser, "--nixl-side-channel-host", env="DYN_VLLM_NIXL_SIDE_CHANNEL_HOST", default=None,
         help="vLLM prefill worker: the address decode workers reach its NIXL side channel at (default: "
              "$VLLM_NIXL_SIDE_CHANNEL_HOST, else this host's address; in Kubernetes the pod IP)")
    flag(parser, "--nixl-side-channel-port", env="DYN_VLLM_NIXL_SIDE_CHANNEL_PORT", type=int, default=0,
         help="vLLM prefill / decode worker: its NIXL side channel port (0: $VLLM_NIXL_SIDE_CHANNEL_PORT, "
              "else a free port, so several instances share a host)")
    flag(parser, "--kv-load-failure-policy", env="DYN_VLLM_KV_LOAD_FAILURE_POLICY", default="recompute",
         choices=["recompute", "fail"],
         help="vLLM decode worker when a KV transfer fails: prefill locally (recompute) or fail the request")


def dist_init(addr: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` of ``--dist-init-addr`` as (host, port); None when not given."""
    if not addr:
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("--dist-init-addr", f"HOST:PORT expected, not {addr!r}")
    return host.strip("[]"), int(port)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments from parsed flags (pure: no vLLM import, so tests can check it).

    The KV connector and KV events configs are added by the engine (they need vLLM's config classes and, for
    events, a socket bound at start).
    """
    kw: dict[str, Any] = {
        "model": args.model,
        "served_model_name": args.served_model_name or None,
        "dtype": model_dtype(args),
        "tensor_parallel_size": args.tp,
        "data_parallel_size": args.dp_size,
        "block_size": args.block_size,
        "enable_prefix_caching": True,
        "enforce_eager": bool(getattr(args, "enforce_eager", False)),
        # Our runtime publishes load metrics from a stat logger; vLLM's periodic log lines add nothing here.
        "disable_log_stats": True,
    }
    if args.ep_size > 1:
        kw["enable_expert_parallel"] = True
    if getattr(args, "max_model_len", None):
        kw["max_model_len"] = args.max_model_len
    if getattr(args, "gpu_memory_utilization", None) is not None:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.nnodes > 1:
        addr = dist_init(args.dist_init_addr)
        if addr is None:
            raise ConfigError("--dist-init-addr", "--nnodes > 1 needs the leader's HOST:PORT")
        kw.update(nnodes=args.nnodes, node_rank=args.node_rank, master_addr=addr[0], master_port=addr[1])
    kw.update(extra_engine_args(args))
    return kw


def connector_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """``KVTransferConfig`` fields for a prefill / decode worker (None in agg mode).

    vLLM decides the direction per request from ``kv_transfer_params`` (``do_remote_decode`` on the prefill
    request, ``do_remote_prefill`` on the decode one); the role is what vLLM 0.32 asks of NixlConnector
    (``kv_both`` is deprecated there).
    """
    if args.mode == "agg":
        return None
    role = "kv_producer" if args.mode == "prefill" else "kv_consumer"
    cfg: dict[str, Any] = {"kv_connector": args.kv_connector, "kv_role": role,
                           "kv_load_failure_policy": args.kv_load_failure_policy}
    if args.kv_buffer_device:
        cfg["kv_buffer_device"] = args.kv_buffer_device
    return cfg


def build_engine(args: argparse.Namespace) -> VllmEngine:
    from workers.vllm.engine import VllmEngine

    return VllmEngine(
        model_path=args.model,
        served_model_name=args.served_model_name,
        mode=args.mode,
        engine_kwargs=engine_kwargs(args),
        connector=connector_config(args),
        kv_events=bool(args.kv_events),
        side_channel_host=args.nixl_side_channel_host,
        side_channel_port=args.nixl_side_channel_port,
    )


def build_engines(args: argparse.Namespace, info: ModelInfo) -> list[VllmEngine]:
    """One engine; it reads its model card from the folder (and vLLM's config once started)."""
    return [build_engine(args)]


SPEC = EngineSpec(
    name="vllm",
    description="vLLM's AsyncLLM in the worker process (vllm-cpu here, GPU vLLM in images); NixlConnector hand-off",
    add_flags=add_flags,
    build=build_engines,
    runs_on_cpu=True,
    has_manifests=True,
)
