"""``dynamo-rt up``: the whole stack on one machine, each role its own child process (as in a cluster).

Starts etcd and nats-server from the pip-installed binaries unless ``DYN_ETCD_ENDPOINTS`` /
``DYN_NATS_ENDPOINTS`` are set, builds the tiny model on first use, then starts the workers and the
frontend, waits until ``/v1/models`` lists a model and prints one line::

    ready: http://127.0.0.1:8000 (model dynamo-tiny)

With ``--planner`` the workers are not started here: the SLA planner (``dynamo-rt planner --connector
local``) is a child instead, starts the minimum (``--workers``, or ``--prefill-workers`` /
``--decode-workers``) and scales the pools from the frontend's metrics; the frontend parks a request while a
pool is at zero (``--worker-wait-timeout``) until the planner's worker registers.

Each role is a :class:`dynamo_rt.local.harness.Child` (its own process group, SIGTERM if ``up`` dies) and
its command line comes from :mod:`dynamo_rt.local.commands`. ``up`` supervises (:mod:`dynamo_rt.local.supervise`):
a worker, the planner, the frontend or the embedded etcd / nats-server that exits is started again after a
backoff (etcd and NATS on the same ports and data, so the others reconnect), with a log line saying so, while
the rest keeps serving; a crash loop stops the stack with a non-zero exit. One Ctrl-C (SIGINT) or SIGTERM
drains: the frontend answers new requests 503 and gives the streams in flight ``--drain-timeout`` seconds
(the rest end with an error event and ``[DONE]``); only then are the workers and services stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo_rt.config import Parser, flag
from dynamo_rt.local import commands
from dynamo_rt.local.harness import DRAIN, Child, ChildExited, NotReady, Stack
from dynamo_rt.local.supervise import Backoff, GaveUp, Supervised, Supervisor
from workers import registry as engine_registry

if TYPE_CHECKING:
    from dynamo_rt.local.services import ManagedProcess

log = logging.getLogger("dynamo_rt.up")

STOP_TIMEOUT = 10.0
PLANNER_WORKER_WAIT = 120.0  # the frontend's --worker-wait-timeout under --planner, unless set


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--engine", env="DYN_UP_ENGINE", default="reference",
         choices=engine_registry.names(), help="engine of the workers")
    flag(p, "--model", env="DYN_MODEL", default="tiny", help="model folder, or 'tiny' (built-in)")
    flag(p, "--served-model-name", env="DYN_SERVED_MODEL_NAME", default=None, help="name clients use")
    flag(p, "--disagg", env="DYN_UP_DISAGG", default=False, is_bool=True,
         help="disaggregated: prefill and decode workers (default: aggregated)")
    flag(p, "--workers", env="DYN_UP_WORKERS", type=int, default=1, help="aggregated workers")
    flag(p, "--prefill-workers", env="DYN_UP_PREFILL_WORKERS", type=int, default=1,
         help="prefill workers (with --disagg)")
    flag(p, "--decode-workers", env="DYN_UP_DECODE_WORKERS", type=int, default=1,
         help="decode workers (with --disagg)")
    flag(p, "--planner", env="DYN_UP_PLANNER", default=False, is_bool=True,
         help="the SLA planner (local connector) starts and stops the workers; --workers / --prefill-workers / "
              "--decode-workers become the minimum")
    flag(p, "--planner-args", env="DYN_UP_PLANNER_ARGS", default="",
         help="extra flags for the planner, one shell-quoted string (e.g. '--ttft-target 0.3 --itl-target 0.02 "
              "--adjustment-interval 10 --scale-to-zero-after 300')")
    flag(p, "--worker-wait-timeout", env="DYN_WORKER_WAIT_TIMEOUT", type=float, default=None,
         help="seconds the frontend holds a request while its model has no worker (default: 120 with --planner, "
              "else 0: answer 503 at once)")
    flag(p, "--http-host", env="DYN_HTTP_HOST", default="127.0.0.1", help="frontend address")
    flag(p, "--http-port", env="DYN_HTTP_PORT", type=int, default=8000, help="frontend port")
    flag(p, "--router-mode", env="DYN_ROUTER_MODE", default="round-robin",
         choices=["round-robin", "random", "least-loaded", "kv"], help="frontend router mode")
    flag(p, "--state-dir", env="DYN_STATE_DIR", default=".state", help="data and logs of the local services")
    flag(p, "--namespace", env="DYN_NAMESPACE", default="dynamo", help="dynamo namespace")
    flag(p, "--log-level", env="DYN_LOG", default="info", help="log level")
    flag(p, "--ready-timeout", env="DYN_UP_READY_TIMEOUT", type=float, default=300.0,
         help="seconds to wait for the stack to serve")
    flag(p, "--drain-timeout", env="DYN_DRAIN_TIMEOUT", type=float, default=10.0,
         help="on Ctrl-C / SIGTERM: seconds the streams in flight get to finish before they are ended with an "
              "error event (new requests get 503 meanwhile)")
    flag(p, "--max-restarts", env="DYN_UP_MAX_RESTARTS", type=int, default=10,
         help="restarts of one child within --restart-window seconds before up gives up and stops the stack")
    flag(p, "--restart-window", env="DYN_UP_RESTART_WINDOW", type=float, default=300.0,
         help="seconds over which --max-restarts is counted")
    p.add_argument("worker_args", nargs=argparse.REMAINDER,
                   help="after --: extra flags passed to every worker (e.g. -- --speedup 10)")


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="dynamo-rt up", description="serve the whole stack locally", env=env)
    add_arguments(p)
    return p


def worker_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, argv) of each worker ``up`` starts itself (without ``--planner``)."""
    extra = [a for a in args.worker_args if a != "--"]
    modes = ([("prefill", args.prefill_workers), ("decode", args.decode_workers)] if args.disagg
             else [("agg", args.workers)])
    return [(f"{'worker' if mode == 'agg' else mode}-{i}",
             commands.worker(args.engine, mode, args.model, served_model_name=args.served_model_name,
                             graceful_timeout=5, extra=extra))
            for mode, n in modes for i in range(n)]


def planner_command(args: argparse.Namespace, frontend_url: str) -> list[str]:
    """The planner child of ``--planner``: it starts the workers ``worker_commands`` would have started."""
    mins = ({"prefill": args.prefill_workers, "decode": args.decode_workers} if args.disagg
            else {"agg": args.workers})
    return commands.local_planner(frontend_url, "disagg" if args.disagg else "agg", engine=args.engine,
                                  model=args.model, minimum=mins, served_model_name=args.served_model_name,
                                  graceful_timeout=5, worker_args=[a for a in args.worker_args if a != "--"],
                                  extra=shlex.split(args.planner_args))


def frontend_command(args: argparse.Namespace) -> list[str]:
    wait = args.worker_wait_timeout
    if wait is None and args.planner:
        wait = PLANNER_WORKER_WAIT
    return commands.frontend(args.http_port, host=args.http_host, router_mode=args.router_mode,
                             worker_wait_timeout=wait, extra=["--drain-timeout", f"{args.drain_timeout:g}"])


def served_model(status: int, body: Any) -> str | None:
    """The first model ``/v1/models`` lists: the stack serves once there is one."""
    data = body.get("data") if status == 200 and isinstance(body, dict) else None
    return str(data[0]["id"]) if data else None


@contextlib.contextmanager
def services(args: argparse.Namespace, env: dict[str, str]) -> Iterator[list[ManagedProcess]]:
    """The embedded etcd and nats-server (yielded, to be supervised), or none when endpoints are given."""
    if env.get("DYN_ETCD_ENDPOINTS") and env.get("DYN_NATS_ENDPOINTS"):
        log.info("using etcd %s and NATS %s", env["DYN_ETCD_ENDPOINTS"], env["DYN_NATS_ENDPOINTS"])
        yield []
        return
    from dynamo_rt.local.services import LocalServices

    state = Path(args.state_dir).resolve()
    log.info("starting embedded etcd and nats-server (state in %s)", state)
    with LocalServices(state) as svc:
        env.setdefault("DYN_ETCD_ENDPOINTS", svc.etcd.client_url)
        env.setdefault("DYN_NATS_ENDPOINTS", svc.nats.url)
        log.info("etcd %s, NATS %s", env["DYN_ETCD_ENDPOINTS"], env["DYN_NATS_ENDPOINTS"])
        for srv in (svc.etcd, svc.nats):
            log.info("started %s (pid %s)", srv.name, srv.pid)
        yield [svc.etcd, svc.nats]


def run(args: argparse.Namespace) -> int:
    from dynamo_rt.logs import setup_logging

    setup_logging(args.log_level, "text", role="up")
    t0 = time.monotonic()
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    env = dict(os.environ)
    env["DYN_NAMESPACE"] = args.namespace
    env["DYN_LOG"] = args.log_level
    env["PYTHONUNBUFFERED"] = "1"
    stack = Stack(stop_timeout=STOP_TIMEOUT - 1)
    try:
        if args.model == "tiny":
            from dynamo_rt.local.tinymodel import ensure_tiny_model

            log.info("preparing the built-in tiny model")
            ensure_tiny_model()  # built once here, not raced by every worker
        with services(args, env) as servers:
            try:
                host = "127.0.0.1" if args.http_host in ("0.0.0.0", "::") else args.http_host
                url = f"http://{host}:{args.http_port}"
                roles = ([("planner", planner_command(args, url))] if args.planner else worker_commands(args))
                for name, argv in [*roles, ("frontend", frontend_command(args))]:
                    # Roles drain on SIGTERM, so that is also what they get if up dies without stopping them.
                    child = stack.start(name, argv, env=env, death_signal=DRAIN)
                    log.info("started %s (pid %d): %s", name, child.pid, " ".join(argv[2:]))
                model = stack.wait_http(url + "/v1/models", served_model, args.ready_timeout)
                log.info("stack ready in %.1fs", time.monotonic() - t0)
                print(f"ready: {url} (model {model})", flush=True)
                supervise(args, stack, servers)
                return 1  # only a crash loop ends supervision (Ctrl-C raises KeyboardInterrupt)
            finally:
                # Children leave discovery and drain while etcd and NATS are still up; the frontend first,
                # so the streams it drains still have their workers.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                front = next((c for c in stack.children if c.name == "frontend"), None)
                if front is not None:
                    front.stop(args.drain_timeout + STOP_TIMEOUT)
                stack.stop()
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    except (ChildExited, NotReady, GaveUp) as exc:
        log.error("%s", exc)
        return 1


def supervise(args: argparse.Namespace, stack: Stack, servers: Sequence[ManagedProcess]) -> None:
    """Restart what exits until a signal (KeyboardInterrupt) or a crash loop (:class:`GaveUp`)."""
    sup = Supervisor()
    now = time.monotonic()

    def backoff() -> Backoff:
        return Backoff(limit=args.max_restarts, window=args.restart_window)

    for srv in servers:
        sup.add(_service(srv, backoff()), now)
    for child in list(stack.children):
        sup.add(_role(stack, child, backoff()), now)
    while True:
        time.sleep(0.5)
        sup.poll(time.monotonic())


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def _service(srv: ManagedProcess, backoff: Backoff) -> Supervised:
    """etcd or nats-server: started again on the same ports and data directory."""
    return Supervised(srv.name, lambda: srv.alive, lambda: srv.exit_code, lambda: srv.start().pid, backoff)


def _role(stack: Stack, child: Child, backoff: Backoff) -> Supervised:
    """A role child of ``stack``: a restart replaces it with a new one of the same command line."""
    cur = child

    def restart() -> int:
        nonlocal cur
        cur = stack.restart(cur)
        return cur.pid

    return Supervised(child.name, lambda: cur.alive(), lambda: cur.returncode, restart, backoff)
