"""The documents of one RoleBasedGroup: a :class:`~deploy.spec.ManifestSpec` in, Kubernetes objects out.

The group holds a frontend role, the worker roles of the spec and (disaggregated by default) a planner role,
all patches of one shared pod template; a CoordinatedPolicy couples prefill and decode; a Service fronts the
frontend. Names RBG defines come from :mod:`deploy.rbg`; :mod:`deploy.catalog` turns the documents into
the YAML files under ``manifests/``.

RBG facts this module relies on (RBG v0.8.0-alpha.5 sources):
- Worker roles use the ``RoleInstanceSet`` workload (``workloads.x-k8s.io/v1alpha2``), RBG's replacement for
  the deprecated v1alpha1 ``InstanceSet``, which the v0.8 controller no longer reconciles. It supports
  ``InPlaceIfPossible`` updates, ``partition`` and ``templateRef``, and with ``leaderWorkerSet.size`` it runs
  the leader/worker pattern itself, injecting ``RBG_LWP_LEADER_ADDRESS`` / ``RBG_LWP_WORKER_INDEX`` /
  ``RBG_LWP_GROUP_SIZE`` (the CRD forbids ``templateRef`` with the old ``InstanceSet`` and
  ``LeaderWorkerSet`` kinds, so those would each need a copy of the shared template).
- A CoordinatedPolicy applies to the RoleBasedGroup of the same name and namespace.
- Pods carry ``rbg.workloads.x-k8s.io/group-name`` and ``rbg.workloads.x-k8s.io/role-name`` labels.

Planner: the ``planner`` role (one replica, ``dynamo-rt planner --connector rbg``) scales the ``prefill`` and
``decoder`` roles through their scaling adapters from the frontend pods' metrics (the role's headless
Service ``s-{group}-frontend``, every pod scraped). It runs as the ServiceAccount ``dynamo-planner`` that
``manifests/planner/rbac.yml`` creates and binds, and reads the engine's performance profile
(``dynamo-rt profile`` output) from the ConfigMap ``{group}-planner-profile``.

KV host tier: only for engines whose KV block manager has a host tier (``KV_HOST_TIER_ENGINES``: the reference
engine, ``workers.reference.kvbm``); vLLM, SGLang and TensorRT-LLM ignore the flags, so their pods get neither
the memory volume nor its memory request. Where rendered, prefill workers get a memory-backed emptyDir
(``KV_HOST_TIER_VOLUME``) and flags pointing the tier at a file in it; an emptyDir lives as long as the pod,
and an in-place update restarts the container inside the same pod, so the new process finds the cached
prefixes.

Pods (from RBG's sources, v0.8.0-alpha.5):
- the frontend's ClusterIP Service is ``{group}-api``: RBG treats an existing Service named ``{group}-{role}``
  as the role's legacy headless Service (pkg/utils/service_utils.go) and would force ``clusterIP: None`` on it;
- frontend and planner run the cpu image without the model volume (the frontend gets tokenizers from NATS);
- workers serve metrics on a fixed port once the engine has registered: readiness on it, and a long startup
  probe while weights load (the leader pod only, for multi-node roles: followers serve nothing);
- workers request cpu and memory (memory: engine host memory + /dev/shm + the KV host tier, all memory-backed)
  and, with an RDMA resource, add ``IPC_LOCK`` so the engine can pin memory for the NIC;
- multi-node groups carry RBG's gang-scheduling annotation, so a leader/worker group is placed whole or not
  at all; ``--toleration`` adds tolerations (GPU node taints) to the worker pods;
- the CoordinatedPolicy comes before the RoleBasedGroup, so the group's first reconcile already sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deploy.rbg import (
    AGG_ROLE,
    API_GROUP,
    DECODE_ROLE,
    FRONTEND_ROLE,
    GANG_SCHEDULING_ANNOTATION,
    GROUP_KIND,
    GROUP_LABEL,
    LWP_GROUP_SIZE_ENV,
    LWP_LEADER_ADDRESS_ENV,
    LWP_WORKER_INDEX_ENV,
    PLANNER_ROLE,
    POLICY_API_VERSION,
    POLICY_KIND,
    PREFILL_ROLE,
    ROLE_LABEL,
    ROLE_POOLS,
    WORKLOAD_KIND,
    service_name,
)
from deploy.spec import ManifestSpec, RoleShape, validate_spec

FRONTEND_PORT = 8000
READINESS_PATH = "/health"  # 200 once a model has a ready worker, 503 before
LIVENESS_PATH = "/live"  # 200 while the process serves HTTP
TEMPLATE_NAME = "dynamo-common"
CONTAINER_NAME = "main"
DIST_INIT_PORT = 29500  # torch.distributed rendezvous on the multi-node leader
# No version label: an in-place image patch would leave it stale.
APP_LABELS = {"app.kubernetes.io/name": "dynamo-rt"}
GPU_RESOURCE = "nvidia.com/gpu"

KV_HOST_TIER_VOLUME = "kv-host-tier"
KV_HOST_TIER_MOUNT = "/kv-host-tier"
KV_HOST_TIER_FILE = f"{KV_HOST_TIER_MOUNT}/host.kv"
KV_HOST_TIER_ROLES = (PREFILL_ROLE,)
KV_HOST_TIER_ENGINES = ("reference",)  # engines with a host KV tier; none of the manifest backends has one

FRONTEND_SERVICE_SUFFIX = "api"  # never a role name: {group}-{role} is RBG's legacy headless Service name
WORKER_METRICS_PORT = 9090
# Engine host memory per GPU (process, CUDA context, weight staging), on top of /dev/shm and the KV host tier.
ENGINE_HOST_GIB_PER_GPU = 24
WORKER_CPU_PER_GPU = 4
STARTUP_PROBE_SECONDS = 1800  # large models load for tens of minutes

# Worker role name -> the worker's --mode.
ROLE_MODE = {AGG_ROLE: "agg", PREFILL_ROLE: "prefill", DECODE_ROLE: "decode"}

PLANNER_SERVICE_ACCOUNT = "dynamo-planner"  # created and bound by manifests/planner/rbac.yml
PLANNER_PROFILE_VOLUME = "planner-profile"
PLANNER_PROFILE_MOUNT = "/planner-profile"
PLANNER_PROFILE_KEY = "profile.json"
PLANNER_METRICS_PORT = 9085
PLANNER_MAX_REPLICAS = 8  # per pool, unless the rendered replicas are more

# Every Secret key is optional: a missing Secret or key leaves the variable unset (no auth), so the same files
# serve an unsecured dev cluster and a secured one.
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

def frontend_service_name(group: str) -> str:
    """The frontend's ClusterIP Service: ``{group}-api``, never ``{group}-{role}`` (see the module docstring)."""
    return f"{group}-{FRONTEND_SERVICE_SUFFIX}"


def meta(name: str, namespace: str | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """An object's ``metadata``: the namespace only when given, so kubectl's current one applies."""
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
    """The shared PodTemplateSpec: image, discovery endpoints, credentials. Roles patch it (workers add the
    model volume, frontend and planner the cpu image)."""
    env = [
        {"name": "DYN_ETCD_ENDPOINTS", "value": spec.etcd_url},
        {"name": "DYN_NATS_ENDPOINTS", "value": spec.nats_url},
        {"name": "DYN_NAMESPACE", "value": spec.dyn_namespace},
        {"name": "DYN_LOG", "value": "info"},
        *_secret_env(spec, SECRET_ENV_ALL_ROLES),
    ]
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
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


def _unprivileged(spec: ManifestSpec, patch: dict[str, Any], env: list[dict[str, Any]]) -> dict[str, Any]:
    """``patch`` (one container) on the cpu image, run as a non-root user on a read-only root filesystem: HOME
    and the temp folder point at a scratch emptyDir, ``env`` is added."""
    pod = patch["spec"]
    container = pod["containers"][0]
    container["image"] = spec.cpu_image_ref
    pod.setdefault("volumes", []).append({"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": "1Gi"}})
    container.setdefault("volumeMounts", []).append({"name": SCRATCH_VOLUME, "mountPath": "/tmp"})
    container["env"] = [{"name": "HOME", "value": "/tmp"}, *env]
    container["securityContext"] = _non_root_context()
    return patch


def frontend_args(spec: ManifestSpec) -> list[str]:
    return ["frontend", "--http-port", str(FRONTEND_PORT), "--router-mode", spec.router_mode]


def _frontend_patch(spec: ManifestSpec) -> dict[str, Any]:
    return _unprivileged(spec, {
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
        "--frontend-url", f"http://{service_name(spec.group_name, FRONTEND_ROLE)}:{FRONTEND_PORT}",
        "--frontend-resolve-all",
        "--profile", f"{PLANNER_PROFILE_MOUNT}/{PLANNER_PROFILE_KEY}",
        "--ttft-target", f"{spec.planner_ttft:g}", "--itl-target", f"{spec.planner_itl:g}",
        "--adjustment-interval", f"{spec.planner_interval:g}",
    ]
    for role, shape in spec.roles:
        pool = ROLE_POOLS[role]
        args += [f"--min-{pool}", "1", f"--max-{pool}", str(max(PLANNER_MAX_REPLICAS, shape.replicas))]
    return [*args, "--metrics-port", str(PLANNER_METRICS_PORT)]


def _planner_patch(spec: ManifestSpec) -> dict[str, Any]:
    return _unprivileged(spec, {
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
    return (spec.backend in KV_HOST_TIER_ENGINES and role in KV_HOST_TIER_ROLES
            and kv_host_tier_file_gib(spec.kv_host_tier_gib) > 0)


def worker_args(spec: ManifestSpec, role: str, shape: RoleShape) -> list[str]:
    args = [
        "worker", "--engine", spec.backend, "--mode", ROLE_MODE[role],
        "--model", spec.model_path, "--served-model-name", spec.served_model_name,
        "--tp", str(shape.tp), "--metrics-port", str(WORKER_METRICS_PORT),
    ]
    if shape.ep > 1:
        args += ["--ep-size", str(shape.ep)]
    if shape.nodes > 1:
        # Kubernetes expands $(VAR) in args from the container's env, which RBG fills per pod. Both API
        # versions run the leader/worker pattern through RoleInstanceSet, which injects the RBG_LWP_* set.
        args += [
            "--nnodes", f"$({LWP_GROUP_SIZE_ENV})",
            "--node-rank", f"$({LWP_WORKER_INDEX_ENV})",
            "--dist-init-addr", f"$({LWP_LEADER_ADDRESS_ENV}):{DIST_INIT_PORT}",
        ]
    if _has_kv_host_tier(spec, role):
        args += ["--kv-host-tier-path", KV_HOST_TIER_FILE,
                 "--kv-host-tier-gib", str(kv_host_tier_file_gib(spec.kv_host_tier_gib))]
    return args


def worker_memory_gib(spec: ManifestSpec, role: str, shape: RoleShape) -> int:
    """A worker pod's memory request (= limit): engine host memory, /dev/shm and the KV host tier, the last two
    memory-backed emptyDirs that count against the pod's memory."""
    tier = spec.kv_host_tier_gib if _has_kv_host_tier(spec, role) else 0
    return ENGINE_HOST_GIB_PER_GPU * shape.gpus_per_pod + gib(spec.shm_size) + tier


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def _worker_patch(spec: ManifestSpec, role: str, shape: RoleShape) -> dict[str, Any]:
    amount = {GPU_RESOURCE: str(shape.gpus_per_pod)}
    # KV hand-off (disagg) and cross-node tensor parallelism want the RDMA NIC.
    rdma = bool(spec.rdma_resource and (spec.mode == "disagg" or shape.nodes > 1))
    if rdma:
        amount[spec.rdma_resource] = "1"
    memory = f"{worker_memory_gib(spec, role, shape)}Gi"
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "args": worker_args(spec, role, shape),
        "ports": [{"name": "metrics", "containerPort": WORKER_METRICS_PORT, "protocol": "TCP"}],
        # No cpu limit: throttling a token loop costs latency; memory request = limit, so it is not evicted
        # before pods that use less than they asked for.
        "resources": {"requests": {"cpu": str(WORKER_CPU_PER_GPU * max(shape.gpus_per_pod, 1)), "memory": memory,
                                   **amount},
                      "limits": {"memory": memory, **amount}},
        "volumeMounts": [{"name": "model", "mountPath": spec.model_path, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if rdma:
        # Registering memory with the NIC pins it (mlock): beyond the default RLIMIT_MEMLOCK without IPC_LOCK.
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    if shape.nodes > 1:
        container["ports"].append({"name": "dist-init", "containerPort": DIST_INIT_PORT, "protocol": "TCP"})
    else:
        container.update(_worker_probes())
    # NCCL and the engines' worker processes exchange tensors through /dev/shm.
    volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": spec.model_pvc, "readOnly": True}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    if _has_kv_host_tier(spec, role):
        # Outlives the container (not the pod): an in-place update keeps the KV blocks it holds.
        volumes.append({"name": KV_HOST_TIER_VOLUME,
                        "emptyDir": {"medium": "Memory", "sizeLimit": f"{spec.kv_host_tier_gib}Gi"}})
        container["volumeMounts"].append({"name": KV_HOST_TIER_VOLUME, "mountPath": KV_HOST_TIER_MOUNT})
    pod: dict[str, Any] = {"volumes": volumes, "containers": [container]}
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    return {"spec": pod}


def _worker_probes() -> dict[str, Any]:
    """The worker's metrics server starts once its engine has registered (workers/main.py), so a 200 on it
    means "serving"; the startup probe holds readiness and liveness off while weights load."""
    return {
        "startupProbe": _probe("/metrics", "metrics", 10, STARTUP_PROBE_SECONDS // 10),
        "readinessProbe": _probe("/metrics", "metrics", 10, 3),
    }


def _leader_patch() -> dict[str, Any]:
    """Multi-node roles: only the leader pod registers and serves metrics, so only it gets the probes."""
    return {"spec": {"containers": [{"name": CONTAINER_NAME, **_worker_probes()}]}}


def gib(size: str) -> int:
    """``32Gi`` -> 32 (the generator writes sizes in whole GiB)."""
    if not size.endswith("Gi") or not size[:-2].isdigit():
        raise ValueError(f"size {size!r}: expected whole GiB such as 32Gi")
    return int(size[:-2])


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
        role["workload"] = {"apiVersion": f"{API_GROUP}/{POLICY_API_VERSION}", "kind": WORKLOAD_KIND}
        if nodes > 1:
            role["leaderWorkerSet"] = {"size": nodes, "patchLeaderTemplate": _leader_patch()}
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
            role["leaderWorkerPattern"] = {"size": nodes, **pattern, "leaderTemplatePatch": _leader_patch()}
        else:
            role["standalonePattern"] = pattern
    return role


def _coordination_rule() -> dict[str, Any]:
    # Prefill and decode move together: rollouts stay within 1% of each other with at most 10% of each
    # role down, and scale-ups advance in step once the new pods are scheduled.
    return {
        "name": "pd-coordination",
        "roles": [PREFILL_ROLE, DECODE_ROLE],
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
    roles = [_role(spec, FRONTEND_ROLE, 1, _frontend_patch(spec), None)]
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
    docs: list[dict[str, Any]] = []
    if disagg and spec.coordination == "policy":
        # The policy binds to the group of the same name and namespace (v1alpha2 moved coordination out of
        # the group; the CoordinatedPolicy API serves v1alpha1 groups too). It comes first, so the group's
        # first reconcile already finds it and the roles never start uncoordinated.
        docs.append({
            "apiVersion": f"{API_GROUP}/{POLICY_API_VERSION}",
            "kind": POLICY_KIND,
            "metadata": meta(name, spec.namespace, APP_LABELS),
            "spec": {"policies": [_coordination_rule()]},
        })
    group_meta = meta(name, spec.namespace, APP_LABELS)
    if spec.multinode:
        # A leader/worker group placed in part holds GPUs and never starts: RBG creates a PodGroup per group.
        group_meta["annotations"] = {GANG_SCHEDULING_ANNOTATION: "true"}
    docs.append({
        "apiVersion": f"{API_GROUP}/{spec.api_version}",
        "kind": GROUP_KIND,
        "metadata": group_meta,
        "spec": rbg_spec,
    })
    docs.append({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(frontend_service_name(name), spec.namespace, APP_LABELS),
        "spec": {
            "type": "ClusterIP",
            "selector": {GROUP_LABEL: name, ROLE_LABEL: FRONTEND_ROLE},
            "ports": [{"name": "http", "port": FRONTEND_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    })
    return docs
