"""``dynamo-rt manifests suggest``: tensor-parallel size and replica counts from the model size and the GPU,
in the spirit of NVIDIA's AIConfigurator, with its reasoning printed line by line.

A first-order model: weights must fit beside a minimum KV share, prefill is compute-bound (MFU of peak
FLOPS), decode bandwidth-bound (a step reads every weight once). The result is a set of
:class:`~deploy.spec.RoleShape` values and the ``dynamo-rt manifests`` command that renders them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from deploy.spec import MODES, RoleShape
from dynamo_rt.errors import InvalidRequest


@dataclass(frozen=True)
class GpuSpec:
    mem_gb: float
    tflops: float  # dense BF16/FP16 tensor TFLOPS
    bw_tbs: float  # HBM bandwidth, TB/s


GPU_PRESETS = {
    "h100": GpuSpec(80, 989, 3.35),
    "h200": GpuSpec(141, 989, 4.8),
    "a100": GpuSpec(80, 312, 2.039),
    "l40s": GpuSpec(48, 362, 0.864),
}

PREFILL_MFU = 0.4  # fraction of peak FLOPS a prefill batch reaches
DECODE_BW_EFF = 0.7  # fraction of peak HBM bandwidth a decode step reaches
DEFAULT_DECODE_BATCH = 64  # decode batch assumed when the model shape (for KV sizing) is not given


@dataclass(frozen=True)
class SuggestInput:
    params_b: float
    gpu: GpuSpec
    gpu_name: str = "custom"
    active_params_b: float | None = None
    dtype_bytes: float = 2.0
    gpus_per_node: int = 8
    mem_fraction: float = 0.9
    min_kv_fraction: float = 0.25
    isl: int = 3000
    osl: int = 150
    total_gpus: int | None = None
    mode: str = "disagg"
    backend: str = "sglang"
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    kv_dtype_bytes: float | None = None


@dataclass(frozen=True)
class Suggestion:
    mode: str
    prefill: RoleShape | None
    decode: RoleShape | None
    worker: RoleShape | None
    reasons: tuple[str, ...]
    command: str


def _pow2_at_least(x: float) -> int:
    n = 1
    while n < x:
        n *= 2
    return n


def _nodes_for(tp: int, gpus_per_node: int) -> int:
    """Fewest pods with equal GPU counts that hold ``tp`` GPUs, at most ``gpus_per_node`` each."""
    n = math.ceil(tp / gpus_per_node)
    while tp % n:
        n += 1
    return n


def suggest(inp: SuggestInput) -> Suggestion:
    """Pick tp (and, for disagg, the prefill/decode split) from memory and a roofline throughput model."""
    if inp.params_b <= 0 or inp.dtype_bytes <= 0 or inp.gpu.mem_gb <= 0 or inp.gpus_per_node < 1:
        raise InvalidRequest("params, dtype bytes, GPU memory and GPUs per node must be positive")
    if not 0 < inp.mem_fraction <= 1 or not 0 <= inp.min_kv_fraction < 1:
        raise InvalidRequest("mem fraction must be in (0, 1] and min KV fraction in [0, 1)")
    if inp.mode not in MODES:
        raise InvalidRequest(f"mode must be one of {', '.join(MODES)}", param="mode")
    why: list[str] = []
    active = inp.active_params_b or inp.params_b
    moe = active < inp.params_b
    weights_gb = inp.params_b * inp.dtype_bytes
    usable_gb = inp.gpu.mem_gb * inp.mem_fraction
    weight_budget = usable_gb * (1 - inp.min_kv_fraction)
    why.append(f"weights: {inp.params_b:g}B params x {inp.dtype_bytes:g} bytes = {weights_gb:g} GB")
    why.append(f"per GPU: {inp.gpu.mem_gb:g} GB x {inp.mem_fraction:g} usable = {usable_gb:g} GB; at most "
               f"{1 - inp.min_kv_fraction:g} of it for weights ({weight_budget:g} GB), the rest is KV cache")
    tp = _pow2_at_least(weights_gb / weight_budget)
    if tp > 64:
        raise InvalidRequest(f"{weights_gb:g} GB of weights need more than 64 GPUs per replica; "
                             "quantize (smaller --dtype-bytes) or use bigger GPUs")
    why.append(f"smallest power-of-two tp with weights/tp <= {weight_budget:g} GB: tp={tp} "
               f"({weights_gb / tp:g} GB of weights per GPU)")
    kv_gb = usable_gb - weights_gb / tp
    why.append(f"KV cache per GPU at tp={tp}: {kv_gb:g} GB")

    kv_per_token: float | None = None
    if inp.layers and inp.kv_heads and inp.head_dim:
        kv_bytes = inp.kv_dtype_bytes or inp.dtype_bytes
        kv_per_token = 2 * inp.layers * inp.kv_heads * inp.head_dim * kv_bytes
        why.append(f"KV per token: 2 x {inp.layers} layers x {inp.kv_heads} kv heads x {inp.head_dim} x "
                   f"{kv_bytes:g} bytes = {kv_per_token:g} bytes")

    def batch_at(t: int) -> int:
        """Concurrent sequences of isl+osl tokens the KV cache of one replica holds (or the default)."""
        if kv_per_token is None:
            return DEFAULT_DECODE_BATCH
        kv_total = (usable_gb - weights_gb / t) * 1e9 * t
        return max(1, int(kv_total / kv_per_token / (inp.isl + inp.osl)))

    def shape(t: int, replicas: int) -> RoleShape:
        return RoleShape(replicas=replicas, tp=t, ep=t if moe else 1, nodes=_nodes_for(t, inp.gpus_per_node))

    if tp > inp.gpus_per_node:
        why.append(f"tp={tp} > {inp.gpus_per_node} GPUs per node: one replica spans "
                   f"{_nodes_for(tp, inp.gpus_per_node)} nodes (multi-node)")
    if moe:
        why.append(f"MoE ({active:g}B of {inp.params_b:g}B active): experts sharded across the tp group "
                   "(ep-size = tp)")

    if inp.mode == "agg":
        replicas = max(1, (inp.total_gpus or tp) // tp)
        worker = shape(tp, replicas)
        if inp.total_gpus:
            why.append(f"{inp.total_gpus} GPUs / tp {tp} = {replicas} worker replicas")
        else:
            why.append("no --total-gpus given: one worker replica")
        if kv_per_token is not None:
            why.append(f"each replica holds about {batch_at(tp)} sequences of {inp.isl}+{inp.osl} tokens")
        cmd = _suggest_command(inp, [("worker", worker)])
        return Suggestion("agg", None, None, worker, tuple(why), cmd)

    # Prefill is compute-bound: keep it at the smallest tp that fits, so more replicas work in parallel.
    # Decode is bandwidth-bound and batch-limited by KV: double tp within a node for a bigger batch.
    tp_p = tp
    tp_d = tp * 2 if tp * 2 <= inp.gpus_per_node else tp
    why.append(f"prefill tp={tp_p} (compute-bound: smallest fit, more parallel replicas); "
               f"decode tp={tp_d} ({'doubled within the node for ' if tp_d > tp else 'kept at the fit; '}"
               f"more KV, bigger batches)")
    prefill_tps = inp.gpu.tflops * 1e12 * PREFILL_MFU / (2 * active * 1e9)
    batch = batch_at(tp_d)
    # MoE decode with a large batch touches (nearly) every expert each step: charge all weights.
    step_s = (weights_gb / tp_d) * 1e9 / (inp.gpu.bw_tbs * 1e12 * DECODE_BW_EFF)
    decode_tps = batch / step_s / tp_d
    why.append(f"prefill: {inp.gpu.tflops:g} TFLOPS x {PREFILL_MFU} MFU / (2 x {active:g}B) = "
               f"{prefill_tps:,.0f} tokens/s per GPU")
    why.append(f"decode: step reads {weights_gb / tp_d:g} GB per GPU at {inp.gpu.bw_tbs:g} TB/s x "
               f"{DECODE_BW_EFF} = {step_s * 1e3:.1f} ms; batch {batch}"
               f"{'' if kv_per_token is not None else ' (assumed: give --layers/--kv-heads/--head-dim)'}"
               f" -> {decode_tps:,.0f} tokens/s per GPU")
    gpu_s_prefill = inp.isl / prefill_tps  # GPU-seconds one request costs in each phase
    gpu_s_decode = inp.osl / decode_tps
    share = gpu_s_prefill / (gpu_s_prefill + gpu_s_decode)
    why.append(f"per request ({inp.isl} in / {inp.osl} out): prefill {gpu_s_prefill * 1e3:.2f} GPU-ms, "
               f"decode {gpu_s_decode * 1e3:.2f} GPU-ms -> prefill share {share:.0%} of the GPUs")
    if inp.total_gpus:
        if inp.total_gpus < tp_p + tp_d:
            raise InvalidRequest(f"--total-gpus {inp.total_gpus} < one prefill (tp {tp_p}) + one decode "
                                 f"(tp {tp_d}) replica")
        p_rep = max(1, round(inp.total_gpus * share / tp_p))
        p_rep = min(p_rep, (inp.total_gpus - tp_d) // tp_p)
        d_rep = max(1, (inp.total_gpus - p_rep * tp_p) // tp_d)
        why.append(f"{inp.total_gpus} GPUs: {p_rep} prefill x {tp_p} + {d_rep} decode x {tp_d} = "
                   f"{p_rep * tp_p + d_rep * tp_d} GPUs used")
    else:
        d_rep = 1
        p_rep = max(1, round(share / (1 - share) * tp_d / tp_p)) if share < 1 else 1
        why.append(f"no --total-gpus given: 1 decode replica; {p_rep} prefill replica(s) keep pace with it")
    prefill, decode = shape(tp_p, p_rep), shape(tp_d, d_rep)
    cmd = _suggest_command(inp, [("prefill", prefill), ("decode", decode)])
    return Suggestion("disagg", prefill, decode, None, tuple(why), cmd)


def _suggest_command(inp: SuggestInput, roles: Sequence[tuple[str, RoleShape]]) -> str:
    parts = ["dynamo-rt manifests", f"--backend {inp.backend}", f"--mode {inp.mode}"]
    for role, s in roles:
        parts += [f"--{role}-tp {s.tp}", f"--{role}-ep {s.ep}", f"--{role}-replicas {s.replicas}",
                  f"--{role}-nodes {s.nodes}"]
    return " ".join(parts)


def format_suggestion(s: Suggestion) -> str:
    lines = ["Reasoning:"] + [f"  - {r}" for r in s.reasons] + ["Suggestion:"]
    for role, shape in (("prefill", s.prefill), ("decode", s.decode), ("worker", s.worker)):
        if shape is not None:
            lines.append(f"  {role}: tp={shape.tp} ep={shape.ep} replicas={shape.replicas} "
                         f"pods/replica={shape.nodes} GPUs/pod={shape.gpus_per_pod}")
    lines += ["Render it with:", f"  {s.command}"]
    return "\n".join(lines) + "\n"
