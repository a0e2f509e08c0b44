"""The planner process: ``dynamo-rt planner --connector {local,rbg,dry-run}``.

Every adjustment interval it reads one :class:`~planner.core.Observation` from the frontends'
metrics, asks :class:`~planner.core.Planner` for target replicas and applies them through the
connector. At start it brings the pools within their [min, max] (the ``local`` connector starts the
minimum number of workers). While the pools are at zero it looks for demand every
``--zero-poll-interval`` seconds instead, so the first request brings a worker back within about a second
plus the worker's start-up.

Each decision is logged (one line), kept in :attr:`PlannerLoop.decisions`, optionally appended to a JSON
lines file (``--decision-log``) and exported as ``dynamo_planner_*`` gauges when ``--metrics-port`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from deploy.rbg import API_GROUP, API_VERSIONS, GROUP_NAME_ENV, POOL_ROLES
from dynamo_rt.config import Parser, flag
from dynamo_rt.errors import DynamoError
from planner.connectors import Connector, DryRunConnector, LocalConnector, LocalWorkerSpec
from planner.core import AGG, DECODE, PREFILL, Decision, Planner, PlannerConfig, PoolLimits, Replicas
from planner.metrics import FrontendMetricsSource, MetricsSource
from planner.predictors import PREDICTORS
from planner.profile import Profile
from workers import registry as engine_registry

log = logging.getLogger("planner")


class PlannerLoop:
    """Observation -> decision -> connector, once per interval (faster while at zero)."""

    def __init__(self, planner: Planner, source: MetricsSource, connector: Connector, *, interval: float,
                 zero_poll_interval: float = 1.0, decision_log: Path | None = None,
                 on_decision: Callable[[Decision], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0 or zero_poll_interval <= 0:
            raise ValueError("intervals must be > 0")
        self.planner = planner
        self.source = source
        self.connector = connector
        self.interval = interval
        self.zero_poll_interval = zero_poll_interval
        self.decision_log = decision_log
        self.on_decision = on_decision
        self.clock = clock
        self.decisions: list[Decision] = []
        self.applied: list[tuple[float, Replicas]] = []  # (time, replicas) after each change
        self.current: Replicas = {}  # as of the last tick
        self.intervals = 0

    async def _apply(self, target: Replicas, now: float) -> None:
        await self.connector.apply(target)
        self.applied.append((now, dict(target)))

    def _record(self, d: Decision) -> None:
        self.decisions.append(d)
        if d.changed or d.reason.startswith(("demand", "idle")):
            log.info("planner: %s -> %s (%s; predicted %s req/s, isl %s, osl %s)", d.current, d.target,
                     d.reason, _fmt(d.predicted_rate), _fmt(d.predicted_isl), _fmt(d.predicted_osl))
        else:
            log.debug("planner: holding %s (%s)", d.current, d.reason)
        if self.decision_log is not None:
            with self.decision_log.open("a") as f:
                f.write(json.dumps(d.to_dict()) + "\n")
        if self.on_decision is not None:
            self.on_decision(d)

    async def start(self) -> None:
        """Bring the pools within their limits and take the metrics baseline."""
        current = await self.connector.current()
        wanted = self.planner.clamp(current, keep_zero=False)
        self.current = {p: current.get(p, 0) for p in wanted}
        if wanted != self.current:
            log.info("planner: bringing %s within limits -> %s", current, wanted)
            await self._apply(wanted, self.clock())
            self.current = wanted
        await self.source.observe()  # baseline: the first interval is measured from here

    async def run(self, stop: asyncio.Event, max_intervals: int = 0) -> None:
        await self.start()
        next_tick = self.clock() + self.interval
        while not stop.is_set():
            at_zero = self.planner.at_zero(self.current)
            wake_at = self.clock() + self.zero_poll_interval if at_zero else next_tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, wake_at - self.clock()))
            if stop.is_set():
                return
            await self.tick()
            next_tick = self.clock() + self.interval
            self.intervals += 1
            if max_intervals and self.intervals >= max_intervals:
                return

    async def tick(self) -> Decision:
        """One observation and decision, applied if it changes anything."""
        obs = await self.source.observe()
        current = await self.connector.current()
        now = self.clock()
        d = self.planner.step(obs, current, now)
        self._record(d)
        self.current = dict(current)
        if d.changed:
            try:
                await self._apply(d.target, now)
                self.current = dict(d.target)
            except DynamoError as exc:
                log.error("planner: applying %s failed: %s (retrying next interval)", d.target, exc)
        return d


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


# ---------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--connector", env="DYN_PLANNER_CONNECTOR", default="dry-run", choices=["local", "rbg", "dry-run"],
         help="how decisions are applied")
    flag(p, "--frontend-url", env="DYN_PLANNER_FRONTEND_URL", default="http://127.0.0.1:8000",
         help="comma-separated frontend base URLs whose /metrics are read (summed)")
    flag(p, "--frontend-resolve-all", env="DYN_PLANNER_FRONTEND_RESOLVE_ALL", default=False, is_bool=True,
         help="scrape every address a frontend host name resolves to (a headless Service: one per pod)")
    flag(p, "--model", env="DYN_PLANNER_MODEL", default=None,
         help="served model name to plan for (default: every model the frontends report); also the "
              "--served-model-name of local workers")
    flag(p, "--mode", env="DYN_PLANNER_MODE", default="disagg", choices=["disagg", "agg"],
         help="disagg: size prefill and decode pools; agg: one pool of aggregated workers")
    flag(p, "--adjustment-interval", env="DYN_PLANNER_ADJUSTMENT_INTERVAL", type=float, default=60.0,
         help="seconds between decisions")
    flag(p, "--ttft-target", env="DYN_PLANNER_TTFT_TARGET", type=float, default=0.5,
         help="time-to-first-token target, seconds")
    flag(p, "--itl-target", env="DYN_PLANNER_ITL_TARGET", type=float, default=0.05,
         help="inter-token latency target, seconds")
    flag(p, "--profile", env="DYN_PLANNER_PROFILE", default="mocker",
         help="per-replica performance profile (JSON from `dynamo-rt profile`, or a shipped name: mocker)")
    flag(p, "--engine-speedup", env="DYN_PLANNER_ENGINE_SPEEDUP", type=float, default=1.0,
         help="the workers run this many times faster than the profiled engine (the mocker's --speedup)")
    flag(p, "--predictor", env="DYN_PLANNER_PREDICTOR", default="moving-average",
         help=f"load predictor: {', '.join(PREDICTORS)}, or module:factory")
    flag(p, "--lookahead", env="DYN_PLANNER_LOOKAHEAD", type=int, default=1,
         help="intervals ahead the load is predicted for: a trend predictor sizes for where the load will be "
              "once new replicas are up (their start-up time / the interval, rounded up)")
    flag(p, "--predictor-window", env="DYN_PLANNER_PREDICTOR_WINDOW", type=int, default=3,
         help="intervals the predictor looks back")
    for pool, lo, hi in ((PREFILL, 1, 8), (DECODE, 1, 8), (AGG, 1, 8)):
        flag(p, f"--min-{pool}", env=f"DYN_PLANNER_MIN_{pool.upper()}", type=int, default=lo,
             help=f"fewest {pool} replicas (0 allowed)")
        flag(p, f"--max-{pool}", env=f"DYN_PLANNER_MAX_{pool.upper()}", type=int, default=hi,
             help=f"most {pool} replicas")
    flag(p, "--max-utilization", env="DYN_PLANNER_MAX_UTILIZATION", type=float, default=0.85,
         help="highest planned busy share of a replica (headroom for bursts)")
    flag(p, "--prefill-cv2", env="DYN_PLANNER_PREFILL_CV2", type=float, default=1.0,
         help="variability of prefill service times in the queueing model (0: identical prompts; 1: "
              "spread lengths and scheduling noise)")
    flag(p, "--scale-down-window", env="DYN_PLANNER_SCALE_DOWN_WINDOW", type=float, default=180.0,
         help="a pool shrinks only to the largest recommendation of this many seconds")
    flag(p, "--scale-up-window", env="DYN_PLANNER_SCALE_UP_WINDOW", type=float, default=0.0,
         help="a pool grows only to the smallest recommendation of this many seconds (0: at once)")
    flag(p, "--scale-to-zero-after", env="DYN_PLANNER_SCALE_TO_ZERO_AFTER", type=float, default=0.0,
         help="stop every worker after this many idle seconds (0: never); the first request brings them back")
    flag(p, "--zero-poll-interval", env="DYN_PLANNER_ZERO_POLL_INTERVAL", type=float, default=1.0,
         help="while at zero, seconds between looks for demand")
    flag(p, "--correction", env="DYN_PLANNER_CORRECTION", default=True, is_bool=True,
         help="correct the profile by the observed TTFT / ITL")
    flag(p, "--correction-settle", env="DYN_PLANNER_CORRECTION_SETTLE", type=float, default=180.0,
         help="seconds after a pool's size changes before its observed latency feeds the correction again "
              "(new replicas must be up and any queue drained)")
    flag(p, "--max-intervals", env="DYN_PLANNER_MAX_INTERVALS", type=int, default=0,
         help="stop after this many decisions (0: run until stopped)")
    flag(p, "--apply-once", env="DYN_PLANNER_APPLY_ONCE", default=None,
         help="set these replicas through the connector and exit, e.g. 'prefill=3,decode=2' (a manual "
              "override, and a check of the connector and its permissions); 'show' prints them only")
    flag(p, "--decision-log", env="DYN_PLANNER_DECISION_LOG", default=None,
         help="append every decision to this JSON-lines file")
    flag(p, "--metrics-port", env="DYN_PLANNER_METRICS_PORT", type=int, default=-1,
         help="serve dynamo_planner_* gauges on this port (0: a free port; -1: off)")
    flag(p, "--log-level", env="DYN_LOG", default="info", help="log level")
    flag(p, "--log-format", env="DYN_LOG_FORMAT", default="text", choices=["text", "json"], help="log format")
    # local connector
    flag(p, "--worker-engine", env="DYN_PLANNER_WORKER_ENGINE", default="mocker",
         choices=engine_registry.names(), help="engine of local workers")
    flag(p, "--worker-model", env="DYN_PLANNER_WORKER_MODEL", default="tiny",
         help="model folder of local workers, or 'tiny'")
    flag(p, "--worker-args", env="DYN_PLANNER_WORKER_ARGS", default="",
         help="extra flags for every local worker, one shell-quoted string (e.g. '--speedup 4')")
    flag(p, "--worker-graceful-timeout", env="DYN_PLANNER_WORKER_GRACEFUL_TIMEOUT", type=float, default=30.0,
         help="seconds a stopping worker may spend finishing its requests")
    flag(p, "--worker-log-dir", env="DYN_PLANNER_WORKER_LOG_DIR", default=None,
         help="write each local worker's output to a file here (default: inherit ours)")
    # rbg connector
    flag(p, "--rbg-name", env="DYN_PLANNER_RBG_NAME", default=None,
         help=f"RoleBasedGroup to scale (default: ${GROUP_NAME_ENV}, set by RBG in its own pods)")
    flag(p, "--k8s-namespace", env="DYN_PLANNER_K8S_NAMESPACE", default=None,
         help="namespace of the group (default: the service account's, or the kubeconfig context's)")
    flag(p, "--kubeconfig", env="DYN_PLANNER_KUBECONFIG", default=None,
         help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG, else ~/.kube/config)")
    flag(p, "--rbg-api-version", env="DYN_PLANNER_RBG_API_VERSION", default="v1alpha2",
         choices=API_VERSIONS, help=f"{API_GROUP} version to speak")
    flag(p, "--prefill-role", env="DYN_PLANNER_PREFILL_ROLE", default=POOL_ROLES[PREFILL],
         help="role of the prefill pool")
    flag(p, "--decode-role", env="DYN_PLANNER_DECODE_ROLE", default=POOL_ROLES[DECODE],
         help="role of the decode pool")
    flag(p, "--agg-role", env="DYN_PLANNER_AGG_ROLE", default=POOL_ROLES[AGG],
         help="role of the aggregated pool")
    flag(p, "--rbg-rollout-timeout", env="DYN_PLANNER_RBG_ROLLOUT_TIMEOUT", type=float, default=300.0,
         help="longest wait for a coordinated (OrderReady) rollout before writing new targets anyway")


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="dynamo-rt planner", description="the SLA planner", env=env)
    add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    return build_parser(env).parse_args(argv)


def planner_config(args: argparse.Namespace) -> PlannerConfig:
    limits = {pool: PoolLimits(getattr(args, f"min_{pool}"), getattr(args, f"max_{pool}"))
              for pool in (PREFILL, DECODE, AGG)}
    return PlannerConfig(
        ttft_target=args.ttft_target, itl_target=args.itl_target, mode=args.mode, limits=limits,
        predictor=args.predictor, predictor_window=args.predictor_window, max_utilization=args.max_utilization,
        lookahead=args.lookahead,
        prefill_cv2=args.prefill_cv2,
        scale_down_window_s=args.scale_down_window, scale_up_window_s=args.scale_up_window,
        scale_to_zero_after_s=args.scale_to_zero_after, correction=args.correction,
        correction_settle_s=args.correction_settle)


def make_connector(args: argparse.Namespace, cfg: PlannerConfig, env: Mapping[str, str] | None = None
                   ) -> Connector:
    env = dict(os.environ if env is None else env)
    if args.connector == "dry-run":
        return DryRunConnector({p: cfg.limits[p].min for p in cfg.pools})
    if args.connector == "local":
        spec = LocalWorkerSpec(engine=args.worker_engine, model=args.worker_model,
                               served_model_name=args.model, extra_args=shlex.split(args.worker_args or ""),
                               graceful_timeout=args.worker_graceful_timeout, env=env,
                               log_dir=Path(args.worker_log_dir) if args.worker_log_dir else None)
        return LocalConnector(spec, cfg.pools)
    from dynamo_rt.errors import InvalidRequest
    from planner.kube import KubeClient, load_config
    from planner.rbg import RbgConnector

    group = args.rbg_name or env.get(GROUP_NAME_ENV)
    if not group:
        raise InvalidRequest(f"--connector rbg needs --rbg-name (or {GROUP_NAME_ENV})", param="rbg_name")
    kcfg = load_config(args.kubeconfig, env)
    log.info("Kubernetes API %s (%s)", kcfg.server, kcfg.source)
    roles = {PREFILL: args.prefill_role, DECODE: args.decode_role, AGG: args.agg_role}
    return RbgConnector(KubeClient(kcfg), group=group, namespace=args.k8s_namespace or kcfg.namespace,
                        pools=cfg.pools, roles=roles, api_version=args.rbg_api_version,
                        rollout_timeout_s=args.rbg_rollout_timeout)


def _gauges(port: int) -> Callable[[Decision], None] | None:
    if port < 0:
        return None
    from prometheus_client import CollectorRegistry, Gauge

    from dynamo_rt.metrics import start_metrics_server

    reg = CollectorRegistry()
    target = Gauge("dynamo_planner_target_replicas", "Replicas the planner wants", ["pool"], registry=reg)
    predicted = Gauge("dynamo_planner_predicted", "Predicted load of the next interval", ["quantity"],
                      registry=reg)
    corr = Gauge("dynamo_planner_correction", "Observed / profiled latency", ["metric"], registry=reg)
    start_metrics_server(reg, port)

    def update(d: Decision) -> None:
        for pool, n in d.target.items():
            target.labels(pool).set(n)
        for q, v in (("rate", d.predicted_rate), ("isl", d.predicted_isl), ("osl", d.predicted_osl)):
            if v is not None:
                predicted.labels(q).set(v)
        corr.labels("ttft").set(d.ttft_correction)
        corr.labels("itl").set(d.itl_correction)

    return update


def parse_replicas(text: str, pools: Sequence[str]) -> Replicas:
    """``prefill=3,decode=2`` -> {"prefill": 3, "decode": 2} (pools of this mode only)."""
    from dynamo_rt.errors import InvalidRequest

    out: Replicas = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        pool, _, n = part.partition("=")
        if pool not in pools or not n.strip().isdigit():
            raise InvalidRequest(f"bad replica setting {part!r}: expected POOL=N with POOL in {list(pools)}",
                                 param="apply_once")
        out[pool] = int(n)
    return out


async def apply_once(args: argparse.Namespace) -> Replicas:
    """``--apply-once``: one write through the connector (no metrics, no limits), then its view."""
    from dynamo_rt.errors import InvalidRequest

    if args.connector == "local":
        raise InvalidRequest("--apply-once works with the rbg and dry-run connectors (local workers are the "
                             "planner's children and stop with it)", param="apply_once")
    cfg = planner_config(args)
    connector = make_connector(args, cfg)
    try:
        if args.apply_once.strip() != "show":
            await connector.apply(parse_replicas(args.apply_once, cfg.pools))
        return await connector.current()
    finally:
        await connector.close()


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> PlannerLoop:
    cfg = planner_config(args)
    profile = Profile.load(args.profile)
    if args.engine_speedup != 1.0:
        profile = profile.scaled(args.engine_speedup)
    urls = [u.strip() for u in args.frontend_url.split(",") if u.strip()]
    source = FrontendMetricsSource(urls, args.model, resolve_all=args.frontend_resolve_all)
    connector = make_connector(args, cfg)
    loop = PlannerLoop(Planner(cfg, profile), source, connector, interval=args.adjustment_interval,
                       zero_poll_interval=args.zero_poll_interval,
                       decision_log=Path(args.decision_log) if args.decision_log else None,
                       on_decision=_gauges(args.metrics_port))
    stop = stop or asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        ev_loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            ev_loop.add_signal_handler(sig, stop.set)
    log.info("planner: %s connector, %s mode, frontends %s, model %s, interval %.1fs, TTFT target %.3fs, "
             "ITL target %.3fs, profile %s (speedup %g)", connector.name, cfg.mode, urls, args.model or "(all)",
             args.adjustment_interval, cfg.ttft_target, cfg.itl_target, args.profile, args.engine_speedup)
    try:
        await loop.run(stop, args.max_intervals)
    finally:
        await connector.close()
        await source.close()
    return loop


def run(args: argparse.Namespace) -> int:
    from dynamo_rt.logs import setup_logging

    setup_logging(args.log_level, args.log_format, role="planner")
    try:
        if args.apply_once:
            print(json.dumps(asyncio.run(apply_once(args))), flush=True)
            return 0
        asyncio.run(serve(args))
    except DynamoError as exc:
        log.error("planner: %s", exc)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))

