"""``dynamo-rt``: one console script, one subcommand per process role.

    dynamo-rt up                  the whole stack locally (etcd + NATS + frontend + workers)
    dynamo-rt frontend            the OpenAI HTTP frontend
    dynamo-rt worker              one engine worker (reference, mocker, vllm, sglang, trtllm)
    dynamo-rt planner / profile   the SLA planner; profile an engine for it
    dynamo-rt make-tiny-model     write the built-in tiny model to a folder
    dynamo-rt manifests           render the RBG manifests

A bad flag value ends the process with one line, ``dynamo-rt <sub>: error: <flag>: <why>``, and status 2
(argparse's own errors exit 2 too); a subcommand whose module cannot be imported in this installation is
still listed, and running it says what is missing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dynamo_rt.config import Parser
from dynamo_rt.errors import ConfigError

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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def config_error(prog: str, exc: ConfigError) -> int:
    """Report a bad flag the way argparse reports its own errors, on one line; the exit status to use."""
    print(f"{prog}: error: {_one_line(exc.message)}", file=sys.stderr)
    return 2


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    parser = Parser(prog="dynamo-rt", description="dynamo-rt: disaggregated LLM serving runtime", env=env)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            # Listed all the same (not argparse's "invalid choice"); running it reports the ImportError.
            why = _one_line(exc).replace("%", "%%")  # help strings are %-formatted
            sp = sub.add_parser(name, help=f"{help_} (unavailable: {why})", add_help=False, env=env)
            sp.set_defaults(_module=module, _import_error=exc)
            continue
        sp = sub.add_parser(name, help=help_, description=help_, env=env)
        mod.add_arguments(sp)
        sp.set_defaults(_module=module, _import_error=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # Flag defaults are read from their environment twins while the parser is built.
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
    except ConfigError as exc:
        return config_error(f"dynamo-rt {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "dynamo-rt", exc)
    prog = f"dynamo-rt {args.command}"
    if args._import_error is not None:
        print(f"{prog}: error: cannot import {args._module}: {_one_line(args._import_error)}", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")  # what parse_args says
    mod: Any = importlib.import_module(args._module)
    runner = getattr(mod, "run", None) or mod.main
    try:
        return int(runner(args) or 0)
    except ConfigError as exc:
        return config_error(prog, exc)


if __name__ == "__main__":
    sys.exit(main())
