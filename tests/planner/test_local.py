"""The planner with the ``local`` connector on a real stack: etcd, NATS, a frontend process and mocker
worker processes that the planner itself starts and stops.

One test walks the whole cycle (each step needs the one before), asserting what the planner does, not how
fast: a load ramp raises the prefill and decode pools, a quiet period brings them back to their minimum,
and then (a second planner on the same workers, with scale-to-zero on) an idle spell takes them to zero and
a request at zero brings a worker back. The frontend parks requests while no worker is up
(``--worker-wait-timeout``), so not one request fails or is cut short on the way. Every wait is bounded but
generous (the peak load runs until the planner has scaled up), so a loaded 2-core box only makes it
slower. Timing is compressed: 1 s adjustment intervals, a 3 s stabilization window, mocker --speedup 0.25
(a slow engine, so the load stays small). Latencies are printed, not asserted.

The CLI test runs ``python -m dynamo_rt planner --connector dry-run`` against the same kind of stack.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_rt.local.services import EtcdServer, NatsServer
from planner.connectors import LocalConnector, LocalWorkerSpec
from planner.core import DECODE, PREFILL, Planner, PlannerConfig, PoolLimits
from planner.metrics import FrontendMetricsSource
from planner.profile import Profile
from planner.runner import PlannerLoop
from tests.conftest import arun
from tests.stack import ROOT, Stack

MODEL = "planner-test"
SPEEDUP = 0.25
ISL, OSL = 512, 64
TTFT_TARGET, ITL_TARGET = 0.6, 0.048  # wall seconds at speedup 0.25 (0.15 s and 12 ms of the profile)
# By the profile at these targets, 8 requests/s need 3 prefill and 2 decode replicas, 1 request/s one each.
LOW_RATE, PEAK_RATE = 1.0, 8.0
MIN = {PREFILL: 1, DECODE: 1}
ZERO = {PREFILL: 0, DECODE: 0}


@dataclass
class Result:
    prompt_id: int
    sent: float
    status: int = 0
    ttft: float | None = None
    text: str = ""
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def prompt(i: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(100, 1000) for _ in range(ISL)]


async def request(client: httpx.AsyncClient, url: str, i: int) -> Result:
    """One streaming completion of prompt ``i``; no retries: a refused or cut request shows in the result."""
    res = Result(i, time.monotonic())
    body = {"model": MODEL, "prompt": prompt(i), "max_tokens": OSL, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.errors.append((await r.aread()).decode(errors="replace"))
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.errors.append(data["error"]["message"])
                for ch in data.get("choices") or []:
                    if res.ttft is None:
                        res.ttft = time.monotonic() - res.sent
                    res.text += ch.get("text") or ""
                if data.get("usage"):
                    res.tokens = data["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        res.errors.append(repr(exc))
    return res


async def paced(client: httpx.AsyncClient, url: str, rate: float, first_id: int, *, seconds: float,
                until: Any = None, max_seconds: float = 0.0) -> list[Result]:
    """``rate`` requests per second, evenly spaced, for ``seconds``; with ``until``, on past that until
    ``until()`` holds (at most ``max_seconds`` in all)."""
    tasks = []
    t0 = time.monotonic()
    k = 0
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= seconds and (until is None or until() or elapsed >= max_seconds):
            break
        await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        tasks.append(asyncio.create_task(request(client, url, first_id + k)))
        k += 1
    return list(await asyncio.gather(*tasks))


async def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def applied_targets(loop: PlannerLoop) -> list[dict[str, int]]:
    return [t for _, t in loop.applied]


def frontend_has_no_worker(url: str) -> bool:
    return httpx.get(url + "/health", timeout=5).status_code == 503


@pytest.mark.timeout(400)  # ~40 s normally; the bounds below are generous for a loaded 2-core box
def test_local_ramp_quiet_zero_and_back(etcd_server: EtcdServer, nats_server: NatsServer, ns: str,
                                        tmp_path: Path) -> None:
    stack = Stack(etcd_server.client_url, nats_server.url, ns)
    stack.start_frontend("--worker-wait-timeout", "120")
    profile = Profile.load("mocker").scaled(SPEEDUP)
    limits = {PREFILL: PoolLimits(1, 4), DECODE: PoolLimits(1, 3)}

    def config(scale_to_zero_after: float) -> PlannerConfig:
        return PlannerConfig(ttft_target=TTFT_TARGET, itl_target=ITL_TARGET, predictor="moving-average",
                             predictor_window=2, max_utilization=0.85, scale_down_window_s=3.0,
                             scale_to_zero_after_s=scale_to_zero_after, limits=limits)

    spec = LocalWorkerSpec(engine="mocker", model="tiny", served_model_name=MODEL,
                           extra_args=["--speedup", str(SPEEDUP)], graceful_timeout=10, env=stack.env,
                           log_dir=tmp_path / "workers")
    connector = LocalConnector(spec, (PREFILL, DECODE))

    running: list[tuple[asyncio.Event, asyncio.Task[None], FrontendMetricsSource]] = []

    def start_loop(cfg: PlannerConfig) -> PlannerLoop:
        source = FrontendMetricsSource([stack.url], MODEL)
        loop = PlannerLoop(Planner(cfg, profile), source, connector, interval=1.0, zero_poll_interval=0.5)
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(loop.run(stop)), source))
        return loop

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}

        async def stop_loop() -> None:
            stop, task, source = running.pop()
            stop.set()
            await asyncio.wait_for(task, 30)
            await source.close()

        try:
            async with httpx.AsyncClient(timeout=150, limits=httpx.Limits(max_connections=200)) as client:
                # 1. Ramp and quiet, with a planner that never scales to zero.
                a = out["a"] = start_loop(config(0.0))
                await asyncio.to_thread(stack.wait_ready, 2, 180)  # the planner started the minimum: 1 + 1

                def scaled_up() -> bool:
                    return any(t[PREFILL] >= 2 and t[DECODE] >= 2 for t in applied_targets(a))

                out["low"] = await paced(client, stack.url, LOW_RATE, 0, seconds=4.0)
                # The peak lasts until the planner has grown both pools (bounded), at least 6 s.
                out["peak"] = await paced(client, stack.url, PEAK_RATE, 100, seconds=6.0, until=scaled_up,
                                          max_seconds=90.0)
                out["peak_end"] = len(a.applied)
                if not scaled_up():
                    raise AssertionError(f"the pools did not grow under the peak load: {applied_targets(a)}")
                await wait_for(lambda: len(a.applied) > out["peak_end"] and a.applied[-1][1] == MIN, 120,
                               "the pools to come back to their minimum")
                await stop_loop()

                # 2. Idle: a planner that scales to zero after 2 idle seconds, on the same workers.
                b = out["b"] = start_loop(config(2.0))
                await wait_for(lambda: ZERO in applied_targets(b), 120, "scale to zero")
                await wait_for(lambda: not connector.stopping and not connector.workers, 120, "workers to exit")
                await wait_for(lambda: frontend_has_no_worker(stack.url), 60, "the frontend to see no worker")
                # At zero: the same prompts as the first low-phase requests, all at once. The frontend parks
                # them, the planner sees them waiting and starts the minimum again.
                out["wake"] = await asyncio.wait_for(
                    asyncio.gather(*(request(client, stack.url, i) for i in range(3))), 150)
                await stop_loop()
        finally:
            while running:
                await stop_loop()
            await connector.close()
        return out

    try:
        out = arun(main(), timeout=380)
    finally:
        stack.stop()
    a: PlannerLoop = out["a"]
    b: PlannerLoop = out["b"]
    low, peak, wake = out["low"], out["peak"], out["wake"]

    # No request lost, refused or cut short: before, during and after the ramp, and across zero.
    for r in [*low, *peak, *wake]:
        assert (r.status, r.errors, r.tokens) == (200, [], OSL), r
    # The mocker's tokens are a function of the prompt: the requests served by the woken-up worker match
    # those served before the pools went to zero, token for token.
    assert [r.text for r in wake] == [r.text for r in low[:3]]

    # Ramp: from the minimum, both pools grew, for load, while the load was at its peak.
    applied_a = applied_targets(a)
    assert applied_a[0] == MIN, applied_a  # the minimum, started at once
    i_up = next(i for i, t in enumerate(applied_a) if t[PREFILL] >= 2 and t[DECODE] >= 2)
    assert i_up < out["peak_end"], applied_a
    rises = [d for d in a.decisions if d.changed and d.target[PREFILL] > d.current[PREFILL]]
    assert rises and all(d.reason.startswith("load") for d in rises)
    assert all((d.predicted_rate or 0) > LOW_RATE for d in rises)
    # Quiet: they came back down to the minimum (that is where phase 1 ended), never below it.
    assert applied_a[-1] == MIN and all(t[PREFILL] >= 1 and t[DECODE] >= 1 for t in applied_a)
    # Idle, then demand: zero, then the minimum again.
    applied_b = applied_targets(b)
    assert applied_b == [ZERO, MIN], applied_b
    reasons = [d.reason for d in b.decisions if d.changed]
    assert reasons[0].startswith("idle for") and reasons[1].startswith("demand at zero"), reasons

    assert connector.started_total == len(connector.exits)  # every worker it started has exited
    # Each left cleanly; one stopped while still starting (before its SIGTERM handler) ends by that signal.
    assert all(code in (0, -signal.SIGTERM) for _, _, code in connector.exits), connector.exits

    # Reported, not asserted: the client-side TTFT at the peak once the pools had grown.
    settled = peak[len(peak) // 2:]
    met = sum(1 for r in settled if r.ttft is not None and r.ttft <= TTFT_TARGET)
    print(f"\nplanner local e2e: ramp {applied_a}; idle/wake {applied_b}; {len(peak)} peak requests, TTFT <= "
          f"{TTFT_TARGET}s for {met}/{len(settled)} of the second half; wake TTFT "
          f"{[round(r.ttft or -1, 2) for r in wake]}")


def test_planner_cli_dry_run(etcd_server: EtcdServer, nats_server: NatsServer, ns: str, tmp_path: Path) -> None:
    """``python -m dynamo_rt planner --connector dry-run`` reads a live frontend and logs decisions."""
    stack = Stack(etcd_server.client_url, nats_server.url, ns)
    stack.start_frontend()
    stack.add_worker("mocker", "agg", "--served-model-name", MODEL, "--speedup", "10")
    decisions = tmp_path / "decisions.jsonl"
    try:
        stack.wait_ready(1, 120)
        with httpx.Client(timeout=30) as c:
            for i in range(3):
                r = c.post(stack.url + "/v1/completions", json={"model": MODEL, "prompt": prompt(i)[:32],
                                                                 "max_tokens": 4, "ignore_eos": True})
                assert r.status_code == 200
        proc = subprocess.run(
            [sys.executable, "-m", "dynamo_rt", "planner", "--connector", "dry-run", "--mode", "agg",
             "--frontend-url", stack.url, "--model", MODEL, "--adjustment-interval", "0.3", "--max-intervals", "3",
             "--decision-log", str(decisions), "--min-agg", "2", "--max-agg", "5"],
            cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=180)
    finally:
        stack.stop()
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in decisions.read_text().splitlines()]
    assert len(lines) == 3
    assert [d["target"] for d in lines] == [{"agg": 2}] * 3  # no load in those intervals: the minimum
    assert all(d["current"] == {"agg": 2} for d in lines)  # dry-run started from the minimum it was given
    assert "dry-run connector, agg mode" in proc.stderr
