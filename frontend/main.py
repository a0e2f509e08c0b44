"""The frontend process: ``dynamo-rt frontend --http-port 8000`` (also ``python -m frontend``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dynamo_rt.config import Parser, add_runtime_flags, flag
from dynamo_rt.errors import ConfigError

if TYPE_CHECKING:
    from frontend.drain import Drain

log = logging.getLogger("frontend")

ROUTER_MODES = ("round-robin", "random", "least-loaded", "kv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_flags(p)
    flag(p, "--http-host", env="DYN_HTTP_HOST", default="0.0.0.0", help="address to listen on")
    flag(p, "--http-port", env="DYN_HTTP_PORT", type=int, default=8000, help="HTTP port (0: pick a free one)")
    flag(p, "--router-mode", env="DYN_ROUTER_MODE", default="round-robin", choices=ROUTER_MODES,
         help="how workers are picked")
    # 4 on bench/kv_routing.py (multi-turn sessions, 8 workers, policy only): hit rate 0.86 vs 0.83 at 1,
    # TTFT p50 0.64x round-robin vs 0.66x; 8 is only marginally better. Under heavy saturation a lower
    # weight spreads load better.
    flag(p, "--kv-overlap-weight", env="DYN_KV_OVERLAP_WEIGHT", type=float, default=4.0,
         help="kv router: weight of uncached prompt blocks against active decode blocks")
    flag(p, "--kv-host-hit-weight", env="DYN_KV_HOST_HIT_WEIGHT", type=float, default=0.5,
         help="kv router: a prompt block a worker holds in its host-memory KV tier counts as this fraction "
              "of a device-memory hit (0..1; it then costs 1 - weight of an uncached block)")
    flag(p, "--kv-disk-hit-weight", env="DYN_KV_DISK_HIT_WEIGHT", type=float, default=0.25,
         help="kv router: the same for a block held in the worker's disk KV tier")
    flag(p, "--router-temperature", env="DYN_ROUTER_TEMPERATURE", type=float, default=0.0,
         help="kv router: softmax sampling temperature (0: always the lowest cost)")
    flag(p, "--disagg-threshold", env="DYN_DISAGG_THRESHOLD", type=int, default=64,
         help="prefill on the decode worker when fewer prompt tokens than this are uncached there")
    flag(p, "--migration-limit", env="DYN_MIGRATION_LIMIT", type=int, default=3,
         help="times a request may move to another worker when its worker fails mid-stream (0: never)")
    flag(p, "--max-concurrency", env="DYN_MAX_CONCURRENCY", type=int, default=0,
         help="requests running at once per model (0: unlimited)")
    flag(p, "--max-queue", env="DYN_MAX_QUEUE", type=int, default=1024,
         help="requests waiting per model beyond --max-concurrency; more get 429")
    flag(p, "--max-body-bytes", env="DYN_MAX_BODY_BYTES", type=int, default=8 * 1024 * 1024,
         help="largest request body accepted (413 beyond)")
    flag(p, "--request-timeout", env="DYN_REQUEST_TIMEOUT", type=float, default=600.0,
         help="deadline of one request in seconds")
    flag(p, "--worker-wait-timeout", env="DYN_WORKER_WAIT_TIMEOUT", type=float, default=0.0,
         help="seconds a request for a model that has no ready worker (its pool scaled to zero) waits for one "
              "to register before a 503; 0: answer 503 at once")
    flag(p, "--response-ttl", env="DYN_RESPONSE_TTL", type=float, default=24 * 3600.0,
         help="seconds a stored /v1/responses response can be continued (previous_response_id) or fetched")
    flag(p, "--api-key", env="DYN_API_KEY", default=None,
         help="require this key (Bearer or x-api-key) on /v1 routes; its tenant is 'default'")
    flag(p, "--api-keys-file", env="DYN_API_KEYS_FILE", default=None,
         help='JSON file of API keys per tenant, {"tenants": {"acme": ["sk-..."], ...}}: each tenant gets its '
              "own prefix cache (with --api-key too, that key is tenant 'default')")
    flag(p, "--debug-endpoints", env="DYN_DEBUG_ENDPOINTS", default=False, is_bool=True,
         help="serve GET /debug/kv_index (the KV router's index per worker; for tests and bench/chaos.py)")
    flag(p, "--drain-timeout", env="DYN_DRAIN_TIMEOUT", type=float, default=10.0,
         help="on SIGTERM / SIGINT: seconds the requests in flight get to finish (new ones get 503); the streams "
              "still running then end with an error event and [DONE]")
    flag(p, "--http-server", env="DYN_HTTP_SERVER", default="builtin", choices=("builtin", "uvicorn"),
         help="the HTTP/1.1 server: builtin (frontend/http1.py, the lean one: SSE chunks go straight to the "
              "socket) or uvicorn (httptools); both serve the same app")
    flag(p, "--prepare-threads", env="DYN_PREPARE_THREADS", type=int, default=0,
         help="threads that render and tokenize long prompts off the event loop (0: one less than the CPUs, "
              "1 to 4)")
    flag(p, "--prepare-nice", env="DYN_PREPARE_NICE", type=int, default=10,
         help="nice value added to those threads, so the event loop's token path wins the CPU (0: none)")
    flag(p, "--tool-call-parser", env="DYN_TOOL_CALL_PARSER", default=None,
         help="parse tool calls out of chat output in this format (overrides the model card's): "
              "hermes, qwen, llama3_json, mistral, deepseek_v3, pythonic")
    flag(p, "--reasoning-parser", env="DYN_REASONING_PARSER", default=None,
         help="split reasoning_content from content (overrides the model card's): deepseek_r1, qwen3")
    flag(p, "--canary-interval", env="DYN_CANARY_INTERVAL", type=float, default=5.0,
         help="seconds between health canaries per model (frontend/health.py; 0: on demand only, /health?canary=1)")
    flag(p, "--canary-timeout", env="DYN_CANARY_TIMEOUT", type=float, default=10.0,
         help="seconds a health canary may take before it counts as failed")


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="dynamo-rt frontend", description="OpenAI-compatible HTTP frontend", env=env)
    add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    return build_parser(env).parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Values argparse cannot check by type: ConfigError naming the flag (the process exits with one line)."""

    def at_least(name: str, lo: float, *, above: bool = False) -> None:
        v = getattr(args, name.lstrip("-").replace("-", "_"))
        if v < lo or (above and v == lo):
            raise ConfigError(name, f"must be {'>' if above else '>='} {lo:g}, got {v:g}")

    if not 0 <= args.http_port <= 65535:
        raise ConfigError("--http-port", f"must be a TCP port (0..65535; 0 picks a free one), got {args.http_port}")
    for name in ("--kv-host-hit-weight", "--kv-disk-hit-weight"):
        v = getattr(args, name[2:].replace("-", "_"))
        if not 0.0 <= v <= 1.0:
            raise ConfigError(name, f"must be in [0, 1] (the fraction of a device-memory hit), got {v:g}")
    for name in ("--kv-overlap-weight", "--router-temperature", "--disagg-threshold", "--migration-limit",
                 "--max-concurrency", "--max-queue", "--worker-wait-timeout", "--drain-timeout",
                 "--canary-interval", "--prepare-threads"):
        at_least(name, 0)
    if not 0 <= args.prepare_nice <= 19:
        raise ConfigError("--prepare-nice", f"must be in 0..19 (added to the threads' nice value), got "
                                            f"{args.prepare_nice}")
    at_least("--max-body-bytes", 0, above=True)
    at_least("--request-timeout", 0, above=True)
    at_least("--response-ttl", 0, above=True)
    at_least("--canary-timeout", 0, above=True)
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key", "is empty (leave it unset to serve without a key)")
    if args.api_keys_file is not None:
        from frontend.tenants import load_keys

        load_keys(args.api_key, args.api_keys_file)  # a malformed file stops the process here, naming the flag
    from frontend.parsers import reasoning_parser, tool_parser

    if args.tool_call_parser:
        tool_parser(args.tool_call_parser)
    if args.reasoning_parser:
        reasoning_parser(args.reasoning_parser)


@contextlib.asynccontextmanager
async def frontend_services(args: argparse.Namespace) -> AsyncIterator[object]:
    """Connect NATS and etcd and build the app's state; closes everything on exit."""
    from dynamo_rt.discovery import DiscoveryView, Registry
    from dynamo_rt.router import RouterMetrics
    from dynamo_rt.transport import NatsOptions, Transport
    from frontend import offload
    from frontend.app import Frontend, FrontendConfig
    from frontend.metrics import FrontendMetrics
    from frontend.models import ModelManager
    from frontend.serving import Dispatcher
    from frontend.tenants import load_keys

    transport = Transport(NatsOptions(
        servers=args.nats_endpoints, user=args.nats_user, password=args.nats_password, token=args.nats_token,
        creds=args.nats_creds, ca=args.nats_ca, cert=args.nats_cert, key=args.nats_key, name="frontend"))
    await transport.connect()
    registry = Registry(args.etcd_endpoints, args.namespace, user=args.etcd_user, password=args.etcd_password,
                        ca=args.etcd_ca, cert=args.etcd_cert, key=args.etcd_key)
    await registry.start()
    view = DiscoveryView(registry)
    await view.start()
    kwargs = {}
    if args.router_mode == "kv":
        kwargs = {"overlap_weight": args.kv_overlap_weight, "temperature": args.router_temperature,
                  "host_hit_weight": args.kv_host_hit_weight, "disk_hit_weight": args.kv_disk_hit_weight}
    metrics = FrontendMetrics()
    manager = ModelManager(view, transport, router_mode=args.router_mode, router_kwargs=kwargs,
                           router_metrics=RouterMetrics(metrics.registry))
    metrics.watch_sse_writes(transport)
    metrics.watch_prompt_caches(lambda: [(sm.name, sm.pre) for sm in list(manager.models.values())])
    await manager.start()
    engine = Dispatcher(manager, transport, metrics, request_timeout=args.request_timeout,
                    disagg_threshold=args.disagg_threshold, migration_limit=args.migration_limit)
    cfg = FrontendConfig(max_body_bytes=args.max_body_bytes, max_concurrency=args.max_concurrency,
                         max_queue=args.max_queue, request_timeout=args.request_timeout,
                         keys=load_keys(args.api_key, args.api_keys_file), worker_wait_timeout=args.worker_wait_timeout,
                         response_ttl=args.response_ttl, tool_call_parser=args.tool_call_parser,
                         reasoning_parser=args.reasoning_parser, prepare_threads=args.prepare_threads,
                         prepare_nice=args.prepare_nice)
    if cfg.keys is not None:  # counts only: a key never reaches a log
        log.info("API keys required: %d keys of %d tenants", len(cfg.keys), len(cfg.keys.tenants))
    offload.set_tokenizer_nice(args.prepare_nice)
    fe = Frontend(manager, engine, metrics, cfg)
    fe.health.interval, fe.health.timeout = args.canary_interval, args.canary_timeout
    await fe.health.start()
    try:
        yield fe
    finally:
        await fe.health.close()
        fe.offload.close()
        await manager.close()
        await view.close()
        await registry.close()
        await transport.close()


async def serve(args: argparse.Namespace) -> None:
    from frontend.app import build_asgi
    from frontend.drain import Drain

    async with frontend_services(args) as fe:
        asgi: Any = build_asgi(fe)  # type: ignore[arg-type]
        if args.debug_endpoints:
            from frontend.debug import DebugRoutes

            asgi = DebugRoutes(asgi, fe.manager)  # type: ignore[attr-defined]
        app = Drain(asgi)
        sock = socket.socket(socket.AF_INET6 if ":" in args.http_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.http_host, args.http_port))
        sock.listen(4096)  # connections queue from here on, while the server below starts
        port = sock.getsockname()[1]
        if args.http_server == "uvicorn":
            serving = _uvicorn_server(app, sock, args.drain_timeout)
        else:
            serving = _builtin_server(app, sock, args.drain_timeout)
        from dynamo_rt.heap import freeze_startup_heap
        from dynamo_rt.transport import redact_servers

        freeze_startup_heap()
        log.info("frontend listening on http://%s:%d (etcd %s, nats %s, namespace %s, router %s, %s HTTP server)",
                 args.http_host, port, redact_servers(args.etcd_endpoints), redact_servers(args.nats_endpoints),
                 args.namespace, args.router_mode, args.http_server)
        await serving


async def _builtin_server(app: Drain, sock: socket.socket, drain_timeout: float) -> None:
    """frontend/http1.py until SIGTERM / SIGINT: then drain (new requests get 503 while the socket stays open),
    and stop: what still runs gets 1 s, then is cancelled (an error event + [DONE] on each stream). A second
    signal stops at once."""
    from frontend.http1 import Server

    loop = asyncio.get_running_loop()
    server = Server(app, backlog=4096)
    await server.start(sock)
    stopping: list[asyncio.Task[None]] = []

    async def drain_then_exit(timeout: float) -> None:
        left = await app.drain(timeout)
        log.info("drained: %d request(s) still running are ended now", left)
        await server.shutdown(grace=1.0)

    def on_signal() -> None:
        stopping.append(loop.create_task(drain_then_exit(0.0 if stopping else drain_timeout)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _uvicorn_server(app: Drain, sock: socket.socket, drain_timeout: float) -> None:
    import uvicorn

    config = uvicorn.Config(app, loop="none", http="httptools", log_config=None, access_log=False,
                            timeout_graceful_shutdown=10, backlog=4096,
                            proxy_headers=False, server_header=False)
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    async def drain_then_exit() -> None:
        left = await app.drain(drain_timeout)
        log.info("drained: %d request(s) still running are ended now", left)
        config.timeout_graceful_shutdown = 1  # then the server cancels them: an error event + [DONE] each
        server.should_exit = True

    def on_signal() -> None:
        if stopping:  # a second signal: stop at once
            config.timeout_graceful_shutdown = 1
            server.should_exit = True
        else:
            stopping.append(loop.create_task(drain_then_exit()))

    # uvicorn installs its own handlers while it serves (signal.signal, calling server.handle_exit): ours
    # replaces that method, so a signal starts the drain instead of closing the listening socket at once.
    def handle_exit(_sig: int, _frame: object) -> None:
        loop.call_soon_threadsafe(on_signal)

    server.handle_exit = handle_exit  # type: ignore[method-assign,assignment]
    await server.serve(sockets=[sock])


def run(args: argparse.Namespace) -> int:
    from dynamo_rt.logs import setup_logging

    check_args(args)
    setup_logging(args.log_level, args.log_format, role="frontend")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from dynamo_rt.cli import config_error

    try:
        return run(parse_args(argv))
    except ConfigError as exc:
        return config_error("dynamo-rt frontend", exc)
