"""The RBG manifests under manifests/: strict CRD validation, RBG admission rules, the generator, the seed's
kubectl commands, and that every container command line parses with our own CLI.

The CRD schemas are RBG v0.8.0-alpha.5's, vendored in tests/schemas/rbg-crds; the checks RBG does outside the schema
(CEL rules, its admission webhook, controller-side template validation) are repeated here from its sources.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deploy.catalog import catalog, check, render, write_all
from deploy.manifests import _suggest_input, add_arguments, main, spec_from_args
from deploy.rbg import GANG_SCHEDULING_ANNOTATION, GROUP_LABEL, ROLE_LABEL, legacy_service_name
from deploy.render import (
    CONTAINER_NAME,
    KV_HOST_TIER_ENGINES,
    LIVENESS_PATH,
    READINESS_PATH,
    ROLE_MODE,
    WORKER_METRICS_PORT,
    _coordination_rule,
    build_documents,
    frontend_service_name,
    worker_args,
    worker_memory_gib,
)
from deploy.spec import (
    BACKENDS,
    DEFAULT_ETCD_URL,
    DEFAULT_MODEL_PATH,
    DEFAULT_NATS_URL,
    DEFAULT_NODES,
    DEFAULT_SERVED_MODEL_NAME,
    VERSION,
    RoleShape,
    default_image,
    parse_tolerations,
    preset,
)
from deploy.suggest import Suggestion, suggest
from dynamo_rt.config import Parser
from dynamo_rt.errors import InvalidRequest

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
CRDS = REPO / "tests" / "schemas" / "rbg-crds"  # vendored: tests/schemas/README.md

# The command-line forms the manifests rely on; dynamo_rt.cli must accept every one of them.
FLAGS_RELIED_ON = {
    "frontend": ["--http-port", "--router-mode"],
    "worker": ["--engine", "--mode", "--model", "--served-model-name", "--tp", "--ep-size", "--nnodes",
               "--node-rank", "--dist-init-addr", "--metrics-port"],
    "planner": ["--connector", "--rbg-api-version", "--mode", "--model", "--frontend-url", "--frontend-resolve-all",
                "--profile", "--ttft-target", "--itl-target", "--adjustment-interval", "--min-prefill",
                "--max-prefill", "--min-decode", "--max-decode", "--metrics-port"],
}
# What RBG injects into leader/worker pods of a RoleInstanceSet (pkg/discovery/env_builder.go), with the
# values kubelet would substitute for $(VAR) in a second worker pod of replica 0.
RBG_LWP_ENV = {
    "RBG_LWP_LEADER_ADDRESS": "dynamo-pd-decoder-0-0.s-dynamo-pd-decoder.default",
    "RBG_LWP_WORKER_INDEX": "1",
    "RBG_LWP_GROUP_SIZE": "2",
}
# Workload types the v0.8 controller reconciles (pkg/reconciler/workload_reconciler.go).
SUPPORTED_WORKLOADS = {"apps/v1/Deployment", "apps/v1/StatefulSet", "leaderworkerset.x-k8s.io/v1/LeaderWorkerSet",
                       "workloads.x-k8s.io/v1alpha2/RoleInstanceSet"}
# Strategic-merge patch keys of the PodSpec lists our patches touch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}

RBG_FILES = sorted(p for p in MANIFESTS.rglob("*.yaml") if p.parent.name != "deps")
DISAGG_FILES = [p for p in RBG_FILES if p.stem == "disagg"]


# ---------------------------------------------------------------------------------------------------------
# Schemas


def strict(schema: Any) -> Any:
    """Copy of an OpenAPI schema where objects with ``properties`` reject unknown fields (unless the schema
    says it preserves them), walking only schema positions so a field named "properties" is safe."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    return out


def partial(schema: Any) -> Any:
    """Copy of a schema with ``required`` dropped except list-item names: what a strategic-merge patch of
    that type may look like (partial, but still no unknown fields)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k != "required"}
    if "required" in schema and "name" in schema["required"]:
        out["required"] = ["name"]
    for key in ("properties",):
        if key in out:
            out[key] = {k: partial(v) for k, v in out[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = partial(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [partial(s) for s in out[key]]
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, version) -> raw openAPIV3Schema."""
    out = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        for version in crd["spec"]["versions"]:
            out[(crd["spec"]["names"]["kind"], version["name"])] = version["schema"]["openAPIV3Schema"]
    assert out, f"no RBG CRD under {CRDS}"
    return out


@functools.cache
def validator(kind: str, version: str, strict_mode: bool = True) -> jsonschema.Draft7Validator:
    schema = crd_schemas()[(kind, version)]
    return jsonschema.Draft7Validator(strict(schema) if strict_mode else schema)


@functools.cache
def template_validator(version: str, patch: bool) -> jsonschema.Draft7Validator:
    """The PodTemplateSpec schema of roleTemplates[].template, strict; for patches also partial."""
    spec = crd_schemas()[("RoleBasedGroup", version)]["properties"]["spec"]
    tmpl = spec["properties"]["roleTemplates"]["items"]["properties"]["template"]
    return jsonschema.Draft7Validator(strict(partial(tmpl) if patch else tmpl))


def errors_of(v: jsonschema.Draft7Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


# ---------------------------------------------------------------------------------------------------------
# Helpers


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def group_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == "RoleBasedGroup"]
    return doc


def rbg_of(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in load(path) if d["kind"] == "RoleBasedGroup"]
    return doc


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """Kubernetes strategic merge for the PodTemplateSpec fields our patches use."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out_list = copy.deepcopy(base)
        for item in patch:
            match = [i for i, b in enumerate(out_list) if b.get(mk) == item.get(mk)]
            if match:
                out_list[match[0]] = merge(out_list[match[0]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def template_ref_and_patch(role: dict[str, Any], version: str) -> tuple[str | None, Any]:
    if version == "v1alpha1":
        return (role.get("templateRef") or {}).get("name"), role.get("templatePatch")
    pattern = role.get("standalonePattern") or role.get("leaderWorkerPattern") or {}
    ref = pattern.get("templateRef") or {}
    return ref.get("name"), ref.get("patch")


def group_size(role: dict[str, Any], version: str) -> int:
    if version == "v1alpha1":
        return int((role.get("leaderWorkerSet") or {}).get("size", 1))
    return int((role.get("leaderWorkerPattern") or {}).get("size", 1))


def effective_templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Role name -> the PodTemplateSpec the controller builds (referenced template + patch)."""
    version = doc["apiVersion"].split("/")[1]
    templates = {t["name"]: t["template"] for t in doc["spec"].get("roleTemplates", [])}
    out = {}
    for role in doc["spec"]["roles"]:
        ref, patch = template_ref_and_patch(role, version)
        assert ref is not None, f"{role['name']}: every role of ours uses the shared template"
        out[role["name"]] = merge(templates[ref], patch or {})
    return out


def int_or_percent(value: Any, replicas: int, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    pct = int(str(value).rstrip("%"))
    scaled = pct * replicas / 100
    return int(-(-scaled // 1)) if round_up else int(scaled)


def admission_problems(doc: dict[str, Any]) -> list[str]:
    """RBG's checks outside the schema: CEL rules, the admission webhook, controller template validation."""
    version = doc["apiVersion"].split("/")[1]
    spec = doc["spec"]
    problems = []
    template_names = {t["name"] for t in spec.get("roleTemplates", [])}
    names = [r["name"] for r in spec["roles"]]
    if len(set(names)) != len(names):
        problems.append("role names repeat")
    for i, role in enumerate(spec["roles"]):
        where = f"roles[{i}] ({role['name']})"
        ref, patch = template_ref_and_patch(role, version)
        if version == "v1alpha1":
            kind = (role.get("workload") or {}).get("kind", "StatefulSet")
            wt = "{}/{}".format(*((role.get("workload") or {}).get(k, d) for k, d in
                                  (("apiVersion", "apps/v1"), ("kind", "StatefulSet"))))
            if wt not in SUPPORTED_WORKLOADS:
                problems.append(f"{where}: workload {wt} is not reconciled by RBG v0.8")
            if "templateRef" in role and kind in ("InstanceSet", "LeaderWorkerSet"):
                problems.append(f"{where}: templateRef is not supported for {kind} workloads")
            if ("template" in role) == ("templateRef" in role) and kind != "InstanceSet":
                problems.append(f"{where}: exactly one of template / templateRef")
            if "templateRef" in role and not role.get("templatePatch"):
                problems.append(f"{where}: templatePatch is required with templateRef")
        else:
            if "standalonePattern" in role and "leaderWorkerPattern" in role:
                problems.append(f"{where}: standalonePattern and leaderWorkerPattern are mutually exclusive")
            pattern = role.get("standalonePattern") or role.get("leaderWorkerPattern")
            if pattern is None:
                problems.append(f"{where}: no pattern")
            elif ("template" in pattern) == ("templateRef" in pattern):
                problems.append(f"{where}: exactly one of template / templateRef")
            elif ref is not None and patch is None:
                problems.append(f"{where}: templateRef.patch is required (use {{}} for none)")
        if ref is not None and ref not in template_names:
            problems.append(f"{where}: template {ref!r} not in roleTemplates")
        ru = (role.get("rolloutStrategy") or {}).get("rollingUpdate")
        replicas = role["replicas"]
        if ru is not None and replicas > 0:
            surge = int_or_percent(ru.get("maxSurge", 0), replicas, True)
            unavailable = int_or_percent(ru.get("maxUnavailable", 1), replicas, False)
            if surge == 0 and unavailable == 0:
                problems.append(f"{where}: maxSurge and maxUnavailable cannot both be 0")
            if "partition" in ru and int_or_percent(ru["partition"], replicas, True) >= replicas:
                problems.append(f"{where}: partition must be less than replicas")
    for rule in spec.get("coordination", []):
        for r in rule["roles"]:
            if r not in names:
                problems.append(f"coordination {rule['name']}: unknown role {r}")
    return problems


def json_pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    """Parent container and final key of an RFC 6901 pointer that must already exist."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last: str | int = int(parts[-1]) if isinstance(node, list) else parts[-1]
    node[last]  # KeyError / IndexError: a JSON-patch replace or remove on this path fails too
    return node, last


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    out = copy.deepcopy(doc)
    for op in ops:
        parent, key = json_pointer(out, op["path"])
        if op["op"] == "replace":
            parent[key] = op["value"]
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise AssertionError(op)
    return out


def cli_parser() -> argparse.ArgumentParser:
    from dynamo_rt import cli

    parser: argparse.ArgumentParser = cli.build_parser()
    return parser


def substitute(arg: str) -> str:
    """Kubelet's $(VAR) expansion with the values RBG injects into leader/worker pods."""
    def one(mo: re.Match[str]) -> str:
        assert mo.group(1) in RBG_LWP_ENV, f"$({mo.group(1)}) is not injected by RBG"
        return RBG_LWP_ENV[mo.group(1)]
    return re.sub(r"\$\(([A-Z0-9_]+)\)", one, arg)


def frontend_routes() -> set[str]:
    """Paths of the GET routes frontend/app.py declares (read from its source, no app built)."""
    path = REPO / "frontend" / "app.py"
    routes = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "get"
                        and dec.args and isinstance(dec.args[0], ast.Constant)):
                    routes.add(dec.args[0].value)
    return routes


def containers_by_role(path: Path) -> dict[str, dict[str, Any]]:
    return {name: t["spec"]["containers"][0] for name, t in effective_templates(rbg_of(path)).items()}


# ---------------------------------------------------------------------------------------------------------
# Tests: schema and admission


def test_catalog_files_exist() -> None:
    # 3 backends x 4 topologies x 2 API versions
    assert len(RBG_FILES) == 24
    for backend in BACKENDS:
        for stem in ("agg", "agg-multinode", "disagg", "disagg-multinode"):
            assert (MANIFESTS / backend / f"{stem}.yaml").is_file()
            assert (MANIFESTS / backend / "v1alpha2" / f"{stem}.yaml").is_file()


@pytest.mark.parametrize("path", RBG_FILES, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_documents_validate_strictly(path: Path) -> None:
    docs = load(path)
    kinds = [d["kind"] for d in docs]
    version = "v1alpha2" if path.parent.name == "v1alpha2" else "v1alpha1"
    disagg = path.stem.startswith("disagg")
    # The policy first: the group's first reconcile must find it (else the roles start uncoordinated).
    expected = (["CoordinatedPolicy"] if disagg else []) + ["RoleBasedGroup"]
    assert kinds == [*expected, "Service"]
    for doc in docs:
        if doc["kind"] == "Service":
            continue
        # CoordinatedPolicy exists only as v1alpha2; it coordinates v1alpha1 groups all the same.
        doc_version = version if doc["kind"] == "RoleBasedGroup" else "v1alpha2"
        assert doc["apiVersion"] == f"workloads.x-k8s.io/{doc_version}"
        assert errors_of(validator(doc["kind"], doc_version), doc) == []
    rbg = rbg_of(path)
    assert admission_problems(rbg) == []
    # Coordination is the CoordinatedPolicy bound by name, in both versions (see deploy.spec.COORDINATION_STYLES).
    assert "coordination" not in rbg["spec"]
    for doc in docs:
        if doc["kind"] == "CoordinatedPolicy":
            assert doc["metadata"]["name"] == rbg["metadata"]["name"]
            roles = {r["name"] for r in rbg["spec"]["roles"]}
            assert all(set(p["roles"]) <= roles for p in doc["spec"]["policies"])


@pytest.mark.parametrize("path", RBG_FILES, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_patches_and_effective_pod_templates_validate(path: Path) -> None:
    """templatePatch / templateRef.patch are preserve-unknown in the CRD: check them against the
    PodTemplateSpec schema (partial but strict), then the merged template (complete and strict)."""
    rbg = rbg_of(path)
    version = rbg["apiVersion"].split("/")[1]
    for role in rbg["spec"]["roles"]:
        _, patch = template_ref_and_patch(role, version)
        assert errors_of(template_validator(version, True), patch) == [], role["name"]
    for name, tmpl in effective_templates(rbg).items():
        assert errors_of(template_validator(version, False), tmpl) == [], name
        (container,) = tmpl["spec"]["containers"]
        assert container["name"] == CONTAINER_NAME
        backend = path.parts[-2 if version == "v1alpha1" else -3]
        worker = name not in ("frontend", "planner")
        # Workers run the engine's image with the model; frontend and planner the cpu image without it.
        assert container["image"] == default_image(backend if worker else "cpu"), name
        assert container["command"] == ["dynamo-rt"]
        mounts = {vm["name"]: vm["mountPath"] for vm in container.get("volumeMounts", [])}
        volumes = {v["name"] for v in tmpl["spec"].get("volumes", [])}
        assert set(mounts) <= volumes
        if worker:
            assert mounts["model"] == DEFAULT_MODEL_PATH
        else:
            assert "model" not in mounts and "model" not in volumes, name


def test_strict_check_catches_typos() -> None:
    rbg = rbg_of(MANIFESTS / "sglang" / "disagg.yaml")
    # An unknown field in a role: the CRD as published accepts it (no additionalProperties), we do not.
    bad = copy.deepcopy(rbg)
    bad["spec"]["roles"][1]["replica"] = 3
    assert errors_of(validator("RoleBasedGroup", "v1alpha1", False), bad) == []
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), bad) == [
        "spec/roles/1: Additional properties are not allowed ('replica' was unexpected)"]
    # Deep inside the shared PodTemplateSpec.
    bad = copy.deepcopy(rbg)
    bad["spec"]["roleTemplates"][0]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), bad) == [
        "spec/roleTemplates/0/template/spec/containers/0: Additional properties are not allowed "
        "('imagee' was unexpected)"]
    # In a patch (preserve-unknown in the CRD): caught by the partial PodTemplateSpec check.
    patch = copy.deepcopy(rbg["spec"]["roles"][2]["templatePatch"])
    patch["spec"]["containers"][0]["arg"] = ["x"]
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), rbg) == []
    assert errors_of(template_validator("v1alpha1", True), patch) == [
        "spec/containers/0: Additional properties are not allowed ('arg' was unexpected)"]
    # A wrong type and a bad enum are schema errors too.
    bad = build_documents(dataclasses.replace(preset("sglang", "disagg"), coordination="inline"))[0]
    bad["spec"]["coordination"][0]["strategy"]["scaling"]["progression"] = "OrderScheduledd"
    assert len(errors_of(validator("RoleBasedGroup", "v1alpha1"), bad)) == 1


def test_admission_rules_are_checked() -> None:
    rbg = rbg_of(MANIFESTS / "sglang" / "disagg.yaml")
    bad = copy.deepcopy(rbg)
    bad["spec"]["roles"][1]["rolloutStrategy"]["rollingUpdate"]["partition"] = 2  # prefill has 2 replicas
    assert admission_problems(bad) == ["roles[1] (prefill): partition must be less than replicas"]
    bad = copy.deepcopy(rbg)
    bad["spec"]["roles"][1]["workload"] = {"apiVersion": "workloads.x-k8s.io/v1alpha1", "kind": "InstanceSet"}
    assert admission_problems(bad) == [
        "roles[1] (prefill): workload workloads.x-k8s.io/v1alpha1/InstanceSet is not reconciled by RBG v0.8",
        "roles[1] (prefill): templateRef is not supported for InstanceSet workloads"]


# ---------------------------------------------------------------------------------------------------------
# Tests: generator


def test_checked_in_files_are_the_generator_output() -> None:
    assert check(MANIFESTS) == []
    assert catalog() == catalog()  # deterministic


def test_check_reports_drift_and_write_all_repairs(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    assert len(write_all(root)) == 26
    assert check(root) == []
    (root / "vllm" / "agg.yaml").write_text("changed\n")
    (root / "vllm" / "extra.yaml").write_text("x: 1\n")
    (root / "deps" / "nats.yaml").unlink()
    assert check(root) == [
        "vllm/agg.yaml: differs from the generator's output",
        "deps/nats.yaml: missing",
        "vllm/extra.yaml: not produced by the generator (stale?)",
    ]
    assert [p.relative_to(root).as_posix() for p in write_all(root)] == ["vllm/agg.yaml", "deps/nats.yaml"]


def _parser() -> Parser:
    p = Parser(env={})
    add_arguments(p)
    return p


def test_main_check_write_and_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "m"
    assert main(_parser().parse_args(["--write-all", "--root", str(root)])) == 0
    assert main(_parser().parse_args(["--check", "--root", str(root)])) == 0
    assert capsys.readouterr().out.endswith("26 files under " + str(root) + " match the generator\n")
    (root / "sglang" / "disagg.yaml").write_text("")
    assert main(_parser().parse_args(["--check", "--root", str(root)])) == 1
    out = tmp_path / "x.yaml"
    args = ["--backend", "vllm", "--mode", "disagg", "--decode-tp", "4", "--decode-ep", "1", "--name", "pd",
            "--output", str(out)]
    assert main(_parser().parse_args(args)) == 0
    text = out.read_text()
    assert text.splitlines()[2] == ("# This file: dynamo-rt manifests --backend vllm --mode disagg --name pd "
                                    "--decode-tp 4 --decode-ep 1")
    decoder = containers_by_role(out)["decoder"]
    assert decoder["args"][decoder["args"].index("--tp") + 1] == "4"
    assert "--ep-size" not in decoder["args"]
    assert decoder["resources"]["limits"] == {"nvidia.com/gpu": "4", "rdma/hca": "1", "memory": "128Gi"}
    # The checked-in file's own header command reproduces it.
    same = tmp_path / "same.yaml"
    assert main(_parser().parse_args(["--backend", "sglang", "--mode", "disagg", "--output", str(same)])) == 0
    assert same.read_text() == (MANIFESTS / "sglang" / "disagg.yaml").read_text()


@pytest.mark.parametrize("path", sorted(MANIFESTS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_header_command_reproduces_the_file(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = path.read_text().splitlines()[2]
    prefix = "# This file: dynamo-rt manifests "
    assert line.startswith(prefix)
    assert main(_parser().parse_args(line[len(prefix):].split())) == 0
    assert capsys.readouterr().out == path.read_text()


def test_bad_inputs_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_parser().parse_args(["--mode", "agg"])) == 2
    assert capsys.readouterr().err == "dynamo-rt manifests: --backend and --mode are required to render a " \
                                      "RoleBasedGroup\n"
    assert main(_parser().parse_args(["--backend", "vllm", "--mode", "agg", "--prefill-tp", "2"])) == 2
    assert "do not apply to --mode agg" in capsys.readouterr().err
    assert main(_parser().parse_args(["--backend", "vllm", "--mode", "agg", "--partition", "1"])) == 2
    assert capsys.readouterr().err == "dynamo-rt manifests: worker: partition 1 must be < replicas 1\n"
    with pytest.raises(InvalidRequest, match="does not split evenly"):
        build_documents(preset("sglang", "agg", multinode=True, nodes=3).__class__(
            backend="sglang", mode="agg", roles=(("worker", RoleShape(replicas=1, tp=8, nodes=3)),)))


def test_inline_coordination_is_the_seeds_shape() -> None:
    """--coordination inline writes the seed's v1alpha1 spec.coordination: valid for the CRD (the seed's
    `progressionStrategy` is not), and refused for v1alpha2, which has no such field."""
    spec = dataclasses.replace(preset("vllm", "disagg"), coordination="inline")
    docs = build_documents(spec)
    assert [d["kind"] for d in docs] == ["RoleBasedGroup", "Service"]
    rbg = docs[0]
    assert rbg["spec"]["coordination"] == [_coordination_rule()]
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), rbg) == []
    assert admission_problems(rbg) == []
    seed = copy.deepcopy(rbg)
    seed["spec"]["coordination"][0]["strategy"]["scaling"] = {"maxSkew": "5%",
                                                              "progressionStrategy": "OrderScheduled"}
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), seed) == [
        "spec/coordination/0/strategy/scaling: Additional properties are not allowed "
        "('progressionStrategy' was unexpected)"]
    with pytest.raises(InvalidRequest, match="only in v1alpha1"):
        build_documents(dataclasses.replace(spec, api_version="v1alpha2"))


def test_version_matches_pyproject() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert VERSION == meta["project"]["version"]


# ---------------------------------------------------------------------------------------------------------
# Tests: what the seed README promises


def test_seed_topology_disagg() -> None:
    for backend in BACKENDS:
        for version_dir in ("", "v1alpha2"):
            path = MANIFESTS / backend / version_dir / "disagg.yaml"
            rbg = rbg_of(path)
            assert rbg["metadata"]["name"] == "dynamo-pd"
            roles = rbg["spec"]["roles"]
            # roles/1 is prefill: the seed's partition patch targets it. The planner comes last.
            assert [r["name"] for r in roles] == ["frontend", "prefill", "decoder", "planner"]
            assert [r["replicas"] for r in roles] == [1, 2, 1, 1]
            assert rbg["spec"]["roleTemplates"][0]["name"] == "dynamo-common"
            c = containers_by_role(path)
            assert c["prefill"]["args"][c["prefill"]["args"].index("--tp") + 1] == "4"
            # memory: 24 GiB engine host memory per GPU + 32 GiB /dev/shm (no KV host tier for these engines).
            assert c["prefill"]["resources"]["limits"] == {"nvidia.com/gpu": "4", "rdma/hca": "1", "memory": "128Gi"}
            assert c["decoder"]["args"][c["decoder"]["args"].index("--ep-size") + 1] == "8"
            assert c["decoder"]["resources"]["limits"] == {"nvidia.com/gpu": "8", "rdma/hca": "1", "memory": "224Gi"}
            assert "resources" not in c["frontend"] or "nvidia.com/gpu" not in str(c["frontend"]["resources"])
            for role in roles[1:3]:
                assert role["rolloutStrategy"]["rollingUpdate"]["type"] == "InPlaceIfPossible"
                assert role["scalingAdapter"] == {"enable": True}
            assert "scalingAdapter" not in roles[3] and "rolloutStrategy" not in roles[3]
            if not version_dir:
                assert {r["workload"]["kind"] for r in roles} == {"RoleInstanceSet"}
            (policy,) = [d for d in load(path) if d["kind"] == "CoordinatedPolicy"]
            assert policy["metadata"]["name"] == "dynamo-pd"
            (rule,) = policy["spec"]["policies"]
            assert rule == {"name": "pd-coordination", "roles": ["prefill", "decoder"], "strategy": {
                "rollingUpdate": {"maxSkew": "1%", "maxUnavailable": "10%"},
                "scaling": {"maxSkew": "5%", "progression": "OrderScheduled"}}}


def test_agg_topology() -> None:
    for path in [p for p in RBG_FILES if p.stem.startswith("agg")]:
        rbg = rbg_of(path)
        assert rbg["metadata"]["name"] == "dynamo-agg"
        assert [r["name"] for r in rbg["spec"]["roles"]] == ["frontend", "worker"]
        assert "coordination" not in rbg["spec"]
        assert containers_by_role(path)["worker"]["args"][:5] == ["worker", "--engine", path.parts[-2]
                                                                  if path.parent.name != "v1alpha2"
                                                                  else path.parts[-3], "--mode", "agg"]


@pytest.mark.parametrize("path", [p for p in RBG_FILES if p.stem.endswith("multinode")],
                         ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_multinode_roles(path: Path) -> None:
    rbg = rbg_of(path)
    version = rbg["apiVersion"].split("/")[1]
    containers = containers_by_role(path)
    multi = [r for r in rbg["spec"]["roles"] if group_size(r, version) > 1]
    assert [r["name"] for r in multi] == (["decoder"] if path.stem.startswith("disagg") else ["worker"])
    for role in multi:
        size = group_size(role, version)
        assert size == DEFAULT_NODES
        args = [substitute(a) for a in containers[role["name"]]["args"]]
        tp = int(args[args.index("--tp") + 1])
        gpus = int(containers[role["name"]]["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus * size == tp
        assert int(args[args.index("--nnodes") + 1]) == size
        assert args[args.index("--dist-init-addr") + 1] == RBG_LWP_ENV["RBG_LWP_LEADER_ADDRESS"] + ":29500"
        assert containers[role["name"]]["resources"]["limits"]["rdma/hca"] == "1"
        if version == "v1alpha1":
            # RoleInstanceSet runs the leader/worker pattern and accepts templateRef (LeaderWorkerSet does not).
            assert role["workload"] == {"apiVersion": "workloads.x-k8s.io/v1alpha2", "kind": "RoleInstanceSet"}


def _seed_patches(image: str, partition: int) -> list[list[dict[str, Any]]]:
    return [
        [{"op": "replace", "path": "/spec/roleTemplates/0/template/spec/containers/0/image", "value": image}],
        [{"op": "replace", "path": "/spec/roles/1/rolloutStrategy/rollingUpdate/partition", "value": partition}],
        [{"op": "remove", "path": "/spec/roles/1/rolloutStrategy/rollingUpdate/partition"}],
    ]


@pytest.mark.parametrize("path", DISAGG_FILES + [p for p in RBG_FILES if p.stem == "agg"],
                         ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_seed_kubectl_patch_paths_resolve(path: Path) -> None:
    rbg = rbg_of(path)
    version = rbg["apiVersion"].split("/")[1]
    replicas = rbg["spec"]["roles"][1]["replicas"]
    doc = rbg
    for ops in _seed_patches("registry.example/dynamo-rt:0.2.0-x", replicas - 1):
        doc = json_patch(doc, ops)
        assert errors_of(validator("RoleBasedGroup", version), doc) == []
        assert admission_problems(doc) == []
    assert effective_templates(doc)["prefill" if "prefill" in effective_templates(doc) else "worker"][
        "spec"]["containers"][0]["image"] == "registry.example/dynamo-rt:0.2.0-x"
    # Every worker role takes its image from roleTemplates/0, so the one patch updates them all; frontend and
    # planner keep the cpu image.
    images = {r: t["spec"]["containers"][0]["image"] for r, t in effective_templates(doc).items()}
    assert {i for r, i in images.items() if r not in ("frontend", "planner")} == {"registry.example/dynamo-rt:0.2.0-x"}
    assert {i for r, i in images.items() if r in ("frontend", "planner")} == {default_image("cpu")}
    # The seed's in-place example says /spec/roleTemplate/0/... (singular): no such field.
    with pytest.raises(KeyError):
        json_pointer(rbg, "/spec/roleTemplate/0/template/spec/containers/0/image")


def test_readme_commands_match_the_files() -> None:
    readme = (MANIFESTS / "README.md").read_text()
    # Label selectors use the keys the controller stamps (api/workloads/constants/label.go).
    selectors = re.findall(r"-l\s+'?([^\s']+)", readme)
    assert selectors
    for sel in selectors:
        for term in sel.split(","):
            assert term.split("=")[0] in (GROUP_LABEL, ROLE_LABEL), term
    # Every JSON-patch path the README uses resolves on the disagg files it is written for.
    paths = re.findall(r'"path":\s*"([^"]+)"', readme)
    assert "/spec/roleTemplates/0/template/spec/containers/0/image" in paths
    assert "/spec/roles/1/rolloutStrategy/rollingUpdate/partition" in paths
    for path in DISAGG_FILES:
        for p in paths:
            json_pointer(rbg_of(path), p)
    # Partition values the README patches in stay below the prefill replica count (webhook rule).
    for value in re.findall(r'"path":\s*"/spec/roles/1/rolloutStrategy/rollingUpdate/partition",\s*'
                            r'"value":\s*(\d+)', readme):
        assert int(value) < rbg_of(MANIFESTS / "sglang" / "disagg.yaml")["spec"]["roles"][1]["replicas"]
    # Every file the README applies exists.
    applied = re.findall(r"-f (manifests/\S+\.yaml)", readme)
    assert "manifests/sglang/disagg.yaml" in applied and "manifests/deps/nats.yaml" in applied
    for rel in applied:
        assert (REPO / rel).is_file(), rel


# ---------------------------------------------------------------------------------------------------------
# Tests: containers against our own code


def test_frontend_ports_and_probes() -> None:
    routes = frontend_routes()
    assert {READINESS_PATH, LIVENESS_PATH} <= routes
    for path in RBG_FILES:
        fe = containers_by_role(path)["frontend"]
        assert fe["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        assert fe["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert fe["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
        svc = next(d for d in load(path) if d["kind"] == "Service")
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
        assert svc["spec"]["selector"] == {GROUP_LABEL: rbg_of(path)["metadata"]["name"],
                                           ROLE_LABEL: "frontend"}


def test_container_commands_parse_with_our_cli() -> None:
    parser = cli_parser()
    for path in RBG_FILES:
        backend = path.parts[-2] if path.parent.name != "v1alpha2" else path.parts[-3]
        for role, c in containers_by_role(path).items():
            argv = [substitute(a) for a in c["command"][1:] + c["args"]]
            ns = parser.parse_args(argv)
            if role == "frontend":
                assert ns.http_port == 8000
                assert ns.router_mode == "kv"
                continue
            if role == "planner":
                assert ns.connector == "rbg" and ns.model == DEFAULT_SERVED_MODEL_NAME
                continue
            assert ns.engine == backend
            assert ns.mode == ROLE_MODE[role]
            assert ns.model == DEFAULT_MODEL_PATH
            assert ns.served_model_name == DEFAULT_SERVED_MODEL_NAME
            gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert ns.tp == gpus * (ns.nnodes if "--nnodes" in argv else 1)


def test_env_vars_are_read_by_our_code() -> None:
    cli_parser()  # building the parsers fills KNOWN_ENV
    from dynamo_rt.config import KNOWN_ENV

    common = {"DYN_ETCD_ENDPOINTS", "DYN_NATS_ENDPOINTS", "DYN_NAMESPACE", "DYN_LOG", "DYN_NATS_USER",
              "DYN_NATS_PASSWORD", "DYN_NATS_TOKEN", "DYN_ETCD_USER", "DYN_ETCD_PASSWORD"}
    extra = {"frontend": {"HOME", "DYN_API_KEY"}, "planner": {"HOME"}}
    for path in RBG_FILES:
        for role, c in containers_by_role(path).items():
            names = {e["name"] for e in c["env"]}
            assert names == common | extra.get(role, set()), role
            assert names - {"HOME"} <= KNOWN_ENV


def test_credentials_come_from_an_optional_secret_and_never_inline() -> None:
    for path in RBG_FILES:
        for role, c in containers_by_role(path).items():
            by_name = {e["name"]: e for e in c["env"]}
            for name in ("DYN_NATS_USER", "DYN_NATS_PASSWORD", "DYN_NATS_TOKEN", "DYN_ETCD_USER",
                         "DYN_ETCD_PASSWORD", *(("DYN_API_KEY",) if role == "frontend" else ())):
                assert "value" not in by_name[name], (path, role, name)
                ref = by_name[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "dynamo-rt-credentials" and ref["optional"] is True, (path, role, name)


def test_frontend_and_planner_run_unprivileged_workers_keep_the_engine_user() -> None:
    for path in RBG_FILES:
        doc = rbg_of(path)
        for role, t in effective_templates(doc).items():
            c = t["spec"]["containers"][0]
            sc = c.get("securityContext")
            if role in ("frontend", "planner"):
                assert sc == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                              "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
                # A read-only root needs somewhere to write: HOME and /tmp are a scratch emptyDir.
                assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
                assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in t["spec"]["volumes"]
                assert {"name": "HOME", "value": "/tmp"} in c["env"]
            elif "rdma/hca" in c["resources"]["limits"]:
                # Registering memory with the NIC pins it: IPC_LOCK, else mlock fails past RLIMIT_MEMLOCK.
                assert sc == {"capabilities": {"add": ["IPC_LOCK"]}}, (path, role)
            else:
                assert sc is None, (path, role)


def test_nats_creds_secret_is_mounted_and_passed_to_every_role() -> None:
    spec = dataclasses.replace(preset("vllm", "disagg"), nats_creds_secret="nats-user-creds")
    doc = next(d for d in yaml.safe_load_all(render(spec)) if d["kind"] == "RoleBasedGroup")
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), doc) == []
    for role, t in effective_templates(doc).items():
        assert errors_of(template_validator("v1alpha1", False), t) == [], role
        c = t["spec"]["containers"][0]
        assert {"name": "DYN_NATS_CREDS", "value": "/etc/dynamo-rt/nats/user.creds"} in c["env"], role
        assert {"name": "nats-creds", "mountPath": "/etc/dynamo-rt/nats", "readOnly": True} in c["volumeMounts"]
        assert {"name": "nats-creds", "secret": {"secretName": "nats-user-creds", "defaultMode": 0o440}} in \
            t["spec"]["volumes"], role
    # Without the option nothing refers to a creds file.
    plain = render(preset("vllm", "disagg"))
    assert "DYN_NATS_CREDS" not in plain and "nats-creds" not in plain
    none = render(dataclasses.replace(preset("vllm", "disagg"), credentials_secret=""))
    assert "secretKeyRef" not in none


def test_flags_relied_on_are_accepted() -> None:
    parser = cli_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, flags in FLAGS_RELIED_ON.items():
        known = set(sub.choices[command]._option_string_actions)
        assert set(flags) <= known, (command, set(flags) - known)


# ---------------------------------------------------------------------------------------------------------
# Tests: the planner role


def _rbac() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in load(MANIFESTS / "planner" / "rbac.yml")}


@pytest.mark.parametrize("path", RBG_FILES, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_planner_role(path: Path) -> None:
    """Disagg groups carry a planner that scales their prefill and decoder roles through the scaling
    adapters, as the ServiceAccount manifests/planner/rbac.yml binds, reading every frontend pod."""
    from planner.runner import parse_args

    rbg = rbg_of(path)
    version = rbg["apiVersion"].split("/")[1]
    roles = {r["name"]: r for r in rbg["spec"]["roles"]}
    if not path.stem.startswith("disagg"):
        assert "planner" not in roles
        return
    planner = roles["planner"]
    assert planner["replicas"] == 1
    tmpl = effective_templates(rbg)["planner"]
    (c,) = tmpl["spec"]["containers"]
    ns = parse_args(c["args"][1:], env={"RBG_GROUP_NAME": rbg["metadata"]["name"]})
    assert c["args"][0] == "planner"
    assert (ns.connector, ns.mode, ns.rbg_api_version, ns.model) == ("rbg", "disagg", version,
                                                                    DEFAULT_SERVED_MODEL_NAME)
    assert ns.rbg_name is None  # RBG's RBG_GROUP_NAME names the group
    # The roles it scales exist and have scaling adapters; the CoordinatedPolicy couples them.
    assert roles[ns.prefill_role]["scalingAdapter"] == roles[ns.decode_role]["scalingAdapter"] == {"enable": True}
    (policy,) = [d for d in load(path) if d["kind"] == "CoordinatedPolicy"]
    assert policy["spec"]["policies"][0]["roles"] == [ns.prefill_role, ns.decode_role]
    # Limits cover the rendered replicas.
    for pool, role in (("prefill", ns.prefill_role), ("decode", ns.decode_role)):
        assert getattr(ns, f"min_{pool}") <= roles[role]["replicas"] <= getattr(ns, f"max_{pool}")
    # It reads the frontend role's pods: RBG's headless Service of that role, every address, port 8000.
    assert ns.frontend_url == f"http://s-{rbg['metadata']['name']}-frontend:8000" and ns.frontend_resolve_all
    # RBG names that Service s-{group}-{role} (RoleBasedGroup.GetServiceName, both API versions) and creates it
    # only for StatefulSet and RoleInstanceSet roles (the default workloads of v1alpha1 / v1alpha2), not
    # for Deployment or LeaderWorkerSet ones: read in sgl-project/rbg at 993491f.
    workload = roles["frontend"].get("workload")
    assert workload is None or (workload["apiVersion"], workload["kind"]) in {
        ("apps/v1", "StatefulSet"), ("workloads.x-k8s.io/v1alpha2", "RoleInstanceSet")}, workload
    assert containers_by_role(path)["frontend"]["ports"][0]["containerPort"] == 8000
    # The profile comes from the ConfigMap mounted where --profile points.
    mounts = {vm["mountPath"]: vm["name"] for vm in c["volumeMounts"]}
    vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
    (vol,) = [vols[name] for mp, name in mounts.items() if ns.profile.startswith(mp + "/")]
    assert vol["configMap"] == {"name": f"{rbg['metadata']['name']}-planner-profile"}
    assert c["ports"] == [{"name": "metrics", "containerPort": ns.metrics_port, "protocol": "TCP"}]
    assert "nvidia.com/gpu" not in str(c["resources"])
    # Its ServiceAccount is the one rbac.yml creates and binds to the Role the connector needs.
    rbac = _rbac()
    sa = tmpl["spec"]["serviceAccountName"]
    assert sa == rbac["ServiceAccount"]["metadata"]["name"]
    assert rbac["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    assert rbac["RoleBinding"]["roleRef"]["name"] == rbac["Role"]["metadata"]["name"]
    granted = {(res, verb) for rule in rbac["Role"]["rules"] if "workloads.x-k8s.io" in rule["apiGroups"]
               for res in rule["resources"] for verb in rule["verbs"]}
    assert {("rolebasedgroups", "get"), ("rolebasedgroups", "patch"),
            ("rolebasedgroupscalingadapters/scale", "patch"), ("coordinatedpolicies", "get")} <= granted


def test_planner_flags() -> None:
    """--no-planner leaves it out of a disagg group; --planner adds one to an agg group (sizing the worker
    role); the targets reach its command line; the header reproduces the render."""
    from planner.runner import parse_args

    base = ["--backend", "vllm", "--mode"]
    no = spec_from_args(_parser().parse_args([*base, "disagg", "--no-planner"]))
    assert [r["name"] for r in group_of(build_documents(no))["spec"]["roles"]] == ["frontend", "prefill", "decoder"]
    agg = spec_from_args(_parser().parse_args([*base, "agg", "--planner", "--planner-ttft-target", "0.3",
                                                 "--planner-interval", "15", "--worker-replicas", "10"]))
    rbg = group_of(build_documents(agg))
    assert [r["name"] for r in rbg["spec"]["roles"]] == ["frontend", "worker", "planner"]
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), rbg) == [] and admission_problems(rbg) == []
    args = effective_templates(rbg)["planner"]["spec"]["containers"][0]["args"]
    ns = parse_args(args[1:], env={})
    assert (ns.mode, ns.agg_role, ns.ttft_target, ns.itl_target, ns.adjustment_interval) == (
        "agg", "worker", 0.3, 0.05, 15.0)
    assert (ns.min_agg, ns.max_agg) == (1, 10)
    assert "--min-prefill" not in args
    text = render(agg, how="x")
    assert "name: planner" in text
    with pytest.raises(InvalidRequest, match="must be > 0"):
        build_documents(dataclasses.replace(agg, planner_itl=0))


# ---------------------------------------------------------------------------------------------------------
# Tests: dependencies


def test_deps_services() -> None:
    want = {"etcd": {2379}, "nats": {4222, 8222}}
    for name in ("etcd", "nats"):
        docs = load(MANIFESTS / "deps" / f"{name}.yaml")
        assert [d["kind"] for d in docs] == ["Deployment", "Service"]
        deploy, svc = docs
        assert svc["metadata"]["name"] == name
        assert {p["port"] for p in svc["spec"]["ports"]} == want[name]
        pod = deploy["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (c,) = pod["spec"]["containers"]
        assert {p["containerPort"] for p in c["ports"]} >= {p["targetPort"] for p in svc["spec"]["ports"]}
        assert c["image"].rsplit(":", 1)[1][0].isdigit() or c["image"].rsplit(":", 1)[1].startswith("v")
    assert "-js" in load(MANIFESTS / "deps" / "nats.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert DEFAULT_ETCD_URL == "http://etcd:2379" and DEFAULT_NATS_URL == "nats://nats:4222"


# ---------------------------------------------------------------------------------------------------------
# Tests: the suggester


def _suggest(argv: list[str]) -> Suggestion:
    return suggest(_suggest_input(_parser().parse_args(["suggest", *argv])))


def test_suggest_70b_on_80gb() -> None:
    s = _suggest(["--params-b", "70", "--gpu-mem-gb", "80"])
    assert (s.prefill, s.decode) == (RoleShape(replicas=15, tp=4), RoleShape(replicas=1, tp=8))
    assert s.reasons[:3] == (
        "weights: 70B params x 2 bytes = 140 GB",
        "per GPU: 80 GB x 0.9 usable = 72 GB; at most 0.75 of it for weights (54 GB), the rest is KV cache",
        "smallest power-of-two tp with weights/tp <= 54 GB: tp=4 (35 GB of weights per GPU)",
    )
    assert s.command == ("dynamo-rt manifests --backend sglang --mode disagg --prefill-tp 4 --prefill-ep 1 "
                         "--prefill-replicas 15 --prefill-nodes 1 --decode-tp 8 --decode-ep 1 "
                         "--decode-replicas 1 --decode-nodes 1")


def test_suggest_budget_moe_multinode_and_render() -> None:
    s = _suggest(["--params-b", "235", "--active-params-b", "22", "--gpu", "h100", "--total-gpus", "32"])
    assert s.prefill == RoleShape(replicas=1, tp=16, ep=16, nodes=2)
    assert s.decode == RoleShape(replicas=1, tp=16, ep=16, nodes=2)
    # The printed command renders a valid group with those shapes.
    args = _parser().parse_args(s.command.split()[2:])
    spec = spec_from_args(args)
    assert dict(spec.roles) == {"prefill": s.prefill, "decoder": s.decode}
    rbg = group_of(build_documents(spec))
    assert errors_of(validator("RoleBasedGroup", "v1alpha1"), rbg) == []
    assert admission_problems(rbg) == []
    agg = _suggest(["--params-b", "8", "--gpu", "l40s", "--mode", "agg", "--total-gpus", "8",
                    "--layers", "32", "--kv-heads", "8", "--head-dim", "128"])
    assert agg.worker == RoleShape(replicas=8, tp=1)
    # (48 x 0.9 - 16) GB of KV / (2 x 32 x 8 x 128 x 2 bytes per token) / 3150 tokens per sequence
    assert agg.reasons[-1] == "each replica holds about 65 sequences of 3000+150 tokens"


def test_suggest_refuses_impossible_inputs() -> None:
    with pytest.raises(InvalidRequest, match="more than 64 GPUs"):
        _suggest(["--params-b", "10000", "--gpu", "a100"])
    with pytest.raises(InvalidRequest, match="< one prefill"):
        _suggest(["--params-b", "70", "--gpu", "h100", "--total-gpus", "8"])
    with pytest.raises(InvalidRequest, match="--gpu or --gpu-mem-gb"):
        _suggest(["--params-b", "70"])


def test_suggest_main_prints_reasoning(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_parser().parse_args(["suggest", "--params-b", "70", "--gpu-mem-gb", "80"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("(no --gpu preset: compute and bandwidth default to H100's)\nReasoning:\n")
    assert "  prefill: tp=4 ep=1 replicas=15 pods/replica=1 GPUs/pod=4\n" in out
    assert out.endswith("Render it with:\n  " + _suggest(["--params-b", "70", "--gpu-mem-gb", "80"]).command + "\n")


# ---------------------------------------------------------------------------------------------------------
# Tests: what RBG's controller would reject or mishandle (issue #17, from RBG v0.8.0-alpha.5's sources)


def _custom_renders() -> list[list[dict[str, Any]]]:
    """Renders beyond the catalog: another group name, a planner on agg, multi-node agg with tolerations."""
    specs = [
        dataclasses.replace(preset("vllm", "disagg"), name="pd-7"),
        dataclasses.replace(preset("sglang", "agg"), planner=True, name="x"),
        dataclasses.replace(preset("trtllm", "agg", multinode=True, api_version="v1alpha2"),
                            tolerations=parse_tolerations("nvidia.com/gpu:NoSchedule")),
    ]
    return [build_documents(s) for s in specs]


def test_no_generated_service_takes_an_rbg_legacy_service_name() -> None:
    """RBG treats an existing Service named {group}-{role} as the role's legacy headless Service
    (pkg/utils/service_utils.go): it would force clusterIP None on ours (immutable: every reconcile fails)."""
    all_docs = [load(p) for p in RBG_FILES] + _custom_renders()
    for docs in all_docs:
        group = group_of(docs)
        name = group["metadata"]["name"]
        legacy = {legacy_service_name(name, r["name"]) for r in group["spec"]["roles"]}
        services = [d for d in docs if d["kind"] == "Service"]
        assert services and all(s["metadata"]["name"] not in legacy for s in services), name
        (svc,) = services
        assert svc["metadata"]["name"] == frontend_service_name(name) == f"{name}-api"
        assert svc["spec"]["selector"] == {GROUP_LABEL: name, ROLE_LABEL: "frontend"}
    # The check can fail: the old name is a legacy name.
    assert legacy_service_name("dynamo-pd", "frontend") == "dynamo-pd-frontend"


@pytest.mark.parametrize("path", RBG_FILES, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_worker_probes_resources_and_capabilities(path: Path) -> None:
    rbg = rbg_of(path)
    version = rbg["apiVersion"].split("/")[1]
    templates = effective_templates(rbg)
    for role in rbg["spec"]["roles"]:
        if role["name"] in ("frontend", "planner"):
            continue
        c = templates[role["name"]]["spec"]["containers"][0]
        # A fixed metrics port, passed on the command line and declared as a named port.
        assert c["args"][c["args"].index("--metrics-port") + 1] == str(WORKER_METRICS_PORT)
        assert {"name": "metrics", "containerPort": WORKER_METRICS_PORT, "protocol": "TCP"} in c["ports"]
        # Probes on it: the metrics server starts only after registration. Multi-node: the leader only.
        size = group_size(role, version)
        if size > 1:
            assert "readinessProbe" not in c and "startupProbe" not in c
            lw = role["leaderWorkerSet"] if version == "v1alpha1" else role["leaderWorkerPattern"]
            key = "patchLeaderTemplate" if version == "v1alpha1" else "leaderTemplatePatch"
            (probed,) = lw[key]["spec"]["containers"]
            assert errors_of(template_validator(version, True), lw[key]) == []
            c = merge(c, probed)
        ready, startup = c["readinessProbe"], c["startupProbe"]
        assert ready["httpGet"] == startup["httpGet"] == {"path": "/metrics", "port": "metrics"}
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # weights load for long
        # Not BestEffort: cpu and memory requested; memory limit = request >= engine + shm (+ KV tier).
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        gpus = int(lim["nvidia.com/gpu"])
        assert req["memory"] == lim["memory"] and "cpu" in req and "cpu" not in lim
        shm = next(v for v in templates[role["name"]]["spec"]["volumes"] if v["name"] == "dshm")
        assert int(lim["memory"][:-2]) >= int(shm["emptyDir"]["sizeLimit"][:-2]) + 24 * gpus
        # rdma/hca comes with IPC_LOCK.
        assert ("rdma/hca" in lim) == (c.get("securityContext") == {"capabilities": {"add": ["IPC_LOCK"]}})
        # No KV host tier: none of these engines uses one.
        assert not any("kv-host-tier" in a for a in c["args"])
        assert all(v["name"] != "kv-host-tier" for v in templates[role["name"]]["spec"]["volumes"])


def test_kv_host_tier_only_for_engines_that_use_it() -> None:
    assert "reference" in KV_HOST_TIER_ENGINES and not set(BACKENDS) & set(KV_HOST_TIER_ENGINES)
    # The reference engine (no image of its own in the catalog) gets the tier and its memory.
    spec = dataclasses.replace(preset("vllm", "disagg"), backend="reference")
    shape = dict(spec.roles)["prefill"]
    args = worker_args(spec, "prefill", shape)
    assert args[args.index("--kv-host-tier-gib") + 1] == "62"
    assert worker_memory_gib(spec, "prefill", shape) == 24 * 4 + 32 + 64
    assert worker_memory_gib(preset("vllm", "disagg"), "prefill", shape) == 24 * 4 + 32


def test_frontend_and_planner_on_the_cpu_image_without_the_model() -> None:
    spec = dataclasses.replace(preset("sglang", "disagg"), image="reg/x:1", cpu_image="reg/cpu:1")
    t = effective_templates(group_of(build_documents(spec)))
    assert {r: c["spec"]["containers"][0]["image"] for r, c in t.items()} == {
        "frontend": "reg/cpu:1", "prefill": "reg/x:1", "decoder": "reg/x:1", "planner": "reg/cpu:1"}
    for role in ("frontend", "planner"):
        assert all(v["name"] != "model" for v in t[role]["spec"].get("volumes", []))


def test_multinode_gang_scheduling_and_tolerations() -> None:
    for path in RBG_FILES:
        rbg = rbg_of(path)
        annotations = rbg["metadata"].get("annotations", {})
        if "multinode" in path.stem:
            assert annotations == {GANG_SCHEDULING_ANNOTATION: "true"}
        else:
            assert annotations == {}
    docs = _custom_renders()[2]
    t = effective_templates(group_of(docs))
    assert t["worker"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "tolerations" not in t["frontend"]["spec"]
    assert errors_of(template_validator("v1alpha2", False), t["worker"]) == []
    assert parse_tolerations("a=b:NoExecute,c:PreferNoSchedule") == (
        {"key": "a", "operator": "Equal", "value": "b", "effect": "NoExecute"},
        {"key": "c", "operator": "Exists", "effect": "PreferNoSchedule"})
    for bad in ("nvidia.com/gpu", "x:Never", ":NoSchedule"):
        with pytest.raises(InvalidRequest):
            parse_tolerations(bad)


def _cel_rules(schema: Any, doc: Any, where: str) -> list[tuple[str, str, str, Any]]:
    """(where, rule, message, self) for every x-kubernetes-validations rule, walking the schema with the doc."""
    out: list[tuple[str, str, str, Any]] = []
    if not isinstance(schema, dict):
        return out
    for v in schema.get("x-kubernetes-validations", []):
        out.append((where, v["rule"], v.get("message", ""), doc))
    if isinstance(doc, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in doc:
                out += _cel_rules(sub, doc[key], f"{where}/{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, value in doc.items():
                out += _cel_rules(schema["additionalProperties"], value, f"{where}/{key}")
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            out += _cel_rules(schema["items"], item, f"{where}/{i}")
    return out


def cel_violations(doc: dict[str, Any]) -> list[str]:
    """The CRD's CEL rules that ``doc`` breaks, evaluated by a real CEL implementation (cel-python)."""
    import celpy  # the test extra's cel-python

    version = doc["apiVersion"].split("/")[1]
    env = celpy.Environment()
    bad = []
    rules = _cel_rules(crd_schemas()[(doc["kind"], version)], doc, doc["kind"])
    for where, rule, message, node in rules:
        result = env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(node)})
        if result is not celpy.celtypes.BoolType(True) and result != celpy.celtypes.BoolType(True):
            bad.append(f"{where}: {message} ({result!r})")
    return bad


def test_cel_rules_hold_on_every_manifest() -> None:
    checked = 0
    for docs in [load(p) for p in RBG_FILES] + _custom_renders():
        for doc in docs:
            if doc["kind"] == "Service":
                continue
            assert cel_violations(doc) == [], doc["metadata"]["name"]
            checked += 1
    assert checked >= len(RBG_FILES)
    # The evaluator catches what the rules forbid, in both versions.
    v2 = rbg_of(MANIFESTS / "vllm" / "v1alpha2" / "disagg.yaml")
    bad = copy.deepcopy(v2)
    bad["spec"]["roles"][1]["leaderWorkerPattern"] = {"size": 2, "templateRef": {"name": "dynamo-common",
                                                                                "patch": {}}}
    assert cel_violations(bad) == ["RoleBasedGroup/spec/roles/1: standalonePattern and leaderWorkerPattern are "
                                   "mutually exclusive (BoolType(False))"]
    v1 = copy.deepcopy(rbg_of(MANIFESTS / "vllm" / "disagg.yaml"))
    v1["spec"]["roles"][1]["workload"]["kind"] = "LeaderWorkerSet"
    assert [v.split(" (")[0] for v in cel_violations(v1)] == [
        "RoleBasedGroup/spec/roles/1: templateRef is not supported for LeaderWorkerSet workloads"]
