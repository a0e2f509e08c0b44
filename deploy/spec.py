"""What one rendered file depends on: :class:`ManifestSpec` (backend, mode, worker role shapes, endpoints,
planner targets), the seed's preset topologies and the checks that keep a spec renderable.

:mod:`deploy.render` turns a spec into documents; :mod:`deploy.manifests` builds one from the command line;
:mod:`deploy.suggest` proposes the :class:`RoleShape` values.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.rbg import AGG_ROLE, API_VERSIONS, DECODE_ROLE, PREFILL_ROLE
from dynamo_rt.errors import InvalidRequest
from workers import registry as engine_registry

# The package version; default image tags follow it (a test keeps it equal to pyproject.toml's).
VERSION = "0.1.0"

BACKENDS = tuple(engine_registry.names(has_manifests=True))  # engines with images: vllm, sglang, trtllm
MODES = ("agg", "disagg")
ROUTER_MODES = ("kv", "round-robin", "random", "least-loaded")
# How prefill/decode coordination is written: a CoordinatedPolicy document (both API versions), or the
# v1alpha1 group's own spec.coordination. The default is the policy: RBG v0.8.0-alpha.5 turns a v1alpha1
# spec.coordination into a CoordinatedPolicy by server-side apply without the rule's `name` (the policy's
# list key), which the API server rejects, and that error stops the group's reconcile before its roles.
COORDINATION_STYLES = ("policy", "inline")

# The seed's example model: a PersistentVolumeClaim holding Qwen3-235B, mounted read-only.
DEFAULT_MODEL_PATH = "/models/qwen3-235B"
DEFAULT_SERVED_MODEL_NAME = "qwen3-235B"
DEFAULT_MODEL_PVC = "qwen3-235b"
DEFAULT_ETCD_URL = "http://etcd:2379"
DEFAULT_NATS_URL = "nats://nats:4222"
DEFAULT_DYN_NAMESPACE = "dynamo"
DEFAULT_RDMA_RESOURCE = "rdma/hca"
DEFAULT_SHM_SIZE = "32Gi"
DEFAULT_KV_HOST_TIER_GIB = 64
DEFAULT_NODES = 2
DEFAULT_PLANNER_TTFT = 0.5
DEFAULT_PLANNER_ITL = 0.05
DEFAULT_PLANNER_INTERVAL = 60.0
# Credentials come from a Kubernetes Secret, never from the manifest (see deploy.render).
DEFAULT_CREDENTIALS_SECRET = "dynamo-rt-credentials"


@dataclass(frozen=True)
class RoleShape:
    """One worker role: replicas, parallelism, and pods per replica (the leader/worker group size)."""

    replicas: int
    tp: int
    ep: int = 1
    nodes: int = 1

    @property
    def gpus_per_pod(self) -> int:
        return self.tp // self.nodes


@dataclass(frozen=True)
class ManifestSpec:
    """Everything one rendered file depends on."""

    backend: str
    mode: str
    roles: tuple[tuple[str, RoleShape], ...]
    api_version: str = "v1alpha1"
    name: str = ""
    namespace: str | None = None
    image: str = ""
    model_path: str = DEFAULT_MODEL_PATH
    served_model_name: str = DEFAULT_SERVED_MODEL_NAME
    model_pvc: str = DEFAULT_MODEL_PVC
    router_mode: str = "kv"
    etcd_url: str = DEFAULT_ETCD_URL
    nats_url: str = DEFAULT_NATS_URL
    dyn_namespace: str = DEFAULT_DYN_NAMESPACE
    rdma_resource: str = DEFAULT_RDMA_RESOURCE
    shm_size: str = DEFAULT_SHM_SIZE
    kv_host_tier_gib: int = DEFAULT_KV_HOST_TIER_GIB  # prefill workers' host KV tier volume; 0: none
    partition: int = 0
    coordination: str = "policy"
    planner: bool | None = None  # a planner role; None: with disagg only
    planner_ttft: float = DEFAULT_PLANNER_TTFT
    planner_itl: float = DEFAULT_PLANNER_ITL
    planner_interval: float = DEFAULT_PLANNER_INTERVAL
    credentials_secret: str = DEFAULT_CREDENTIALS_SECRET  # "": no Secret references
    nats_creds_secret: str = ""  # a Secret holding a NATS .creds file under key user.creds; "": none
    cpu_image: str = ""  # frontend and planner; "": dynamo-rt:<version>-cpu
    tolerations: tuple[dict[str, str], ...] = ()  # added to worker pods (GPU node taints)

    @property
    def group_name(self) -> str:
        return self.name or ("dynamo-pd" if self.mode == "disagg" else "dynamo-agg")

    @property
    def image_ref(self) -> str:
        return self.image or default_image(self.backend)

    @property
    def cpu_image_ref(self) -> str:
        return self.cpu_image or default_image("cpu")

    @property
    def multinode(self) -> bool:
        return any(shape.nodes > 1 for _, shape in self.roles)

    @property
    def has_planner(self) -> bool:
        return self.mode == "disagg" if self.planner is None else self.planner

    @property
    def planner_profile_configmap(self) -> str:
        return f"{self.group_name}-planner-profile"


def default_image(backend: str) -> str:
    """The image our Dockerfile's ``<backend>`` target builds (push it under your registry's name)."""
    return f"dynamo-rt:{VERSION}-{backend}"


def preset(backend: str, mode: str, multinode: bool = False, nodes: int = DEFAULT_NODES,
           api_version: str = "v1alpha1") -> ManifestSpec:
    """The seed's example topologies, with the multi-node role spread over ``nodes`` pods.

    agg: one worker, 4 GPUs (``--tp 4``); multi-node: 4 GPUs on each of ``nodes`` pods.
    disagg: prefill ``--tp 4`` x2 replicas, decoder ``--tp 8 --ep-size 8`` (MoE); multi-node: prefill on one
    8-GPU node, the decoder spread over ``nodes`` 8-GPU pods.
    """
    if mode == "agg":
        worker = RoleShape(replicas=1, tp=4 * nodes, nodes=nodes) if multinode else RoleShape(replicas=1, tp=4)
        roles: tuple[tuple[str, RoleShape], ...] = ((AGG_ROLE, worker),)
    else:
        if multinode:
            prefill = RoleShape(replicas=1, tp=8, ep=8)
            decoder = RoleShape(replicas=1, tp=8 * nodes, ep=8 * nodes, nodes=nodes)
        else:
            prefill = RoleShape(replicas=2, tp=4)
            decoder = RoleShape(replicas=1, tp=8, ep=8)
        roles = ((PREFILL_ROLE, prefill), (DECODE_ROLE, decoder))
    return ManifestSpec(backend=backend, mode=mode, roles=roles, api_version=api_version)


TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def parse_tolerations(text: str) -> tuple[dict[str, str], ...]:
    """``key[=value]:Effect[,...]`` -> Kubernetes tolerations (``Exists`` without a value, else ``Equal``)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        taint, sep, effect = item.rpartition(":")
        key, eq, value = taint.partition("=")
        if not sep or not key or effect not in TOLERATION_EFFECTS:
            raise InvalidRequest(f"toleration {item!r}: expected key[=value]:{'|'.join(TOLERATION_EFFECTS)}",
                                 param="toleration")
        tol = {"key": key, "operator": "Equal" if eq else "Exists"}
        if eq:
            tol["value"] = value
        out.append({**tol, "effect": effect})
    return tuple(out)


def validate_spec(spec: ManifestSpec) -> None:
    """Reject inputs that would render a group RBG or the engines refuse."""
    if spec.backend not in BACKENDS:
        raise InvalidRequest(f"backend must be one of {', '.join(BACKENDS)}", param="backend")
    if spec.mode not in MODES:
        raise InvalidRequest(f"mode must be one of {', '.join(MODES)}", param="mode")
    if spec.api_version not in API_VERSIONS:
        raise InvalidRequest(f"api version must be one of {', '.join(API_VERSIONS)}", param="api_version")
    if spec.router_mode not in ROUTER_MODES:
        raise InvalidRequest(f"router mode must be one of {', '.join(ROUTER_MODES)}", param="router_mode")
    if spec.coordination not in COORDINATION_STYLES:
        raise InvalidRequest(f"coordination must be one of {', '.join(COORDINATION_STYLES)}",
                             param="coordination")
    if spec.coordination == "inline" and spec.api_version != "v1alpha1":
        raise InvalidRequest("inline coordination exists only in v1alpha1", param="coordination")
    if spec.partition < 0:
        raise InvalidRequest("partition must be >= 0", param="partition")
    if spec.planner_ttft <= 0 or spec.planner_itl <= 0 or spec.planner_interval <= 0:
        raise InvalidRequest("planner TTFT / ITL targets and interval must be > 0", param="planner_ttft_target")
    if not (spec.shm_size.endswith("Gi") and spec.shm_size[:-2].isdigit()):
        raise InvalidRequest("shm size must be whole GiB, such as 32Gi", param="shm_size")
    if spec.kv_host_tier_gib < 0:
        raise InvalidRequest("kv host tier size must be >= 0 GiB", param="kv_host_tier_gib")
    for role, shape in spec.roles:
        if shape.replicas < 1:
            raise InvalidRequest(f"{role}: replicas must be >= 1", param=f"{role}_replicas")
        if shape.tp < 1 or shape.ep < 1 or shape.nodes < 1:
            raise InvalidRequest(f"{role}: tp, ep-size and nodes must be >= 1", param=f"{role}_tp")
        if shape.tp % shape.nodes:
            raise InvalidRequest(f"{role}: tp {shape.tp} does not split evenly over {shape.nodes} nodes",
                                 param=f"{role}_tp")
        if shape.tp % shape.ep:
            raise InvalidRequest(f"{role}: ep-size {shape.ep} must divide tp {shape.tp}", param=f"{role}_ep")
        # RBG's admission webhook: partition must stay below replicas (0 means "update everything").
        if spec.partition >= shape.replicas and spec.partition > 0:
            raise InvalidRequest(f"{role}: partition {spec.partition} must be < replicas {shape.replicas}",
                                 param="partition")
