"""``dynamo-rt``: one console script, one subcommand per process role.

    dynamo-rt up                  the whole stack locally (etcd + NATS + frontend + workers)
    dynamo-rt frontend            the OpenAI HTTP frontend
    dynamo-rt worker              one engine worker (reference, mocker, vllm, sglang, trtllm)
    dynamo-rt make-tiny-model     write the built-in tiny model to a folder
    dynamo-rt manifests           render the RBG manifests
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dynamo_rt.config import Parser

# subcommand -> (module, help). Each module has add_arguments(parser) and run(args) -> int (or main(args)).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("dynamo_rt.local.launcher", "serve the whole stack locally"),
    "frontend": ("frontend.main", "run the OpenAI-compatible frontend"),
    "worker": ("workers.main", "run one engine worker"),
    "make-tiny-model": ("dynamo_rt.local.tinymodel", "write the built-in tiny model (HF format) to a folder"),
    "manifests": ("deploy.manifests", "render RoleBasedGroup manifests"),
    "planner": ("planner", "run the SLA planner"),
    "profile": ("planner.profiler", "profile an engine for the planner"),
}


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    parser = Parser(prog="dynamo-rt", description="dynamo-rt: disaggregated LLM serving runtime", env=env)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue  # a role whose module is not in this installation
        sp = sub.add_parser(name, help=help_, description=help_, env=env)
        mod.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mod: Any = importlib.import_module(args._module)
    runner = getattr(mod, "run", None) or mod.main
    return int(runner(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
