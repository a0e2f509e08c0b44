"""The RoleBasedGroup (RBG, sgl-project/rbg) vocabulary: every name we share with the RBG controller.

One home for the strings both sides of the deployment must spell the same way: the manifest generator
(:mod:`deploy.render`) writes them into the YAML and the planner's RBG connector (:mod:`planner.rbg`) reads
and patches the objects they name. Checked against RBG v0.8.0-alpha.5's sources and the CRDs in
``tests/schemas/rbg-crds/`` (vendored).
"""

from __future__ import annotations

API_GROUP = "workloads.x-k8s.io"
# v1alpha1 is the shape of the seed's README, v1alpha2 the storage version.
API_VERSIONS = ("v1alpha1", "v1alpha2")
# Workloads, CoordinatedPolicy and the scaling adapter exist only in v1alpha2 (they serve v1alpha1 groups too).
POLICY_API_VERSION = "v1alpha2"

# Kinds and their REST resource names (the planner's API paths, the RBAC rules in manifests/planner/rbac.yml).
GROUP_KIND = "RoleBasedGroup"
POLICY_KIND = "CoordinatedPolicy"
# RBG's worker workload; the deprecated v1alpha1 InstanceSet is no longer reconciled by the v0.8 controller.
WORKLOAD_KIND = "RoleInstanceSet"
GROUP_RESOURCE = "rolebasedgroups"
ADAPTER_RESOURCE = "rolebasedgroupscalingadapters"
POLICY_RESOURCE = "coordinatedpolicies"
# A scaling adapter's status.phase once the controller has tied it to its role (NotBound before).
ADAPTER_BOUND = "Bound"

# Pod labels the current controller stamps (v1alpha1-era keys were rolebasedgroup.workloads.x-k8s.io/name|role).
GROUP_LABEL = "rbg.workloads.x-k8s.io/group-name"
ROLE_LABEL = "rbg.workloads.x-k8s.io/role-name"

# Group annotation: gang-schedule every role's pods (api/workloads/constants/annotation.go); RBG derives the
# per-RoleInstance gang annotation from it.
GANG_SCHEDULING_ANNOTATION = "rbg.workloads.x-k8s.io/group-gang-scheduling"

# Env RBG injects into every pod, and into each pod of a leader/worker group (RoleInstanceSet with a size).
GROUP_NAME_ENV = "RBG_GROUP_NAME"
LWP_LEADER_ADDRESS_ENV = "RBG_LWP_LEADER_ADDRESS"
LWP_WORKER_INDEX_ENV = "RBG_LWP_WORKER_INDEX"
LWP_GROUP_SIZE_ENV = "RBG_LWP_GROUP_SIZE"

# Role names of our groups.
FRONTEND_ROLE = "frontend"
PREFILL_ROLE = "prefill"
DECODE_ROLE = "decoder"
AGG_ROLE = "worker"
PLANNER_ROLE = "planner"
# Planner pool (planner.core's PREFILL / DECODE / AGG) -> the worker role that pool is.
POOL_ROLES = {"prefill": PREFILL_ROLE, "decode": DECODE_ROLE, "agg": AGG_ROLE}
ROLE_POOLS = {role: pool for pool, role in POOL_ROLES.items()}


def service_name(group: str, role: str) -> str:
    """The headless Service RBG creates for a role (StatefulSet and RoleInstanceSet workloads): its own name."""
    return f"s-{group}-{role}"


def legacy_service_name(group: str, role: str) -> str:
    """The name RBG treats as a role's legacy headless Service when a Service of that name exists: never
    give a generated Service this name (see ``deploy.render``)."""
    return f"{group}-{role}"


def adapter_name(group: str, role: str) -> str:
    """The RoleBasedGroupScalingAdapter RBG creates for a role with ``scalingAdapter.enable``."""
    return f"{group}-{role}"
