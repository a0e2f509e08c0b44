"""One RBG vocabulary (``deploy.rbg``) for the manifest generator and the planner's RBG connector.

The planner role of a rendered group is started from its own command line, as RBG would start it (with
``RBG_GROUP_NAME`` set), and the connector it builds must name exactly the objects the render wrote: the
group and its API version, the worker roles and their scaling adapters, the CoordinatedPolicy, the frontend
role's Service; its API resources must be the ones manifests/planner/rbac.yml grants. A second check reads
the source: no module of ``deploy`` or ``planner`` but ``deploy/rbg.py`` spells an RBG name in its code.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.render import FRONTEND_PORT, build_documents
from deploy.spec import preset
from planner.rbg import RbgConnector
from planner.runner import make_connector, parse_args, planner_config

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "serving"

# The names RBG defines (RBG v0.8.0-alpha.5); only deploy/rbg.py may spell them in code.
RBG_STRINGS = ("workloads.x-k8s.io", "rolebasedgroups", "rolebasedgroupscalingadapters", "coordinatedpolicies",
               "RBG_GROUP_NAME", "RBG_LWP_", "rbg.workloads.x-k8s.io/")


def _kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig for an API server nobody calls: building the connector reads it, nothing connects."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": NAMESPACE}}]}))
    return path


def _planner_of(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[RbgConnector, Any]:
    """The connector the rendered planner role builds, started as RBG starts it."""
    (rbg,) = [d for d in docs if d["kind"] == "RoleBasedGroup"]
    (planner,) = [r for r in rbg["spec"]["roles"] if r["name"] == "planner"]
    patch = planner.get("templatePatch") or planner["standalonePattern"]["templateRef"]["patch"]
    args = patch["spec"]["containers"][0]["args"]
    assert args[0] == "planner"
    env = {"RBG_GROUP_NAME": rbg["metadata"]["name"]}  # what RBG injects into the pod
    ns = parse_args([*args[1:], "--kubeconfig", str(_kubeconfig(tmp_path))], env=env)
    conn = make_connector(ns, planner_config(ns), env=env)
    assert isinstance(conn, RbgConnector)
    return conn, ns


@pytest.mark.parametrize("api_version", ["v1alpha1", "v1alpha2"])
@pytest.mark.parametrize("mode", ["disagg", "agg"])
def test_planner_connector_names_what_the_render_wrote(api_version: str, mode: str, tmp_path: Path) -> None:
    spec = dataclasses.replace(preset("vllm", mode, api_version=api_version), name="pd-7", planner=True)
    docs = build_documents(spec)
    (rbg,) = [d for d in docs if d["kind"] == "RoleBasedGroup"]
    conn, ns = _planner_of(docs, tmp_path)
    rendered_roles = {r["name"]: r for r in rbg["spec"]["roles"]}
    worker_roles = [r["name"] for r in rbg["spec"]["roles"] if "scalingAdapter" in r]
    expected_workers = ["prefill", "decoder"] if mode == "disagg" else ["worker"]
    assert worker_roles == expected_workers

    # The group: its name (from RBG_GROUP_NAME), its API group and version.
    assert conn.group == rbg["metadata"]["name"] == "pd-7"
    assert conn.rbg_path == f"/apis/{rbg['apiVersion']}/namespaces/{NAMESPACE}/rolebasedgroups/pd-7"
    # Every pool the planner sizes is a rendered worker role with an adapter, and every such role is sized.
    assert sorted(conn.roles.values()) == sorted(worker_roles)
    assert all(rendered_roles[r]["scalingAdapter"] == {"enable": True} for r in conn.roles.values())
    # RBG names each role's adapter {group}-{role}; the connector patches exactly those.
    for role in worker_roles:
        assert conn.scale_path(role) == (f"/apis/{rbg['apiVersion']}/namespaces/{NAMESPACE}/"
                                         f"rolebasedgroupscalingadapters/pd-7-{role}/scale")
    # The CoordinatedPolicy it reads is the one rendered (same API group, version and name).
    policies = [d for d in docs if d["kind"] == "CoordinatedPolicy"]
    if mode == "disagg":
        (policy,) = policies
        assert conn.policy_path == (f"/apis/{policy['apiVersion']}/namespaces/{NAMESPACE}/coordinatedpolicies/"
                                    f"{policy['metadata']['name']}")
        assert policy["spec"]["policies"][0]["roles"] == [conn.roles["prefill"], conn.roles["decode"]]
    else:
        assert policies == []
    # It scrapes the frontend role's pods through the headless Service RBG creates for that role.
    assert "frontend" in rendered_roles
    assert ns.frontend_url == f"http://s-pd-7-frontend:{FRONTEND_PORT}"
    # Its paths use only the resources manifests/planner/rbac.yml grants, in the API group it grants.
    rbac = {d["kind"]: d for d in yaml.safe_load_all((REPO / "manifests" / "planner" / "rbac.yml").read_text())}
    granted = {(g, res) for rule in rbac["Role"]["rules"] for g in rule["apiGroups"] for res in rule["resources"]}
    paths = [conn.rbg_path, conn.policy_path, *(conn.scale_path(r) for r in worker_roles)]
    for path in paths:
        _, apis, group, _version, _ns, _name, resource, *rest = path.split("/")
        assert apis == "apis" and (group, "/".join([resource, *rest[1:]])) in granted, path


def _code_strings(path: Path) -> list[str]:
    """String constants in ``path``'s code (docstrings left out: they may name what the code does)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_rbg_names_are_spelled_once() -> None:
    sources = sorted([*(REPO / "deploy").glob("*.py"), *(REPO / "planner").glob("*.py")])
    assert REPO / "deploy" / "rbg.py" in sources
    spelled = {(p.relative_to(REPO).as_posix(), word) for p in sources for s in _code_strings(p)
               for word in RBG_STRINGS if word in s}
    assert {f for f, _ in spelled} == {"deploy/rbg.py"}, sorted(spelled)
    # ... and it spells every one of them.
    assert {w for _, w in spelled} == set(RBG_STRINGS)
