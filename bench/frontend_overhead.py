"""Frontend CPU per request: our frontend + mocker versus NVIDIA Dynamo 1.6.1's frontend + mocker.

Same run, same load: 64 concurrent clients, 2000 streamed chat requests, 32 output tokens (``ignore_eos``),
~36 prompt tokens (each prompt differs), mockers as fast as they go (ours ``--speedup 0``, Dynamo's
``--speedup-ratio 0``). Both stacks run on our embedded etcd + nats-server on loopback (one pair per
stack), both with etcd discovery and the NATS request plane (Dynamo: ``--discovery-backend etcd
--request-plane nats --event-plane nats``), both route round-robin, both serve the tiny model under the
name ``tiny`` (Dynamo's mocker reads the tokenizer from the same folder, block size 16 like ours).

The load generator (``bench/_common.py``) runs in its own process and opens a new connection per request
(``Connection: close``) for both stacks: Dynamo's HTTP listener does not set TCP_NODELAY, so keep-alive
would measure Nagle's delay, not the frontend. Each response must be complete (200, 32 completion tokens
in ``usage``, ``[DONE]``, no error event); anything else is counted as an error.

A third stack, "ours, paced mocker" (``--paced-speedup 2``; 0 skips it), runs our mocker at ``--speedup 2``,
which spaces tokens about as far apart as Dynamo's mocker does at ``--speedup-ratio 0`` on this machine
(~6-9 ms). At full speed our mocker emits tokens in bursts and our frontend coalesces the frames that are
ready into one SSE event (~5 events per request against Dynamo's ~30); the paced stack streams one event
per token like Dynamo, so it is the like-for-like per-token comparison. The JSON line keeps the full-speed
setup.

Measured: req/s, TTFT p50/p99 (first SSE event with non-empty text), and the frontend process's CPU time
(user+sys of all its threads and descendants, ``/proc/<pid>/stat``, before/after) per request. After a
warm-up, the measured phase runs ``--rounds`` times (default 2), alternating ours / Dynamo, so background
load on a shared machine hits both alike; each round is printed and the mean goes into the summary.

Prints a table; the LAST line is JSON: ``{"bench": "frontend_overhead", "ours": <frontend CPU ms/req>,
"baseline": <Dynamo's>, "ratio": ours/baseline, "unit": "cpu_ms_per_req"}``.
Run: ``.venv/bin/python bench/frontend_overhead.py [--quick] [--ours-only] [--profile]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    OUT_DIR,
    PY,
    Stack,
    cpu_seconds,
    ensure_dynamo_venv,
    exit_on_sigterm,
    report,
    run_load,
    save_plot,
    say,
    start_stack,
    table,
)

MODEL = "tiny"
OURS, DYNAMO, PACED = "ours", "Dynamo 1.6.1", "ours, paced mocker"


def bodies(n: int, max_tokens: int, offset: int = 0) -> list[list[bytes]]:
    """``n`` one-request sessions; every prompt differs (~36 tokens with the chat template)."""
    out = []
    for i in range(offset, offset + n):
        msg = f"Request {i}: tell me a story about the lighthouse keeper and the quiet harbour by the sea."
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": msg}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        out.append([json.dumps(body).encode()])
    return out


def start_ours(model_dir: str, speedup: float = 0.0, name: str = OURS) -> Stack:
    tag = "fe-ours" if speedup == 0 else f"fe-ours-x{speedup:g}"
    return start_stack("ours", model_dir, MODEL, tag=tag, name=name, worker_args=["--speedup", str(speedup)],
                       namespace="benchfe")


def start_dynamo(model_dir: str) -> Stack:
    return start_stack("dynamo", model_dir, MODEL, tag="fe-dynamo", name=DYNAMO,
                       worker_args=["--speedup-ratio", "0", "--block-size", "16"])


def measure(stack: Stack, n: int, concurrency: int, max_tokens: int, offset: int) -> dict[str, Any]:
    sessions = bodies(n, max_tokens, offset)
    fe0, w0 = cpu_seconds(stack.frontend.pid), cpu_seconds(stack.worker.pid)
    res = run_load(stack.url, sessions, concurrency)
    fe1, w1 = cpu_seconds(stack.frontend.pid), cpu_seconds(stack.worker.pid)
    s = res.summary(max_tokens)
    s["fe_cpu_ms"] = 1000 * (fe1 - fe0) / n
    s["worker_cpu_ms"] = 1000 * (w1 - w0) / n
    s["fe_cpu_util"] = (fe1 - fe0) / res.wall_s
    if s["errors"]:
        say(f"  {stack.name}: {s['errors']} bad responses, e.g. {res.error_samples(3, max_tokens)}")
    return s


def profile_ours(stack: Stack, n: int, concurrency: int, max_tokens: int) -> None:
    """py-spy (if installed in .venv) records our frontend under the same load -> bench/out/."""
    spy = Path(PY).parent / "py-spy"
    if not spy.exists():
        say("--profile: py-spy is not installed in .venv (pip install py-spy); skipped")
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    outs = []
    for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
        out = OUT_DIR / f"frontend_profile.{ext}"
        rec = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(stack.frontend.pid),
                "--rate",
                "200",
                "--format",
                fmt,
                "--output",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        run_load(stack.url, bodies(n, max_tokens, 10_000_000), concurrency)
        rec.send_signal(2)  # SIGINT: py-spy writes its output and exits
        rec.wait(30)
        outs.append(out)
    say(f"profile written: {', '.join(map(str, outs))}")
    top_frames(OUT_DIR / "frontend_profile.txt")


def top_frames(raw: Path, n: int = 25) -> None:
    """Self time and inclusive time per function from py-spy's raw (collapsed stacks) output."""
    if not raw.exists():
        return
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit():
            continue
        c = int(cnt)
        total += c
        frames = stack.split(";")
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + c
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + c
    print(f"\npy-spy: {total} samples; top self time")
    for fr, c in sorted(self_t.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {100 * c / total:5.1f}%  {fr}")
    print("top inclusive time")
    for fr, c in sorted(incl.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {100 * c / total:5.1f}%  {fr}")


def plot(rows: dict[str, list[dict[str, Any]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, key, title in zip(
        axes,
        ("fe_cpu_ms", "req_s", "ttft_p50"),
        ("frontend CPU ms / request", "requests / s", "TTFT p50 ms"),
        strict=True,
    ):
        vals = [statistics.mean(r[key] for r in rows[nm]) for nm in names]
        ax.bar(names, vals, color=["tab:blue", "tab:gray", "tab:cyan"][: len(names)])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(title)
    fig.suptitle("frontend overhead: 64 clients, 32-token streamed chat, mocker at full speed")
    save_plot(fig, "frontend_overhead")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per measured round")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=300, help="requests before measuring")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per stack (alternating)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 requests, 1 round")
    ap.add_argument("--ours-only", action="store_true", help="skip NVIDIA Dynamo")
    ap.add_argument("--profile", action="store_true", help="also py-spy our frontend under the same load")
    ap.add_argument(
        "--paced-speedup",
        type=float,
        default=2.0,
        help="also run ours with the mocker at this --speedup, which paces tokens about as far apart "
        "as Dynamo's mocker does at --speedup-ratio 0 here, so our frontend gets no chance to "
        "coalesce them (0: skip)",
    )
    args = ap.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.requests, args.warmup, args.rounds = 300, 64, 1

    from dynamo_rt.local.tinymodel import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    dyn_py = None if args.ours_only else ensure_dynamo_venv()
    stacks: list[Stack] = []
    try:
        say("starting our frontend + mocker")
        stacks.append(start_ours(model_dir))
        if dyn_py is not None:
            say("starting Dynamo 1.6.1 frontend + mocker")
            stacks.append(start_dynamo(model_dir))
        if args.paced_speedup > 0:
            say(f"starting our frontend + mocker at --speedup {args.paced_speedup:g} (paced tokens)")
            stacks.append(start_ours(model_dir, args.paced_speedup, PACED))
        for st in stacks:
            say(f"warm-up {st.name}: {args.warmup} requests")
            w = run_load(st.url, bodies(args.warmup, args.max_tokens, 5_000_000), args.concurrency)
            ws = w.summary(args.max_tokens)
            say(f"  {ws['ok']}/{ws['requests']} ok, mean prompt tokens {ws['prompt_tokens'] / max(1, ws['ok']):.1f}")
        results: dict[str, list[dict[str, Any]]] = {st.name: [] for st in stacks}
        for r in range(args.rounds):
            for st in stacks:
                say(f"round {r + 1}/{args.rounds} {st.name}: {args.requests} requests, {args.concurrency} clients")
                s = measure(st, args.requests, args.concurrency, args.max_tokens, r * args.requests)
                results[st.name].append(s)
                say(
                    f"  {s['req_s']:.0f} req/s, TTFT p50 {s['ttft_p50']:.1f} ms, frontend "
                    f"{s['fe_cpu_ms']:.3f} CPU ms/req, errors {s['errors']}"
                )
        if args.profile:
            profile_ours(stacks[0], args.requests, args.concurrency, args.max_tokens)
    finally:
        for st in stacks:
            st.stop()

    headers = [
        "stack / round",
        "req/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "fe CPU ms/req",
        "fe CPU util",
        "mocker CPU ms",
        "SSE ev/req",
        "errors",
    ]
    rows = []
    for name, rs in results.items():
        for i, s in enumerate(rs, 1):
            rows.append(
                [
                    f"{name} #{i}",
                    s["req_s"],
                    s["ttft_p50"],
                    s["ttft_p99"],
                    s["fe_cpu_ms"],
                    s["fe_cpu_util"],
                    s["worker_cpu_ms"],
                    s["events_per_req"],
                    s["errors"],
                ]
            )
    print()
    print(table(headers, rows, 22))

    def mean(name: str, key: str) -> float:
        return statistics.mean(s[key] for s in results[name]) if name in results else float("nan")

    def ratio(a: float, b: float) -> float:
        return a / b if b and b == b else float("nan")

    print()
    sh = ["metric (mean of rounds)", "ours", "Dynamo", "ratio", "ours paced", "paced/Dynamo"]
    srows = []
    for key, label in (
        ("fe_cpu_ms", "frontend CPU ms/req"),
        ("req_s", "req/s"),
        ("ttft_p50", "TTFT p50 ms"),
        ("ttft_p99", "TTFT p99 ms"),
        ("worker_cpu_ms", "mocker CPU ms/req"),
        ("events_per_req", "SSE events/req"),
        ("errors", "errors"),
    ):
        a, b, c = mean(OURS, key), mean(DYNAMO, key), mean(PACED, key)
        srows.append([label, a, b, ratio(a, b), c, ratio(c, b)])
    print(table(sh, srows, 26))
    ours, base = mean(OURS, "fe_cpu_ms"), mean(DYNAMO, "fe_cpu_ms")
    total_err = sum(s["errors"] for rs in results.values() for s in rs)
    if total_err:
        print(f"WARNING: {total_err} incomplete or failed responses")
    plot(results)
    report(
            {
                "bench": "frontend_overhead",
                "ours": round(ours, 4),
                "baseline": None if base != base else round(base, 4),
                "ratio": None if base != base else round(ratio(ours, base), 4),
                "unit": "cpu_ms_per_req",
            }
    )
    return 1 if total_err else 0


if __name__ == "__main__":
    sys.exit(main())
