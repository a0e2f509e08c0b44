"""Planner bench: a bursty trace (quiet, ramp, peak, quiet) on mocker workers, twice in one run.

1. ours: the planner with the ``local`` connector, starting from its minimum;
2. baseline: a static deployment sized for the peak: per pool, the replicas the planner ran on average
   while the trace was at its peak, rounded up (what it took there), as ``local`` workers started before
   the trace and kept to its end. The planner's formula at the nominal peak load (``formula``: the profile
   alone, before any observed-latency correction) is printed alongside.

Same frontend, same etcd / NATS, same trace (seeded Poisson arrivals, prompt and output lengths drawn
around their means). For each run: SLA attainment (share of requests whose client-side TTFT and mean
ITL both meet the targets; a failed request misses) and replica-seconds (every worker process from start
to exit, draining included, over the trace window). Prints a table, saves a plot to
bench/out/planner.png and the per-request data to bench/out/planner.json, and ends with one JSON line::

    {"bench": "planner", "ours": ..., "baseline": ..., "ratio": ..., "unit": "replica_s", "sla_attainment": ...}

Goal: SLA attainment >= 95 % with ratio <= 0.6. Time is compressed by the mocker's ``--speedup``; every
figure here is wall time. Usage: ``python bench/planner.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import report  # noqa: E402
from dynamo_rt.local import commands  # noqa: E402
from dynamo_rt.local.harness import Stack  # noqa: E402
from dynamo_rt.local.services import LocalServices, free_port  # noqa: E402
from planner.connectors import LocalConnector, LocalWorker, LocalWorkerSpec  # noqa: E402
from planner.core import DECODE, PREFILL, Planner, PlannerConfig, PoolLimits  # noqa: E402
from planner.metrics import FrontendMetricsSource  # noqa: E402
from planner.profile import Profile  # noqa: E402
from planner.runner import PlannerLoop  # noqa: E402
from planner.sla import decode_replicas, prefill_replicas  # noqa: E402

OUT = ROOT / "bench" / "out"
MODEL = "bench-planner"
_t0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _t0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Trace


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate_from: float
    rate_to: float


@dataclass
class Arrival:
    t: float
    isl: int
    osl: int
    seed: int


def make_trace(phases: list[Phase], isl: int, osl: int, seed: int) -> list[Arrival]:
    """Non-homogeneous Poisson arrivals (thinning), lengths uniform in [0.75, 1.25] x their means."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    t0 = 0.0
    for ph in phases:
        peak = max(ph.rate_from, ph.rate_to)
        t = 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= ph.seconds:
                break
            rate = ph.rate_from + (ph.rate_to - ph.rate_from) * t / ph.seconds
            if rng.random() * peak <= rate:
                out.append(Arrival(t0 + t, rng.randint(int(isl * 0.75), int(isl * 1.25)),
                                   rng.randint(int(osl * 0.75), int(osl * 1.25)), rng.getrandbits(32)))
        t0 += ph.seconds
    return out


# ---------------------------------------------------------------------------------------------------------
# Load


@dataclass
class Sample:
    t: float  # scheduled send time from the trace start
    isl: int
    osl: int
    status: int = 0
    ttft: float | None = None
    itl: float | None = None
    tokens: int = 0
    error: str = ""


async def one(client: httpx.AsyncClient, url: str, a: Arrival) -> Sample:
    s = Sample(a.t, a.isl, a.osl)
    rng = random.Random(a.seed)
    body = {"model": MODEL, "prompt": [rng.randrange(100, 1000) for _ in range(a.isl)], "max_tokens": a.osl,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = 0.0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            s.status = r.status_code
            if r.status_code != 200:
                s.error = (await r.aread()).decode(errors="replace")[:200]
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    s.error = str(data["error"].get("message"))[:200]
                if data.get("usage"):
                    s.tokens = int(data["usage"]["completion_tokens"])
                if data.get("choices"):
                    now = time.perf_counter()
                    if not first:
                        first = now
                    last = now
    except httpx.HTTPError as exc:
        s.error = repr(exc)[:200]
        return s
    if first:
        s.ttft = first - t0
        if s.tokens > 1:
            s.itl = (last - first) / (s.tokens - 1)
    return s


async def replay(url: str, trace: list[Arrival]) -> tuple[list[Sample], float, float]:
    """Send the trace open-loop; returns the samples and the wall window [start, end of the last request]."""
    # No keep-alive: a reused httpx pool can start a burst of streams in waves instead of at once.
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30), limits=limits) as client:
        start = time.monotonic()
        tasks = []
        for a in trace:
            await asyncio.sleep(max(0.0, start + a.t - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, url, a)))
        samples = list(await asyncio.gather(*tasks))
        return samples, start, time.monotonic()


# ---------------------------------------------------------------------------------------------------------
# Accounting


def replica_seconds(workers: list[LocalWorker], ends: dict[int, float], start: float, end: float) -> float:
    """Worker-process seconds inside [start, end]; a worker still running counts until ``end``."""
    total = 0.0
    for w in workers:
        a = max(start, w.started)
        b = min(end, ends.get(w.pid, end))
        total += max(0.0, b - a)
    return total


class Tracker:
    """Remembers every worker a LocalConnector ever started and when it exited."""

    def __init__(self, conn: LocalConnector) -> None:
        self.conn = conn
        self.all: list[LocalWorker] = []
        self.ends: dict[int, float] = {}
        self.timeline: list[tuple[float, int, int]] = []  # (t, prefill, decode) running processes
        self.active: list[tuple[float, int, int]] = []  # the same, less those draining after a scale-down

    def poll(self) -> None:
        now = time.monotonic()
        for w in [*self.conn.workers, *self.conn.stopping]:
            if w not in self.all:
                self.all.append(w)
        for w in self.all:
            if w.pid not in self.ends and w.proc.poll() is not None:
                self.ends[w.pid] = now
        alive = [w for w in self.all if w.pid not in self.ends]
        self.timeline.append((now, sum(w.pool == PREFILL for w in alive), sum(w.pool == DECODE for w in alive)))
        act = self.conn.workers
        self.active.append((now, sum(w.pool == PREFILL for w in act), sum(w.pool == DECODE for w in act)))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        self.poll()


def attainment(samples: list[Sample], ttft_target: float, itl_target: float) -> dict[str, float]:
    n = len(samples)
    ok = [s for s in samples if s.status == 200 and not s.error and s.ttft is not None]
    ttft_ok = sum(1 for s in ok if s.ttft is not None and s.ttft <= ttft_target)
    itl_ok = sum(1 for s in ok if s.itl is None or s.itl <= itl_target)
    both = sum(1 for s in ok if s.ttft is not None and s.ttft <= ttft_target and (s.itl is None or s.itl <= itl_target))
    ttfts = sorted(s.ttft for s in ok if s.ttft is not None)
    itls = sorted(s.itl for s in ok if s.itl is not None)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else math.nan

    return {"requests": n, "failed": n - len(ok), "sla": both / n if n else math.nan, "ttft_ok": ttft_ok / n,
            "itl_ok": itl_ok / n, "ttft_p50": pct(ttfts, 0.5), "ttft_p95": pct(ttfts, 0.95),
            "ttft_p99": pct(ttfts, 0.99), "itl_p50": pct(itls, 0.5), "itl_p95": pct(itls, 0.95)}


# ---------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunResult:
    name: str
    replica_s: float
    window: tuple[float, float]
    stats: dict[str, float]
    samples: list[Sample] = field(default_factory=list)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    active: list[tuple[float, int, int]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)


async def wait_instances(url: str, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as c:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                r = await c.get(url + "/health")
                if r.status_code == 200 and sum(m["instances"] for m in r.json()["models"].values()) >= n:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{n} workers did not register within {timeout}s")


async def run_static(args: argparse.Namespace, url: str, spec: LocalWorkerSpec, trace: list[Arrival],
                     replicas: dict[str, int]) -> RunResult:
    conn = LocalConnector(spec, (PREFILL, DECODE))
    tracker = Tracker(conn)
    stop = asyncio.Event()
    await conn.apply(replicas)
    track = asyncio.create_task(tracker.run(stop))
    try:
        await wait_instances(url, sum(replicas.values()))
        say(f"baseline: static {replicas} ready; replaying {len(trace)} requests")
        samples, start, end = await replay(url, trace)
    finally:
        await conn.close()
        stop.set()
        await track
    return RunResult("baseline", replica_seconds(tracker.all, tracker.ends, start, end), (start, end),
                     attainment(samples, args.ttft_target, args.itl_target), samples, tracker.timeline)


async def run_planner(args: argparse.Namespace, url: str, spec: LocalWorkerSpec, trace: list[Arrival],
                      profile: Profile) -> RunResult:
    cfg = PlannerConfig(ttft_target=args.ttft_target, itl_target=args.itl_target, predictor=args.predictor,
                        predictor_window=args.predictor_window, max_utilization=args.max_utilization,
                        lookahead=args.lookahead,
                        scale_down_window_s=args.scale_down_window, correction=args.correction,
                        prefill_cv2=args.prefill_cv2, correction_settle_s=args.correction_settle,
                        limits={PREFILL: PoolLimits(1, args.max_prefill), DECODE: PoolLimits(1, args.max_decode)})
    conn = LocalConnector(spec, cfg.pools)
    tracker = Tracker(conn)
    source = FrontendMetricsSource([url], MODEL)
    loop = PlannerLoop(Planner(cfg, profile), source, conn, interval=args.interval)
    stop_planner, stop_track = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(loop.run(stop_planner))
    track = asyncio.create_task(tracker.run(stop_track))
    try:
        await wait_instances(url, 2)
        await asyncio.sleep(args.interval * 2)  # a couple of quiet intervals: the predictors start from idle
        say(f"ours: planner ready at {conn.counts()}; replaying {len(trace)} requests")
        samples, start, end = await replay(url, trace)
    finally:
        stop_planner.set()
        await task
        await conn.close()
        await source.close()
        stop_track.set()
        await track
    return RunResult("ours", replica_seconds(tracker.all, tracker.ends, start, end), (start, end),
                     attainment(samples, args.ttft_target, args.itl_target), samples, tracker.timeline,
                     tracker.active, [d.to_dict() for d in loop.decisions])


def peak_sizing(ours: RunResult, phases: list[Phase]) -> dict[str, int]:
    """Per pool, the replicas the planner ran on average while the trace was at its peak, rounded up:
    what it took there, without the transient spikes of a scale-up."""
    t = 0.0
    lo = hi = 0.0
    for ph in phases:
        if ph.name == "peak":
            lo, hi = t, t + ph.seconds
        t += ph.seconds
    start = ours.window[0]
    during = [(p, d) for ts, p, d in ours.active if start + lo <= ts <= start + hi]
    return {PREFILL: math.ceil(sum(p for p, _ in during) / len(during) - 1e-9),
            DECODE: math.ceil(sum(d for _, d in during) / len(during) - 1e-9)}


def plot(path: Path, runs: list[RunResult], trace: list[Arrival], args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    span = max(a.t for a in trace) if trace else 1
    bins = [i * 2.0 for i in range(int(span / 2) + 2)]
    axes[0].hist([a.t for a in trace], bins=bins, weights=[0.5] * len(trace), color="grey")
    axes[0].set_ylabel("requests/s (trace)")
    for r in runs:
        t0 = r.window[0]
        ts = [t - t0 for t, _, _ in r.timeline]
        axes[1].step(ts, [p + d for _, p, d in r.timeline], where="post", label=f"{r.name} (P+D)")
        if r.name == "ours":
            axes[1].step(ts, [p for _, p, _ in r.timeline], where="post", label="ours prefill", alpha=0.6)
            axes[1].step(ts, [d for _, _, d in r.timeline], where="post", label="ours decode", alpha=0.6)
        ok = [(s.t, s.ttft) for s in r.samples if s.ttft is not None]
        axes[2].scatter([t for t, _ in ok], [v for _, v in ok], s=4, label=r.name, alpha=0.5)
    axes[1].set_ylabel("worker processes")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].axhline(args.ttft_target, color="red", lw=0.8, label="TTFT target")
    axes[2].set_ylabel("TTFT (s)")
    axes[2].set_xlabel("seconds since trace start")
    axes[2].set_xlim(0, span + 5)
    axes[2].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> int:
    scale = 0.5 if args.quick else 1.0
    phases = [Phase("quiet", 60 * scale, args.quiet_rate, args.quiet_rate),
              Phase("ramp", 30 * scale, args.quiet_rate, args.peak_rate),
              Phase("peak", 40 * scale, args.peak_rate, args.peak_rate),
              Phase("quiet", 70 * scale, args.quiet_rate, args.quiet_rate)]
    trace = make_trace(phases, args.isl, args.osl, args.seed)
    profile = Profile.load(args.profile).scaled(args.speedup)
    # The formula at the nominal peak load (mean lengths), for reference.
    p_peak = prefill_replicas(args.peak_rate, args.isl, profile, args.ttft_target,
                              max_utilization=args.max_utilization, cv2=args.prefill_cv2).replicas
    d_peak = decode_replicas(args.peak_rate, args.osl, profile, args.itl_target, isl=args.isl,
                             max_utilization=args.max_utilization).replicas
    formula = {PREFILL: max(1, p_peak), DECODE: max(1, d_peak)}
    say(f"trace: {len(trace)} requests over {sum(p.seconds for p in phases):.0f}s "
        f"({', '.join(f'{p.name} {p.seconds:.0f}s' for p in phases)}); peak {args.peak_rate} req/s, quiet "
        f"{args.quiet_rate} req/s, ISL ~{args.isl}, OSL ~{args.osl}; mocker speedup {args.speedup}; "
        f"targets TTFT {args.ttft_target}s ITL {args.itl_target}s; the formula at the peak: {formula}")
    OUT.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="dyn-bench-planner-"))
    runs: list[RunResult] = []
    with LocalServices(state) as svc:
        env = dict(os.environ, DYN_ETCD_ENDPOINTS=svc.etcd.client_url, DYN_NATS_ENDPOINTS=svc.nats.url,
                   DYN_NAMESPACE="benchplanner", DYN_METRICS_PORT="-1", DYN_LOG="info", PYTHONUNBUFFERED="1")
        port = free_port()
        log_dir = OUT / "logs" / "planner"
        log_dir.mkdir(parents=True, exist_ok=True)
        with Stack(stop_timeout=15) as stack:
            stack.start("frontend", commands.frontend(port), env=env, cwd=ROOT, log=log_dir / "frontend.log")
            url = f"http://127.0.0.1:{port}"
            spec = LocalWorkerSpec(engine="mocker", model="tiny", served_model_name=MODEL,
                                   extra_args=["--speedup", str(args.speedup)], graceful_timeout=30, env=env,
                                   log_dir=log_dir)
            for name in ("ours", "baseline"):
                if name == "baseline":
                    static = peak_sizing(runs[0], phases)
                    runs.append(await run_static(args, url, spec, trace, static))
                else:
                    runs.append(await run_planner(args, url, spec, trace, profile))
                r = runs[-1]
                r.stats["loadavg_1m"] = os.getloadavg()[0]
                say(f"{r.name}: {r.replica_s:.0f} replica-s, SLA {r.stats['sla']:.3f}, TTFT p95 "
                    f"{r.stats['ttft_p95']:.3f}s, ITL p95 {r.stats['itl_p95'] * 1e3:.1f}ms, failed "
                    f"{r.stats['failed']:.0f}; load average {r.stats['loadavg_1m']:.1f} on "
                    f"{os.cpu_count()} CPUs")
    by = {r.name: r for r in runs}
    ours, base = by["ours"], by["baseline"]
    ratio = ours.replica_s / base.replica_s
    rows = [("", "ours (planner)", "baseline (static)")]
    rows.append(("replica-seconds", f"{ours.replica_s:.0f}", f"{base.replica_s:.0f}"))
    for key, fmt in (("sla", "{:.3f}"), ("ttft_ok", "{:.3f}"), ("itl_ok", "{:.3f}"), ("ttft_p50", "{:.3f}s"),
                     ("ttft_p95", "{:.3f}s"), ("ttft_p99", "{:.3f}s"), ("itl_p50", "{:.4f}s"),
                     ("itl_p95", "{:.4f}s"), ("requests", "{:.0f}"), ("failed", "{:.0f}"),
                     ("loadavg_1m", "{:.1f}")):
        rows.append((key, fmt.format(ours.stats[key]), fmt.format(base.stats[key])))
    rows.append(("ratio (ours / baseline replica-s)", f"{ratio:.3f}", ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(width[i]) for i, c in enumerate(r)))
    (OUT / "planner.json").write_text(json.dumps({
        "args": vars(args), "static": static, "formula": formula, "phases": [asdict(p) for p in phases],
        "runs": {r.name: {"replica_s": r.replica_s, "stats": r.stats, "timeline": r.timeline,
                          "samples": [asdict(s) for s in r.samples], "decisions": r.decisions} for r in runs}}))
    plot(OUT / "planner.png", runs, trace, args)
    report({"bench": "planner", "ours": round(ours.replica_s, 1), "baseline": round(base.replica_s, 1),
            "ratio": round(ratio, 3), "unit": "replica_s", "sla_attainment": round(ours.stats["sla"], 4),
            "baseline_sla_attainment": round(base.stats["sla"], 4)})
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="half-length trace")
    p.add_argument("--speedup", type=float, default=0.2, help="mocker --speedup (wall time per engine time)")
    p.add_argument("--profile", default="mocker")
    p.add_argument("--isl", type=int, default=512)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--quiet-rate", type=float, default=1.0)
    p.add_argument("--peak-rate", type=float, default=15.0)
    p.add_argument("--ttft-target", type=float, default=1.0, help="seconds, wall")
    p.add_argument("--itl-target", type=float, default=0.075, help="seconds, wall")
    p.add_argument("--interval", type=float, default=3.0, help="planner adjustment interval, seconds")
    p.add_argument("--predictor", default="linear")
    p.add_argument("--predictor-window", type=int, default=4)
    p.add_argument("--lookahead", type=int, default=2, help="intervals ahead (worker start-up time)")
    p.add_argument("--max-utilization", type=float, default=0.85)
    p.add_argument("--prefill-cv2", type=float, default=1.0)
    p.add_argument("--scale-down-window", type=float, default=10.0)
    p.add_argument("--correction-settle", type=float, default=12.0)
    p.add_argument("--correction", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-prefill", type=int, default=8)
    p.add_argument("--max-decode", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("planner").setLevel(logging.INFO)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
