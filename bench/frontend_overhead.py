"""Frontend CPU per request: our frontend + mocker versus NVIDIA Dynamo 1.6.1's frontend + mocker.

Same run, same load: 64 concurrent clients, 2000 streamed chat requests per round, 32 output tokens
(``ignore_eos``), ~36 prompt tokens (each prompt differs). Both stacks run on our embedded etcd + nats-server
on loopback (one pair per stack), both with etcd discovery and the NATS request plane (Dynamo:
``--discovery-backend etcd --request-plane nats --event-plane nats``), both route round-robin, both serve the
tiny model under the name ``tiny`` (Dynamo's mocker reads the tokenizer from the same folder, block size 16
like ours). The load generator (``bench/_common.py``) runs in its own process and opens a new connection per
request (``Connection: close``) for both stacks: Dynamo's HTTP listener does not set TCP_NODELAY, so
keep-alive would measure Nagle's delay, not the frontend. Each response must be complete (200, 32 completion
tokens in ``usage``, ``[DONE]``, no error event); anything else is counted as an error.

Three phases (``--phases``, all by default), each on its own fresh pair of stacks:

1. **paced** (the JSON headline): both mockers paced to the same inter-token latency, ~20 ms at 64 clients:
   ours at ``--paced-speedup`` (1: 10 ms + 0.1 ms per running sequence per step), Dynamo's at
   ``--paced-speedup-ratio`` (0.4: its timing model gives ~8 ms per step at 64 sequences at ratio 1). Tokens
   then reach both frontends one at a time, so both send one SSE event per token: the like-for-like
   per-token comparison. Checked, not assumed: before the measured rounds each stack streams
   ``--reference-requests`` requests one at a time (nothing to coalesce); the measured rounds must send at
   least 97% as many text-carrying events per request as that reference (:func:`one_event_per_token`), or
   the bench warns and the JSON line says ``"one_event_per_token": false``. (A reference rather than 32:
   both detokenizers hold back byte-fallback tokens that do not end a UTF-8 character, so 32 random token
   ids give ~28 text events on both stacks even one request at a time.)
2. **full speed**: both mockers as fast as they go (ours ``--speedup 0``, Dynamo's ``--speedup-ratio 0``). Our
   mocker then emits tokens in bursts and our frontend coalesces the frames that are ready into one SSE
   event (~3 text events per request against Dynamo's ~28), so this table compares different amounts of
   work per request; it is printed as the second table and reported in the JSON line's ``full_speed``.
3. **cpu-only**: NVIDIA's own method for the Dynamo frontend (its ``dynamo-frontend-benchmark`` notes): mock
   workers effectively infinitely fast (``--speedup 0`` / ``--speedup-ratio 0``), ``--cpu-only-workers``
   engines (4, ``--num-workers`` in one worker process on both stacks), the frontend process (every thread,
   and its children) pinned to one core with ``os.sched_setaffinity`` for both stacks alike, everything else
   (worker, etcd, NATS, the load generator) on the other cores, and a closed loop of
   ``--cpu-only-concurrency`` clients: req/s at saturation, the frontend's core near 100% busy (printed as
   ``fe CPU util``; below ~0.9 the frontend was not the bottleneck). The JSON line's ``cpu_only_req_s``. Then
   the goal's pairing: our stack open loop (seeded Poisson arrivals) at ``OPEN_LOOP_LOAD`` (1.5) x Dynamo's
   saturation req/s, its TTFT p50/p99 against Dynamo's at its saturation (``cpu_only_req_s.open_loop``).
   Closed-loop TTFTs at two different saturation rates compare queues, not frontends: with our stack the
   one core left to the load generator, mockers and NATS is ~99% busy (``busiest non-frontend core``), so
   the client's clock counts its own wait there.

Measured per round: req/s, TTFT p50/p99 (first SSE event with non-empty text), ITL (p50 latency minus p50
TTFT over 31 tokens), the frontend process's CPU time (user+sys of all its threads and descendants,
``/proc/<pid>/stat``, before/after) per request and its utilization, the mocker's CPU per request, SSE events
per request (all ``data:`` events but ``[DONE]``) and tokens per text event. After a warm-up, each phase runs
``--rounds`` times (default 2); the stack order rotates each round, so background load on a shared machine
hits both alike; each round is printed and the mean goes into the summary.

Prints one table per phase; the LAST line is JSON: ``{"bench": "frontend_overhead", "ours": <paced frontend CPU
ms/req>, "baseline": <Dynamo's, paced>, "ratio": ours/baseline, "unit": "cpu_ms_per_req", "setup": ...,
"events_per_req_ours", "events_per_req_baseline" (paced, all SSE events), "tokens_per_event": {"<stack>
<phase>": completion tokens per text event}, "text_events_vs_one_at_a_time": {stack: paced / reference},
"one_event_per_token", "full_speed": {"ours", "baseline", "ratio"}, "cpu_only_req_s": {"ours", "baseline",
"ratio", "workers", "concurrency", "fe_core_util"}}`` (``cpu_only_req_s.ratio`` is ours/Dynamo in req/s: higher
is better there). On a 2-core machine the cpu-only phase leaves one core to the worker, etcd, NATS and the
load generator, which then bound req/s before the frontend's core fills (``fe_core_util`` well below 1): the
figure means something from ~4 cores up.
Run: ``.venv/bin/python bench/frontend_overhead.py [--quick] [--ours-only] [--phases paced full cpu-only]
[--profile]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    OUT_DIR,
    PY,
    ROOT,
    Stack,
    cpu_seconds,
    cpus_jiffies,
    descendants,
    ensure_dynamo_venv,
    exit_on_sigterm,
    host_busy,
    poisson_arrivals,
    report,
    run_load,
    save_plot,
    say,
    start_stack,
    table,
)
from _long_prompt import print_long, run_long

MODEL = "tiny"
OURS, DYNAMO = "ours", "Dynamo 1.6.1"
PHASES = ("paced", "full", "cpu-only", "long")
PHASE_TITLE = {
    "paced": "paced mockers, one SSE event per token on both stacks (the headline)",
    "full": "mockers at full speed (ours coalesces ready tokens into fewer events)",
    "cpu-only": "NVIDIA's CPU-only method: infinitely fast mockers, frontend pinned to one core, req/s",
    "long": "long prompts (~32k tokens): frontend time on the critical path, other streams' ITL p99",
}
ONE_EVENT_TOLERANCE = 0.03  # loaded text events may fall this far below the one-at-a-time reference


# --------------------------------------------------------------------------------------------- accounting


def tokens_per_event(completion_tokens: float, text_events: float) -> float:
    """Completion tokens per SSE event that carries text (1.0: one event per token; NaN without events)."""
    return completion_tokens / text_events if text_events > 0 else float("nan")


def one_event_per_token(loaded_text_events: float, reference_text_events: float,
                        tolerance: float = ONE_EVENT_TOLERANCE) -> bool:
    """Whether a loaded run sent (within ``tolerance``) as many text events per request as the same stack
    does one request at a time, when nothing can be coalesced: then every token that decodes to text got
    its own event. (The reference, not ``max_tokens``: a token that ends no UTF-8 character is held back by
    the detokenizer and sent with the next, alike on both stacks.)"""
    if reference_text_events <= 0:
        return False
    return loaded_text_events >= (1.0 - tolerance) * reference_text_events


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """The run order of round ``round_index``: ``names`` rotated by one per round, so each stack runs in
    each position equally often."""
    if not names:
        return []
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


# --------------------------------------------------------------------------------------------- stacks


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


def start_ours(model_dir: str, speedup: float, tag: str, workers: int = 1, *, name: str = OURS,
               root: Path | None = None, frontend_args: Sequence[str] = ()) -> Stack:
    args = ["--speedup", f"{speedup:g}", "--num-workers", str(workers)]
    return start_stack("ours", model_dir, MODEL, tag=f"fe-{name.replace(' ', '_').replace('@', '-')}-{tag}",
                       name=name, worker_args=args, frontend_args=frontend_args, namespace="benchfe",
                       instances=workers, frontend_root=root)  # fmt: skip


def ab_tree(ref: str) -> tuple[str, Path]:
    """Our source tree at git ``ref`` (``git archive`` into bench/out/ab/<sha>): its frontend runs beside the
    working tree's, same worker, same load, interleaved rounds. Returns (stack name, folder)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    dest = OUT_DIR / "ab" / sha
    if not (dest / "frontend").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return f"ours@{sha}", dest


def start_dynamo(model_dir: str, speedup: float, tag: str, workers: int = 1) -> Stack:
    args = ["--speedup-ratio", f"{speedup:g}", "--block-size", "16", "--num-workers", str(workers)]
    return start_stack("dynamo", model_dir, MODEL, tag=f"fe-dynamo-{tag}", name=DYNAMO, worker_args=args,
                       instances=workers)  # fmt: skip


def pin(pid: int, cpus: set[int]) -> int:
    """Pin every thread of ``pid`` and of its descendants to ``cpus``; returns how many threads."""
    n = 0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(FileNotFoundError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(tid), cpus)
                    n += 1
    return n


@contextlib.contextmanager
def own_affinity(cpus: set[int]) -> Iterator[None]:
    """Run the block with this process on ``cpus`` (children started in it, the load generator, inherit it)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


TTFT_METRIC = "dynamo_frontend_time_to_first_token_seconds_bucket"  # both frontends export this histogram


def ttft_buckets(url: str) -> dict[float, float]:
    """The frontend's own TTFT histogram (cumulative count per upper bound, all label values summed)."""
    import urllib.request

    out: dict[float, float] = {}
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith(TTFT_METRIC):
            labels, _, value = line.rpartition(" ")
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + float(value)
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile over the counts added between two scrapes, in ms (nan: none)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if b == float("inf"):
                return prev_b * 1000
            return 1000 * (prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0))
        prev_b, prev_c = b, c
    return float("nan")


# cpu-only phase: the load ours carries open loop, as a multiple of Dynamo's saturation req/s (the goal's 1.5x).
OPEN_LOOP_LOAD = 1.5


def measure(stack: Stack, n: int, concurrency: int, max_tokens: int, offset: int,
            arrivals: list[float] | None = None) -> dict[str, Any]:
    sessions = bodies(n, max_tokens, offset)
    h0 = ttft_buckets(stack.url)
    fe0, w0, c0 = cpu_seconds(stack.frontend.pid), cpu_seconds(stack.worker.pid), cpus_jiffies()
    res = run_load(stack.url, sessions, concurrency, arrivals=arrivals)
    fe1, w1, c1 = cpu_seconds(stack.frontend.pid), cpu_seconds(stack.worker.pid), cpus_jiffies()
    h1 = ttft_buckets(stack.url)
    # The busiest core the frontend may not run on (the load generator's, mocker's, NATS's): near 1, the client's
    # clock (its TTFT) counts its own wait for that core.
    fe_cores = os.sched_getaffinity(stack.frontend.pid)
    s_rest = [host_busy(c0[c], c1[c]) for c in c1 if c in c0 and c not in fe_cores]
    s: dict[str, Any] = dict(res.summary(max_tokens))
    # TTFT as each frontend measures it (request in -> first token back from the worker): on 2 cores the
    # load generator can lag behind a fast stack, and then the client's TTFT counts its own queue.
    s["fe_ttft_p50"], s["fe_ttft_p99"] = histogram_quantile(h0, h1, 0.5), histogram_quantile(h0, h1, 0.99)
    s["client_cpu_util"] = s["client_cpu_ms_per_req"] * s["req_s"] / 1000
    s["other_core_busy"] = max(s_rest, default=float("nan"))
    s["fe_cpu_ms"] = 1000 * (fe1 - fe0) / n
    s["worker_cpu_ms"] = 1000 * (w1 - w0) / n
    s["fe_cpu_util"] = (fe1 - fe0) / res.wall_s
    s["worker_cpu_util"] = (w1 - w0) / res.wall_s
    s["itl_ms"] = (s["lat_p50"] - s["ttft_p50"]) / max(1, max_tokens - 1)
    s["tokens_per_event"] = tokens_per_event(max_tokens, s["text_events_per_req"])
    if s["errors"]:
        say(f"  {stack.name}: {s['errors']} bad responses, e.g. {res.error_samples(3, max_tokens)}")
    return s


Starter = Callable[[], Stack]


Rounds = dict[str, list[dict[str, Any]]]  # stack name -> one summary per measured round


def run_phase(phase: str, starters: list[Starter], args: argparse.Namespace,
              cpus: tuple[set[int], set[int]] | None = None) -> tuple[Rounds, dict[str, float]]:
    """Start every stack of ``phase``, warm each up, (paced) take each one's one-at-a-time reference, then
    ``args.rounds`` measured rounds in rotating order; stop them. With ``cpus`` = (frontend core, other
    cores), every frontend is pinned to the first and everything else to the second. Returns the rounds
    per stack name and the reference text events per request per stack name."""
    cpu_only = phase == "cpu-only"
    n = args.cpu_only_requests if cpu_only else args.requests
    conc = args.cpu_only_concurrency if cpu_only else args.concurrency
    stacks: list[Stack] = []
    results: dict[str, list[dict[str, Any]]] = {}
    refs: dict[str, float] = {}
    place = own_affinity(cpus[1]) if cpus else contextlib.nullcontext()
    try:
        with place:
            for start in starters:
                st = start()
                stacks.append(st)
                if cpus:
                    fe_threads = pin(st.frontend.pid, cpus[0])
                    others = sum(pin(p, cpus[1]) for p in [st.worker.pid, *st.services.pids()])
                    say(f"  {st.name}: frontend pinned to CPU {sorted(cpus[0])} ({fe_threads} threads), worker, "
                        f"etcd, NATS and the load generator to CPUs {sorted(cpus[1])} ({others} threads)")
            for st in stacks:
                say(f"[{phase}] warm-up {st.name}: {args.warmup} requests")
                w = run_load(st.url, bodies(args.warmup, args.max_tokens, 5_000_000), conc).summary(args.max_tokens)
                say(f"  {w['ok']}/{w['requests']} ok, mean prompt tokens {w['prompt_tokens'] / max(1, w['ok']):.1f}")
                if phase == "paced":
                    r = run_load(st.url, bodies(args.reference_requests, args.max_tokens, 7_000_000), 1)
                    refs[st.name] = r.summary(args.max_tokens)["text_events_per_req"]
                    say(f"  reference, one request at a time: {refs[st.name]:.2f} text events per request")
            by_name = {st.name: st for st in stacks}
            results = {name: [] for name in by_name}
            for r in range(args.rounds):
                for name in rotation(list(by_name), r):
                    say(f"[{phase}] round {r + 1}/{args.rounds} {name}: {n} requests, {conc} clients")
                    s = measure(by_name[name], n, conc, args.max_tokens, r * n)
                    results[name].append(s)
                    say(f"  {s['req_s']:.0f} req/s, TTFT p50 {s['ttft_p50']:.1f} ms, frontend {s['fe_cpu_ms']:.3f} "
                        f"CPU ms/req ({s['fe_cpu_util']:.2f} core), {s['events_per_req']:.1f} events/req, "
                        f"{s['tokens_per_event']:.2f} tokens/text event, errors {s['errors']}")  # fmt: skip
            if args.profile and phase == "paced":
                profile_ours(by_name[OURS], n, conc, args.max_tokens)
            if cpu_only and OURS in by_name and DYNAMO in by_name:
                # The goal's pairing: ours carrying OPEN_LOOP_LOAD x Dynamo's saturation req/s, its TTFT against
                # Dynamo's at its saturation (closed loop: its own TTFT at the load it can carry).
                rate = OPEN_LOOP_LOAD * statistics.mean(s["req_s"] for s in results[DYNAMO])
                name = f"{OURS} open loop at {OPEN_LOOP_LOAD:g}x Dynamo's req/s"
                say(f"[{phase}] {name}: {n} requests, Poisson arrivals at {rate:.0f}/s")
                s = measure(by_name[OURS], n, conc, args.max_tokens, args.rounds * n, poisson_arrivals(n, rate, 22))
                s["offered_req_s"] = rate
                results[name] = [s]
                say(f"  {s['req_s']:.0f} req/s, TTFT p50/p99 {s['ttft_p50']:.1f}/{s['ttft_p99']:.1f} ms, frontend "
                    f"{s['fe_cpu_util']:.2f} core, errors {s['errors']}")
    finally:
        for st in stacks:
            st.stop()
    return results, refs


def profile_ours(stack: Stack, n: int, concurrency: int, max_tokens: int) -> None:
    """py-spy (from .venv, else from PATH) records our frontend under the same load -> bench/out/
    frontend_profile.txt (collapsed stacks); prints the top frames and the per-hop table (:func:`hop_table`),
    scaled by the frontend CPU measured during the recording."""
    found = Path(PY).parent / "py-spy"
    spy = str(found) if found.exists() else shutil.which("py-spy")
    if spy is None:
        say("--profile: py-spy is not installed in .venv or on PATH (pip install py-spy); skipped")
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "frontend_profile.txt"
    rec = subprocess.Popen([spy, "record", "--pid", str(stack.frontend.pid), "--rate", "500", "--format", "raw",
                            "--output", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1.0)
    s = measure(stack, n, concurrency, max_tokens, 10_000_000)
    rec.send_signal(2)  # SIGINT: py-spy writes its output and exits
    rec.wait(30)
    say(f"profile written: {out} (frontend {s['fe_cpu_ms']:.3f} CPU ms/req while recording)")
    top_frames(out)
    hop_table(out, s["fe_cpu_ms"], s["events_per_req"])


def _samples(raw: Path) -> Iterator[tuple[list[str], int]]:
    for line in raw.read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        if cnt.isdigit():
            yield stack.split(";"), int(cnt)


def top_frames(raw: Path, n: int = 25) -> None:
    """Self time and inclusive time per function from py-spy's raw (collapsed stacks) output."""
    if not raw.exists():
        return
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for frames, c in _samples(raw):
        total += c
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + c
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + c
    print(f"\npy-spy: {total} samples; top self time")
    for fr, c in sorted(self_t.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {100 * c / total:5.1f}%  {fr}")
    print("top inclusive time")
    for fr, c in sorted(incl.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {100 * c / total:5.1f}%  {fr}")


# The hops of a token's path ("token") and of a request's ("request"): a sample belongs to the first rule that
# matches one of its frames, innermost frame first. Substrings of py-spy's "function (file:line)" frames.
HOPS: list[tuple[str, str, tuple[str, ...]]] = [
    ("token", "SSE write: ASGI send + socket write", ("RequestResponseCycle.send", "granian", "_SseSender")),
    ("token", "NATS frame receipt: socket read, nats-py parser, subscription", (
        "nats/protocol/parser.py", "Client._read_loop", "Client._process_msg", "Subscription._wait_for_msgs",
        "_on_mux_msg", "ResponseStream._push", "_MuxQueue", "_on_batch", "ResponseStream._deliver",
        "_direct_mux_delivery")),
    ("token", "frame decode (msgpack)", ("decode_frame", "dynamo_rt/protocol.py")),
    ("token", "detokenization + stop checks", ("frontend/detok.py",)),
    ("token", "SSE encoding (byte templates)", ("ChunkTemplates", "_js (")),
    ("token", "token step in the frame callback (metrics, bookkeeping, direct writer)", (
        "choice_events.<locals>", "stream_response.<locals>.emit", "DirectWriter")),
    ("request", "NATS request (publish, ack, flush)", (
        "Client._flusher", "Client.request", "_request_new_style", "Transport.call", "ResponseStream._open",
        "nats/nuid.py", "Client.publish", "_send_cancel", "ResponseStream._finish", "ResponseStream.send",
        "Transport.open_stream", "call_stoppable")),
    ("request", "chat template", ("apply_chat_template", "jinja2", "<template>")),
    ("request", "tokenization", ("frontend/preprocess.py",)),
    ("request", "validation", ("frontend/openai_protocol.py",)),
    ("request", "routing", ("dynamo_rt/router/", "Dispatcher.open")),
    ("request", "metrics", ("prometheus_client", "frontend/metrics.py")),
    ("request", "read body", ("read_body",)),
    ("token", "stream loop (generators, frame queue)", (
        "choice_events", "stream_response", "_send_stream", "ResponseStream.__anext__", "ResponseStream._get")),
    ("request", "response setup, admission, request id", ("frontend/app.py", "frontend/serving.py", "contextlib")),
    ("request", "HTTP accept + parse (server)", ("uvicorn/", "starlette/", "httptools")),
    ("token", "event loop in C (epoll, socket reads, task switches)", ("Runner.run",)),
]


def hop_table(raw: Path, cpu_ms_per_req: float, events_per_req: float) -> None:
    """CPU per request (and per SSE event for the token hops) of each hop: its share of the samples times the
    frontend CPU per request measured during the recording."""
    if not raw.exists():
        return
    counts: dict[tuple[str, str], int] = {}
    total = 0
    for frames, c in _samples(raw):
        total += c
        hop = ("other", "other")
        for fr in reversed(frames):
            rule = next(((path, name) for path, name, keys in HOPS if any(k in fr for k in keys)), None)
            if rule is not None:
                hop = rule
                break
        counts[hop] = counts.get(hop, 0) + c
    if not total:
        return
    rows: list[list[object]] = []
    for path in ("token", "request", "other"):
        for (p, name), c in sorted(counts.items(), key=lambda kv: -kv[1]):
            if p == path:
                us = 1000 * cpu_ms_per_req * c / total
                rows.append([name, path, 100 * c / total, us, us / events_per_req if path == "token" else ""])
    print(f"\nper-hop frontend CPU ({total} samples, {cpu_ms_per_req:.3f} ms/req, {events_per_req:.1f} SSE events/req)")
    print(table(["hop", "path", "% samples", "us/req", "us/event"], rows, 62))


def mean_of(results: dict[str, list[dict[str, Any]]], name: str, key: str) -> float:
    return statistics.mean(s[key] for s in results[name]) if results.get(name) else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b else float("nan")


def print_phase(phase: str, results: dict[str, list[dict[str, Any]]], refs: dict[str, float],
                args: argparse.Namespace) -> None:
    """The per-round table and the ours / Dynamo summary of one phase."""
    headers = ["stack / round", "req/s", "TTFT p50 ms", "TTFT p99 ms", "fe TTFT p50", "fe TTFT p99", "ITL ms",
               "fe CPU ms/req", "fe CPU util", "mocker CPU ms", "SSE ev/req", "text ev/req", "tok/text ev",
               "errors"]  # fmt: skip
    rows = [[f"{name} #{i}", s["req_s"], s["ttft_p50"], s["ttft_p99"], s["fe_ttft_p50"], s["fe_ttft_p99"], s["itl_ms"],
             s["fe_cpu_ms"], s["fe_cpu_util"], s["worker_cpu_ms"], s["events_per_req"], s["text_events_per_req"],
             s["tokens_per_event"], s["errors"]]
            for name, rs in results.items() for i, s in enumerate(rs, 1)]  # fmt: skip
    print(f"\n=== {phase}: {PHASE_TITLE[phase]}")
    print(table(headers, rows, 20))
    print()
    srows: list[list[object]] = []
    for key, label in (("fe_cpu_ms", "frontend CPU ms/req"), ("req_s", "req/s"), ("ttft_p50", "TTFT p50 ms"),
                       ("ttft_p99", "TTFT p99 ms"), ("fe_ttft_p50", "TTFT p50 ms at the frontend"),
                       ("fe_ttft_p99", "TTFT p99 ms at the frontend"), ("itl_ms", "ITL ms (p50 lat - TTFT)"),
                       ("fe_cpu_util", "frontend CPU util (cores)"), ("client_cpu_util", "load generator CPU util"),
                       ("other_core_busy", "busiest non-frontend core"),
                       ("worker_cpu_ms", "mocker CPU ms/req"),
                       ("events_per_req", "SSE events/req"), ("text_events_per_req", "text events/req"),
                       ("tokens_per_event", "tokens/text event"), ("errors", "errors")):  # fmt: skip
        a, b = mean_of(results, OURS, key), mean_of(results, DYNAMO, key)
        srows.append([label, a, b, ratio(a, b)])
    if refs:
        a, b = refs.get(OURS, float("nan")), refs.get(DYNAMO, float("nan"))
        srows.append(["text ev/req, 1 at a time", a, b, ratio(a, b)])
        checks = [one_event_per_token(mean_of(results, nm, "text_events_per_req"), refs[nm]) if nm in refs else "-"
                  for nm in (OURS, DYNAMO)]  # fmt: skip
        srows.append(["one event per token?", *checks, ""])
    print(table(["metric (mean of rounds)", "ours", "Dynamo", "ours/Dynamo"], srows, 28))
    for other in [nm for nm in results if nm not in (OURS, DYNAMO) and " open loop " not in nm]:  # --ab-ref
        arows = [[label, mean_of(results, OURS, key), mean_of(results, other, key),
                  ratio(mean_of(results, OURS, key), mean_of(results, other, key))]
                 for key, label in (("fe_cpu_ms", "frontend CPU ms/req"), ("req_s", "req/s"),
                                    ("ttft_p50", "TTFT p50 ms"), ("ttft_p99", "TTFT p99 ms"), ("itl_ms", "ITL ms"),
                                    ("events_per_req", "SSE events/req"))]  # fmt: skip
        print()
        print(table(["metric (mean of rounds)", "ours", other, f"ours/{other}"], arows, 28))
    for nm in [nm for nm in results if " open loop " in nm and DYNAMO in results]:
        s = results[nm][0]
        print(f"\n{nm} ({s['offered_req_s']:.0f} offered, {s['req_s']:.0f} req/s carried, frontend "
              f"{s['fe_cpu_util']:.2f} core): TTFT p50/p99 {s['ttft_p50']:.1f}/{s['ttft_p99']:.1f} ms vs Dynamo's "
              f"{mean_of(results, DYNAMO, 'ttft_p50'):.1f}/{mean_of(results, DYNAMO, 'ttft_p99'):.1f} at its "
              f"saturation (ratio {ratio(s['ttft_p50'], mean_of(results, DYNAMO, 'ttft_p50')):.2f} / "
              f"{ratio(s['ttft_p99'], mean_of(results, DYNAMO, 'ttft_p99')):.2f}); errors {s['errors']}")
    if phase == "cpu-only":
        util = min((mean_of(results, nm, "fe_cpu_util") for nm in (OURS, DYNAMO) if nm in results),
                   default=float("nan"))
        if util < 0.9:
            print(f"NOTE: a frontend used {util:.2f} of its core: it was not the only bottleneck (load generator or "
                  f"mocker starved on {os.cpu_count()} CPUs?); raise --cpu-only-concurrency or use a bigger machine")


def plot(results: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return
    panels = [(ph, key, title) for ph, key, title in (
        ("paced", "fe_cpu_ms", "paced: frontend CPU ms / request"),
        ("full", "fe_cpu_ms", "full speed: frontend CPU ms / request"),
        ("cpu-only", "req_s", "CPU-only, 1 frontend core: req/s"),
    ) if ph in results]  # fmt: skip
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (ph, key, title) in zip(axes[0], panels, strict=True):
        names = list(results[ph])
        ax.bar(names, [mean_of(results[ph], nm, key) for nm in names], color=["tab:blue", "tab:gray"][: len(names)])
        ax.set_title(title, fontsize=9)
    fig.suptitle("frontend overhead: 32-token streamed chat, ours vs NVIDIA Dynamo 1.6.1")
    save_plot(fig, "frontend_overhead")


def headline(results: dict[str, dict[str, list[dict[str, Any]]]], refs: dict[str, float],
             args: argparse.Namespace) -> dict[str, Any]:
    """The JSON line: the paced (like-for-like) figure as ours / baseline / ratio, the rest beside it."""

    def r4(x: float) -> float | None:
        return None if x != x else round(x, 4)

    paced = results.get("paced", {})
    ours, base = mean_of(paced, OURS, "fe_cpu_ms"), mean_of(paced, DYNAMO, "fe_cpu_ms")
    line: dict[str, Any] = {
        "bench": "frontend_overhead", "ours": r4(ours), "baseline": r4(base), "ratio": r4(ratio(ours, base)),
        "unit": "cpu_ms_per_req",
        "setup": f"paced: ours --speedup {args.paced_speedup:g}, Dynamo --speedup-ratio {args.paced_speedup_ratio:g} "
                 f"(ITL ms {mean_of(paced, OURS, 'itl_ms'):.1f} / {mean_of(paced, DYNAMO, 'itl_ms'):.1f}), "
                 f"{args.concurrency} clients, {args.max_tokens} tokens",
        "events_per_req_ours": r4(mean_of(paced, OURS, "events_per_req")),
        "events_per_req_baseline": r4(mean_of(paced, DYNAMO, "events_per_req")),
        "tokens_per_event": {f"{nm} {ph}": r4(mean_of(results[ph], nm, "tokens_per_event"))
                             for ph in ("paced", "full", "cpu-only") if ph in results for nm in results[ph]},
        "text_events_vs_one_at_a_time": {nm: r4(ratio(mean_of(paced, nm, "text_events_per_req"), refs[nm]))
                                         for nm in paced if nm in refs},
        "ttft_ms": {nm: {k: r4(mean_of(paced, nm, k)) for k in ("ttft_p50", "ttft_p99", "fe_ttft_p50", "fe_ttft_p99")}
                    for nm in paced},
        "one_event_per_token": all(one_event_per_token(mean_of(paced, nm, "text_events_per_req"), refs[nm])
                                   for nm in paced if nm in refs) if paced else None,
    }  # fmt: skip
    if "full" in results:
        a, b = mean_of(results["full"], OURS, "fe_cpu_ms"), mean_of(results["full"], DYNAMO, "fe_cpu_ms")
        line["full_speed"] = {"ours": r4(a), "baseline": r4(b), "ratio": r4(ratio(a, b))}
    if "cpu-only" in results:
        a, b = mean_of(results["cpu-only"], OURS, "req_s"), mean_of(results["cpu-only"], DYNAMO, "req_s")
        cpu = results["cpu-only"]
        line["cpu_only_req_s"] = {"ours": r4(a), "baseline": r4(b), "ratio": r4(ratio(a, b)),
                                  "ttft_ms": {nm: {k: r4(mean_of(cpu, nm, k)) for k in
                                                   ("ttft_p50", "ttft_p99", "fe_ttft_p50", "fe_ttft_p99")}
                                              for nm in cpu},
                                  "open_loop": {nm: {k: r4(cpu[nm][0][k]) for k in (
                                      "offered_req_s", "req_s", "ttft_p50", "ttft_p99", "fe_ttft_p50", "fe_ttft_p99",
                                      "fe_cpu_util", "errors")} for nm in cpu if " open loop " in nm},
                                  "workers": args.cpu_only_workers, "concurrency": args.cpu_only_concurrency,
                                  "fe_core_util": {nm: r4(mean_of(results["cpu-only"], nm, "fe_cpu_util"))
                                                   for nm in results["cpu-only"]}}  # fmt: skip
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per measured round (paced, full)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=300, help="requests before measuring")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per stack (rotating order)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="phases to run, in order")
    ap.add_argument("--paced-speedup", type=float, default=1.0,
                    help="paced phase: our mocker's --speedup (1: 10 ms + 0.1 ms per running sequence per step, "
                         "~20 ms between tokens at 64 clients)")  # fmt: skip
    ap.add_argument("--paced-speedup-ratio", type=float, default=0.4,
                    help="paced phase: Dynamo's mocker's --speedup-ratio (0.4: its timing model's ~8 ms per step at "
                         "64 sequences stretched to ~20 ms, like ours)")  # fmt: skip
    ap.add_argument("--reference-requests", type=int, default=32,
                    help="paced phase: requests streamed one at a time for the events-per-request reference")
    ap.add_argument("--cpu-only-workers", type=int, default=4, help="cpu-only phase: mocker engines per stack")
    ap.add_argument("--cpu-only-concurrency", type=int, default=128, help="cpu-only phase: clients")
    ap.add_argument("--cpu-only-requests", type=int, default=2000, help="cpu-only phase: requests per round")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 requests per round, 1 round")
    ap.add_argument("--ours-only", action="store_true", help="skip NVIDIA Dynamo")
    ap.add_argument("--profile", action="store_true", help="also py-spy our frontend under the paced load")
    ap.add_argument("--long-tokens", type=int, default=32000, help="long phase: prompt tokens of a long request")
    ap.add_argument("--long-concurrent", type=int, default=100, help="long phase: long requests arriving at once")
    ap.add_argument("--long-requests", type=int, default=20, help="long phase: requests per one-at-a-time probe")
    ap.add_argument("--long-short-requests", type=int, default=600,
                    help="long phase: short paced requests per interference run")
    ap.add_argument("--ab-ref", default=None, metavar="GITREF",
                    help="also run our frontend as of this commit (same worker and load, interleaved rounds)")
    ap.add_argument("--ours-args", default="", help="extra frontend flags for our stack (one string)")
    args = ap.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.requests, args.cpu_only_requests, args.warmup, args.rounds = 300, 300, 64, 1
        args.long_requests, args.long_short_requests = 10, 300

    from dynamo_rt.local.tinymodel import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    if not args.ours_only:
        ensure_dynamo_venv()
    allowed = sorted(os.sched_getaffinity(0))
    fe_core, rest = {allowed[-1]}, set(allowed[:-1]) or set(allowed)
    ab = ab_tree(args.ab_ref) if args.ab_ref else None
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    refs: dict[str, float] = {}
    long_result: dict[str, Any] | None = None
    for phase in args.phases:
        if phase == "long":
            say(f"phase long: {PHASE_TITLE['long']}")
            long_result = run_long(model_dir, args, lambda: start_ours(model_dir, args.paced_speedup, "long",
                                                                        frontend_args=args.ours_args.split()), bodies)
            continue
        speed = args.paced_speedup if phase == "paced" else 0.0
        dyn_speed = args.paced_speedup_ratio if phase == "paced" else 0.0
        workers = args.cpu_only_workers if phase == "cpu-only" else 1
        tag = phase.replace("-", "")

        def ours(speed: float = speed, workers: int = workers, tag: str = tag) -> Stack:
            return start_ours(model_dir, speed, tag, workers, frontend_args=args.ours_args.split())

        def ref(speed: float = speed, workers: int = workers, tag: str = tag) -> Stack:
            return start_ours(model_dir, speed, tag, workers, name=ab[0], root=ab[1])

        def dyn(speed: float = dyn_speed, workers: int = workers, tag: str = tag) -> Stack:
            return start_dynamo(model_dir, speed, tag, workers)

        say(f"phase {phase}: {PHASE_TITLE[phase]}; ours --speedup {speed:g}, Dynamo --speedup-ratio {dyn_speed:g}, "
            f"{workers} engine(s) per stack")  # fmt: skip
        starters: list[Starter] = [ours] if args.ours_only else [ours, dyn]
        if ab is not None:
            starters.append(ref)
        res, rf = run_phase(phase, starters, args, (fe_core, rest) if phase == "cpu-only" else None)
        results[phase] = res
        refs.update(rf)

    for phase in args.phases:
        if phase == "long":
            if long_result is not None:
                print_long(long_result, PHASE_TITLE["long"])
            continue
        print_phase(phase, results[phase], refs if phase == "paced" else {}, args)
    total_err = sum(s["errors"] for ph in results.values() for rs in ph.values() for s in rs)
    print()
    if total_err:
        print(f"WARNING: {total_err} incomplete or failed responses")
    line = headline(results, refs, args)
    if line["one_event_per_token"] is False:
        print("WARNING: a paced stack coalesced tokens (fewer text events than one at a time): the headline is not "
              "like for like; rerun on a quieter machine, or pace both slower (--paced-speedup 0.5 "
              "--paced-speedup-ratio 0.2)")
    if long_result is not None:
        line["long_prompt"] = long_result
    plot(results)
    report(line)
    return 1 if total_err else 0


if __name__ == "__main__":
    sys.exit(main())
