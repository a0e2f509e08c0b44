"""Kubernetes manifests: the renderer behind ``dynamo-rt manifests`` and a sizing suggester.

Renders RoleBasedGroup (RBG, sgl-project/rbg) YAML for the frontend and the engine workers of one backend
(sglang, vllm, trtllm), aggregated or disaggregated, single- or multi-node, as ``workloads.x-k8s.io``
v1alpha1 (the shape the seed README uses) or v1alpha2 (the storage version), with prefill/decode coordination
as a separate CoordinatedPolicy (see ``COORDINATION_STYLES``). The files under ``manifests/`` are exactly
this module's output: ``--write-all`` regenerates them and ``--check`` verifies them. ``suggest`` picks
tensor-parallel size and replica counts from the model size and the GPU, in the spirit of NVIDIA's
AIConfigurator, printing its reasoning.

RBG facts this module relies on (RBG v0.8.0-alpha.5 sources):
- Worker roles use the ``RoleInstanceSet`` workload (``workloads.x-k8s.io/v1alpha2``), RBG's replacement for
  the deprecated v1alpha1 ``InstanceSet``, which the v0.8 controller no longer reconciles. It supports
  ``InPlaceIfPossible`` updates, ``partition`` and ``templateRef``, and with ``leaderWorkerSet.size`` it runs
  the leader/worker pattern itself, injecting ``RBG_LWP_LEADER_ADDRESS`` / ``RBG_LWP_WORKER_INDEX`` /
  ``RBG_LWP_GROUP_SIZE`` (the CRD forbids ``templateRef`` with the old ``InstanceSet`` and
  ``LeaderWorkerSet`` kinds, so those would each need a copy of the shared template).
- A CoordinatedPolicy applies to the RoleBasedGroup of the same name and namespace.
- Pods carry ``rbg.workloads.x-k8s.io/group-name`` and ``rbg.workloads.x-k8s.io/role-name`` labels.

Planner: disaggregated groups get a ``planner`` role (one replica, ``dynamo-rt planner --connector rbg``)
that scales the ``prefill`` and ``decoder`` roles through their scaling adapters from the frontend pods'
metrics (the role's headless Service ``s-{group}-frontend``, every pod scraped). It runs as the
ServiceAccount ``dynamo-planner`` that ``manifests/planner/rbac.yml`` creates and binds, and reads the
engine's performance profile (``dynamo-rt profile`` output) from the ConfigMap ``{group}-planner-profile``.

KV host tier: prefill workers get a memory-backed emptyDir (``KV_HOST_TIER_VOLUME``) and worker flags pointing
the KV block manager's host tier (``workers.reference.kvbm``) at a file in it. An emptyDir lives as long as
the pod, and an in-place update (``InPlaceIfPossible``, image-only change) restarts the container inside the
same pod, so the new process finds the file and serves the prefixes the old one cached.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from dynamo_rt.config import Parser, flag
from dynamo_rt.errors import InvalidRequest
from workers import registry as engine_registry

# The package version; default image tags follow it (a test keeps it equal to pyproject.toml's).
VERSION = "0.1.0"

API_GROUP = "workloads.x-k8s.io"
BACKENDS = tuple(engine_registry.names(has_manifests=True))  # engines with images: vllm, sglang, trtllm
MODES = ("agg", "disagg")
API_VERSIONS = ("v1alpha1", "v1alpha2")
ROUTER_MODES = ("kv", "round-robin", "random", "least-loaded")
# How prefill/decode coordination is written: a CoordinatedPolicy document (both API versions), or the
# v1alpha1 group's own spec.coordination. The default is the policy: RBG v0.8.0-alpha.5 turns a v1alpha1
# spec.coordination into a CoordinatedPolicy by server-side apply without the rule's `name` (the policy's
# list key), which the API server rejects, and that error stops the group's reconcile before its roles.
COORDINATION_STYLES = ("policy", "inline")

FRONTEND_PORT = 8000
READINESS_PATH = "/health"  # 200 once a model has a ready worker, 503 before
LIVENESS_PATH = "/live"  # 200 while the process serves HTTP
TEMPLATE_NAME = "dynamo-common"
CONTAINER_NAME = "main"
DIST_INIT_PORT = 29500  # torch.distributed rendezvous on the multi-node leader

GROUP_LABEL = "rbg.workloads.x-k8s.io/group-name"
ROLE_LABEL = "rbg.workloads.x-k8s.io/role-name"
# No version label: an in-place image patch would leave it stale.
APP_LABELS = {"app.kubernetes.io/name": "dynamo-rt"}

# The seed's example model: a PersistentVolumeClaim holding Qwen3-235B, mounted read-only.
DEFAULT_MODEL_PATH = "/models/qwen3-235B"
DEFAULT_SERVED_MODEL_NAME = "qwen3-235B"
DEFAULT_MODEL_PVC = "qwen3-235b"
DEFAULT_ETCD_URL = "http://etcd:2379"
DEFAULT_NATS_URL = "nats://nats:4222"
DEFAULT_DYN_NAMESPACE = "dynamo"
DEFAULT_RDMA_RESOURCE = "rdma/hca"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_SHM_SIZE = "32Gi"
KV_HOST_TIER_VOLUME = "kv-host-tier"
KV_HOST_TIER_MOUNT = "/kv-host-tier"
KV_HOST_TIER_FILE = f"{KV_HOST_TIER_MOUNT}/host.kv"
DEFAULT_KV_HOST_TIER_GIB = 64
KV_HOST_TIER_ROLES = ("prefill",)
DEFAULT_NODES = 2

ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"
NATS_IMAGE = "nats:2.10.22-alpine"

# Worker role name -> the worker's --mode.
ROLE_MODE = {"worker": "agg", "prefill": "prefill", "decoder": "decode"}
# Worker role name -> the planner pool that sizes it (planner.core's PREFILL / DECODE / AGG).
ROLE_POOL = {"worker": "agg", "prefill": "prefill", "decoder": "decode"}

PLANNER_ROLE = "planner"
PLANNER_SERVICE_ACCOUNT = "dynamo-planner"  # created and bound by manifests/planner/rbac.yml
PLANNER_PROFILE_VOLUME = "planner-profile"
PLANNER_PROFILE_MOUNT = "/planner-profile"
PLANNER_PROFILE_KEY = "profile.json"
PLANNER_METRICS_PORT = 9085
DEFAULT_PLANNER_TTFT = 0.5
DEFAULT_PLANNER_ITL = 0.05
DEFAULT_PLANNER_INTERVAL = 60.0
PLANNER_MAX_REPLICAS = 8  # per pool, unless the rendered replicas are more

# Credentials come from a Kubernetes Secret, never from the manifest. Every key is optional: a missing Secret or
# key leaves the variable unset (no auth), so the same files serve an unsecured dev cluster and a secured one.
DEFAULT_CREDENTIALS_SECRET = "dynamo-rt-credentials"
SECRET_ENV_ALL_ROLES = (
    ("DYN_NATS_USER", "nats-user"), ("DYN_NATS_PASSWORD", "nats-password"), ("DYN_NATS_TOKEN", "nats-token"),
    ("DYN_ETCD_USER", "etcd-user"), ("DYN_ETCD_PASSWORD", "etcd-password"),
)
SECRET_ENV_FRONTEND = (("DYN_API_KEY", "api-key"),)
NATS_CREDS_VOLUME = "nats-creds"
NATS_CREDS_MOUNT = "/etc/dynamo-rt/nats"
NATS_CREDS_KEY = "user.creds"
# The frontend and the planner need no privilege at all: they run as the CPU image's user (uid 1000) on a
# read-only root filesystem with a scratch /tmp. GPU engine workers keep their image's user: the engines'
# images run as root and pin memory for RDMA/NCCL.
NON_ROOT_UID = 1000
SCRATCH_VOLUME = "tmp"

HEADER = (
    "# Generated by `dynamo-rt manifests`: do not edit by hand.\n"
    "# Regenerate every checked-in file with `dynamo-rt manifests --write-all`"
    " (verify with `dynamo-rt manifests --check`).\n"
)


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

    @property
    def group_name(self) -> str:
        return self.name or ("dynamo-pd" if self.mode == "disagg" else "dynamo-agg")

    @property
    def image_ref(self) -> str:
        return self.image or default_image(self.backend)

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
        roles: tuple[tuple[str, RoleShape], ...] = (("worker", worker),)
    else:
        if multinode:
            prefill = RoleShape(replicas=1, tp=8, ep=8)
            decoder = RoleShape(replicas=1, tp=8 * nodes, ep=8 * nodes, nodes=nodes)
        else:
            prefill = RoleShape(replicas=2, tp=4)
            decoder = RoleShape(replicas=1, tp=8, ep=8)
        roles = (("prefill", prefill), ("decoder", decoder))
    return ManifestSpec(backend=backend, mode=mode, roles=roles, api_version=api_version)


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


# ---------------------------------------------------------------------------------------------------------
# Documents


def _meta(name: str, namespace: str | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    return meta


def _secret_env(spec: ManifestSpec, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    if not spec.credentials_secret:
        return []
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": spec.credentials_secret, "key": key,
                                                           "optional": True}}} for env, key in pairs]


def _non_root_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }


def _base_template(spec: ManifestSpec) -> dict[str, Any]:
    """The shared PodTemplateSpec: image, discovery endpoints, credentials, model volume. Roles patch it."""
    env = [
        {"name": "DYN_ETCD_ENDPOINTS", "value": spec.etcd_url},
        {"name": "DYN_NATS_ENDPOINTS", "value": spec.nats_url},
        {"name": "DYN_NAMESPACE", "value": spec.dyn_namespace},
        {"name": "DYN_LOG", "value": "info"},
        *_secret_env(spec, SECRET_ENV_ALL_ROLES),
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "model", "persistentVolumeClaim": {"claimName": spec.model_pvc, "readOnly": True}},
    ]
    mounts = [{"name": "model", "mountPath": spec.model_path, "readOnly": True}]
    if spec.nats_creds_secret:
        # Not optional: a process told to use a creds file that is absent exits at start with a clear error.
        volumes.append({"name": NATS_CREDS_VOLUME, "secret": {"secretName": spec.nats_creds_secret,
                                                              "defaultMode": 0o440}})
        mounts.append({"name": NATS_CREDS_VOLUME, "mountPath": NATS_CREDS_MOUNT, "readOnly": True})
        env.append({"name": "DYN_NATS_CREDS", "value": f"{NATS_CREDS_MOUNT}/{NATS_CREDS_KEY}"})
    return {
        "metadata": {"labels": dict(APP_LABELS)},
        "spec": {
            "volumes": volumes,
            "containers": [
                {
                    "name": CONTAINER_NAME,
                    "image": spec.image_ref,
                    "command": ["dynamo-rt"],
                    "env": env,
                    "volumeMounts": mounts,
                },
            ],
        },
    }


def _unprivileged(patch: dict[str, Any], env: list[dict[str, Any]]) -> dict[str, Any]:
    """``patch`` (one container) run as a non-root user on a read-only root filesystem: HOME and the temp
    folder point at a scratch emptyDir, ``env`` is added."""
    pod = patch["spec"]
    container = pod["containers"][0]
    pod.setdefault("volumes", []).append({"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": "1Gi"}})
    container.setdefault("volumeMounts", []).append({"name": SCRATCH_VOLUME, "mountPath": "/tmp"})
    container["env"] = [{"name": "HOME", "value": "/tmp"}, *env]
    container["securityContext"] = _non_root_context()
    return patch


def frontend_args(spec: ManifestSpec) -> list[str]:
    return ["frontend", "--http-port", str(FRONTEND_PORT), "--router-mode", spec.router_mode]


def _frontend_patch(spec: ManifestSpec) -> dict[str, Any]:
    return _unprivileged({
        "spec": {
            "containers": [
                {
                    "name": CONTAINER_NAME,
                    "args": frontend_args(spec),
                    "ports": [{"name": "http", "containerPort": FRONTEND_PORT, "protocol": "TCP"}],
                    "readinessProbe": {
                        "httpGet": {"path": READINESS_PATH, "port": "http"},
                        "periodSeconds": 5,
                        "failureThreshold": 3,
                    },
                    "livenessProbe": {
                        "httpGet": {"path": LIVENESS_PATH, "port": "http"},
                        "initialDelaySeconds": 10,
                        "periodSeconds": 10,
                        "failureThreshold": 3,
                    },
                    # CPU only: tokenizing, routing and streaming.
                    "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
                },
            ],
        },
    }, _secret_env(spec, SECRET_ENV_FRONTEND))


def planner_args(spec: ManifestSpec) -> list[str]:
    """``dynamo-rt planner`` in the group: RBG injects ``RBG_GROUP_NAME`` (the planner's default
    ``--rbg-name``) and the namespace comes from the pod's service account."""
    args = [
        "planner", "--connector", "rbg", "--rbg-api-version", spec.api_version, "--mode", spec.mode,
        "--model", spec.served_model_name,
        "--frontend-url", f"http://s-{spec.group_name}-frontend:{FRONTEND_PORT}", "--frontend-resolve-all",
        "--profile", f"{PLANNER_PROFILE_MOUNT}/{PLANNER_PROFILE_KEY}",
        "--ttft-target", f"{spec.planner_ttft:g}", "--itl-target", f"{spec.planner_itl:g}",
        "--adjustment-interval", f"{spec.planner_interval:g}",
    ]
    for role, shape in spec.roles:
        pool = ROLE_POOL[role]
        args += [f"--min-{pool}", "1", f"--max-{pool}", str(max(PLANNER_MAX_REPLICAS, shape.replicas))]
    return [*args, "--metrics-port", str(PLANNER_METRICS_PORT)]


def _planner_patch(spec: ManifestSpec) -> dict[str, Any]:
    return _unprivileged({
        "spec": {
            "serviceAccountName": PLANNER_SERVICE_ACCOUNT,
            # Not optional: without a profile of the real engine the planner would size pools by guesswork,
            # so the pod waits (ContainerCreating, "configmap not found") until the ConfigMap exists.
            "volumes": [{"name": PLANNER_PROFILE_VOLUME,
                         "configMap": {"name": spec.planner_profile_configmap}}],
            "containers": [
                {
                    "name": CONTAINER_NAME,
                    "args": planner_args(spec),
                    "ports": [{"name": "metrics", "containerPort": PLANNER_METRICS_PORT, "protocol": "TCP"}],
                    "volumeMounts": [{"name": PLANNER_PROFILE_VOLUME, "mountPath": PLANNER_PROFILE_MOUNT,
                                      "readOnly": True}],
                    "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                },
            ],
        },
    }, [])


def kv_host_tier_file_gib(volume_gib: int) -> int:
    """The tier file's size for a volume of ``volume_gib``: a memory emptyDir that outgrows its sizeLimit
    gets the pod evicted, so the file (index included) leaves 1/32 of the volume, at least 1 GiB, free."""
    return volume_gib - max(1, -(-volume_gib // 32))


def _has_kv_host_tier(spec: ManifestSpec, role: str) -> bool:
    return role in KV_HOST_TIER_ROLES and kv_host_tier_file_gib(spec.kv_host_tier_gib) > 0


def worker_args(spec: ManifestSpec, role: str, shape: RoleShape) -> list[str]:
    args = [
        "worker", "--engine", spec.backend, "--mode", ROLE_MODE[role],
        "--model", spec.model_path, "--served-model-name", spec.served_model_name,
        "--tp", str(shape.tp),
    ]
    if shape.ep > 1:
        args += ["--ep-size", str(shape.ep)]
    if shape.nodes > 1:
        # Kubernetes expands $(VAR) in args from the container's env, which RBG fills per pod. Both API
        # versions run the leader/worker pattern through RoleInstanceSet, which injects the RBG_LWP_* set.
        args += [
            "--nnodes", "$(RBG_LWP_GROUP_SIZE)",
            "--node-rank", "$(RBG_LWP_WORKER_INDEX)",
            "--dist-init-addr", f"$(RBG_LWP_LEADER_ADDRESS):{DIST_INIT_PORT}",
        ]
    if _has_kv_host_tier(spec, role):
        args += ["--kv-host-tier-path", KV_HOST_TIER_FILE,
                 "--kv-host-tier-gib", str(kv_host_tier_file_gib(spec.kv_host_tier_gib))]
    return args


def _worker_patch(spec: ManifestSpec, role: str, shape: RoleShape) -> dict[str, Any]:
    amount = {GPU_RESOURCE: str(shape.gpus_per_pod)}
    # KV hand-off (disagg) and cross-node tensor parallelism want the RDMA NIC.
    if spec.rdma_resource and (spec.mode == "disagg" or shape.nodes > 1):
        amount[spec.rdma_resource] = "1"
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "args": worker_args(spec, role, shape),
        "resources": {"requests": dict(amount), "limits": dict(amount)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if shape.nodes > 1:
        container["ports"] = [{"name": "dist-init", "containerPort": DIST_INIT_PORT, "protocol": "TCP"}]
    # NCCL and the engines' worker processes exchange tensors through /dev/shm.
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    if _has_kv_host_tier(spec, role):
        # Outlives the container (not the pod): an in-place update keeps the KV blocks it holds.
        volumes.append({"name": KV_HOST_TIER_VOLUME,
                        "emptyDir": {"medium": "Memory", "sizeLimit": f"{spec.kv_host_tier_gib}Gi"}})
        container["volumeMounts"].append({"name": KV_HOST_TIER_VOLUME, "mountPath": KV_HOST_TIER_MOUNT})
    return {"spec": {"volumes": volumes, "containers": [container]}}


def _rollout(spec: ManifestSpec) -> dict[str, Any]:
    # partition is written even at 0 so `kubectl patch ... /rollingUpdate/partition` has a path to replace.
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {
            "type": "InPlaceIfPossible",
            "maxUnavailable": 1,
            "partition": spec.partition,
            "inPlaceUpdateStrategy": {"gracePeriodSeconds": 30},
        },
    }


def _role(spec: ManifestSpec, name: str, replicas: int, patch: dict[str, Any],
          shape: RoleShape | None) -> dict[str, Any]:
    role: dict[str, Any] = {"name": name, "replicas": replicas}
    nodes = shape.nodes if shape is not None else 1
    if spec.api_version == "v1alpha1":
        role["workload"] = {"apiVersion": f"{API_GROUP}/v1alpha2", "kind": "RoleInstanceSet"}
        if nodes > 1:
            role["leaderWorkerSet"] = {"size": nodes}
    if shape is not None:
        # The planner (or an HPA) scales worker roles through the adapter's /scale subresource.
        role["scalingAdapter"] = {"enable": True}
        role["rolloutStrategy"] = _rollout(spec)
    if spec.api_version == "v1alpha1":
        role["templateRef"] = {"name": TEMPLATE_NAME}
        role["templatePatch"] = patch
    else:
        pattern: dict[str, Any] = {"templateRef": {"name": TEMPLATE_NAME, "patch": patch}}
        if nodes > 1:
            role["leaderWorkerPattern"] = {"size": nodes, **pattern}
        else:
            role["standalonePattern"] = pattern
    return role


def _coordination_rule() -> dict[str, Any]:
    # Prefill and decode move together: rollouts stay within 1% of each other with at most 10% of each
    # role down, and scale-ups advance in step once the new pods are scheduled.
    return {
        "name": "pd-coordination",
        "roles": ["prefill", "decoder"],
        "strategy": {
            "rollingUpdate": {"maxSkew": "1%", "maxUnavailable": "10%"},
            "scaling": {"maxSkew": "5%", "progression": "OrderScheduled"},
        },
    }


def build_documents(spec: ManifestSpec) -> list[dict[str, Any]]:
    """The RoleBasedGroup (+ CoordinatedPolicy for disagg) and a Service in front of the frontend.

    Roles: frontend, the worker roles, then the planner (last, so the worker roles keep the indices the
    README's JSON patches use)."""
    validate_spec(spec)
    name = spec.group_name
    roles = [_role(spec, "frontend", 1, _frontend_patch(spec), None)]
    for role_name, shape in spec.roles:
        roles.append(_role(spec, role_name, shape.replicas, _worker_patch(spec, role_name, shape), shape))
    if spec.has_planner:
        roles.append(_role(spec, PLANNER_ROLE, 1, _planner_patch(spec), None))
    rbg_spec: dict[str, Any] = {
        "roleTemplates": [{"name": TEMPLATE_NAME, "template": _base_template(spec)}],
        "roles": roles,
    }
    disagg = spec.mode == "disagg"
    if disagg and spec.coordination == "inline":
        rbg_spec["coordination"] = [_coordination_rule()]
    docs: list[dict[str, Any]] = [{
        "apiVersion": f"{API_GROUP}/{spec.api_version}",
        "kind": "RoleBasedGroup",
        "metadata": _meta(name, spec.namespace, APP_LABELS),
        "spec": rbg_spec,
    }]
    if disagg and spec.coordination == "policy":
        # The policy binds to the group of the same name and namespace (v1alpha2 moved coordination out of
        # the group; the CoordinatedPolicy API serves v1alpha1 groups too).
        docs.append({
            "apiVersion": f"{API_GROUP}/v1alpha2",
            "kind": "CoordinatedPolicy",
            "metadata": _meta(name, spec.namespace, APP_LABELS),
            "spec": {"policies": [_coordination_rule()]},
        })
    docs.append({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(f"{name}-frontend", spec.namespace, APP_LABELS),
        "spec": {
            "type": "ClusterIP",
            "selector": {GROUP_LABEL: name, ROLE_LABEL: "frontend"},
            "ports": [{"name": "http", "port": FRONTEND_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    })
    return docs


def _service(name: str, namespace: str | None, ports: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, {"app.kubernetes.io/name": name}),
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": pname, "port": port, "targetPort": port, "protocol": "TCP"} for pname, port in ports],
        },
    }


def _deployment(name: str, namespace: str | None, container: dict[str, Any],
                volumes: list[dict[str, Any]]) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "replicas": 1,
            # Recreate: two copies must never run at once against the same name.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"containers": [container], "volumes": volumes},
            },
        },
    }


def etcd_documents(namespace: str | None = None) -> list[dict[str, Any]]:
    """Single-member etcd. Its data is leases and leased keys only, so an emptyDir is enough: after a
    restart every process re-registers within one lease TTL."""
    container = {
        "name": "etcd",
        "image": ETCD_IMAGE,
        "command": [
            "/usr/local/bin/etcd", "--name=etcd-0", "--data-dir=/var/lib/etcd",
            "--listen-client-urls=http://0.0.0.0:2379", "--advertise-client-urls=http://etcd:2379",
            "--listen-peer-urls=http://0.0.0.0:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=etcd-0=http://127.0.0.1:2380",
        ],
        "ports": [{"name": "client", "containerPort": 2379}, {"name": "peer", "containerPort": 2380}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "client"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "client"}, "initialDelaySeconds": 10,
                          "periodSeconds": 10},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
    }
    return [
        _deployment("etcd", namespace, container, [{"name": "data", "emptyDir": {}}]),
        _service("etcd", namespace, [("client", 2379)]),
    ]


def nats_documents(namespace: str | None = None) -> list[dict[str, Any]]:
    """Single NATS server with JetStream (the object store holds tokenizer files) and monitoring on 8222."""
    container = {
        "name": "nats",
        "image": NATS_IMAGE,
        "args": ["-js", "-sd", "/data", "-m", "8222"],
        "ports": [{"name": "client", "containerPort": 4222}, {"name": "monitor", "containerPort": 8222}],
        "readinessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"},
                           "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "monitor"}, "initialDelaySeconds": 10,
                          "periodSeconds": 10},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return [
        _deployment("nats", namespace, container, [{"name": "data", "emptyDir": {}}]),
        _service("nats", namespace, [("client", 4222), ("monitor", 8222)]),
    ]


# ---------------------------------------------------------------------------------------------------------
# YAML


class _Dumper(yaml.SafeDumper):
    """SafeDumper that indents list items under their key, as kubectl and most k8s docs do."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def dump_documents(docs: Iterable[dict[str, Any]], header: str) -> str:
    body = "---\n".join(
        yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110,
                  allow_unicode=False)
        for doc in docs
    )
    return header + body


def command_line(spec: ManifestSpec) -> str:
    """The `dynamo-rt manifests` command that renders ``spec`` from its preset (catalog specs only), spelled
    as a custom render's header spells it, so that command's output is byte-for-byte the checked-in file."""
    parts = ["dynamo-rt manifests", f"--backend {spec.backend}", f"--mode {spec.mode}"]
    if spec.multinode:
        parts.append("--multinode")
    if spec.api_version != "v1alpha1":
        parts.append(f"--api-version {spec.api_version}")
    return " ".join(parts)


def render(spec: ManifestSpec, how: str | None = None) -> str:
    """One file's text: the header (saying how to reproduce it) and the documents."""
    header = HEADER + f"# This file: {how or command_line(spec)}\n"
    return dump_documents(build_documents(spec), header)


def render_deps(which: str, namespace: str | None = None) -> str:
    docs = etcd_documents(namespace) if which == "etcd" else nats_documents(namespace)
    return dump_documents(docs, HEADER + f"# This file: dynamo-rt manifests --deps {which}\n")


# ---------------------------------------------------------------------------------------------------------
# The checked-in files


def catalog() -> dict[str, str]:
    """Relative path under ``manifests/`` -> file text, for every generated file."""
    files: dict[str, str] = {}
    for backend in BACKENDS:
        for mode in MODES:
            for multinode in (False, True):
                stem = mode + ("-multinode" if multinode else "")
                for api in API_VERSIONS:
                    rel = f"{backend}/{stem}.yaml" if api == "v1alpha1" else f"{backend}/{api}/{stem}.yaml"
                    files[rel] = render(preset(backend, mode, multinode, api_version=api))
    files["deps/etcd.yaml"] = render_deps("etcd")
    files["deps/nats.yaml"] = render_deps("nats")
    return files


def write_all(root: Path) -> list[Path]:
    written = []
    for rel, text in catalog().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def check(root: Path) -> list[str]:
    """Problems with the checked-in files: missing, different from the generator, or not generated."""
    problems = []
    files = catalog()
    for rel, text in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.read_text() != text:
            problems.append(f"{rel}: differs from the generator's output")
    if root.is_dir():
        for path in sorted(root.rglob("*.yaml")):
            rel = path.relative_to(root).as_posix()
            if rel not in files:
                problems.append(f"{rel}: not produced by the generator (stale?)")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Sizing suggestions (AIConfigurator-style, first-order)


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


# ---------------------------------------------------------------------------------------------------------
# CLI


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
         help="GiB of the memory-backed volume holding the prefill workers' host KV tier (0: none)")
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
        key = "decode" if role == "decoder" else role
        tp, ep, rep, nodes = (getattr(args, f"{key}_{x}") for x in ("tp", "ep", "replicas", "nodes"))
        roles.append((role, replace(shape, tp=shape.tp if tp is None else tp, ep=shape.ep if ep is None else ep,
                                    replicas=shape.replicas if rep is None else rep,
                                    nodes=shape.nodes if nodes is None else nodes)))
    for role in ("worker", "prefill", "decode"):
        if role not in {("decode" if r == "decoder" else r) for r, _ in spec.roles} and any(
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
        nats_creds_secret=args.nats_creds_secret,
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
