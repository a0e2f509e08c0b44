"""The one builder of role command lines: worker, frontend and planner argv for a child process.

``dynamo-rt up`` (:mod:`dynamo_rt.local.launcher`), the planner's local connector and the profiler
(``planner/``), tests/stack.py and the benches all start roles with these, and hand the argv to
:mod:`dynamo_rt.local.harness`. Optional flags are left out when not given, so each role's own default
(and environment twin) applies.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence

PLANNER_DEFAULT_MAX = 8  # the planner's --max-{prefill,decode,agg} default


def worker(engine: str, mode: str, model: str, *, served_model_name: str | None = None,
           graceful_timeout: float | None = None, extra: Sequence[str] = (),
           python: str = sys.executable) -> list[str]:
    """``python -m workers``: one worker of ``engine`` in ``mode`` (agg, prefill or decode) serving ``model``."""
    argv = [python, "-m", "workers", "--engine", engine, "--mode", mode, "--model", model]
    if graceful_timeout is not None:
        argv += ["--graceful-timeout", f"{graceful_timeout:g}"]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return [*argv, *extra]


def frontend(port: int, *, host: str = "127.0.0.1", router_mode: str | None = None,
             worker_wait_timeout: float | None = None, extra: Sequence[str] = (),
             python: str = sys.executable) -> list[str]:
    """``python -m frontend`` on ``host:port``."""
    argv = [python, "-m", "frontend", "--http-host", host, "--http-port", str(port)]
    if router_mode:
        argv += ["--router-mode", router_mode]
    if worker_wait_timeout:
        argv += ["--worker-wait-timeout", f"{worker_wait_timeout:g}"]
    return [*argv, *extra]


def local_planner(frontend_url: str, mode: str, *, engine: str, model: str, minimum: Mapping[str, int],
                  served_model_name: str | None = None, graceful_timeout: float | None = None,
                  worker_args: Sequence[str] = (), extra: Sequence[str] = (),
                  python: str = sys.executable) -> list[str]:
    """``python -m dynamo_rt planner --connector local``: a planner that starts ``engine`` workers itself
    (what :func:`worker` would start, ``worker_args`` added) and scales each pool from ``minimum``. A minimum
    above the planner's default maximum raises the maximum; a mocker's ``--speedup`` among ``worker_args``
    becomes the planner's ``--engine-speedup``, so it reads the profile in the same time scale."""
    argv = [python, "-m", "dynamo_rt", "planner", "--connector", "local", "--frontend-url", frontend_url,
            "--mode", mode, "--worker-engine", engine, "--worker-model", model]
    if graceful_timeout is not None:
        argv += ["--worker-graceful-timeout", f"{graceful_timeout:g}"]
    argv += ["--worker-args", shlex.join(worker_args)]
    if served_model_name:
        argv += ["--model", served_model_name]
    for pool, n in minimum.items():
        argv += [f"--min-{pool}", str(n)]
        if n > PLANNER_DEFAULT_MAX:
            argv += [f"--max-{pool}", str(n)]
    args = list(worker_args)
    if engine == "mocker" and "--speedup" in args[:-1]:
        argv += ["--engine-speedup", args[args.index("--speedup") + 1]]
    return [*argv, *extra]
