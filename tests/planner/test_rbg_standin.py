"""The ``rbg`` connector: every write it makes validates against the RBG CRD schemas (tests/schemas/rbg-crds).

No Kubernetes API server can run here, so its HTTP calls go to a STAND-IN: :class:`StandinApiServer`, a
small real HTTPS server on loopback (``http.server`` + a trustme CA) that serves what the connector uses
of the API (GET / JSON-patch a RoleBasedGroup, GET / merge-patch a RoleBasedGroupScalingAdapter's ``scale``
subresource, GET a CoordinatedPolicy), checks the bearer token, validates every object a write produces
against the CRD schema of the version in the URL (strict: unknown fields are errors) and refuses
``replicas`` edits of a role that has a scaling adapter, as RBG's webhook does. It is a stand-in, not
Kubernetes: ``manifests/planner/check-on-cluster.sh`` runs the same connector against a real cluster.
The objects come from the checked-in manifests under manifests/.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trustme
import yaml
from prometheus_client import generate_latest

from dynamo_rt.errors import InvalidRequest
from frontend.metrics import FrontendMetrics
from planner.connectors import Connector
from planner.core import DECODE, PREFILL, Planner, PlannerConfig, PoolLimits
from planner.kube import KubeApiError, KubeClient, in_cluster_config, kubeconfig_config, load_config
from planner.metrics import FrontendMetricsSource
from planner.profile import Profile
from planner.rbg import (
    RbgConnector,
    coordination_rules,
    find_role,
    parse_skew,
    ready_skew,
    replicas_patch,
    rule_for,
    scale_body,
)
from planner.runner import PlannerLoop
from planner.sla import decode_replicas, prefill_replicas
from tests.conftest import arun

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
CRDS = REPO / "tests" / "schemas" / "rbg-crds"  # vendored: tests/schemas/README.md
TOKEN = "standin-token-0123"
DISAGG = [MANIFESTS / b / v / "disagg.yaml" for b in ("vllm", "sglang", "trtllm") for v in ("", "v1alpha2")]
AGG = [MANIFESTS / b / v / "agg.yaml" for b in ("vllm", "sglang", "trtllm") for v in ("", "v1alpha2")]


# ---------------------------------------------------------------------------------------------------------
# Schemas


def _strict(schema: Any) -> Any:
    """Objects with ``properties`` reject unknown fields unless they preserve them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out


@functools.cache
def validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        if crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                return jsonschema.Draft7Validator(_strict(v["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD schema for {kind} {version}")


def schema_errors(obj: dict[str, Any]) -> list[str]:
    kind, version = obj["kind"], obj["apiVersion"].rsplit("/", 1)[1]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind, version).iter_errors(obj)]


def load_manifest(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    rbg = next(d for d in docs if d["kind"] == "RoleBasedGroup")
    policy = next((d for d in docs if d["kind"] == "CoordinatedPolicy"), None)
    return rbg, policy


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 test / replace / add on a copy (what the connector sends)."""
    out = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = out
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last: Any = int(parts[-1]) if isinstance(parent, list) else parts[-1]
        if op["op"] == "test":
            if parent[last] != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {parent[last]!r} != {op['value']!r}")
        elif op["op"] in ("replace", "add"):
            if op["op"] == "replace" and (last not in parent if isinstance(parent, dict) else last >= len(parent)):
                raise ValueError(f"replace of a missing path {op['path']}")
            parent[last] = op["value"]
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return out


def adapter_object(rbg: dict[str, Any], role: dict[str, Any]) -> dict[str, Any]:
    """The RoleBasedGroupScalingAdapter RBG creates for a role with ``scalingAdapter.enable``."""
    group = rbg["metadata"]["name"]
    return {"apiVersion": rbg["apiVersion"], "kind": "RoleBasedGroupScalingAdapter",
            "metadata": {"name": f"{group}-{role['name']}", "namespace": "default"},
            "spec": {"replicas": role.get("replicas", 1), "scaleTargetRef": {"name": group, "role": role["name"]}},
            # The adapter controller binds it to the role once both exist (phase NotBound before).
            "status": {"phase": "Bound"}}


# ---------------------------------------------------------------------------------------------------------
# Pure: the patches themselves


@pytest.mark.parametrize("path", DISAGG + AGG, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_patch_validates_against_the_crd(path: Path) -> None:
    rbg, policy = load_manifest(path)
    assert schema_errors(rbg) == []
    roles = ["prefill", "decoder"] if "disagg" in path.name else ["worker"]
    for targets in ({r: 0 for r in roles}, {r: 1 for r in roles}, {r: i + 3 for i, r in enumerate(roles)}):
        # Direct path (a group without adapters): one JSON patch, a name test before each replace.
        bare = copy.deepcopy(rbg)
        for r in bare["spec"]["roles"]:
            r.pop("scalingAdapter", None)
        ops = replicas_patch(bare, targets)
        assert [o["op"] for o in ops] == ["test", "replace"] * len(roles)
        patched = apply_json_patch(bare, ops)
        assert schema_errors(patched) == []
        assert {r: find_role(patched, r)[1]["replicas"] for r in roles} == targets
        # Adapter path: the scale subresource's spec.replicas lands in the adapter object.
        for role, n in targets.items():
            _, r = find_role(rbg, role)
            assert r["scalingAdapter"]["enable"] is True
            adapter = adapter_object(rbg, r)
            adapter["spec"].update(scale_body(n)["spec"])
            assert schema_errors(adapter) == []
    if policy is not None:
        assert schema_errors(policy) == []
        rule = rule_for(coordination_rules(rbg, policy), {"prefill", "decoder"})
        assert rule is not None and (rule.name, rule.max_skew, rule.progression) == (
            "pd-coordination", 0.05, "OrderScheduled")


def test_patch_guards_and_coordination_helpers() -> None:
    rbg, _ = load_manifest(MANIFESTS / "vllm" / "disagg.yaml")
    assert replicas_patch(rbg, {"decoder": 4}) == [
        {"op": "test", "path": "/spec/roles/2/name", "value": "decoder"},
        {"op": "replace", "path": "/spec/roles/2/replicas", "value": 4}]
    with pytest.raises(InvalidRequest, match="has no role 'decode'"):
        replicas_patch(rbg, {"decode": 1})
    with pytest.raises(InvalidRequest, match=">= 0"):
        replicas_patch(rbg, {"decoder": -1})
    # A reordered role list is refused by the test op, not applied to the wrong role.
    moved = copy.deepcopy(rbg)
    moved["spec"]["roles"].reverse()
    with pytest.raises(ValueError, match="test failed"):
        apply_json_patch(moved, replicas_patch(rbg, {"decoder": 4}))
    assert [parse_skew(v) for v in ("5%", "100%", 7, None, " 0% ")] == [0.05, 1.0, 0.07, 1.0, 0.0]
    inline = copy.deepcopy(rbg)
    inline["spec"]["coordination"] = [{"name": "pd", "roles": ["prefill", "decoder"],
                                       "strategy": {"scaling": {"maxSkew": "20%", "progression": "OrderReady"}}},
                                      {"name": "upd", "roles": ["prefill", "decoder"],
                                       "strategy": {"rollingUpdate": {"maxSkew": "1%"}}}]
    assert schema_errors(inline) == []
    rules = coordination_rules(inline, None)
    assert [(r.name, r.max_skew, r.progression) for r in rules] == [("pd", 0.2, "OrderReady")]
    assert rule_for(rules, {"prefill", "frontend"}) is None
    inline["status"] = {"roleStatuses": [
        {"name": "prefill", "readyReplicas": 1, "replicas": 2, "updatedReplicas": 2},
        {"name": "decoder", "readyReplicas": 1, "replicas": 1, "updatedReplicas": 1}]}
    assert ready_skew(inline, ("prefill", "decoder")) == 0.5


# ---------------------------------------------------------------------------------------------------------
# The stand-in API server


class StandinApiServer:
    """A loopback HTTPS stand-in for the parts of the Kubernetes API the rbg connector uses."""

    def __init__(self, tmp: Path, rbg: dict[str, Any], policy: dict[str, Any] | None) -> None:
        self.lock = threading.Lock()
        self.rbg = copy.deepcopy(rbg)
        self.version = rbg["apiVersion"].rsplit("/", 1)[1]
        self.group = rbg["metadata"]["name"]
        self.policy = copy.deepcopy(policy)
        self.adapters = {f"{self.group}-{r['name']}": adapter_object(rbg, r) for r in rbg["spec"]["roles"]
                         if (r.get("scalingAdapter") or {}).get("enable")}
        self.requests: list[tuple[str, str, str | None, Any]] = []  # method, path, content type, body
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = tmp / "standin-ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="standin-k8s", daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> StandinApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def replicas(self) -> dict[str, int]:
        return {r["name"]: r["replicas"] for r in self.rbg["spec"]["roles"]}

    # -- request handling

    def _route(self, method: str, path: str, ctype: str | None, body: Any) -> tuple[int, Any]:
        base = f"/apis/workloads.x-k8s.io/{self.version}/namespaces/default"
        if path == f"{base}/rolebasedgroups/{self.group}":
            if method == "GET":
                return 200, self.rbg
            if ctype != "application/json-patch+json":
                return 415, _status(415, f"unsupported patch type {ctype}")
            try:
                new = apply_json_patch(self.rbg, body)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return 422, _status(422, f"the patch did not apply: {exc}")
            for r_old, r_new in zip(self.rbg["spec"]["roles"], new["spec"]["roles"], strict=True):
                if (r_new.get("scalingAdapter") or {}).get("enable") and r_new["replicas"] != r_old["replicas"]:
                    return 422, _status(422, f"role {r_new['name']} is scaled by its scaling adapter")
            return self._commit_rbg(new)
        prefix = f"{base}/rolebasedgroupscalingadapters/"
        if method == "GET" and path.startswith(prefix) and "/" not in path[len(prefix):]:
            found = self.adapters.get(path[len(prefix):])
            return (200, found) if found is not None else (404, _status(404, f"{path} not found"))
        if path.startswith(prefix) and path.endswith("/scale"):
            name = path[len(prefix):-len("/scale")]
            adapter = self.adapters.get(name)
            if adapter is None:
                return 404, _status(404, f"rolebasedgroupscalingadapters {name} not found")
            if method == "PATCH":
                shape_ok = set(body) == {"spec"} and set(body["spec"]) == {"replicas"}
                if ctype != "application/merge-patch+json" or not shape_ok:
                    return 422, _status(422, f"unexpected scale patch {ctype} {body}")
                new_adapter = copy.deepcopy(adapter)
                new_adapter["spec"]["replicas"] = body["spec"]["replicas"]
                errs = schema_errors(new_adapter)
                if errs:
                    return 422, _status(422, f"adapter invalid: {errs}")
                self.adapters[name] = new_adapter
                # The controller carries the adapter's number into the role.
                new = copy.deepcopy(self.rbg)
                find_role(new, new_adapter["spec"]["scaleTargetRef"]["role"])[1]["replicas"] = body["spec"]["replicas"]
                code, out = self._commit_rbg(new)
                if code != 200:
                    return code, out
            a = self.adapters[name]
            return 200, {"apiVersion": "autoscaling/v1", "kind": "Scale",
                         "metadata": {"name": name, "namespace": "default"},
                         "spec": {"replicas": a["spec"]["replicas"]},
                         "status": {"replicas": a["spec"]["replicas"], "selector": ""}}
        if path == f"/apis/workloads.x-k8s.io/v1alpha2/namespaces/default/coordinatedpolicies/{self.group}":
            if self.policy is None:
                return 404, _status(404, f"coordinatedpolicies {self.group} not found")
            return 200, self.policy
        return 404, _status(404, f"no route {method} {path}")

    def _commit_rbg(self, new: dict[str, Any]) -> tuple[int, Any]:
        errs = schema_errors(new)
        if errs:
            return 422, _status(422, f"RoleBasedGroup invalid: {errs}")
        self.rbg = new
        return 200, new

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _do(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                ctype = self.headers.get("Content-Type")
                with srv.lock:
                    srv.requests.append((method, self.path, ctype, body))
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        code, out = 401, _status(401, "Unauthorized")
                    else:
                        code, out = srv._route(method, self.path, ctype, body)
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._do("GET")

            def do_PATCH(self) -> None:
                self._do("PATCH")

        return Handler


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(TOKEN + "\n")
    (d / "namespace").write_text("default\n")
    return d


def _in_cluster_client(server: StandinApiServer, sa_dir: Path) -> KubeClient:
    (sa_dir / "ca.crt").write_bytes(server.ca_file.read_bytes())
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    cfg = load_config(None, env, sa_dir)
    assert (cfg.server, cfg.namespace, cfg.source) == (server.url, "default", f"in-cluster ({sa_dir})")
    return KubeClient(cfg)


@pytest.fixture
def standin(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StandinApiServer]:
    rbg, policy = load_manifest(MANIFESTS / request.param)
    with StandinApiServer(tmp_path, rbg, policy) as s:
        yield s


# ---------------------------------------------------------------------------------------------------------
# The connector against the stand-in


@pytest.mark.parametrize("standin", ["vllm/disagg.yaml", "vllm/v1alpha2/disagg.yaml"], indirect=True)
def test_standin_scales_through_scaling_adapters(standin: StandinApiServer, sa_dir: Path) -> None:
    async def main() -> tuple[dict[str, int], dict[str, int]]:
        conn = RbgConnector(_in_cluster_client(standin, sa_dir), group="dynamo-pd", namespace="default",
                            pools=(PREFILL, DECODE), api_version=standin.version)
        before = await conn.current()
        await conn.apply({PREFILL: 4, DECODE: 2})
        await conn.apply({PREFILL: 4, DECODE: 2})  # nothing to change: no write
        after = await conn.current()
        await conn.close()
        return before, after

    before, after = arun(main())
    assert before == {PREFILL: 2, DECODE: 1} and after == {PREFILL: 4, DECODE: 2}
    assert standin.replicas() == {"frontend": 1, "prefill": 4, "decoder": 2, "planner": 1}
    writes = [(m, p, c, b) for m, p, c, b in standin.requests if m == "PATCH"]
    base = f"/apis/workloads.x-k8s.io/{standin.version}/namespaces/default/rolebasedgroupscalingadapters"
    # prefill is further from its target (+2) than the decoder (+1): it goes first.
    assert writes == [
        ("PATCH", f"{base}/dynamo-pd-prefill/scale", "application/merge-patch+json", {"spec": {"replicas": 4}}),
        ("PATCH", f"{base}/dynamo-pd-decoder/scale", "application/merge-patch+json", {"spec": {"replicas": 2}}),
    ]
    assert all(schema_errors(a) == [] for a in standin.adapters.values())


@pytest.mark.parametrize("standin", ["vllm/v1alpha2/disagg.yaml"], indirect=True)
def test_standin_writes_no_adapter_before_it_is_bound(standin: StandinApiServer, sa_dir: Path) -> None:
    """RBG ties an adapter to its role asynchronously (status.phase NotBound -> Bound): a number written to an
    unbound adapter would not reach the role, so the connector holds that role until the next round."""
    standin.adapters["dynamo-pd-prefill"]["status"]["phase"] = "NotBound"

    async def main() -> dict[str, int]:
        conn = RbgConnector(_in_cluster_client(standin, sa_dir), group="dynamo-pd", namespace="default",
                            pools=(PREFILL, DECODE), api_version=standin.version)
        await conn.apply({PREFILL: 4, DECODE: 2})
        standin.adapters["dynamo-pd-prefill"]["status"]["phase"] = "Bound"
        await conn.apply({PREFILL: 4, DECODE: 2})
        out = await conn.current()
        await conn.close()
        return out

    assert arun(main()) == {PREFILL: 4, DECODE: 2}
    base = f"/apis/workloads.x-k8s.io/{standin.version}/namespaces/default/rolebasedgroupscalingadapters"
    writes = [(m, p) for m, p, _c, _b in standin.requests if m == "PATCH"]
    # Round 1: the decoder only; round 2: prefill, now Bound.
    assert writes == [("PATCH", f"{base}/dynamo-pd-decoder/scale"), ("PATCH", f"{base}/dynamo-pd-prefill/scale")]


@pytest.mark.parametrize("standin", ["sglang/disagg.yaml"], indirect=True)
def test_standin_json_patch_without_adapters(standin: StandinApiServer, tmp_path: Path) -> None:
    for r in standin.rbg["spec"]["roles"]:
        r.pop("scalingAdapter", None)
    standin.adapters.clear()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "c", "cluster": {"server": standin.url,
                                               "certificate-authority": str(standin.ca_file)}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "standin", "context": {"cluster": "c", "user": "u", "namespace": "default"}}]}))

    async def main() -> dict[str, int]:
        conn = RbgConnector(KubeClient(kubeconfig_config(kubeconfig)), group="dynamo-pd", namespace="default",
                            pools=(PREFILL, DECODE), api_version=standin.version)
        await conn.apply({PREFILL: 3, DECODE: 0})
        got = await conn.current()
        await conn.close()
        return got

    assert arun(main()) == {PREFILL: 3, DECODE: 0}
    writes = [(p, c, b) for m, p, c, b in standin.requests if m == "PATCH"]
    assert writes == [("/apis/workloads.x-k8s.io/v1alpha1/namespaces/default/rolebasedgroups/dynamo-pd",
                       "application/json-patch+json",
                       [{"op": "test", "path": "/spec/roles/1/name", "value": "prefill"},
                        {"op": "replace", "path": "/spec/roles/1/replicas", "value": 3},
                        {"op": "test", "path": "/spec/roles/2/name", "value": "decoder"},
                        {"op": "replace", "path": "/spec/roles/2/replicas", "value": 0}])]
    assert standin.replicas() == {"frontend": 1, "prefill": 3, "decoder": 0, "planner": 1}


@pytest.mark.parametrize("standin", ["vllm/v1alpha2/disagg.yaml"], indirect=True)
def test_standin_order_ready_coordination_holds_until_the_rollout_catches_up(
        standin: StandinApiServer, sa_dir: Path) -> None:
    assert standin.policy is not None
    standin.policy["spec"]["policies"][0]["strategy"]["scaling"]["progression"] = "OrderReady"
    assert schema_errors(standin.policy) == []
    # RBG is still pacing the last change: prefill 1/2 ready, decoder 1/1.
    standin.rbg["status"] = {"roleStatuses": [
        {"name": "prefill", "readyReplicas": 1, "replicas": 2, "updatedReplicas": 2},
        {"name": "decoder", "readyReplicas": 1, "replicas": 1, "updatedReplicas": 1}]}

    async def main() -> list[int]:
        conn = RbgConnector(_in_cluster_client(standin, sa_dir), group="dynamo-pd", namespace="default",
                            pools=(PREFILL, DECODE), api_version="v1alpha2", rollout_timeout_s=3600)
        counts = []
        await conn.apply({PREFILL: 3, DECODE: 2})
        counts.append(len([r for r in standin.requests if r[0] == "PATCH"]))
        standin.rbg["status"]["roleStatuses"][0]["readyReplicas"] = 2  # caught up
        await conn.apply({PREFILL: 3, DECODE: 2})
        counts.append(len([r for r in standin.requests if r[0] == "PATCH"]))
        await conn.close()
        return counts

    assert arun(main()) == [0, 2]
    assert standin.replicas()["prefill"] == 3 and standin.replicas()["decoder"] == 2


@pytest.mark.parametrize("standin", ["vllm/v1alpha2/disagg.yaml"], indirect=True)
def test_standin_refusals(standin: StandinApiServer, sa_dir: Path, tmp_path: Path) -> None:
    (sa_dir / "ca.crt").write_bytes(standin.ca_file.read_bytes())
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(standin.port)}

    async def main() -> list[str]:
        out = []
        (sa_dir / "token").write_text("wrong")
        conn = RbgConnector(KubeClient(in_cluster_config(env, sa_dir)), group="dynamo-pd", namespace="default",
                            pools=(PREFILL, DECODE))
        try:
            await conn.current()
        except KubeApiError as exc:
            out.append(f"{exc.http_status} {exc.message.split(': ', 2)[-1]}")
        await conn.close()
        (sa_dir / "token").write_text(TOKEN)
        conn = RbgConnector(KubeClient(in_cluster_config(env, sa_dir)), group="dynamo-pd", namespace="default",
                            pools=(PREFILL, DECODE), roles={PREFILL: "prefill", DECODE: "decode"})
        try:
            await conn.current()
        except InvalidRequest as exc:
            out.append(exc.message)
        await conn.close()
        # An untrusted server certificate is a transport failure, not a silent success.
        bad = KubeClient(in_cluster_config(env, sa_dir))
        bad._http = httpx.AsyncClient(base_url=standin.url, verify=ssl.create_default_context())
        try:
            await bad.get("/version")
        except Exception as exc:  # the type is what is checked
            out.append(type(exc).__name__)
        await bad.close()
        return out

    assert arun(main()) == [
        "401 Unauthorized",
        "RoleBasedGroup dynamo-pd has no role 'decode' (roles: ['frontend', 'prefill', 'decoder', 'planner'])",
        "Unavailable",
    ]
    assert standin.replicas() == {"frontend": 1, "prefill": 2, "decoder": 1, "planner": 1}


@pytest.mark.parametrize("standin", ["vllm/v1alpha2/disagg.yaml"], indirect=True)
def test_standin_planner_loop_end_to_end(standin: StandinApiServer, sa_dir: Path) -> None:
    """The planner's loop: frontend metrics (a real FrontendMetrics registry, in-process) -> decision ->
    RBG writes on the stand-in."""
    fm = FrontendMetrics()
    clock = [0.0]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=generate_latest(fm.registry))

    def load(n: int) -> None:
        for _ in range(n):
            fm.input_tokens.labels("m").inc(1000)
            fm.ttft.labels("m").observe(0.1)
            fm.output_tokens.labels("m").inc(100)
            fm.duration.labels("m").observe(1.0)

    profile = Profile.load("mocker")
    cfg = PlannerConfig(ttft_target=0.3, itl_target=0.02, predictor="constant", scale_down_window_s=0,
                        correction=False, limits={PREFILL: PoolLimits(1, 6), DECODE: PoolLimits(1, 4)})

    async def main() -> list[dict[str, int]]:
        conn: Connector = RbgConnector(_in_cluster_client(standin, sa_dir), group="dynamo-pd",
                                       namespace="default", pools=(PREFILL, DECODE))
        src = FrontendMetricsSource(["http://frontend"], "m", client=httpx.AsyncClient(
            transport=httpx.MockTransport(handler)), clock=lambda: clock[0])
        loop = PlannerLoop(Planner(cfg, profile), src, conn, interval=1.0, clock=lambda: clock[0])
        await loop.start()
        seen = []
        for n in (40, 2):  # 40 req/s then 2 req/s of 1000 in / 100 out
            load(n)
            clock[0] += 1.0
            await loop.tick()
            seen.append(standin.replicas())
        await conn.close()
        return seen

    peak, quiet = arun(main())
    expect_p = prefill_replicas(40.0, 1000, profile, 0.3, max_utilization=cfg.max_utilization).replicas
    expect_d = decode_replicas(40.0, 100, profile, 0.02, isl=1000, max_utilization=cfg.max_utilization).replicas
    assert peak == {"frontend": 1, "prefill": min(6, expect_p), "decoder": min(4, expect_d),
                    "planner": 1}
    assert expect_p >= 3
    assert quiet == {"frontend": 1, "prefill": 1, "decoder": 1, "planner": 1}
    assert all(schema_errors(a) == [] for a in standin.adapters.values())
    assert schema_errors(standin.rbg) == []


@pytest.mark.parametrize("standin", ["vllm/v1alpha2/disagg.yaml"], indirect=True)
def test_standin_cli_apply_once(standin: StandinApiServer, tmp_path: Path) -> None:
    """What check-on-cluster.sh runs: ``dynamo-rt planner --connector rbg --apply-once`` with a kubeconfig
    holding a bearer token and inline CA data."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "planner",
        "clusters": [{"name": "c", "cluster": {
            "server": standin.url,
            "certificate-authority-data": base64.b64encode(standin.ca_file.read_bytes()).decode()}}],
        "users": [{"name": "planner", "user": {"token": TOKEN}}],
        "contexts": [{"name": "planner", "context": {"cluster": "c", "user": "planner", "namespace": "default"}}]}))

    def planner(setting: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dynamo_rt", "planner", "--connector", "rbg", "--kubeconfig", str(kubeconfig),
             "--rbg-name", "dynamo-pd", "--rbg-api-version", "v1alpha2", "--apply-once", setting,
             "--log-level", "warning"], cwd=REPO, capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "DYN_"))})

    shown = planner("show")
    assert (shown.returncode, shown.stdout) == (0, '{"prefill": 2, "decode": 1}\n'), shown.stderr
    done = planner("prefill=3,decode=2")
    assert (done.returncode, done.stdout) == (0, '{"prefill": 3, "decode": 2}\n'), done.stderr
    assert standin.replicas() == {"frontend": 1, "prefill": 3, "decoder": 2, "planner": 1}
    bad = planner("prefill=x")
    assert bad.returncode == 2 and "bad replica setting 'prefill=x'" in bad.stderr


@pytest.mark.parametrize("api", ["v1alpha1", "v1alpha2"])
def test_check_on_cluster_objects_validate(api: str) -> None:
    """The RoleBasedGroups check-on-cluster.sh creates are valid for the CRDs."""
    script = MANIFESTS / "planner" / "check-on-cluster.sh"
    text = script.read_text()
    fn = text[text.index("group() {"):text.index("\n}\n", text.index("group() {")) + 3]
    for adapter in ("true", "false"):
        out = subprocess.run(["bash", "-c", f"API={api}\n{fn}\ngroup g {adapter}"], capture_output=True, text=True,
                             check=True).stdout
        obj = yaml.safe_load(out)
        assert schema_errors(obj) == [], out
        assert [(r["name"], r["scalingAdapter"]["enable"]) for r in obj["spec"]["roles"]] == [
            ("prefill", adapter == "true"), ("decoder", adapter == "true")]
    rbac = list(yaml.safe_load_all((MANIFESTS / "planner" / "rbac.yml").read_text()))
    assert [d["kind"] for d in rbac] == ["ServiceAccount", "Role", "RoleBinding"]
    granted = {(res, verb) for rule in rbac[1]["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    # Every call the connector makes is granted.
    for need in [("rolebasedgroups", "get"), ("rolebasedgroups", "patch"), ("rolebasedgroupscalingadapters/scale",
                 "get"), ("rolebasedgroupscalingadapters/scale", "patch"), ("coordinatedpolicies", "get")]:
        assert need in granted
    assert not any(verb in ("delete", "create", "*") for _, verb in granted)
