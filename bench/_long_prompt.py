"""The long-prompt phase of ``frontend_overhead.py`` (issue #22's long-prompt goals; see that bench's
docstring and bench/README.md): a ~32k-token chat prompt's cost on the frontend's critical path, and what
100 of them arriving at once do to other streams' inter-token latency."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import PY, Proc, Stack, cpu_seconds, ours_env, run_load, say, stop_all, table, wait_model

from dynamo_rt.local import commands

LONG_MODEL = "tiny-long"
_WORDS = ("harbour", "keeper", "lantern", "tide", "granite", "gull", "signal", "fog", "ledger", "rope", "north",
          "beacon", "shore", "storm", "quiet", "window", "stair", "oil", "wick", "night")


def long_text(tokens: int, seed: int, tokens_per_word: float) -> str:
    """About ``tokens`` tokens of prose; ``seed`` makes every text differ from its first words on."""
    n = max(1, int(tokens / tokens_per_word))
    return " ".join(f"{_WORDS[(i * 7 + seed) % len(_WORDS)]}{(i * 31 + seed) % 97}" for i in range(n))


def long_bodies(n: int, tokens: int, tokens_per_word: float, *, shared: bool, offset: int = 0,
                model: str = LONG_MODEL, max_tokens: int = 1) -> list[list[bytes]]:
    """``n`` chat requests of ~``tokens`` prompt tokens: ``shared`` -> one long system prompt (the same for
    all: the frontend has tokenized it before) and a short user turn that differs; else every prompt differs
    throughout (cold)."""
    out = []
    for i in range(offset, offset + n):
        system = long_text(tokens, 1 if shared else 1000 + i, tokens_per_word)
        body = {"model": model, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"Question {i}: what did the keeper write?"}]}
        out.append([json.dumps(body).encode()])
    return out


def run_long(model_dir: str, args: argparse.Namespace, start: Callable[[], Stack],
             bodies: Callable[[int, int, int], list[list[bytes]]]) -> dict[str, Any]:
    """Our stack with two mockers: the paced one (``tiny``) for short streams and an infinitely fast one with a
    large context (``tiny-long``) for the long prompts, so the long prompts' simulated prefill never delays
    the short streams' worker: what the short streams feel of the long prompts is the frontend's doing.

    1. critical path: one request at a time, frontend CPU per request and TTFT of a short prompt, a ~32k
       prompt whose system part the frontend has seen (``warm``) and one it has not (``cold``); the difference
       to the short prompt is what the long prompt adds.
    2. interference: the paced short load alone, then again while ``--long-concurrent`` long requests arrive
       at once (warm, then cold), then alone again: the short streams' inter-token latency p99 (from the
       client's reads) against the mean of the two runs alone."""
    st = start()
    env = ours_env(st.services.etcd_url, st.services.nats_url, "benchfe")
    extra = ["--speedup", "0", "--context-length", str(args.long_tokens * 2),
             "--num-blocks", str(max(16384, args.long_concurrent * args.long_tokens // 8))]
    second = Proc("fe-ours-long-worker2", commands.worker("mocker", "agg", model_dir, served_model_name=LONG_MODEL,
                                                          extra=extra, python=PY), env)  # fmt: skip
    out: dict[str, Any] = {"tokens": args.long_tokens, "concurrent": args.long_concurrent}
    try:
        wait_model(st.url, LONG_MODEL, [second, *st.procs])
        # Calibrate words -> tokens with the model's own tokenizer, through the frontend (usage).
        probe = run_load(st.url, long_bodies(1, 2000, 1.0, shared=False, offset=9_000_000), 1).records[0]
        tpw = max(0.2, probe["prompt_tokens"] / 2000) if probe["prompt_tokens"] else 2.0
        run_load(st.url, long_bodies(4, args.long_tokens, tpw, shared=True), 1)  # warm-up, and caches the shared part
        short = [[json.dumps({"model": LONG_MODEL, "max_tokens": 1, "stream": True, "ignore_eos": True,
                              "stream_options": {"include_usage": True},
                              "messages": [{"role": "user", "content": f"Question {i}: what did the keeper write?"}],
                              }).encode()] for i in range(args.long_requests)]  # fmt: skip
        crit: dict[str, dict[str, float]] = {}
        k, t = args.long_requests, args.long_tokens
        for name, sessions in (("short", short), ("warm", long_bodies(k, t, tpw, shared=True, offset=100)),
                               ("cold", long_bodies(k, t, tpw, shared=False, offset=200))):
            s = _measure_sessions(st, sessions, 1, 1)
            crit[name] = {"fe_cpu_ms": s["fe_cpu_ms"], "ttft_p50": s["ttft_p50"], "errors": s["errors"],
                          "prompt_tokens": s["prompt_tokens"] / max(1, s["ok"]), "dispatch_ms": s["dispatch_ms"]}
            say(f"  [long] one at a time, {name}: {crit[name]['prompt_tokens']:.0f} prompt tokens, frontend "
                f"{s['fe_cpu_ms']:.2f} CPU ms/req, dispatch {s['dispatch_ms']:.2f} ms, TTFT p50 "
                f"{s['ttft_p50']:.1f} ms, errors {s['errors']}")
        out["critical_path"] = crit
        out["added_fe_ms"] = {k: round(crit[k]["fe_cpu_ms"] - crit["short"]["fe_cpu_ms"], 3) for k in ("warm", "cold")}
        # The goal's measure: the frontend's own time on the critical path before the worker has the request
        # (its dispatch histogram), the long prompt's minus the short one's. TTFT adds the worker's share.
        out["added_dispatch_ms"] = {k: round(crit[k]["dispatch_ms"] - crit["short"]["dispatch_ms"], 3)
                                    for k in ("warm", "cold")}
        out["added_ttft_ms"] = {k: round(crit[k]["ttft_p50"] - crit["short"]["ttft_p50"], 2) for k in ("warm", "cold")}
        # Interference: short paced streams alone, then with the long requests arriving at once. Every run sends
        # the same short requests: the mocker's tokens are a function of the prompt, so the detokenizer holds
        # back the same byte-fallback tokens in each (a held token doubles a gap: it sets the p99 alone).
        n = args.long_short_requests
        # (An unmeasured first pass puts their prompts in the mocker's prefix cache for every measured run.)
        run_load(st.url, bodies(n, args.max_tokens, 20_000_000), args.concurrency)
        alone = run_load(st.url, bodies(n, args.max_tokens, 20_000_000), args.concurrency).summary(args.max_tokens)
        itl: dict[str, float] = {"alone_p99": alone["itl_p99"], "alone_p50": alone["itl_p50"]}
        for kind in ("warm", "cold"):
            longs = long_bodies(args.long_concurrent, args.long_tokens, tpw, shared=kind == "warm", offset=300_000)
            box: dict[str, Any] = {}

            def fire(longs: list[list[bytes]] = longs, box: dict[str, Any] = box) -> None:
                time.sleep(2.0)  # the short streams are in full flow by then
                box["r"] = run_load(st.url, longs, len(longs)).summary(1)

            th = threading.Thread(target=fire)
            th.start()
            mixed = run_load(st.url, bodies(n, args.max_tokens, 20_000_000), args.concurrency).summary(args.max_tokens)
            th.join()
            lr = box.get("r", {})
            itl[f"{kind}_p99"], itl[f"{kind}_p50"] = mixed["itl_p99"], mixed["itl_p50"]
            say(f"  [long] short streams' ITL p50/p99 {alone['itl_p50']:.1f}/{alone['itl_p99']:.1f} ms alone, "
                f"{mixed['itl_p50']:.1f}/{mixed['itl_p99']:.1f} ms with {args.long_concurrent} {kind} long prompts "
                f"(their TTFT p50 {lr.get('ttft_p50', float('nan')):.0f} ms, errors {lr.get('errors')}); "
                f"short errors {mixed['errors']}")
        # The short load alone once more, after: the reference is the mean of the runs before and after.
        after = run_load(st.url, bodies(n, args.max_tokens, 20_000_000), args.concurrency).summary(args.max_tokens)
        itl["alone_first_p99"], itl["alone_last_p99"] = alone["itl_p99"], after["itl_p99"]
        itl["alone_p99"] = (alone["itl_p99"] + after["itl_p99"]) / 2
        itl["alone_p50"] = (alone["itl_p50"] + after["itl_p50"]) / 2
        say(f"  [long] short streams alone again: ITL p50/p99 {after['itl_p50']:.1f}/{after['itl_p99']:.1f} ms")
        out["itl_ms"] = itl
        out["itl_p99_ratio"] = {k: round(itl[f"{k}_p99"] / itl["alone_p99"], 3) for k in ("warm", "cold")}
    finally:
        stop_all([second])
        st.stop()
    return out


DISPATCH = "dynamo_frontend_request_dispatch_seconds"


def dispatch_totals(url: str) -> tuple[float, float]:
    """(sum seconds, count) of the frontend's dispatch histogram: a request's arrival -> its publication to a
    worker (body, validation, template, tokenization, routing), all label values summed."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    got = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in got:
            if line.startswith(DISPATCH + suffix):
                got[suffix] += float(line.rpartition(" ")[2])
    return got["_sum"], got["_count"]


def _measure_sessions(stack: Stack, sessions: list[list[bytes]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    fe0, (d0, c0) = cpu_seconds(stack.frontend.pid), dispatch_totals(stack.url)
    res = run_load(stack.url, sessions, concurrency)
    fe1, (d1, c1) = cpu_seconds(stack.frontend.pid), dispatch_totals(stack.url)
    s: dict[str, Any] = dict(res.summary(max_tokens))
    s["fe_cpu_ms"] = 1000 * (fe1 - fe0) / max(1, len(sessions))
    s["dispatch_ms"] = 1000 * (d1 - d0) / (c1 - c0) if c1 > c0 else float("nan")
    return s


def print_long(r: dict[str, Any], title: str) -> None:
    print(f"\n=== long: {title}")
    crit = r["critical_path"]
    rows = [[k, v["prompt_tokens"], v["fe_cpu_ms"], v["fe_cpu_ms"] - crit["short"]["fe_cpu_ms"], v["dispatch_ms"],
             v["dispatch_ms"] - crit["short"]["dispatch_ms"], v["ttft_p50"], v["ttft_p50"] - crit["short"]["ttft_p50"],
             v["errors"]] for k, v in crit.items()]  # fmt: skip
    print(table(["prompt (1 at a time)", "tokens", "fe CPU ms/req", "added fe CPU", "dispatch ms", "added dispatch",
                 "TTFT p50 ms", "added TTFT ms", "errors"], rows, 24))  # fmt: skip
    itl = r["itl_ms"]
    rows = [["alone (mean of 2)", itl["alone_p50"], itl["alone_p99"], 1.0]] + [
        [f"+{r['concurrent']} {k} long", itl[f"{k}_p50"], itl[f"{k}_p99"], r["itl_p99_ratio"][k]]
        for k in ("warm", "cold")]
    print()
    print(table(["short streams", "ITL p50 ms", "ITL p99 ms", "p99 / alone"], rows, 24))
