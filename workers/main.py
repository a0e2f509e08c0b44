"""The worker process: ``dynamo-rt worker --engine E --mode M --model PATH`` (also ``python -m workers``).

One entry function (:func:`run`) per process: it parses flags, builds the engine, connects to NATS and
etcd, serves until SIGTERM/SIGINT, then leaves discovery and drains. Engine-specific flags come from
``workers.<engine>.flags`` (``add_flags`` / ``build_engine``), so a new engine is a new folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynamo_rt.config import Parser, add_runtime_flags, flag
from dynamo_rt.errors import DynamoError
from dynamo_rt.heap import freeze_startup_heap
from dynamo_rt.protocol import Mode
from workers.common.engine import Engine, ModelInfo

log = logging.getLogger("workers")

ENGINES = ("reference", "mocker", "vllm", "sglang", "trtllm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_flags(p)
    flag(p, "--engine", env="DYN_ENGINE", default="reference", choices=ENGINES, help="engine to run")
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
    flag(p, "--node-rank", env="DYN_NODE_RANK", type=int, default=0, help="this node's rank")
    flag(p, "--dist-init-addr", env="DYN_DIST_INIT_ADDR", default=None,
         help="HOST:PORT of the multi-node leader")
    flag(p, "--extra-engine-args", env="DYN_EXTRA_ENGINE_ARGS", default=None,
         help="JSON object of engine keyword arguments passed through as is")
    flag(p, "--graceful-timeout", env="DYN_GRACEFUL_TIMEOUT", type=float, default=30.0,
         help="seconds to let in-flight requests finish on SIGTERM")
    flag(p, "--block-size", env="DYN_BLOCK_SIZE", type=int, default=16, help="tokens per KV block")
    for name in ENGINES:
        mod = _flags_module(name)
        if mod is not None and hasattr(mod, "add_flags"):
            mod.add_flags(_SharedFlags(p, p.add_argument_group(f"{name} engine")))


class _SharedFlags:
    """What an engine's ``add_flags`` sees: flags another engine already declared (--max-num-seqs...) are
    shared, not declared twice."""

    def __init__(self, parser: argparse.ArgumentParser, group: Any) -> None:
        self._parser = parser
        self._group = group
        self.env = getattr(parser, "env", os.environ)

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        if any(n in self._parser._option_string_actions for n in names):
            return None
        return self._group.add_argument(*names, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


def _flags_module(engine: str) -> Any:
    try:
        return importlib.import_module(f"workers.{engine}.flags")
    except ImportError:
        return None


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="dynamo-rt worker", description="Serve one engine instance", env=env)
    add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    return build_parser(env).parse_args(argv)


def resolve_model(model: str) -> Path:
    if model == "tiny":
        from dynamo_rt.local.tinymodel import ensure_tiny_model

        return ensure_tiny_model()
    p = Path(model)
    if not (p / "config.json").is_file():
        raise SystemExit(f"--model {model}: no config.json there (a Hugging Face model folder is expected)")
    return p


def model_info_from_dir(path: Path, served_name: str | None, block_size: int = 16) -> ModelInfo:
    """What engines without their own loader (the mocker) publish, read from an HF folder."""
    cfg = json.loads((path / "config.json").read_text())
    gen: dict[str, Any] = {}
    if (path / "generation_config.json").is_file():
        gen = json.loads((path / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return ModelInfo(
        name=served_name or path.name,
        path=str(path),
        context_length=int(cfg.get("max_position_embeddings", 4096)),
        block_size=block_size,
        eos_token_ids=eos_ids,
        bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
    )


def build_engines(args: argparse.Namespace, model_path: Path) -> list[Engine]:
    mod = _flags_module(args.engine)
    if mod is None:
        raise SystemExit(f"engine {args.engine!r} is not available in this installation")
    args.model = str(model_path)
    if args.engine == "mocker":
        info = model_info_from_dir(model_path, args.served_model_name, getattr(args, "block_size", 16) or 16)
        if hasattr(mod, "build_engines"):
            return list(mod.build_engines(args, info))
        return [mod.build_engine(args, info)]
    return [mod.build_engine(args)]


async def serve(args: argparse.Namespace) -> None:
    from dynamo_rt.discovery import Registry
    from dynamo_rt.metrics import start_metrics_server
    from dynamo_rt.transport import NatsOptions, Transport, redact_servers
    from workers.common.runtime import WorkerMetrics, WorkerRuntime

    if args.model == "tiny" and not args.served_model_name:
        args.served_model_name = "dynamo-tiny"
    model_path = resolve_model(args.model)
    engines = build_engines(args, model_path)
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
            registry = Registry(args.etcd_endpoints, args.namespace, user=args.etcd_user,
                                password=args.etcd_password, ca=args.etcd_ca, cert=args.etcd_cert,
                                key=args.etcd_key)
            await registry.start()
            await eng.start()
            rt = WorkerRuntime(eng, engine_name=args.engine, mode=Mode(args.mode), registry=registry,
                               transport=transport, metrics=metrics)
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
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args))
    except DynamoError as exc:  # a start-up failure (bad credentials, server down): one line, no traceback
        log.error("%s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))
