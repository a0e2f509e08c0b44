"""The ``rbg`` connector: sets the replicas of a RoleBasedGroup's worker roles on Kubernetes.

Pools map to roles (``prefill`` -> ``prefill``, ``decode`` -> ``decoder``, ``agg`` -> ``worker`` by default:
:data:`deploy.rbg.POOL_ROLES`, the names the manifest generator gives the roles; every RBG name comes from
:mod:`deploy.rbg`).
For each role the connector writes where RBG wants the number:

- the role enables a scaling adapter (``roles[].scalingAdapter.enable``): RBG created a
  RoleBasedGroupScalingAdapter ``{group}-{role}`` and refuses ``replicas`` edits on the group that disagree
  with it, so the connector patches the adapter's ``scale`` subresource (``{"spec": {"replicas": n}}``,
  a JSON merge patch), and only once the adapter's ``status.phase`` is ``Bound``: before that RBG's adapter
  controller has not tied it to the role, and a number written there would not reach the role;
- otherwise: one JSON patch on the group, ``test`` of ``/spec/roles/{i}/name`` (so a reordered role list
  is refused instead of resizing the wrong role) and ``replace`` of ``/spec/roles/{i}/replicas``; every role
  without an adapter goes into that one patch, so the API server applies them together.

Coordination: RBG paces coordinated roles itself (``spec.coordination`` in v1alpha1, a CoordinatedPolicy
named like the group in v1alpha2; rule ``strategy.scaling.{maxSkew,progression}``): scaling out, it grows
the roles in batches whose progress (current / desired) differs by at most ``maxSkew``. The connector
honours a rule that binds its roles by (1) writing every changed role of the group in the same step, the
adapters back to back, so the controller always sees both new targets; and (2) with ``progression:
OrderReady``, writing no new targets while the roles' ready progress still differs by more than
``maxSkew`` (the controller is still pacing the previous change; up to ``rollout_timeout_s``, after which
it writes anyway and says so).

The pure functions (:func:`replicas_patch`, :func:`scale_body`, :func:`coordination_rules`,
:func:`ready_skew`) are what the tests validate against the CRD schemas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deploy.rbg import (
    ADAPTER_BOUND,
    ADAPTER_RESOURCE,
    API_GROUP,
    GROUP_RESOURCE,
    POLICY_API_VERSION,
    POLICY_RESOURCE,
    POOL_ROLES,
    adapter_name,
)
from dynamo_rt.errors import InvalidRequest
from planner.core import Replicas
from planner.kube import JSON_PATCH, MERGE_PATCH, KubeApiError, KubeClient

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def find_role(rbg: Mapping[str, Any], role: str) -> tuple[int, dict[str, Any]]:
    roles = (rbg.get("spec") or {}).get("roles") or []
    for i, r in enumerate(roles):
        if isinstance(r, dict) and r.get("name") == role:
            return i, r
    name = (rbg.get("metadata") or {}).get("name", "?")
    raise InvalidRequest(f"RoleBasedGroup {name} has no role {role!r} (roles: "
                         f"{[r.get('name') for r in roles if isinstance(r, dict)]})")


def adapter_enabled(rbg: Mapping[str, Any], role: str) -> bool:
    _, r = find_role(rbg, role)
    return bool((r.get("scalingAdapter") or {}).get("enable", False))


def role_replicas(rbg: Mapping[str, Any], role: str) -> int:
    _, r = find_role(rbg, role)
    return int(r.get("replicas", 1))


def replicas_patch(rbg: Mapping[str, Any], targets: Mapping[str, int]) -> list[dict[str, Any]]:
    """A JSON patch setting ``roles[name].replicas`` for each ``{role: replicas}``, guarded by a name test."""
    ops: list[dict[str, Any]] = []
    for role, n in targets.items():
        if n < 0:
            raise InvalidRequest(f"replicas of role {role!r} must be >= 0 (got {n})")
        i, _ = find_role(rbg, role)
        ops.append({"op": "test", "path": f"/spec/roles/{i}/name", "value": role})
        ops.append({"op": "replace", "path": f"/spec/roles/{i}/replicas", "value": int(n)})
    return ops


def scale_body(replicas: int) -> dict[str, Any]:
    """The merge patch of a ``scale`` subresource (autoscaling/v1 Scale)."""
    if replicas < 0:
        raise InvalidRequest(f"replicas must be >= 0 (got {replicas})")
    return {"spec": {"replicas": int(replicas)}}


@dataclass(frozen=True, slots=True)
class ScalingRule:
    name: str
    roles: tuple[str, ...]
    max_skew: float  # fraction of the desired replicas, 0..1
    progression: str  # OrderScheduled | OrderReady


def parse_skew(value: Any) -> float:
    """``"5%"`` -> 0.05. An integer (v1alpha2 allows int-or-string) is read as percent, like the controller's
    percentage form; no value means no limit."""
    if value is None:
        return 1.0
    if isinstance(value, int | float):
        return max(0.0, min(1.0, float(value) / 100))
    s = str(value).strip()
    try:
        return max(0.0, min(1.0, float(s[:-1] if s.endswith("%") else s) / 100))
    except ValueError:
        raise InvalidRequest(f"maxSkew {value!r} is not a percentage") from None


def coordination_rules(rbg: Mapping[str, Any], policy: Mapping[str, Any] | None) -> list[ScalingRule]:
    """Scaling rules from the group's own ``spec.coordination`` (v1alpha1) and its CoordinatedPolicy."""
    raw: list[Any] = list((rbg.get("spec") or {}).get("coordination") or [])
    if policy:
        raw += list((policy.get("spec") or {}).get("policies") or [])
    out: list[ScalingRule] = []
    for rule in raw:
        if not isinstance(rule, dict):
            continue
        scaling = (rule.get("strategy") or {}).get("scaling")
        if not isinstance(scaling, dict):
            continue
        out.append(ScalingRule(str(rule.get("name", "")), tuple(rule.get("roles") or ()),
                               parse_skew(scaling.get("maxSkew")),
                               str(scaling.get("progression") or "OrderScheduled")))
    return out


def rule_for(rules: list[ScalingRule], roles: set[str]) -> ScalingRule | None:
    """The rule binding two or more of ``roles`` (the tightest skew if several do)."""
    hits = [r for r in rules if len(roles & set(r.roles)) >= 2]
    return min(hits, key=lambda r: r.max_skew) if hits else None


def ready_skew(rbg: Mapping[str, Any], roles: tuple[str, ...]) -> float:
    """Largest difference of ready progress (ready / desired) between ``roles``, from the group's status."""
    statuses = {s.get("name"): s for s in ((rbg.get("status") or {}).get("roleStatuses") or [])
                if isinstance(s, dict)}
    progress = []
    for role in roles:
        desired = role_replicas(rbg, role)
        ready = int((statuses.get(role) or {}).get("readyReplicas", 0))
        progress.append(1.0 if desired == 0 and ready == 0 else 0.0 if desired == 0 else min(1.0, ready / desired))
    return max(progress) - min(progress) if progress else 0.0


# ---------------------------------------------------------------------------------------------------------
# The connector


class RbgConnector:
    """Reads and writes the replicas of a RoleBasedGroup's worker roles (see the module docstring)."""

    name = "rbg"

    def __init__(self, client: KubeClient, *, group: str, namespace: str, pools: tuple[str, ...],
                 roles: Mapping[str, str] | None = None, api_version: str = "v1alpha2",
                 rollout_timeout_s: float = 300.0) -> None:
        self.client = client
        self.group = group
        self.namespace = namespace
        self.pools = pools
        self.roles = {p: (roles or POOL_ROLES)[p] for p in pools}
        self.api_version = api_version
        self.rollout_timeout_s = rollout_timeout_s
        self._held_since: float | None = None
        self._policy_readable = True
        self.writes: list[tuple[str, str, Any]] = []  # (method + path, content type, body) of each write

    # -- paths

    def _base(self, version: str | None = None) -> str:
        return f"/apis/{API_GROUP}/{version or self.api_version}/namespaces/{self.namespace}"

    @property
    def rbg_path(self) -> str:
        return f"{self._base()}/{GROUP_RESOURCE}/{self.group}"

    def adapter_path(self, role: str) -> str:
        return f"{self._base()}/{ADAPTER_RESOURCE}/{adapter_name(self.group, role)}"

    def scale_path(self, role: str) -> str:
        return f"{self.adapter_path(role)}/scale"

    @property
    def policy_path(self) -> str:
        return f"{self._base(POLICY_API_VERSION)}/{POLICY_RESOURCE}/{self.group}"

    # -- reads

    async def _policy(self) -> dict[str, Any] | None:
        if not self._policy_readable:
            return None
        try:
            return await self.client.get(self.policy_path)
        except KubeApiError as exc:
            if exc.http_status == 404:
                return None
            if exc.http_status == 403:
                log.warning("cannot read CoordinatedPolicy %s (%s): coordination from the group only",
                            self.group, exc)
                self._policy_readable = False
                return None
            raise

    async def _bound(self, role: str) -> bool:
        """The role's scaling adapter exists and RBG has bound it to the role."""
        try:
            adapter = await self.client.get(self.adapter_path(role))
        except KubeApiError as exc:
            if exc.http_status != 404:
                raise
            return False
        return bool((adapter.get("status") or {}).get("phase") == ADAPTER_BOUND)

    async def current(self) -> Replicas:
        return await self._replicas(await self.client.get(self.rbg_path))

    async def _replicas(self, rbg: Mapping[str, Any]) -> Replicas:
        out: Replicas = {}
        for pool, role in self.roles.items():
            if adapter_enabled(rbg, role):
                try:
                    scale = await self.client.get(self.scale_path(role))
                    out[pool] = int((scale.get("spec") or {}).get("replicas", 0))
                    continue
                except KubeApiError as exc:
                    if exc.http_status != 404:
                        raise
                    # The controller has not created the adapter yet: the role's own number stands.
            out[pool] = role_replicas(rbg, role)
        return out

    # -- writes

    async def apply(self, target: Mapping[str, int]) -> None:
        rbg = await self.client.get(self.rbg_path)
        now = await self._replicas(rbg)
        changed = {self.roles[p]: int(n) for p, n in target.items() if p in self.roles and now.get(p) != n}
        if not changed:
            return
        rule = rule_for(coordination_rules(rbg, await self._policy()), set(self.roles.values()))
        if rule is not None and rule.progression == "OrderReady":
            coordinated = tuple(r for r in rule.roles if r in self.roles.values())
            skew = ready_skew(rbg, coordinated)
            if skew > rule.max_skew + 1e-9:
                t = time.monotonic()
                if self._held_since is None:
                    self._held_since = t
                if t - self._held_since < self.rollout_timeout_s:
                    log.info("holding %s: coordinated roles %s are %.0f%% apart in ready progress (maxSkew "
                             "%.0f%%); RBG is still pacing the last change", changed, coordinated, skew * 100,
                             rule.max_skew * 100)
                    return
                log.warning("coordinated roles %s still %.0f%% apart after %.0fs: writing anyway", coordinated,
                            skew * 100, t - self._held_since)
        self._held_since = None
        direct = {r: n for r, n in changed.items() if not adapter_enabled(rbg, r)}
        via_adapter = {r: n for r, n in changed.items() if adapter_enabled(rbg, r)}
        if direct:
            ops = replicas_patch(rbg, direct)
            self.writes.append((f"PATCH {self.rbg_path}", JSON_PATCH, ops))
            await self.client.patch(self.rbg_path, ops, JSON_PATCH)
        unbound = [r for r in via_adapter if not await self._bound(r)]
        if unbound:
            held = {r: via_adapter.pop(r) for r in unbound}
            log.info("holding %s: the scaling adapters of %s are not Bound yet", held, unbound)
        # Growing: the role that is furthest behind its target first, so the pair never skews the other way.
        for role, n in sorted(via_adapter.items(), key=lambda kv: kv[1] - role_replicas(rbg, kv[0]), reverse=True):
            body = scale_body(n)
            self.writes.append((f"PATCH {self.scale_path(role)}", MERGE_PATCH, body))
            await self.client.patch(self.scale_path(role), body, MERGE_PATCH)
        log.info("RoleBasedGroup %s/%s: set %s%s", self.namespace, self.group, changed,
                 f" (coordinated by {rule.name!r}, maxSkew {rule.max_skew:.0%})" if rule else "")

    async def close(self) -> None:
        await self.client.close()
