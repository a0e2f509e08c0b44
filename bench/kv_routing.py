"""KV-aware routing versus round-robin on a prefix-heavy multi-turn chat workload (8 mocker workers).

Workload (seeded, identical for every run): ``--systems`` shared system prompts of 1-2k tokens and
``--sessions`` chat sessions; each session picks a system prompt and runs ``--turns`` turns one after the
other, each turn appending a user message of ``--turn-tokens`` tokens to the conversation, so every prompt
extends the session's previous one. The assistant messages kept in the history are fixed synthetic replies
of ``--max-tokens`` tokens (the mockers' outputs are random ids, and a fixed history keeps the prompts the
same for every router and both stacks). Every request streams ``--max-tokens`` tokens (``ignore_eos``).
Two presets, both run by default (``--workload all``, chat first; ``--workload chat|long`` runs one; the flags
override a preset):

* ``long``: 12 turns of 200-500 tokens, mean prompt ~4k tokens (up to ~7.5k), the mockers
  simulating a 16k-context model (``--context-length 16384``; same tokenizer). Conversations of this size
  (a system prompt with instructions or tools, a dozen turns) are where routing by cache decides TTFT, and
  where the published figures for KV-aware routing were measured.
* ``chat``: 6 turns of 100-300 tokens (prompts ~1.1-2.9k tokens, ~850 of them uncached per request under
  round-robin). Its ratio is bounded near ~0.47 by the mocker's timing model, see the end of this text.

Arrivals, two phases (``--mode``, default both, each on fresh stacks):
* open loop (the headline's phase): sessions arrive as a seeded Poisson process of ``--session-rate``
  sessions/s, however many are already in flight, as users do; a session's turns still run one after the
  other with no think time. Every router and both stacks get the same schedule. The default rate is
  calibrated at start-up, per workload: round-robin runs in-process on the same open loop, time-compressed 8x, a few
  times (:func:`calibrate`, 15-40 s), which gives its mean simulated *work per request* at that rate beyond
  the ~10 ms per-step floor (prefill: 2 ms + 0.07 ms per uncached token; decode: 0.1 ms per step it runs
  in; :func:`request_work_ms`), hence the request rate the 8 workers can absorb; the session rate loads the
  round-robin fleet to ``--target-util`` (0.8: loaded, not overloaded, as fleets are sized). Each run
  reports its utilization = offered request rate x its own measured mean work per request / 8 workers
  (kv's is lower: it computes fewer tokens for the same requests).
* closed loop (``--closed-loop`` alone): ``--concurrency`` sessions at once, a new one
  when one ends. The fleet is never loaded (32 sessions keep round-robin at ~40% utilization), so every
  TTFT is about one prefill pass and queueing, where routing by cache pays most in production, never shows.

Stacks, each on a fresh etcd + NATS and fresh workers (caches start cold): 8 mocker engines at realistic
speed (``--speedup 1``: ~0.07 ms simulated prefill per *uncached* prompt token, ~10 ms per decode step) in
one worker process (``--num-workers 8``), behind our frontend with ``--router-mode round-robin`` and then
``--router-mode kv``; then NVIDIA Dynamo 1.6.1's mocker (``--num-workers 8 --speedup-ratio 1
--block-size 16``, its own timing model) behind its frontend with ``--router-mode kv`` (etcd discovery,
NATS request and event planes), for its cache hit rate beside ours (its TTFT is on a different timing
model, so only the hit rate is compared). Both kv routers weigh a worker the same way, overlap weight x
(prompt blocks not cached there + its pending prefill blocks) + its active blocks, and Dynamo runs at our
weight (``--kv-overlap-weight``, 4 by default: our frontend's default) through its
``--router-kv-overlap-score-weight`` (in 1.6.1 a deprecated alias of ``prefill_load_scale``, default 1.0,
that takes precedence; its log confirms "overlap_score_weight is deprecated; use prefill_load_scale").
``--dynamo-weight 1 2 4`` sweeps it instead, one Dynamo run per value. The in-process stack (below) runs the
same routers without Dynamo.

Reported per run: TTFT p50/p99 (first SSE event with text), request and token throughput, the cache hit rate =
sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens), the utilization, errors (a request
that fails or streams fewer than ``--max-tokens`` tokens; must be 0) and host CPU.

Variants: every run measures each workload (chat, long) x phase (open loop, closed loop) x stack: the
in-process stack (our ``Router`` and 8 mocker engines in the bench's own process, KV events handed straight
to the index, the same requests tokenized without the chat template, no frontend, NATS or Dynamo: the
routing policies alone, far less exposed to host noise) and the full stack (the processes above, with
Dynamo). Each variant runs ``--rounds`` times (default 2, fresh workers each time), the order of its runs
rotated by one each round (:func:`rotation`), and prints its tables as it ends. At the end a table lists
every variant's kv / round-robin ratio, then one JSON line per variant: ``{"bench": "kv_routing" (full stack)
or "kv_routing_policy" (in-process), "ours": kv TTFT p50, "baseline": round-robin TTFT p50, "ratio", "unit":
"ms", "workload", "phase": "open-loop" | "closed-loop", "stack": "full" | "in-process", "session_rate" (open
loop) or "concurrency" (closed loop), "rr_util", "hit_rate" (ours kv), "rr_hit_rate", "kv_overlap_weight",
"dynamo_hit_rate" (at our weight), "dynamo_hit_rate_by_weight", "rounds"}`` (means over rounds). The LAST
line, the headline, is the full stack's open loop on ``long`` (:func:`headline_index`: full stack before
in-process, open loop before closed, long before chat, among the variants that ran); every other variant's
line comes before it, chat's included. ``--in-process`` / ``--stack-only`` run one stack, ``--workload``
one workload, ``--open-loop`` / ``--closed-loop`` one phase; ``--tuned-weight W...`` adds one of our kv runs
per weight. Run: ``.venv/bin/python bench/kv_routing.py [--quick] [--workload chat|long|all] [--ours-only]
[--open-loop | --closed-loop] [--in-process | --stack-only] [--session-rate R | --target-util U]
[--dynamo-weight W ...] [--tuned-weight W ...]``. ``--quick`` (32 sessions of 3 turns, one round, every
variant) takes ~3-4 minutes.

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
from collections.abc import Sequence
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
    poisson_arrivals,
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
    ``arrivals``), then everything stopped. ``weight``: the kv router's overlap weight (ours
    ``--kv-overlap-weight``, default ``args.kv_overlap_weight``; Dynamo's ``--router-kv-overlap-score-weight``,
    default its own)."""
    dyn = kind == "dynamo"
    if dyn:
        worker = ["--num-workers", str(WORKERS), "--speedup-ratio", str(args.speedup), "--block-size", "16",
                  "--num-gpu-blocks-override", str(args.num_blocks)]  # fmt: skip
        if args.context_length:
            worker += ["--max-model-len", str(args.context_length)]
        # Dynamo 1.6.1's kv router cost: overlap weight x (prompt blocks - cached blocks + the worker's pending
        # prefill) + its active decode blocks, like ours; the flag is a deprecated alias of prefill_load_scale
        # (default 1.0) that takes precedence over it.
        front: list[str] = [] if weight is None else ["--router-kv-overlap-score-weight", f"{weight:g}"]
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



RR, KV = "ours round-robin", "ours kv"
DYNAMO = "Dynamo 1.6.1 kv"
Run = tuple[str, str, str, float | None]  # (stack kind, router mode, run name, overlap weight or None: default)
Rounds = dict[str, list[dict[str, Any]]]  # run name -> one summary per round


def rotation(runs: Sequence[Run], round_index: int) -> list[Run]:
    """The run order of round ``round_index``: ``runs`` rotated by one per round, so that no run is always
    first (cold host caches) or always next to the same neighbour on a shared machine."""
    if not runs:
        return []
    k = round_index % len(runs)
    return [*runs[k:], *runs[:k]]


def headline_index(variants: Sequence[tuple[str, str, str]]) -> int:
    """Which (workload, phase, stack) variant is the JSON headline: the full stack over in-process, the open
    loop over the closed loop, ``long`` over ``chat``, in that order of precedence."""
    return max(range(len(variants)), key=lambda i: (variants[i][2] == "full", variants[i][1] == "open-loop",
                                                    variants[i][0] == "long"))  # fmt: skip


def workload_args(args: argparse.Namespace, workload: str) -> argparse.Namespace:
    """``args`` with ``workload``'s preset filled in where no flag set the value."""
    ns = argparse.Namespace(**vars(args))
    ns.workload = workload
    for key, value in WORKLOADS[workload].items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    return ns


def plot(results: Rounds, name: str) -> None:
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
    fig.suptitle(f"KV-aware routing vs round-robin ({name}): prefix-heavy multi-turn chat, 8 mocker workers")
    save_plot(fig, name)


def mean_of(results: Rounds, name: str, key: str) -> float:
    return statistics.mean(s[key] for s in results[name]) if results.get(name) else float("nan")


def print_phase(title: str, results: Rounds) -> None:
    """The per-run table, the hit rate by turn and the kv / round-robin summary of one variant."""
    headers = ["run", "TTFT p50 ms", "TTFT p99 ms", "req/s", "out tok/s", "hit rate", "prompt tok", "util",
               "errors", "worker CPU", "fe CPU", "host busy"]  # fmt: skip
    rows = []
    for name, rs in results.items():
        for i, s in enumerate(rs, 1):
            rows.append([f"{name} #{i}", s["ttft_p50"], s["ttft_p99"], s["req_s"], s["tok_s"], s["hit_rate"],
                         round(s["prompt_tokens"] / max(1, s["ok"])), s["util"], s["errors"], s["worker_util"],
                         s["frontend_util"], s["host_busy"]])  # fmt: skip
    print(f"\n=== {title}")
    print(table(headers, rows, 26))
    print("\nhit rate by turn (mean of rounds):")
    for name, rs in results.items():
        turns = sorted(rs[0]["turn_hit"])
        cells = "  ".join(f"t{t}: {statistics.mean(x['turn_hit'][t] for x in rs):.2f}" for t in turns)
        print(f"  {name:<24}{cells}")
    print()
    others = [n for n in results if n not in (KV, RR)]
    sh = ["metric (mean of rounds)", "kv", "round-robin", "kv / rr", *(n.replace("1.6.1 ", "") for n in others)]
    srows = []
    for key, label in (("ttft_p50", "TTFT p50 ms"), ("ttft_p99", "TTFT p99 ms"), ("req_s", "req/s"),
                       ("hit_rate", "cache hit rate"), ("util", "fleet utilization"),
                       ("fe_ttft_mean", "frontend-side TTFT ms"), ("host_busy", "host CPU busy"),
                       ("errors", "errors")):  # fmt: skip
        a, b = mean_of(results, KV, key), mean_of(results, RR, key)
        srows.append([label, a, b, a / b if b else float("nan"), *(mean_of(results, n, key) for n in others)])
    print(table(sh, srows, 26))


def variant_line(wl: argparse.Namespace, phase: str, stack: str, results: Rounds) -> dict[str, Any]:
    """One variant's JSON line: kv vs round-robin TTFT p50, named by workload, phase and stack."""
    rr, kv = mean_of(results, RR, "ttft_p50"), mean_of(results, KV, "ttft_p50")
    line: dict[str, Any] = {"bench": "kv_routing" if stack == "full" else "kv_routing_policy", "ours": round(kv, 3),
                            "baseline": round(rr, 3), "ratio": round(kv / rr, 4), "unit": "ms",
                            "workload": wl.workload, "phase": phase, "stack": stack}  # fmt: skip
    if phase == "open-loop":
        line["session_rate"] = round(wl.session_rate, 3)
    else:
        line["concurrency"] = wl.concurrency
    line["rr_util"] = round(mean_of(results, RR, "util"), 3)
    line["hit_rate"] = round(mean_of(results, KV, "hit_rate"), 4)
    line["rr_hit_rate"] = round(mean_of(results, RR, "hit_rate"), 4)
    line["kv_overlap_weight"] = wl.kv_overlap_weight
    dyn = {n.rsplit("w=", 1)[1]: round(mean_of(results, n, "hit_rate"), 4) for n in results if n.startswith(DYNAMO)}
    if dyn:
        matched = f"{wl.kv_overlap_weight:g}"
        line["dynamo_hit_rate"] = dyn.get(matched, next(iter(dyn.values())))
        line["dynamo_hit_rate_by_weight"] = dyn
    line["rounds"] = wl.rounds
    return line


def run_variant(wl: argparse.Namespace, phase: str, stack: str, runs: list[Run], model_dir: str,
                sessions: list[list[bytes]], token_sessions: list[list[list[int]]],
                arrivals: list[float] | None) -> Rounds:
    """Every run of one (workload, phase, stack) variant, ``wl.rounds`` times, in rotating order."""
    results: Rounds = {name: [] for _, _, name, _ in runs}
    for r in range(wl.rounds):
        for kind, router, name, weight in rotation(runs, r):
            say(f"{wl.workload} / {phase} / {stack}, round {r + 1}/{wl.rounds}: {name}")
            if stack == "in-process":
                s = run_in_process(router, token_sessions, wl, wl.kv_overlap_weight if weight is None else weight,
                                   arrivals=arrivals)  # fmt: skip
            else:
                tag = f"{wl.workload}-{kind}-{router}" + ("" if weight is None else f"-w{weight:g}")
                s = run_stack(kind, router, model_dir, sessions, wl, tag, weight, arrivals=arrivals)
            results[name].append(s)
            say(f"  TTFT p50 {s['ttft_p50']:.1f} ms, p99 {s['ttft_p99']:.1f} ms, {s['req_s']:.1f} req/s, hit rate "
                f"{s['hit_rate']:.3f}, utilization {s['util']:.2f}, mean prompt "
                f"{s['prompt_tokens'] / max(1, s['ok']):.0f} tokens, {s['wall_s']:.0f} s, errors {s['errors']}; "
                f"CPU: worker {s['worker_util']:.2f}, frontend {s['frontend_util']:.2f}, host "
                f"{100 * s['host_busy']:.0f}% busy")  # fmt: skip
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--systems", type=int, default=20, help="shared system prompts")
    ap.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all",
                    help="chat (6 turns of 100-300 tokens, prompts ~1.1-2.9k), long (12 turns of 200-500 tokens, mean "
                         "prompt ~4k, up to ~7.5k, on a simulated 16k-context model) or all (both, chat first); the "
                         "flags below override a preset")  # fmt: skip
    ap.add_argument("--turns", type=int, default=None, help="turns per session")
    ap.add_argument("--system-tokens", type=int, nargs=2, default=[1000, 2000], metavar=("MIN", "MAX"))
    ap.add_argument("--turn-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--mode", choices=["open-loop", "closed-loop", "both"], default="both",
                    help="measured phase(s): open loop (Poisson session arrivals at --session-rate), closed loop "
                         "(--concurrency sessions at once), or both, open loop first")  # fmt: skip
    ap.add_argument("--open-loop", dest="mode", action="store_const", const="open-loop", help="= --mode open-loop")
    ap.add_argument("--closed-loop", dest="mode", action="store_const", const="closed-loop",
                    help="= --mode closed-loop")  # fmt: skip
    ap.add_argument("--session-rate", type=float, default=None,
                    help="open loop: sessions/s (Poisson); default: the rate that loads the round-robin fleet to "
                         "--target-util, calibrated on each workload at start-up")  # fmt: skip
    ap.add_argument("--target-util", type=float, default=0.8,
                    help="open loop: round-robin fleet utilization the default --session-rate aims at (0.8: "
                         "loaded, not overloaded, as fleets are sized)")  # fmt: skip
    ap.add_argument("--concurrency", type=int, default=32, help="closed loop: sessions in flight (4 per worker)")
    ap.add_argument("--speedup", type=float, default=1.0, help="mocker speedup (1: realistic timing)")
    ap.add_argument("--num-blocks", type=int, default=16384, help="KV blocks per mocker engine")
    ap.add_argument("--context-length", type=int, default=None,
                    help="the mockers (ours and Dynamo's) simulate a model with this context (0: the tiny model's "
                         "4096)")  # fmt: skip
    ap.add_argument("--kv-overlap-weight", type=float, default=4.0,
                    help="the kv router's overlap weight in the main kv runs, ours and (matched) Dynamo's "
                         "(4.0: our frontend's default)")  # fmt: skip
    ap.add_argument("--tuned-weight", type=float, nargs="*", default=[], metavar="W",
                    help="also run ours kv with each of these --kv-overlap-weight values; reported, not the ratio")
    ap.add_argument("--dynamo-weight", type=float, nargs="+", default=None, metavar="W",
                    help="Dynamo's --router-kv-overlap-score-weight, one Dynamo kv run per value (default: "
                         "--kv-overlap-weight, matched to ours; e.g. 1 2 4 for a sweep)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 sessions, 3 turns, 1 round")
    ap.add_argument("--ours-only", action="store_true", help="skip NVIDIA Dynamo")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true",
                       help="only the in-process variants: our Router and the mockers in this process (no frontend, "
                            "NATS or Dynamo); JSON lines named kv_routing_policy")  # fmt: skip
    where.add_argument("--stack-only", action="store_true", help="only the full-stack variants")
    args = ap.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.sessions, args.turns, args.rounds, args.concurrency = 32, 3, 1, 16
    if args.speedup <= 0:
        ap.error("--speedup must be > 0 (the bench measures time)")
    workloads = ["chat", "long"] if args.workload == "all" else [args.workload]
    phases = ["open-loop", "closed-loop"] if args.mode == "both" else [args.mode]
    stacks = ["in-process"] if args.in_process else ["full"] if args.stack_only else ["in-process", "full"]
    dyn_weights = args.dynamo_weight or [args.kv_overlap_weight]
    policy_runs: list[Run] = [("ours", "round-robin", RR, None), ("ours", "kv", KV, None),
                              *(("ours", "kv", f"ours kv w={w:g}", w) for w in args.tuned_weight if w > 0)]  # fmt: skip
    dyn_runs: list[Run] = [("dynamo", "kv", f"{DYNAMO} w={w:g}", w) for w in dyn_weights]
    stack_runs = policy_runs + ([] if args.ours_only else dyn_runs)

    from dynamo_rt.local.tinymodel import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    gen = TextGen(model_dir)
    if "full" in stacks and not args.ours_only:
        ensure_dynamo_venv()
    variants: list[tuple[argparse.Namespace, str, str, Rounds]] = []
    for workload in workloads:
        wl = workload_args(args, workload)
        sessions = build_workload(gen, wl)
        n_req = sum(len(s) for s in sessions)
        say(f"workload {workload}: {wl.sessions} sessions x {wl.turns} turns = {n_req} requests, {wl.systems} system "
            f"prompts of {wl.system_tokens[0]}-{wl.system_tokens[1]} tokens, turns of {wl.turn_tokens[0]}-"
            f"{wl.turn_tokens[1]} tokens, {wl.max_tokens} output tokens")  # fmt: skip
        need_tokens = "in-process" in stacks or ("open-loop" in phases and wl.session_rate is None)
        token_sessions = tokenize_workload(gen, sessions) if need_tokens else []
        arrivals: list[float] | None = None
        if "open-loop" in phases:
            rule = "given (--session-rate)"
            if wl.session_rate is None:
                work, wl.session_rate = calibrate(token_sessions, wl)
                absorb = WORKERS * 1000 * wl.speedup / work
                rule = (f"calibrated: round-robin does {work:.1f} ms of work per request at that rate (in-process, "
                        f"prompts without the chat template), so {WORKERS} workers absorb {absorb:.0f} req/s; "
                        f"x {wl.target_util:g} / {wl.turns} turns")  # fmt: skip
            arrivals = poisson_arrivals(wl.sessions, wl.session_rate, wl.seed)
            say(f"{workload} open loop: {wl.session_rate:.2f} sessions/s ({wl.session_rate * wl.turns:.1f} req/s "
                f"offered), Poisson, last session at {arrivals[-1]:.1f} s; {rule}")  # fmt: skip
        for phase in phases:
            for stack in stacks:
                runs = policy_runs if stack == "in-process" else stack_runs
                arr = arrivals if phase == "open-loop" else None
                res = run_variant(wl, phase, stack, runs, model_dir, sessions, token_sessions, arr)
                variants.append((wl, phase, stack, res))
                what = (f"{wl.session_rate:.2f} sessions/s Poisson" if phase == "open-loop"
                        else f"{wl.concurrency} sessions at once")  # fmt: skip
                print_phase(f"{workload} / {phase} ({what}) / {stack}", res)
                name = "kv_routing" if stack == "full" else "kv_routing_policy"
                plot(res, f"{name}_{workload}_{phase.replace('-', '_')}")

    total_err = sum(s["errors"] for *_, res in variants for rs in res.values() for s in rs)
    lines = [variant_line(wl, phase, stack, res) for wl, phase, stack, res in variants]
    print("\n=== every variant: kv vs round-robin TTFT p50 (the JSON lines below, the headline last)")
    headers = ["workload / phase / stack", "kv p50 ms", "rr p50 ms", "kv / rr", "kv hit", "rr hit", "rr util",
               "Dynamo hit (w)"]  # fmt: skip
    rows = [[f"{ln['workload']} / {ln['phase']} / {ln['stack']}", ln["ours"], ln["baseline"], ln["ratio"],
             ln["hit_rate"], ln["rr_hit_rate"], ln["rr_util"],
             " ".join(f"{v:.3f} ({w})" for w, v in ln.get("dynamo_hit_rate_by_weight", {}).items()) or "-"]
            for ln in lines]  # fmt: skip
    print(table(headers, rows, 34))
    if total_err:
        print(f"WARNING: {total_err} incomplete or failed responses")
    head = headline_index([(ln["workload"], ln["phase"], ln["stack"]) for ln in lines])
    print()
    for i, ln in enumerate(lines):
        if i != head:
            print(json.dumps(ln))
    report(lines[head])
    return 1 if total_err else 0


if __name__ == "__main__":
    sys.exit(main())
