"""KV-aware routing versus round-robin on a prefix-heavy multi-turn chat workload (8 mocker workers).

Workload (seeded, identical for every run): ``--systems`` shared system prompts of 1-2k tokens and
``--sessions`` chat sessions; each session picks a system prompt and runs ``--turns`` turns one after the
other, each turn appending a user message of ``--turn-tokens`` tokens to the conversation, so every prompt
extends the session's previous one. The assistant messages kept in the history are fixed synthetic replies
of ``--max-tokens`` tokens (the mockers' outputs are random ids, and a fixed history keeps the prompts the
same for every router and both stacks). Every request streams ``--max-tokens`` tokens (``ignore_eos``).
Two presets (``--workload``; the flags override them):

* ``long`` (default): 12 turns of 200-500 tokens, mean prompt ~4k tokens (up to ~7.5k), the mockers
  simulating a 16k-context model (``--context-length 16384``; same tokenizer). Conversations of this size
  (a system prompt with instructions or tools, a dozen turns) are where routing by cache decides TTFT, and
  where the published figures for KV-aware routing were measured.
* ``chat``: 6 turns of 100-300 tokens (prompts ~1.1-2.9k tokens, ~850 of them uncached per request under
  round-robin). Its ratio is bounded near ~0.47 by the mocker's timing model, see the end of this text.

Arrivals, two phases (``--mode``, default both, each on fresh stacks):
* open loop (the JSON line's phase): sessions arrive as a seeded Poisson process of ``--session-rate``
  sessions/s, however many are already in flight, as users do; a session's turns still run one after the
  other with no think time. Every router and both stacks get the same schedule. The default rate is
  calibrated at start-up: round-robin runs in-process on the same open loop, time-compressed 8x, a few
  times (:func:`calibrate`, 15-40 s), which gives its mean simulated *work per request* at that rate beyond
  the ~10 ms per-step floor (prefill: 2 ms + 0.07 ms per uncached token; decode: 0.1 ms per step it runs
  in; :func:`request_work_ms`), hence the request rate the 8 workers can absorb; the session rate loads the
  round-robin fleet to ``--target-util`` (0.8: loaded, not overloaded, as fleets are sized). Each run
  reports its utilization = offered request rate x its own measured mean work per request / 8 workers
  (kv's is lower: it computes fewer tokens for the same requests).
* closed loop (``--closed-loop``, the bench before open loop): ``--concurrency`` sessions at once, a new one
  when one ends. The fleet is never loaded (32 sessions keep round-robin at ~40% utilization), so every
  TTFT is about one prefill pass and queueing, where routing by cache pays most in production, never shows.

Stacks, each on a fresh etcd + NATS and fresh workers (caches start cold): 8 mocker engines at realistic
speed (``--speedup 1``: ~0.07 ms simulated prefill per *uncached* prompt token, ~10 ms per decode step) in
one worker process (``--num-workers 8``), behind our frontend with ``--router-mode round-robin`` and then
``--router-mode kv``; then NVIDIA Dynamo 1.6.1's mocker (``--num-workers 8 --speedup-ratio 1
--block-size 16``, its own timing model) behind its frontend with ``--router-mode kv`` (etcd discovery,
NATS request and event planes), for its cache hit rate beside ours (its TTFT is on a different timing
model, so only the hit rate is compared).

Reported per run: TTFT p50/p99 (first SSE event with text), request and token throughput, the cache hit rate =
sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens), the utilization, errors (a request
that fails or streams fewer than ``--max-tokens`` tokens; must be 0) and host CPU. Each phase runs
``--rounds`` times (default 2, fresh stacks each time). The LAST line printed is JSON ``{"bench":
"kv_routing", "ours": TTFT p50 with kv, "baseline": TTFT p50 round-robin, "ratio": ..., "unit": "ms", "mode":
"open-loop", "session_rate": ..., "rr_util": ..., "hit_rate": ours kv, "dynamo_hit_rate": ...}`` (means over
rounds); with both phases the closed loop's line (``"mode": "closed-loop", "concurrency": ...``) comes just
before it. Run: ``.venv/bin/python bench/kv_routing.py [--workload long|chat] [--quick] [--ours-only]
[--open-loop | --closed-loop] [--session-rate R | --target-util U] [--in-process] [--tuned-weight W ...]``.
``--tuned-weight`` adds one of our kv runs per ``--kv-overlap-weight`` W. ``--in-process`` compares the
routing policies alone: our ``Router`` and 8 mocker engines in the bench's own process, KV events handed
straight to the index, the same requests tokenized without the chat template, no frontend, NATS or Dynamo; it
is much less exposed to host noise, and its JSON line is named ``kv_routing_policy``.

What bounds the ``chat`` workload's ratio: with this timing model a later turn computes only its new ~250
tokens, but its prefill still takes a whole forward pass (10 ms floor + 2 ms + 0.07 ms per token, ~30 ms)
after the step in flight ends, so kv TTFT p50 stays near 40-45 ms of simulated time (plus the frontend and
NATS), while round-robin computes ~850 tokens per request (~70 ms). In the closed loop that is the whole story
(ratio ~0.6). In the open loop round-robin also queues: a request waits for the step in flight, which now
often carries other requests' long prefills, and shares its own step with them; but the mocker admits every
waiting prompt into the next step (up to 8192 tokens), so the wait grows like one step (10 ms / (1 -
utilization)), not like a queue of prefills. Measured in-process (200 sessions, one round each), the ratio is
~0.54 at 58% round-robin utilization, ~0.47-0.49 at 77-81% and ~0.45 at 87-94%: 0.33 is not reached by a fleet
that is loaded but not overloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    cpu_seconds,
    ensure_dynamo_venv,
    exit_on_sigterm,
    host_busy,
    host_cpu,
    pct,
    report,
    run_load,
    save_plot,
    say,
    start_stack,
    table,
)

MODEL = "tiny"
WORKERS = 8


# --------------------------------------------------------------------------------------------- workload


class TextGen:
    """Deterministic filler text of about N tokens of the tiny model's tokenizer (words of its corpus)."""

    def __init__(self, model_dir: str) -> None:
        from tokenizers import Tokenizer

        root = Path(__file__).resolve().parent.parent
        self.words = (root / "dynamo_rt" / "local" / "data" / "tiny_corpus.txt").read_text().split()
        self.tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        rng = random.Random(0)
        sample = " ".join(rng.choice(self.words) for _ in range(4000))
        self.tokens_per_word = len(self.tok.encode(sample).ids) / 4000

    def text(self, rng: random.Random, tokens: int) -> str:
        n = max(1, round(tokens / self.tokens_per_word))
        return " ".join(rng.choice(self.words) for _ in range(n))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text).ids)


def build_workload(gen: TextGen, args: argparse.Namespace) -> list[list[bytes]]:
    rng = random.Random(args.seed)
    systems = [
        f"You are assistant #{i}. " + gen.text(rng, rng.randint(args.system_tokens[0], args.system_tokens[1]))
        for i in range(args.systems)
    ]
    sessions: list[list[bytes]] = []
    for s in range(args.sessions):
        msgs: list[dict[str, str]] = [{"role": "system", "content": systems[rng.randrange(args.systems)]}]
        reqs = []
        for t in range(args.turns):
            n = rng.randint(args.turn_tokens[0], args.turn_tokens[1])
            msgs.append({"role": "user", "content": f"[session {s}, turn {t}] " + gen.text(rng, n)})
            body = {
                "model": MODEL,
                "messages": list(msgs),
                "max_tokens": args.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            reqs.append(json.dumps(body).encode())
            msgs.append({"role": "assistant", "content": gen.text(rng, args.max_tokens)})
        sessions.append(reqs)
    return sessions


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Start times (s) of ``n`` sessions arriving as a Poisson process of ``rate`` sessions/s; the first at 0.
    Seeded apart from the workload, so every router and both stacks get the same schedule."""
    rng = random.Random(f"arrivals-{seed}")
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def request_work_ms(prompt_tokens: int, cached_tokens: int, max_tokens: int) -> float:
    """Simulated work one request adds to its mocker beyond the per-step floor (ms at speedup 1, the mocker's
    default :class:`TimingModel`): its prefill (launch overhead + uncached tokens) and its share of the
    ``max_tokens`` steps it runs in. The floor (~10 ms per step) is paid once per step whatever the batch,
    so a worker with ``rate x work < 1 s/s`` keeps up, and ``rate x work`` is its utilization (the 2 ms
    launch overhead is shared when prefills batch, so this is a slight over-estimate under load)."""
    from workers.mocker.engine import TimingModel

    tm = TimingModel()
    uncached = prompt_tokens - cached_tokens
    return tm.prefill_base_ms + tm.prefill_ms_per_token * uncached + tm.decode_ms_per_seq * max_tokens


def utilization(records: list[dict[str, Any]], req_s: float, args: argparse.Namespace, open_loop: bool) -> float:
    """Mean utilization of the ``WORKERS`` mockers in a run (:func:`request_work_ms`): the offered request
    rate (open loop: session rate x turns) or the achieved one (closed loop) times the mean work per
    request, as a fraction of the fleet's time."""
    if not records or (open_loop and args.session_rate is None):  # None: a calibration run, rate not chosen yet
        return float("nan")
    work = statistics.mean(request_work_ms(r["prompt_tokens"], r["cached_tokens"], args.max_tokens) for r in records)
    rate = args.session_rate * args.turns if open_loop else req_s
    return rate * work / 1000.0 / args.speedup / WORKERS


# --workload presets (explicit flags win).
WORKLOADS: dict[str, dict[str, Any]] = {
    "long": {"turns": 12, "turn_tokens": [200, 500], "context_length": 16384},
    "chat": {"turns": 6, "turn_tokens": [100, 300], "context_length": 0},
}

CALIBRATE_SPEEDUP = 8.0  # calibration runs the open loop this many times faster than real time


def calibrate(token_sessions: list[list[list[int]]], args: argparse.Namespace) -> tuple[float, float]:
    """Round-robin's mean work per request (ms, :func:`request_work_ms`) on this workload and the session
    rate that loads the round-robin fleet to ``args.target_util``, found by running round-robin in-process.

    Round-robin's work depends on the rate it is measured at: the faster sessions arrive, the more of them
    are in flight, and on workloads whose prompts fill the workers' KV caches (long conversations) more
    prefixes are evicted before their next turn, so a closed-loop measurement underestimates the work at
    the open loop's rate (by ~2x at 4k-token prompts). So: a first estimate from a closed loop at full speed
    (no timing), then a fixed-point iteration on the open loop itself, time-compressed
    ``CALIBRATE_SPEEDUP`` times (mockers and the arrival schedule alike, ~5-10 s a run): rate <- target x
    capacity(work measured at rate), until the utilization is within 3% of the target (at most 4 runs)."""
    s = run_in_process("round-robin", token_sessions, args, args.kv_overlap_weight, speedup=0)
    work = s["work_ms"]

    def rate_for(w: float) -> float:
        return args.target_util * WORKERS * 1000.0 * args.speedup / w / args.turns

    rate = rate_for(work)
    for i in range(4):
        arrivals = [t / CALIBRATE_SPEEDUP for t in poisson_arrivals(args.sessions, rate, args.seed)]
        s = run_in_process("round-robin", token_sessions, args, args.kv_overlap_weight, arrivals=arrivals,
                           speedup=CALIBRATE_SPEEDUP * args.speedup)  # fmt: skip
        work = s["work_ms"]
        util = rate * args.turns * work / 1000.0 / args.speedup / WORKERS
        say(f"  calibration {i + 1}: {rate:.2f} sessions/s -> round-robin {work:.1f} ms of work per request, "
            f"hit rate {s['hit_rate']:.3f}, utilization {util:.2f}")  # fmt: skip
        if abs(util - args.target_util) <= 0.03 * args.target_util:
            break
        rate = rate_for(work)
    return work, rate


# --------------------------------------------------------------------------------------------- stacks


def frontend_ttft_mean(url: str) -> float:
    """Mean TTFT our frontend measured itself (worker call to first token, ms): the part of the client's
    TTFT spent behind the frontend, as opposed to in it (HTTP, tokenizing, routing)."""
    import urllib.request

    sums: dict[str, float] = {}
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("dynamo_frontend_time_to_first_token_seconds_"):
                name, _, value = line.rpartition(" ")
                kind = name.split("{")[0].rsplit("_", 1)[1]
                sums[kind] = sums.get(kind, 0.0) + float(value)
    return 1000 * sums.get("sum", 0.0) / sums["count"] if sums.get("count") else float("nan")


def run_stack(
    kind: str,
    router: str,
    model_dir: str,
    sessions: list[list[bytes]],
    args: argparse.Namespace,
    tag: str,
    weight: float | None = None,
    arrivals: list[float] | None = None,
) -> dict[str, Any]:
    """Fresh services + workers + frontend, the whole workload once (closed loop, or open loop with
    ``arrivals``), then everything stopped."""
    dyn = kind == "dynamo"
    if dyn:
        worker = ["--num-workers", str(WORKERS), "--speedup-ratio", str(args.speedup), "--block-size", "16",
                  "--num-gpu-blocks-override", str(args.num_blocks)]  # fmt: skip
        if args.context_length:
            worker += ["--max-model-len", str(args.context_length)]
        front: list[str] = []
    else:
        worker = ["--num-workers", str(WORKERS), "--speedup", str(args.speedup), "--num-blocks", str(args.num_blocks),
                  "--block-size", "16"]  # fmt: skip
        if args.context_length:
            worker += ["--context-length", str(args.context_length)]
        front = ["--kv-overlap-weight", str(args.kv_overlap_weight if weight is None else weight)]
    with start_stack(kind, model_dir, MODEL, tag=f"kv-{tag}", router=router, worker_args=worker,
                     frontend_args=front, namespace="kvbench", instances=WORKERS) as st:  # fmt: skip
        url, procs = st.url, st.procs
        time.sleep(1.0)  # KV event subscriptions settle
        t0 = time.monotonic()
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        h0 = host_cpu()
        res = run_load(url, sessions, args.concurrency, timeout=300.0, arrivals=arrivals)
        h1 = host_cpu()
        cpu1 = [cpu_seconds(p.pid) for p in procs]
        out = res.summary(args.max_tokens)
        out["wall_s"] = wall = time.monotonic() - t0
        # CPU share of the worker process and the frontend (1.0 = one core), and of the whole machine:
        # a worker process near 1.0 means simulated time is stretched by real CPU, not by the model.
        out["worker_util"] = (cpu1[0] - cpu0[0]) / wall
        out["frontend_util"] = (cpu1[1] - cpu0[1]) / wall
        out["host_busy"] = host_busy(h0, h1)
        out["fe_ttft_mean"] = float("nan") if dyn else frontend_ttft_mean(url)
        ok = res.ok(args.max_tokens)
        # Dynamo's mocker has its own timing model: our work estimate means nothing there.
        out["util"] = float("nan") if dyn else utilization(ok, out["req_s"], args, arrivals is not None)
        if out["errors"]:
            say(f"  {tag}: {out['errors']} bad responses, e.g. {res.error_samples(3, args.max_tokens)}")
        # Per turn: how the hit rate builds up along a session.
        turns: dict[int, list[int]] = {}
        for r in res.ok(args.max_tokens):
            agg = turns.setdefault(r["turn"], [0, 0])
            agg[0] += r["cached_tokens"]
            agg[1] += r["prompt_tokens"]
        out["turn_hit"] = {t: c / p if p else 0.0 for t, (c, p) in sorted(turns.items())}
        return out


def run_in_process(router: str, sessions: list[list[list[int]]], args: argparse.Namespace, weight: float,
                   arrivals: list[float] | None = None, speedup: float | None = None) -> dict[str, Any]:
    """The routing policy alone: our Router and ``WORKERS`` mocker engines in this process, KV events handed
    straight to the index, no HTTP, tokenizer or NATS. Far less exposed to host noise than the stacks, so
    it is the way to compare policies; the prompts are the same requests tokenized without a chat
    template. Closed loop (``args.concurrency`` sessions at once), or open loop with ``arrivals`` (each
    session's start, seconds from the start of the run). ``speedup`` overrides ``args.speedup``."""
    import asyncio

    from dynamo_rt.protocol import GenerateRequest, StopConditions
    from dynamo_rt.router import Router, RouterEvents
    from workers.common.engine import ModelInfo
    from workers.mocker import MockerEngine

    async def go() -> dict[str, Any]:
        info = ModelInfo(name=MODEL, path="", context_length=1 << 20, block_size=16)
        names = [f"w{i}" for i in range(WORKERS)]
        sp = args.speedup if speedup is None else speedup
        engines = {w: MockerEngine(info, speedup=sp, num_blocks=args.num_blocks, seed=i)
                   for i, w in enumerate(names)}  # fmt: skip
        events = RouterEvents()
        for w, e in engines.items():
            e.set_kv_event_sink(events.sink(w))
            await e.start()
        rt = Router(router, indexer=events.indexer, overlap_weight=weight, seed=args.seed)  # type: ignore[arg-type]
        recs: list[dict[str, Any]] = []
        gate = asyncio.Semaphore(args.concurrency)
        stop = StopConditions(max_tokens=args.max_tokens, ignore_eos=True)

        loop = asyncio.get_running_loop()
        failed: list[str] = []

        async def session(s: int, reqs: list[list[int]]) -> None:
            if arrivals is not None:  # open loop: the session starts on time, however many are in flight
                await asyncio.sleep(max(0.0, start + arrivals[s] - loop.time()))
                await turns(s, reqs)
            else:
                async with gate:
                    await turns(s, reqs)

        async def turns(s: int, reqs: list[list[int]]) -> None:
            for turn, toks in enumerate(reqs):
                t0 = time.perf_counter()
                d = rt.select(names, toks, {})
                rec: dict[str, Any] = {"turn": turn, "prompt_tokens": len(toks)}
                req = GenerateRequest(request_id=f"{s}-{turn}", token_ids=toks, stop=stop)
                n = 0
                try:
                    async for out in engines[d.worker_id].generate(req):
                        if "ttft_ms" not in rec:
                            rec["ttft_ms"] = 1000 * (time.perf_counter() - t0)
                            rec["cached_tokens"] = out.cached_tokens
                            rt.on_first_token(d.worker_id, d.key)
                        n += len(out.token_ids)
                except Exception as exc:  # counted as an error, like a bad response in the stacks
                    failed.append(f"{s}-{turn}: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    rt.on_request_finished(d.worker_id, d.request_blocks, d.key)
                if n != args.max_tokens:
                    failed.append(f"{s}-{turn}: {n} tokens")
                    continue
                recs.append(rec)

        c0, h0, t0 = time.process_time(), host_cpu(), time.monotonic()
        start = loop.time()  # the open loop's time zero
        await asyncio.gather(*(session(i, reqs) for i, reqs in enumerate(sessions)))
        wall, h1, c1 = time.monotonic() - t0, host_cpu(), time.process_time()
        for e in engines.values():
            await e.stop()
        ttft = sorted(r["ttft_ms"] for r in recs)
        prompt = sum(r["prompt_tokens"] for r in recs)
        by_turn: dict[int, list[int]] = {}
        for r in recs:
            agg = by_turn.setdefault(r["turn"], [0, 0])
            agg[0] += r["cached_tokens"]
            agg[1] += r["prompt_tokens"]
        errors = sum(len(reqs) for reqs in sessions) - len(recs)
        if failed:
            say(f"  {router}: {len(failed)} failed requests, e.g. {failed[:3]}")
        return {"ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "req_s": len(recs) / wall,
                "tok_s": len(recs) * args.max_tokens / wall, "hit_rate": sum(r["cached_tokens"] for r in recs) / prompt,
                "prompt_tokens": prompt, "ok": len(recs), "errors": errors, "wall_s": wall,
                "worker_util": (c1 - c0) / wall, "frontend_util": float("nan"), "host_busy": host_busy(h0, h1),
                "fe_ttft_mean": float("nan"),
                "util": utilization(recs, len(recs) / wall, args, arrivals is not None),
                "work_ms": statistics.mean(request_work_ms(r["prompt_tokens"], r["cached_tokens"], args.max_tokens)
                                           for r in recs) if recs else float("nan"),
                "turn_hit": {t: c / p if p else 0.0 for t, (c, p) in sorted(by_turn.items())}}  # fmt: skip

    return asyncio.run(go())


def tokenize_workload(gen: TextGen, sessions: list[list[bytes]]) -> list[list[list[int]]]:
    """The requests' messages as token ids (role tags instead of the chat template), for :func:`run_in_process`."""
    out = []
    for reqs in sessions:
        toks = []
        for body in reqs:
            msgs = json.loads(body)["messages"]
            toks.append(gen.tok.encode("".join(f"<{m['role']}>{m['content']}\n" for m in msgs)).ids)
        out.append(toks)
    return out


# --------------------------------------------------------------------------------------------- main


def plot(results: dict[str, list[dict[str, Any]]], name: str = "kv_routing") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(
        axes, ("ttft_p50", "ttft_p99", "hit_rate"), ("TTFT p50 ms", "TTFT p99 ms", "cache hit rate"), strict=True
    ):
        vals = [statistics.mean(r[key] for r in results[n]) for n in names]
        colors = ["tab:gray", "tab:blue", "tab:cyan", "tab:olive", "tab:purple", "tab:green"] * 2
        ax.bar(names, vals, color=colors[: len(names)])
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("KV-aware routing vs round-robin: prefix-heavy multi-turn chat, 8 mocker workers")
    save_plot(fig, name)


def print_phase(phase: str, results: dict[str, list[dict[str, Any]]], tuned: list[str]) -> None:
    """The per-run table, the hit rate by turn and the kv / round-robin summary of one phase."""
    headers = ["run", "TTFT p50 ms", "TTFT p99 ms", "req/s", "out tok/s", "hit rate", "prompt tok", "util",
               "errors", "worker CPU", "fe CPU", "host busy"]  # fmt: skip
    rows = []
    for name, rs in results.items():
        for i, s in enumerate(rs, 1):
            rows.append([f"{name} #{i}", s["ttft_p50"], s["ttft_p99"], s["req_s"], s["tok_s"], s["hit_rate"],
                         round(s["prompt_tokens"] / max(1, s["ok"])), s["util"], s["errors"], s["worker_util"],
                         s["frontend_util"], s["host_busy"]])  # fmt: skip
    print(f"\n=== {phase}")
    print(table(headers, rows, 24))

    def mean(name: str, key: str) -> float:
        return statistics.mean(s[key] for s in results[name]) if results.get(name) else float("nan")

    print()
    print("hit rate by turn (mean of rounds):")
    for name, rs in results.items():
        turns = sorted(rs[0]["turn_hit"])
        cells = "  ".join(f"t{t}: {statistics.mean(x['turn_hit'][t] for x in rs):.2f}" for t in turns)
        print(f"  {name:<22}{cells}")
    print()
    sh = ["metric (mean of rounds)", "kv", "round-robin", "kv / rr",
          *(h for n in tuned for h in (n.removeprefix("ours "), "/ rr")), "Dynamo kv"]  # fmt: skip
    srows = []
    for key, label in (("ttft_p50", "TTFT p50 ms"), ("ttft_p99", "TTFT p99 ms"), ("req_s", "req/s"),
                       ("hit_rate", "cache hit rate"), ("util", "fleet utilization"),
                       ("fe_ttft_mean", "frontend-side TTFT ms"), ("host_busy", "host CPU busy"),
                       ("errors", "errors")):  # fmt: skip
        a, b = mean("ours kv", key), mean("ours round-robin", key)
        cells: list[object] = [label, a, b, a / b if b else float("nan")]
        for n in tuned:
            c = mean(n, key)
            cells += [c, c / b if b else float("nan")]
        srows.append([*cells, mean("Dynamo 1.6.1 kv", key)])
    print(table(sh, srows, 26))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--systems", type=int, default=20, help="shared system prompts")
    ap.add_argument("--workload", choices=list(WORKLOADS), default="long",
                    help="preset for --turns / --turn-tokens / --context-length: long (12 turns of 200-500 tokens, "
                         "mean prompt ~4k, up to ~7.5k, on a simulated 16k-context model) or chat (6 turns of "
                         "100-300 tokens, prompts ~1.1-2.9k); the flags override it")  # fmt: skip
    ap.add_argument("--turns", type=int, default=None, help="turns per session")
    ap.add_argument("--system-tokens", type=int, nargs=2, default=[1000, 2000], metavar=("MIN", "MAX"))
    ap.add_argument("--turn-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--mode", choices=["open-loop", "closed-loop", "both"], default="both",
                    help="measured phase(s): open loop (Poisson session arrivals at --session-rate), closed loop "
                         "(--concurrency sessions at once), or both, open loop first; the JSON line is open "
                         "loop's unless only closed loop runs")  # fmt: skip
    ap.add_argument("--open-loop", dest="mode", action="store_const", const="open-loop", help="= --mode open-loop")
    ap.add_argument("--closed-loop", dest="mode", action="store_const", const="closed-loop",
                    help="= --mode closed-loop (the bench before open loop: its JSON line)")  # fmt: skip
    ap.add_argument("--session-rate", type=float, default=None,
                    help="open loop: sessions/s (Poisson); default: the rate that loads the round-robin fleet to "
                         "--target-util, calibrated on this workload at start-up")  # fmt: skip
    ap.add_argument("--target-util", type=float, default=0.8,
                    help="open loop: round-robin fleet utilization the default --session-rate aims at (0.8: "
                         "loaded, not overloaded, as fleets are sized)")  # fmt: skip
    ap.add_argument("--concurrency", type=int, default=32, help="closed loop: sessions in flight (4 per worker)")
    ap.add_argument("--speedup", type=float, default=1.0, help="mocker speedup (1: realistic timing)")
    ap.add_argument("--num-blocks", type=int, default=16384, help="KV blocks per mocker engine")
    ap.add_argument("--context-length", type=int, default=None,
                    help="the mockers (ours and Dynamo's) simulate a model with this context (0: the tiny model's "
                         "4096)")  # fmt: skip
    ap.add_argument(
        "--kv-overlap-weight",
        type=float,
        default=4.0,
        help="our frontend's --kv-overlap-weight in the main kv run (4.0: the frontend's default)",
    )
    ap.add_argument(
        "--tuned-weight",
        type=float,
        nargs="*",
        default=[],
        metavar="W",
        help="also run ours kv with each of these --kv-overlap-weight values; reported, not in the JSON line",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 sessions, 3 turns, 1 round")
    ap.add_argument("--ours-only", action="store_true", help="skip NVIDIA Dynamo")
    ap.add_argument("--in-process", action="store_true",
                    help="compare routing policies only: our Router and the mockers in this process (no frontend, "
                         "NATS or Dynamo); the JSON line is then named kv_routing_policy")  # fmt: skip
    args = ap.parse_args()
    exit_on_sigterm()
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.sessions, args.turns, args.rounds, args.concurrency = 40, 3, 1, 16
    if args.speedup <= 0:
        ap.error("--speedup must be > 0 (the bench measures time)")
    phases = {"open-loop": ["open-loop"], "closed-loop": ["closed-loop"], "both": ["open-loop", "closed-loop"]}
    phases_run = phases[args.mode]

    from dynamo_rt.local.tinymodel import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    gen = TextGen(model_dir)
    sessions = build_workload(gen, args)
    n_req = sum(len(s) for s in sessions)
    say(
        f"workload: {args.sessions} sessions x {args.turns} turns = {n_req} requests, {args.systems} system "
        f"prompts of {args.system_tokens[0]}-{args.system_tokens[1]} tokens, turns of "
        f"{args.turn_tokens[0]}-{args.turn_tokens[1]} tokens, {args.max_tokens} output tokens"
    )
    token_sessions = tokenize_workload(gen, sessions) if args.in_process or args.session_rate is None else []
    if args.in_process:
        args.ours_only = True
    arrivals: list[float] | None = None
    if "open-loop" in phases_run:
        rule = "given (--session-rate)"
        if args.session_rate is None:
            work, args.session_rate = calibrate(token_sessions, args)
            absorb = WORKERS * 1000 * args.speedup / work
            rule = (f"calibrated: round-robin does {work:.1f} ms of work per request at that rate (in-process, "
                    f"prompts without the chat template), so {WORKERS} workers absorb {absorb:.0f} req/s; "
                    f"x {args.target_util:g} / {args.turns} turns")  # fmt: skip
        arrivals = poisson_arrivals(args.sessions, args.session_rate, args.seed)
        say(f"open loop: {args.session_rate:.2f} sessions/s ({args.session_rate * args.turns:.1f} req/s offered), "
            f"Poisson, last session at {arrivals[-1]:.1f} s; {rule}")  # fmt: skip
    if "closed-loop" in phases_run:
        say(f"closed loop: {args.concurrency} sessions at once, no think time")
    if not args.ours_only:
        ensure_dynamo_venv()
    runs: list[tuple[str, str, str, float | None]] = [
        ("ours", "round-robin", "ours round-robin", None),
        ("ours", "kv", "ours kv", None),
    ]
    for w in args.tuned_weight:
        if w > 0:
            runs.append(("ours", "kv", f"ours kv w={w:g}", w))
    if not args.ours_only:
        runs.append(("dynamo", "kv", "Dynamo 1.6.1 kv", None))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {ph: {name: [] for _, _, name, _ in runs}
                                                            for ph in phases_run}  # fmt: skip
    for phase in phases_run:
        arr = arrivals if phase == "open-loop" else None
        for r in range(args.rounds):
            for kind, router, name, weight in runs:
                say(f"{phase} round {r + 1}/{args.rounds}: {name} ({WORKERS} workers, fresh caches)")
                tag = name.split()[0].lower() + "-" + router + ("" if weight is None else f"-w{weight:g}")
                if args.in_process:
                    w = args.kv_overlap_weight if weight is None else weight
                    s = run_in_process(router, token_sessions, args, w, arrivals=arr)
                else:
                    s = run_stack(kind, router, model_dir, sessions, args, tag, weight, arrivals=arr)
                results[phase][name].append(s)
                say(
                    f"  TTFT p50 {s['ttft_p50']:.1f} ms, p99 {s['ttft_p99']:.1f} ms, {s['req_s']:.1f} req/s, "
                    f"hit rate {s['hit_rate']:.3f}, utilization {s['util']:.2f}, mean prompt "
                    f"{s['prompt_tokens'] / max(1, s['ok']):.0f} tokens, {s['wall_s']:.0f} s, errors {s['errors']}; "
                    f"CPU: worker {s['worker_util']:.2f}, frontend {s['frontend_util']:.2f}, host "
                    f"{100 * s['host_busy']:.0f}% busy"
                )

    tuned = [name for _, _, name, weight in runs if weight is not None]
    for phase in phases_run:
        what = (f"{args.session_rate:.2f} sessions/s Poisson" if phase == "open-loop"
                else f"{args.concurrency} sessions at once")  # fmt: skip
        print_phase(f"{phase} ({what})", results[phase], tuned)
    total_err = sum(s["errors"] for ph in results.values() for rs in ph.values() for s in rs)
    if total_err:
        print(f"WARNING: {total_err} incomplete or failed responses")
    name = "kv_routing_policy" if args.in_process else "kv_routing"
    for phase in phases_run:
        plot(results[phase], name if phase == phases_run[0] else f"{name}_{phase.replace('-', '_')}")

    def mean(phase: str, run: str, key: str) -> float:
        return statistics.mean(s[key] for s in results[phase][run])

    print()
    lines = {}
    for phase in phases_run:
        rr, kv = mean(phase, "ours round-robin", "ttft_p50"), mean(phase, "ours kv", "ttft_p50")
        line: dict[str, Any] = {"bench": name, "ours": round(kv, 3), "baseline": round(rr, 3),
                                "ratio": round(kv / rr, 4), "unit": "ms", "mode": phase}  # fmt: skip
        if phase == "open-loop":
            line["session_rate"] = round(args.session_rate, 3)
        else:
            line["concurrency"] = args.concurrency
        line["rr_util"] = round(mean(phase, "ours round-robin", "util"), 3)
        line["hit_rate"] = round(mean(phase, "ours kv", "hit_rate"), 4)
        if not args.ours_only:
            line["dynamo_hit_rate"] = round(mean(phase, "Dynamo 1.6.1 kv", "hit_rate"), 4)
        lines[phase] = line
    for phase in reversed(phases_run):  # the first phase (open loop when it runs) prints last
        report(lines[phase])
    return 1 if total_err else 0


if __name__ == "__main__":
    sys.exit(main())
