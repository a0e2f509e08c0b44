"""``dynamo-rt manifests``: the command line of the manifest generator (``dynamo_rt.cli`` maps the
subcommand to this module's :func:`add_arguments` and :func:`main`).

Renders one RoleBasedGroup (``--backend``, ``--mode``, shape and endpoint flags: :mod:`deploy.spec`,
:mod:`deploy.render`), the etcd / NATS dependencies (``--deps``: :mod:`deploy.deps`), regenerates or
checks every checked-in file (``--write-all``, ``--check``: :mod:`deploy.catalog`), or suggests a shape
(``suggest``: :mod:`deploy.suggest`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from deploy.catalog import catalog, check, render, render_deps, write_all
from deploy.rbg import API_VERSIONS, DECODE_ROLE
from deploy.render import NATS_CREDS_KEY
from deploy.spec import (
    BACKENDS,
    COORDINATION_STYLES,
    DEFAULT_CREDENTIALS_SECRET,
    DEFAULT_DYN_NAMESPACE,
    DEFAULT_ETCD_URL,
    DEFAULT_KV_HOST_TIER_GIB,
    DEFAULT_MODEL_PATH,
    DEFAULT_MODEL_PVC,
    DEFAULT_NATS_URL,
    DEFAULT_NODES,
    DEFAULT_PLANNER_INTERVAL,
    DEFAULT_PLANNER_ITL,
    DEFAULT_PLANNER_TTFT,
    DEFAULT_RDMA_RESOURCE,
    DEFAULT_SERVED_MODEL_NAME,
    MODES,
    ROUTER_MODES,
    ManifestSpec,
    default_image,
    parse_tolerations,
    preset,
)
from deploy.suggest import GPU_PRESETS, GpuSpec, SuggestInput, format_suggestion, suggest
from dynamo_rt.config import Parser, flag
from dynamo_rt.errors import InvalidRequest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dynamo-rt manifests`` (render / --write-all / --check / --deps) and ``... suggest``."""
    p = parser
    flag(p, "--backend", env="DYN_MANIFEST_BACKEND", choices=BACKENDS, help="engine backend")
    flag(p, "--mode", env="DYN_MANIFEST_MODE", choices=MODES, help="aggregated or disaggregated serving")
    flag(p, "--multinode", env="DYN_MANIFEST_MULTINODE", is_bool=True, default=False,
         help="spread the worker (agg) or decoder (disagg) role over --nodes pods")
    flag(p, "--nodes", env="DYN_MANIFEST_NODES", type=int, default=DEFAULT_NODES,
         help="pods per multi-node replica (leaderWorkerSet size)")
    flag(p, "--api-version", env="DYN_MANIFEST_API_VERSION", choices=API_VERSIONS, default="v1alpha1",
         help="RoleBasedGroup API version")
    flag(p, "--name", env="DYN_MANIFEST_NAME", default="",
         help="RoleBasedGroup name (default dynamo-pd for disagg, dynamo-agg for agg)")
    flag(p, "--k8s-namespace", env="DYN_MANIFEST_K8S_NAMESPACE", default=None,
         help="metadata.namespace (default: kubectl's current namespace)")
    flag(p, "--image", env="DYN_MANIFEST_IMAGE", default="",
         help=f"image for every role (default {default_image('<backend>')})")
    flag(p, "--model-path", env="DYN_MANIFEST_MODEL_PATH", default=DEFAULT_MODEL_PATH,
         help="where the model PVC is mounted (the workers' --model)")
    flag(p, "--served-model-name", env="DYN_MANIFEST_SERVED_MODEL_NAME", default=DEFAULT_SERVED_MODEL_NAME,
         help="model name clients send")
    flag(p, "--model-pvc", env="DYN_MANIFEST_MODEL_PVC", default=DEFAULT_MODEL_PVC,
         help="PersistentVolumeClaim holding the model")
    flag(p, "--router-mode", env="DYN_MANIFEST_ROUTER_MODE", choices=ROUTER_MODES, default="kv",
         help="frontend router")
    flag(p, "--etcd-url", env="DYN_MANIFEST_ETCD_URL", default=DEFAULT_ETCD_URL, help="DYN_ETCD_ENDPOINTS value")
    flag(p, "--nats-url", env="DYN_MANIFEST_NATS_URL", default=DEFAULT_NATS_URL, help="DYN_NATS_ENDPOINTS value")
    flag(p, "--dyn-namespace", env="DYN_MANIFEST_DYN_NAMESPACE", default=DEFAULT_DYN_NAMESPACE,
         help="DYN_NAMESPACE value (dynamo's discovery namespace)")
    flag(p, "--rdma-resource", env="DYN_MANIFEST_RDMA_RESOURCE", default=DEFAULT_RDMA_RESOURCE,
         help="RDMA extended resource for disagg / multi-node pods ('' for none)")
    flag(p, "--partition", env="DYN_MANIFEST_PARTITION", type=int, default=0,
         help="initial rollingUpdate.partition of worker roles")
    flag(p, "--kv-host-tier-gib", env="DYN_MANIFEST_KV_HOST_TIER_GIB", type=int, default=DEFAULT_KV_HOST_TIER_GIB,
         help="GiB of the memory-backed volume holding the prefill workers' host KV tier, for engines "
              "that have one (the reference engine; none of the manifest backends) (0: none)")
    for role in ("worker", "prefill", "decode"):
        flag(p, f"--{role}-tp", env=f"DYN_MANIFEST_{role.upper()}_TP", type=int, default=None,
             help=f"{role} tensor-parallel size (default: the preset's)")
        flag(p, f"--{role}-ep", env=f"DYN_MANIFEST_{role.upper()}_EP", type=int, default=None,
             help=f"{role} expert-parallel size")
        flag(p, f"--{role}-replicas", env=f"DYN_MANIFEST_{role.upper()}_REPLICAS", type=int, default=None,
             help=f"{role} replicas")
        flag(p, f"--{role}-nodes", env=f"DYN_MANIFEST_{role.upper()}_NODES", type=int, default=None,
             help=f"{role} pods per replica (> 1: leader/worker pattern)")
    flag(p, "--coordination", env="DYN_MANIFEST_COORDINATION", choices=COORDINATION_STYLES, default="policy",
         help="prefill/decode coordination as a CoordinatedPolicy, or inline (v1alpha1 spec.coordination)")
    flag(p, "--planner", env="DYN_MANIFEST_PLANNER", is_bool=True, default=None,
         help="add a planner role that scales the worker roles (default: with --mode disagg only)")
    flag(p, "--planner-ttft-target", env="DYN_MANIFEST_PLANNER_TTFT_TARGET", type=float,
         default=DEFAULT_PLANNER_TTFT, help="the planner's time-to-first-token target, seconds")
    flag(p, "--planner-itl-target", env="DYN_MANIFEST_PLANNER_ITL_TARGET", type=float,
         default=DEFAULT_PLANNER_ITL, help="the planner's inter-token latency target, seconds")
    flag(p, "--planner-interval", env="DYN_MANIFEST_PLANNER_INTERVAL", type=float,
         default=DEFAULT_PLANNER_INTERVAL, help="seconds between the planner's decisions")
    flag(p, "--credentials-secret", env="DYN_MANIFEST_CREDENTIALS_SECRET", default=DEFAULT_CREDENTIALS_SECRET,
         help="Secret whose optional keys api-key, nats-user, nats-password, nats-token, etcd-user, etcd-password "
              "become DYN_API_KEY (frontend) and the NATS / etcd credentials of every role ('' for none)")
    flag(p, "--nats-creds-secret", env="DYN_MANIFEST_NATS_CREDS_SECRET", default="",
         help=f"Secret holding a NATS .creds file under key {NATS_CREDS_KEY}: mounted read-only in every role "
              "and passed as DYN_NATS_CREDS")
    flag(p, "--cpu-image", env="DYN_MANIFEST_CPU_IMAGE", default="",
         help=f"image of the frontend and the planner (default {default_image('cpu')})")
    flag(p, "--toleration", env="DYN_MANIFEST_TOLERATION", default="",
         help="tolerations of the worker pods, key[=value]:Effect[,...] (e.g. nvidia.com/gpu:NoSchedule)")
    flag(p, "--output", env="DYN_MANIFEST_OUTPUT", default="-", help="file to write ('-': stdout)")
    flag(p, "--deps", env="DYN_MANIFEST_DEPS", choices=("etcd", "nats"), default=None,
         help="render the etcd or NATS dependency instead of a RoleBasedGroup")
    flag(p, "--write-all", env="DYN_MANIFEST_WRITE_ALL", is_bool=True, default=False,
         help="regenerate every checked-in file under --root")
    flag(p, "--check", env="DYN_MANIFEST_CHECK", is_bool=True, default=False,
         help="exit 1 if the files under --root differ from the generator's output")
    flag(p, "--root", env="DYN_MANIFEST_ROOT", default="manifests", help="folder of the checked-in files")

    sub = p.add_subparsers(dest="manifests_cmd", metavar="{suggest}")
    s = sub.add_parser("suggest", help="suggest tp and replica counts from model size and GPU memory")
    flag(s, "--params-b", env="DYN_SUGGEST_PARAMS_B", type=float, default=None,
         help="model parameters, billions (total, for MoE)")
    flag(s, "--active-params-b", env="DYN_SUGGEST_ACTIVE_PARAMS_B", type=float, default=None,
         help="active parameters per token, billions (MoE; default: all)")
    flag(s, "--dtype-bytes", env="DYN_SUGGEST_DTYPE_BYTES", type=float, default=2.0,
         help="bytes per weight (2: bf16, 1: fp8, 0.5: int4)")
    flag(s, "--gpu", env="DYN_SUGGEST_GPU", choices=tuple(GPU_PRESETS), default=None,
         help="GPU preset (memory, TFLOPS, bandwidth)")
    flag(s, "--gpu-mem-gb", env="DYN_SUGGEST_GPU_MEM_GB", type=float, default=None,
         help="GPU memory in GB (overrides the preset's)")
    flag(s, "--gpu-tflops", env="DYN_SUGGEST_GPU_TFLOPS", type=float, default=None,
         help="dense BF16 TFLOPS (default: the preset's, else H100's)")
    flag(s, "--gpu-bw-tbs", env="DYN_SUGGEST_GPU_BW_TBS", type=float, default=None,
         help="HBM bandwidth in TB/s (default: the preset's, else H100's)")
    flag(s, "--gpus-per-node", env="DYN_SUGGEST_GPUS_PER_NODE", type=int, default=8, help="GPUs per node")
    flag(s, "--mem-fraction", env="DYN_SUGGEST_MEM_FRACTION", type=float, default=0.9,
         help="fraction of GPU memory the engine may use")
    flag(s, "--min-kv-fraction", env="DYN_SUGGEST_MIN_KV_FRACTION", type=float, default=0.25,
         help="fraction of usable memory kept for KV cache at least")
    flag(s, "--isl", env="DYN_SUGGEST_ISL", type=int, default=3000, help="typical input tokens")
    flag(s, "--osl", env="DYN_SUGGEST_OSL", type=int, default=150, help="typical output tokens")
    flag(s, "--total-gpus", env="DYN_SUGGEST_TOTAL_GPUS", type=int, default=None,
         help="GPU budget to split into replicas")
    flag(s, "--mode", env="DYN_SUGGEST_MODE", choices=MODES, default="disagg", help="serving mode")
    flag(s, "--backend", env="DYN_SUGGEST_BACKEND", choices=BACKENDS, default="sglang",
         help="backend for the printed render command")
    flag(s, "--layers", env="DYN_SUGGEST_LAYERS", type=int, default=None, help="decoder layers (KV sizing)")
    flag(s, "--kv-heads", env="DYN_SUGGEST_KV_HEADS", type=int, default=None, help="KV heads (KV sizing)")
    flag(s, "--head-dim", env="DYN_SUGGEST_HEAD_DIM", type=int, default=None, help="head dim (KV sizing)")
    flag(s, "--kv-dtype-bytes", env="DYN_SUGGEST_KV_DTYPE_BYTES", type=float, default=None,
         help="bytes per KV element (default: --dtype-bytes)")


def spec_from_args(args: argparse.Namespace) -> ManifestSpec:
    if args.backend is None or args.mode is None:
        raise InvalidRequest("--backend and --mode are required to render a RoleBasedGroup", param="backend")
    if args.nodes < 2 and args.multinode:
        raise InvalidRequest("--nodes must be >= 2 with --multinode", param="nodes")
    spec = preset(args.backend, args.mode, args.multinode, args.nodes, args.api_version)
    roles = []
    for role, shape in spec.roles:
        key = "decode" if role == DECODE_ROLE else role
        tp, ep, rep, nodes = (getattr(args, f"{key}_{x}") for x in ("tp", "ep", "replicas", "nodes"))
        roles.append((role, replace(shape, tp=shape.tp if tp is None else tp, ep=shape.ep if ep is None else ep,
                                    replicas=shape.replicas if rep is None else rep,
                                    nodes=shape.nodes if nodes is None else nodes)))
    for role in ("worker", "prefill", "decode"):
        if role not in {("decode" if r == DECODE_ROLE else r) for r, _ in spec.roles} and any(
                getattr(args, f"{role}_{x}") is not None for x in ("tp", "ep", "replicas", "nodes")):
            raise InvalidRequest(f"--{role}-* flags do not apply to --mode {args.mode}", param=f"{role}_tp")
    return replace(
        spec, roles=tuple(roles), name=args.name, namespace=args.k8s_namespace, image=args.image,
        model_path=args.model_path, served_model_name=args.served_model_name, model_pvc=args.model_pvc,
        router_mode=args.router_mode, etcd_url=args.etcd_url, nats_url=args.nats_url,
        dyn_namespace=args.dyn_namespace, rdma_resource=args.rdma_resource, partition=args.partition,
        coordination=args.coordination, kv_host_tier_gib=args.kv_host_tier_gib, planner=args.planner,
        planner_ttft=args.planner_ttft_target, planner_itl=args.planner_itl_target,
        planner_interval=args.planner_interval, credentials_secret=args.credentials_secret,
        nats_creds_secret=args.nats_creds_secret, cpu_image=args.cpu_image,
        tolerations=parse_tolerations(args.toleration),
    )


def _suggest_input(args: argparse.Namespace) -> SuggestInput:
    if args.params_b is None:
        raise InvalidRequest("--params-b is required", param="params_b")
    base = GPU_PRESETS[args.gpu or "h100"]
    if args.gpu is None and args.gpu_mem_gb is None:
        raise InvalidRequest("give --gpu or --gpu-mem-gb", param="gpu")
    gpu = GpuSpec(
        mem_gb=args.gpu_mem_gb if args.gpu_mem_gb is not None else base.mem_gb,
        tflops=args.gpu_tflops if args.gpu_tflops is not None else base.tflops,
        bw_tbs=args.gpu_bw_tbs if args.gpu_bw_tbs is not None else base.bw_tbs,
    )
    return SuggestInput(
        params_b=args.params_b, gpu=gpu, gpu_name=args.gpu or "custom", active_params_b=args.active_params_b,
        dtype_bytes=args.dtype_bytes, gpus_per_node=args.gpus_per_node, mem_fraction=args.mem_fraction,
        min_kv_fraction=args.min_kv_fraction, isl=args.isl, osl=args.osl, total_gpus=args.total_gpus,
        mode=args.mode, backend=args.backend, layers=args.layers, kv_heads=args.kv_heads,
        head_dim=args.head_dim, kv_dtype_bytes=args.kv_dtype_bytes,
    )


def _emit(text: str, output: str) -> None:
    if output == "-":
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)


def main(args: argparse.Namespace) -> int:
    """Run ``dynamo-rt manifests``; returns the exit status (1: --check found differences, 2: bad input)."""
    try:
        if getattr(args, "manifests_cmd", None) == "suggest":
            inp = _suggest_input(args)
            if inp.gpu_name == "custom" and (args.gpu_tflops is None or args.gpu_bw_tbs is None):
                sys.stdout.write("(no --gpu preset: compute and bandwidth default to H100's)\n")
            sys.stdout.write(format_suggestion(suggest(inp)))
            return 0
        root = Path(args.root)
        if args.write_all:
            for path in write_all(root):
                sys.stdout.write(f"wrote {path}\n")
            return 0
        if args.check:
            problems = check(root)
            for line in problems:
                sys.stdout.write(f"{line}\n")
            if problems:
                sys.stdout.write("run `dynamo-rt manifests --write-all` to regenerate\n")
                return 1
            sys.stdout.write(f"{len(catalog())} files under {root} match the generator\n")
            return 0
        if args.deps:
            _emit(render_deps(args.deps, args.k8s_namespace), args.output)
            return 0
        spec = spec_from_args(args)
        how = "dynamo-rt manifests " + " ".join(_argv_of(args))
        _emit(render(spec, how=how), args.output)
        return 0
    except InvalidRequest as exc:
        sys.stderr.write(f"dynamo-rt manifests: {exc.message}\n")
        return 2


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The render flags that differ from their defaults, for the header of a custom render."""
    # An empty environment, so env twins do not hide flags from the header.
    defaults = Parser(env={})
    add_arguments(defaults)
    base = vars(defaults.parse_args([]))
    out = []
    for key, value in vars(args).items():
        if key in ("output", "write_all", "check", "root", "manifests_cmd", "deps", "func") or key not in base:
            continue
        if value != base[key]:
            opt = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                out.append(opt if value else f"--no-{key.replace('_', '-')}")
            else:
                out += [opt, str(value)]
    return out
