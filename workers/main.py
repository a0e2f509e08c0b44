"""The worker process: ``dynamo-rt worker --engine E --mode M --model PATH`` (also ``python -m workers``).

One entry function (:func:`run`) per process: it parses flags, builds the engine, connects to NATS and
etcd, serves until SIGTERM/SIGINT, then leaves discovery and drains. The worker's own flags are here; the
chosen engine's flags, its parser and its build function come from the engine registry
(:mod:`workers.registry`), so a new engine is a new folder. A node of rank > 0 of a multi-node instance runs
its engine headless instead (:class:`~workers.common.engine.MultiNodeFollower`). A bad flag value ends the
process with one line naming the flag and status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dynamo_rt.config import Parser, add_runtime_flags, flag
from dynamo_rt.errors import ConfigError, DynamoError
from dynamo_rt.heap import freeze_startup_heap
from dynamo_rt.protocol import Mode
from workers import registry
from workers.common.engine import Engine, MultiNodeFollower
from workers.common.gpu_flags import extra_engine_args
from workers.common.model_info import model_info_from_dir

log = logging.getLogger("workers")


def add_arguments(p: Parser) -> None:
    """The worker's own flags; the chosen engine's parser (``p.then``) parses the engine's."""
    add_runtime_flags(p)
    flag(p, "--engine", env="DYN_ENGINE", default=registry.names()[0], choices=registry.names(),
         help="engine to run (`--engine E --help` lists E's flags)")
    flag(p, "--mode", env="DYN_MODE", default="agg", choices=[m.value for m in Mode],
         help="agg, prefill or decode")
    flag(p, "--model", env="DYN_MODEL", default="tiny",
         help="model folder (HF format), or 'tiny' for the built-in tiny model (built on first use)")
    flag(p, "--served-model-name", env="DYN_SERVED_MODEL_NAME", default=None,
         help="name clients use (default: the model folder's name)")
    flag(p, "--tp", env="DYN_TP", type=int, default=1, help="tensor-parallel size (GPU engines)")
    flag(p, "--ep-size", env="DYN_EP_SIZE", type=int, default=1, help="expert-parallel size (GPU engines)")
    flag(p, "--dp-size", env="DYN_DP_SIZE", type=int, default=1, help="data-parallel size (GPU engines)")
    flag(p, "--nnodes", env="DYN_NNODES", type=int, default=1, help="nodes of one multi-node instance")
    flag(p, "--node-rank", env="DYN_NODE_RANK", type=int, default=0,
         help="this node's rank; a node of rank > 0 runs its engine headless for the leader (serves nothing)")
    flag(p, "--dist-init-addr", env="DYN_DIST_INIT_ADDR", default=None,
         help="HOST:PORT of the multi-node leader")
    flag(p, "--extra-engine-args", env="DYN_EXTRA_ENGINE_ARGS", default=None,
         help="JSON object of engine keyword arguments passed through as is (vLLM, SGLang, TRT-LLM)")
    flag(p, "--graceful-timeout", env="DYN_GRACEFUL_TIMEOUT", type=float, default=30.0,
         help="seconds to let in-flight requests finish on SIGTERM")
    flag(p, "--kv-verify-checksum", env="DYN_KV_VERIFY_CHECKSUM", default=False, is_bool=True,
         help="disaggregation over NIXL: prefill workers send a CRC-32 of every pinned KV block, decode workers "
              "check the blocks they pull against it (a mismatch is a failed pull: the prompt is prefilled "
              "locally). Costs a pass over the prompt's KV on both sides; for tests")
    flag(p, "--test-fault-kv-corrupt", env="DYN_TEST_FAULT_KV_CORRUPT", type=int, default=0,
         help="TEST ONLY fault: corrupt one received block in each of the next N KV pulls")
    env = p.env
    p.then = lambda ns: registry.engine_parser(ns.engine, env)


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="dynamo-rt worker", description="Serve one engine instance", env=env)
    add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The worker's flags and the chosen engine's, in one namespace."""
    return build_parser(env).parse_args(argv)


def resolve_model(model: str) -> Path:
    if model == "tiny":
        from dynamo_rt.local.tinymodel import ensure_tiny_model

        return ensure_tiny_model()
    p = Path(model)
    if not (p / "config.json").is_file():
        raise ConfigError("--model", f"{model}: no config.json there (a Hugging Face model folder is expected)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """What the parsers cannot check alone (raises :class:`ConfigError`)."""
    extra_engine_args(args)
    if args.nnodes < 1:
        raise ConfigError("--nnodes", f"must be at least 1, not {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise ConfigError("--node-rank", f"must be from 0 to --nnodes - 1 ({args.nnodes - 1}), not {args.node_rank}")


def build_engines(args: argparse.Namespace, model_path: Path) -> list[Engine]:
    """The chosen engine's instances (not started) for the model folder ``model_path``."""
    spec = registry.spec(args.engine)
    args.model = str(model_path)
    engines = list(spec.build(args, model_info_from_dir(model_path, args.served_model_name)))
    if not engines:
        raise ConfigError("--engine", f"engine {args.engine!r} built no engine from these flags")
    return engines


def follower(args: argparse.Namespace) -> bool:
    """A node of rank > 0 of a multi-node instance."""
    return bool(args.nnodes > 1 and args.node_rank > 0)


def engines_for(args: argparse.Namespace) -> list[Engine]:
    """The model folder resolved (``tiny``: the built-in model, served as ``dynamo-tiny``), then the engines."""
    if args.model == "tiny" and not args.served_model_name:
        args.served_model_name = "dynamo-tiny"
    return build_engines(args, resolve_model(args.model))


async def serve(args: argparse.Namespace, engines: list[Engine] | None = None) -> None:
    from dynamo_rt.discovery import Registry
    from dynamo_rt.metrics import start_metrics_server
    from dynamo_rt.transport import NatsOptions, Transport, redact_servers
    from workers.common.runtime import WorkerMetrics, WorkerRuntime

    if engines is None:
        engines = engines_for(args)
    transport = Transport(NatsOptions(
        servers=args.nats_endpoints, user=args.nats_user, password=args.nats_password, token=args.nats_token,
        creds=args.nats_creds, ca=args.nats_ca, cert=args.nats_cert, key=args.nats_key,
        name=f"worker-{args.engine}-{args.mode}"))
    await transport.connect()
    metrics = WorkerMetrics()
    runtimes: list[WorkerRuntime] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for eng in engines:
            etcd = Registry(args.etcd_endpoints, args.namespace, user=args.etcd_user, password=args.etcd_password,
                            ca=args.etcd_ca, cert=args.etcd_cert, key=args.etcd_key)
            await etcd.start()
            await eng.start()
            rt = WorkerRuntime(eng, engine_name=args.engine, mode=Mode(args.mode), registry=etcd,
                               transport=transport, metrics=metrics, kv_verify_checksum=args.kv_verify_checksum,
                               fault_corrupt_pulls=args.test_fault_kv_corrupt)
            await rt.start()
            runtimes.append(rt)
        freeze_startup_heap()  # the engine's step thread would otherwise pay for full collections
        port = start_metrics_server(metrics.registry, args.metrics_port)
        log.info("worker ready: %d instance(s) of %s (%s) for model %r; etcd %s, nats %s, metrics port %s",
                 len(runtimes), args.engine, args.mode, engines[0].info.name, redact_servers(args.etcd_endpoints),
                 redact_servers(args.nats_endpoints), port)
        await stop.wait()
        log.info("stopping: leaving discovery, draining in-flight requests (up to %.0fs)", args.graceful_timeout)
    finally:
        await asyncio.gather(*(rt.stop(grace=args.graceful_timeout) for rt in runtimes), return_exceptions=True)
        with contextlib.suppress(Exception):
            await transport.close()


def run(args: argparse.Namespace) -> int:
    from dynamo_rt.logs import setup_logging

    setup_logging(args.log_level, args.log_format, role=f"worker[{args.engine}/{args.mode}]")
    try:
        check_args(args)
        engines = None
        if follower(args):
            engines = engines_for(args)
            if isinstance(engines[0], MultiNodeFollower):
                # Rank > 0 of a multi-node instance: this node's part of the engine, for the leader, until
                # killed; it registers nothing (the leader is the instance). Engines without a follower mode
                # (TensorRT-LLM: MPI starts its ranks) serve as usual.
                log.info("node %d of %d: running %s headless for the leader at %s", args.node_rank, args.nnodes,
                         args.engine, args.dist_init_addr)
                engines[0].run_headless()
                return 0
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(serve(args, engines))
    except ConfigError as exc:
        return config_error(exc)
    except DynamoError as exc:  # a start-up failure (bad credentials, server down): one line, no traceback
        log.error("%s", exc)
        return 1
    return 0


def config_error(exc: ConfigError) -> int:
    """A bad flag: one line naming it, status 2 (as argparse's own errors)."""
    print(f"dynamo-rt worker: error: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        return config_error(exc)
    return run(args)
