"""The engine registry: which engines a worker can run, and where each one's spec lives.

Place: the worker (``workers.main``) parses its common flags and ``--engine E``, then E's own parser
(:func:`engine_parser`) parses the rest, and E's build function makes the engine(s) it serves. The local
launcher (``dynamo-rt up``), the planner's local connector, the profiler and the manifest generator read the
engine names here.

Adding an engine: a folder ``workers/<name>/`` whose flags module (cheap to import: it must not import the
engine's framework, which the build function imports when it runs) defines ``SPEC = EngineSpec(...)``, plus one
line in :data:`ENGINES`. Tests register a stand-in engine the same way, by adding its module to
:data:`ENGINES` (``monkeypatch.setitem(registry.ENGINES, "standin", "tests.engines.some_module")``).

Each engine's flags have one owner, one default and one environment twin: an engine declares its own (two
engines may use the same flag name with different defaults and twins, as ``--max-num-seqs`` does), and never a
flag the worker declares (``--model``, ``--mode``, ``--tp``...).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dynamo_rt.config import Parser
from dynamo_rt.errors import ConfigError
from workers.common.engine import Engine, ModelInfo

# name -> the module holding the engine's SPEC. The first is the worker's default engine.
ENGINES: dict[str, str] = {
    "reference": "workers.reference.flags",
    "mocker": "workers.mocker.flags",
    "vllm": "workers.vllm.flags",
    "sglang": "workers.sglang.flags",
    "trtllm": "workers.trtllm.flags",
}

# (parsed flags, the model folder's info) -> the engine instances to serve, not started; each is registered as
# an instance of its own. ``args.model`` is the resolved model folder.
BuildEngines = Callable[[argparse.Namespace, ModelInfo], Sequence[Engine]]


@dataclass(frozen=True, slots=True)
class EngineSpec:
    name: str  # the --engine value
    description: str  # one line, shown by `dynamo-rt worker --engine NAME --help`
    add_flags: Callable[[argparse.ArgumentParser], None]  # declares the engine's own flags (with env twins)
    build: BuildEngines
    runs_on_cpu: bool = False  # serves on a CPU-only host: local stacks, the profiler's own stack
    has_manifests: bool = False  # has an engine image and RBG manifests (`dynamo-rt manifests --backend`)


def names(*, runs_on_cpu: bool | None = None, has_manifests: bool | None = None) -> list[str]:
    """Registered engine names, in registry order; the keywords keep those with that property."""
    out = []
    for name in ENGINES:
        if runs_on_cpu is not None or has_manifests is not None:
            s = spec(name)
            if runs_on_cpu is not None and s.runs_on_cpu != runs_on_cpu:
                continue
            if has_manifests is not None and s.has_manifests != has_manifests:
                continue
        out.append(name)
    return out


def spec(name: str) -> EngineSpec:
    """The spec of engine ``name`` (imports only its flags module)."""
    module = ENGINES.get(name)
    if module is None:
        raise ConfigError("--engine", f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    try:
        found = getattr(importlib.import_module(module), "SPEC", None)
    except ImportError as exc:
        raise ConfigError("--engine", f"engine {name!r} is not available in this installation ({exc})") from exc
    if not isinstance(found, EngineSpec) or found.name != name:
        raise TypeError(f"{module}.SPEC is not the EngineSpec of engine {name!r}")
    return found


def engine_parser(name: str, env: Mapping[str, str] | None = None) -> Parser:
    """A parser of engine ``name``'s own flags only (environment twins read from ``env``)."""
    s = spec(name)
    p = Parser(prog=f"dynamo-rt worker --engine {name}", description=f"{name} engine: {s.description}",
               usage=argparse.SUPPRESS, add_help=False, env=env)
    s.add_flags(p)
    return p

