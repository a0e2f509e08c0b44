"""Soak: many concurrent streams for minutes on mocker workers; no error, and the frontend's memory flat.

Our etcd + nats-server (embedded), ``--workers`` mocker worker processes (aggregated, ``--speedup``) and one
frontend. ``--streams`` client loops (default 256) each send streamed chat requests back to back, every one
with a distinct prompt (so the KV router state, detokenizers and per-request structures churn), for
``--minutes`` (default 10). Every response must be whole: 200, ``finish_reason: length``, ``--max-tokens``
completion tokens in ``usage``, ``[DONE]``; anything else is an error. The client is bench/_common's raw
asyncio HTTP/1.1 client (one connection per request), in this process.

The frontend's resident memory (``VmRSS``) is sampled every 10 s; the start value is taken after a warm-up
(10 % of the run, 15-60 s: allocator pools, tokenizer caches and connection buffers grow to their working
size first), the end value at the end. The run passes with zero errors and RSS end / start under 1.10.

Prints a table; the LAST line is JSON. The claim is "memory flat", so the baseline is the same frontend
measured in the same run at the end of the warm-up: ``{"bench": "soak", "ours": <RSS at end, MB>,
"baseline": <RSS at warm-up end, MB>, "ratio": <end / start>, "unit": "rss_mb", "errors": <count>,
"requests": <completed>, "req_s_early": ..., "req_s_late": ...}`` (completed requests per second over the
first and the last fifth of the 10 s samples after the warm-up: a frontend that slows down as it runs shows
there). No
number here is a constant (an earlier ``"baseline": 0`` was one). Plot of RSS and throughput over time:
bench/out/soak.png.
Run: ``.venv/bin/python bench/soak.py [--minutes 10] [--streams 256]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from bench._common import (
    PY,
    Proc,
    Services,
    _request,
    cleanup,
    exit_on_sigterm,
    free_port,
    ours_env,
    pyplot,
    report,
    save_plot,
    say,
    table,
    wait_instances,
)
from dynamo_rt.local import commands

MODEL = "dynamo-tiny"
NS = "soak"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, port: int, streams: int, max_tokens: int, seconds: float, frontend_pid: int) -> None:
        self.port = port
        self.streams = streams
        self.max_tokens = max_tokens
        self.seconds = seconds
        self.pid = frontend_pid
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.samples: list[tuple[float, float, int]] = []  # (t, rss MB, completed requests so far)
        self.t0 = 0.0

    def _body(self, client: int, n: int) -> bytes:
        return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"stream {client} turn {n}: "
                                                          "tell me something new"}],
                           "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()

    async def _client(self, i: int, stop_at: float) -> None:
        n = 0
        while time.monotonic() < stop_at:
            rec = await _request("127.0.0.1", self.port, "/v1/chat/completions", self._body(i, n), 120.0)
            n += 1
            if (rec["status"] == 200 and rec["done"] and rec["error"] is None
                    and rec["finish_reason"] == "length" and rec["completion_tokens"] == self.max_tokens):
                self.ok += 1
            else:
                why = rec["error"] or f"status {rec['status']} done={rec['done']} tokens={rec['completion_tokens']}"
                self.errors[why[:160]] += 1
                await asyncio.sleep(0.1)

    async def _sampler(self, stop_at: float) -> None:
        while True:
            self.samples.append((time.monotonic() - self.t0, rss_mb(self.pid), self.ok))
            if time.monotonic() >= stop_at:
                return
            await asyncio.sleep(min(10.0, max(0.0, stop_at - time.monotonic())))

    async def run(self) -> None:
        self.t0 = time.monotonic()
        stop_at = self.t0 + self.seconds
        sampler = asyncio.create_task(self._sampler(stop_at))
        last = 0.0
        clients = [asyncio.create_task(self._client(i, stop_at)) for i in range(self.streams)]
        while not all(c.done() for c in clients):
            await asyncio.sleep(1)
            now = time.monotonic() - self.t0
            if now - last >= 30:
                last = now
                say(f"  {now:5.0f}s: {self.ok} ok, {sum(self.errors.values())} errors, "
                    f"frontend RSS {rss_mb(self.pid):.1f} MB")
        await asyncio.gather(*clients)
        await sampler


def plot(samples: list[tuple[float, float, int]], warmup: float) -> None:
    plt = pyplot()
    if plt is None:
        return
    ts = [s[0] for s in samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    a.plot(ts, [s[1] for s in samples], marker=".")
    a.axvline(warmup, color="gray", linestyle="--", label="end of warm-up")
    a.set_ylabel("frontend RSS (MB)")
    a.legend()
    rates = [(s2[2] - s1[2]) / max(1e-9, s2[0] - s1[0]) for s1, s2 in itertools.pairwise(samples)]
    b.plot(ts[1:], rates, marker=".")
    b.set_ylabel("completed req/s")
    b.set_xlabel("seconds")
    fig.suptitle("soak: concurrent streams on mocker workers")
    save_plot(fig, "soak")


def finite(x: float) -> float | None:
    """``x`` rounded for the JSON line, None for NaN (too short a run to have the window)."""
    return round(x, 2) if x == x else None


def window_rate(samples: list[tuple[float, float, int]], late: bool) -> float:
    """Completed requests per second over the first (or, ``late``, the last) fifth of ``samples``, at least
    two of them; NaN with fewer than two samples."""
    n = max(2, math.ceil(len(samples) / 5))
    win = samples[-n:] if late else samples[:n]
    if len(win) < 2 or win[-1][0] <= win[0][0]:
        return float("nan")
    return (win[-1][2] - win[0][2]) / (win[-1][0] - win[0][0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    ap.add_argument("--streams", type=int, default=256, help="concurrent client streams")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per response")
    ap.add_argument("--workers", type=int, default=2, help="mocker worker processes")
    ap.add_argument("--speedup", type=float, default=1.0, help="mocker --speedup")
    ap.add_argument("--router-mode", default="kv",
                    help="frontend --router-mode (kv, the manifests' mode: the index and the router's book of "
                         "in-flight requests churn with every request)")
    args = ap.parse_args()
    exit_on_sigterm()
    seconds = args.minutes * 60
    warmup = min(60.0, max(15.0, seconds * 0.1))
    port = free_port()
    with Services() as s, cleanup([]) as procs:
        env = ours_env(s.etcd_url, s.nats_url, NS)
        worker = commands.worker("mocker", "agg", "tiny", extra=["--speedup", str(args.speedup)], python=PY)
        for i in range(args.workers):
            procs.append(Proc(f"soak-worker-{i}", worker, env))
        procs.append(Proc("soak-frontend", commands.frontend(port, router_mode=args.router_mode, python=PY), env))
        frontend = procs[-1]
        wait_instances(f"http://127.0.0.1:{port}", MODEL, args.workers, False, procs)
        say(f"soak: {args.streams} streams x {args.max_tokens} tokens for {args.minutes:g} min on {args.workers} "
            f"mocker workers (speedup {args.speedup:g}, router {args.router_mode}); warm-up {warmup:.0f}s")
        soak = Soak(port, args.streams, args.max_tokens, seconds, frontend.pid)
        asyncio.run(soak.run())
        alive = {p.name: p.alive() for p in procs}
    after = [smp for smp in soak.samples if smp[0] >= warmup]
    start = after[0] if after else soak.samples[0]
    end = soak.samples[-1]
    peak = max(smp[1] for smp in soak.samples)
    errors = sum(soak.errors.values())
    ratio = end[1] / start[1] if start[1] else float("nan")
    duration = end[0]
    early, late = window_rate(after or soak.samples, False), window_rate(after or soak.samples, True)
    rows: list[list[Any]] = [
        ["requests completed", soak.ok], ["errors", errors], ["requests/s", soak.ok / max(1e-9, duration)],
        ["frontend RSS at warm-up end (MB)", start[1]], ["frontend RSS at end (MB)", end[1]],
        ["frontend RSS peak (MB)", peak], ["RSS end / start", ratio],
        ["req/s, first fifth after warm-up", early], ["req/s, last fifth", late],
        ["processes alive at end", f"{sum(alive.values())}/{len(alive)}"],
    ]
    print(table(["soak", "value"], rows, first_width=36))
    for why, n in soak.errors.most_common(5):
        print(f"  error x{n}: {why}")
    plot(soak.samples, warmup)
    passed = errors == 0 and ratio < 1.10 and all(alive.values())
    say("PASS" if passed else "FAIL")
    report({"bench": "soak", "ours": round(end[1], 1), "baseline": round(start[1], 1), "ratio": round(ratio, 4),
            "unit": "rss_mb", "errors": errors, "requests": soak.ok, "req_s_early": finite(early),
            "req_s_late": finite(late)})
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
