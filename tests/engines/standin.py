"""Test helper: the harness the engine adapters' contract tests share (stand-in engines, manifest command lines).

The SGLang and TensorRT-LLM adapters cannot run their engines on this machine, so ``test_sglang_standin.py`` and
``test_trtllm_standin.py`` drive each adapter against a stand-in engine object (defined in the test module: its
method signatures are the contract). What the two share is here: parsing a worker command line for the tiny
model, building requests, collecting an adapter's outputs, and the worker command lines of ``manifests/``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import yaml

from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from tests.stack import ROOT
from workers.common.engine import EngineOutput
from workers.main import parse_args

# What the manifests leave to the pod's environment, as a multi-node instance's second node sees it.
_LWP_ENV = {"$(RBG_LWP_GROUP_SIZE)": "2", "$(RBG_LWP_WORKER_INDEX)": "1", "$(RBG_LWP_LEADER_ADDRESS)": "10.0.0.1"}


class _Generates(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]: ...


def engine_args(engine: str, mode: str, block_size: int, *extra: str) -> argparse.Namespace:
    """A worker command line of ``engine`` in ``mode`` for the tiny model, parsed by the real worker CLI."""
    return parse_args(["--engine", engine, "--mode", mode, "--model", str(ensure_tiny_model()),
                       "--block-size", str(block_size), *extra])


def req(rid: str, prompt: list[int], n: int = 6, **kw: Any) -> GenerateRequest:
    """A greedy request for ``n`` tokens (``sampling=`` overrides; other keywords go to GenerateRequest)."""
    sampling = kw.pop("sampling", SamplingParams(temperature=0.0))
    return GenerateRequest(request_id=rid, token_ids=prompt, sampling=sampling,
                           stop=StopConditions(max_tokens=n, ignore_eos=True), **kw)


async def collect(eng: _Generates, request: GenerateRequest) -> list[EngineOutput]:
    return [o async for o in eng.generate(request)]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def worker_argvs(backend: str) -> list[list[str]]:
    """The ``worker`` command line of every container of ``manifests/{backend}/`` (RBG variables filled in)."""
    argvs = []
    for path in sorted(Path(ROOT, "manifests", backend).glob("**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for role in (doc or {}).get("spec", {}).get("roles", []):
                for c in role.get("templatePatch", {}).get("spec", {}).get("containers", []):
                    argv = [a for a in c.get("args", []) if a != "worker"]
                    if "--engine" not in argv:
                        continue
                    for var, value in _LWP_ENV.items():
                        argv = [a.replace(var, value) for a in argv]
                    argvs.append(argv)
    return argvs
