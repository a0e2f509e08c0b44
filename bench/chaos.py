"""Chaos with invariants on the reference engine, through ``dynamo-rt up`` (which restarts what dies).

``dynamo-rt up --engine reference --workers 2 --router-mode kv`` runs with the workers' test-only KV event
faults on (``DYN_TEST_KV_EVENTS_FAULT``: batches dropped, duplicated, reordered) and the frontend's
``--debug-endpoints``. A seeded schedule then runs cycles for ``--minutes`` (``--quick``: about 45 s): in
each cycle ``--clients`` client loops send greedy streamed chat requests (prompts sharing prefixes, so the
KV router has something to route on) while one fault strikes: a worker SIGKILLed, a worker SIGSTOPped for
2-5 s then SIGCONTed, etcd or nats-server SIGKILLed (``up`` restarts each one). Then the load stops and the
invariants are checked:

- every request ends within its deadline (``--deadline``) with a status: a finish_reason, or an error (event
  or JSON body) with an error code; ``silent`` counts the others (no [DONE], no finish_reason, no error, or
  past the deadline);
- no token lost or duplicated: a request that finished has exactly the text its prompt got in a fault-free
  run at the start (greedy; a migrated stream included); ``mismatched`` counts the others;
- KV blocks return to baseline: every live worker reports 0 blocks in use (its load reports on NATS)
  within 5 s of the load stopping; ``block_leaks`` counts the workers that did not;
- the router's index converges: for every live worker, the hashes the frontend's KV index holds
  (``/debug/kv_index``) equal what the engine holds (the worker's ``kv_blocks`` snapshot) within 5 s;
  ``index_diverged`` counts the (cycle, worker) pairs that did not, ``index_converge_s`` is the slowest.

The LAST line is JSON: ``{"bench": "chaos", "ours": <requests that ended with a correct status and text>,
"baseline": <requests sent>, "ratio": ours / baseline, "unit": "requests", "silent", "mismatched",
"block_leaks", "index_diverged", "errors": {code: n}, "faults": {kind: n}, "kv_event_faults": spec, ...}``.
Plot: bench/out/chaos.png (outcomes per fault kind). Exit status 1 if an invariant was broken.
Run: ``.venv/bin/python bench/chaos.py [--minutes 5] [--quick] [--seed 7]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench._common import PY, ROOT, exit_on_sigterm, plot_bars, report, say
from dynamo_rt.local.harness import Child
from dynamo_rt.local.services import free_port

MODEL = "dynamo-tiny"
NS = "chaos"
FAULTS = ("kill_worker", "stop_worker", "kill_etcd", "kill_nats")
PREFIXES = ["You are a careful assistant. " * 6, "Answer briefly and exactly. " * 9, "Story time: " * 12]


@dataclass
class Counts:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    silent: int = 0
    mismatched: int = 0
    block_leaks: int = 0
    index_diverged: int = 0
    index_converge_s: float = 0.0
    by_fault: dict[str, Counter[str]] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # the first few invariant breaks, for the reader


# --------------------------------------------------------------------------------------------- the stack


class Up:
    """``dynamo-rt up`` with the faults' environment; pids and endpoints read from its log."""

    def __init__(self, state: Path, args: argparse.Namespace) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), DYN_DEBUG_ENDPOINTS="1",
                   DYN_TEST_KV_EVENTS_FAULT=args.kv_faults, DYN_METRICS_PORT="0")
        self.log = state / "up.log"
        self.child = Child("up", [PY, "-m", "dynamo_rt", "up", "--engine", "reference", "--workers",
                                  str(args.workers), "--router-mode", "kv", "--http-port", str(self.port),
                                  "--namespace", NS, "--state-dir", str(state / "state"), "--drain-timeout", "5"],
                           env=env, cwd=ROOT, log=self.log)
        deadline = time.monotonic() + 300
        while "ready: " not in self.text():
            if not self.child.alive() or time.monotonic() > deadline:
                raise SystemExit(f"dynamo-rt up did not become ready:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        m = re.search(r"NATS (nats://\S+)", self.text())
        assert m, "no NATS url in up's log"
        self.nats_url = m.group(1)
        self.url = f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def pid(self, name: str, timeout: float = 60.0) -> int | None:
        """The pid of ``name``'s running process (waits while ``up`` is still backing off a restart)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = re.findall(rf"(?:started|restarted) {re.escape(name)} \(pid (\d+)", self.text())
            if pids:
                try:
                    os.kill(int(pids[-1]), 0)
                    return int(pids[-1])
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return None


# --------------------------------------------------------------------------------------------- requests


def prompt(i: int) -> str:
    return f"{PREFIXES[i % len(PREFIXES)]} Question {i}: name three colours."


async def one(c: httpx.AsyncClient, url: str, i: int, max_tokens: int, deadline: float) -> tuple[str, str]:
    """(outcome, text): outcome is "ok", "error:<code>" or "silent:<why>"."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    text: list[str] = []
    finish = err = None
    done = False
    try:
        async with asyncio.timeout(deadline):
            async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    e = json.loads(await r.aread()).get("error") or {}
                    return (f"error:{e.get('code')}" if e.get("code") else f"silent:http {r.status_code}"), ""
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        err = ev["error"].get("code") or ""
                        continue
                    for ch in ev.get("choices") or []:
                        text.append((ch.get("delta") or {}).get("content") or "")
                        finish = ch.get("finish_reason") or finish
    except TimeoutError:
        return "silent:past deadline", ""
    except (httpx.HTTPError, ValueError) as exc:
        return f"silent:{type(exc).__name__}", ""
    if not done:
        return "silent:no [DONE]", ""
    if err is not None:
        return (f"error:{err}" if err else "silent:error without code"), ""
    return ("ok" if finish else "silent:no finish_reason"), "".join(text)


async def client_loop(url: str, rng: random.Random, stop: asyncio.Event, args: argparse.Namespace,
                      want: dict[int, str], counts: Counts, fault: str) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.deadline)) as c:
        while not stop.is_set():
            i = rng.randrange(args.prompts)
            counts.sent += 1
            outcome, text = await one(c, url, i, args.max_tokens, args.deadline)
            tally = counts.by_fault.setdefault(fault, Counter())
            if outcome == "ok" and text != want[i]:
                outcome = "mismatched"
                counts.mismatched += 1
                counts.samples.append(f"prompt {i} ({fault}): {text[:80]!r} != {want[i][:80]!r}")
            elif outcome == "ok":
                counts.ok += 1
            elif outcome.startswith("error:"):
                counts.ok += 1  # a correct status: an error with its code, never silence
                counts.errors[outcome[6:]] += 1
            else:
                counts.silent += 1
                counts.samples.append(f"prompt {i} ({fault}): {outcome}")
            tally[outcome.split(":")[0]] += 1


# --------------------------------------------------------------------------------------------- checks


class Workers:
    """The workers' load reports (blocks in use, per instance) and their ``kv_blocks`` snapshots, over NATS."""

    def __init__(self, nats_url: str) -> None:
        from dynamo_rt.transport import NatsOptions, Transport

        self.transport = Transport(NatsOptions(servers=nats_url, name="chaos-bench"))
        self.loads: dict[str, tuple[float, int]] = {}  # instance -> (when heard, blocks in use)

    async def start(self) -> None:
        from dynamo_rt.protocol import decode_load
        from dynamo_rt.transport import load_subject

        await self.transport.connect()

        def on_load(data: bytes, _subject: str) -> None:
            lm = decode_load(data)
            self.loads[lm.instance_id] = (time.monotonic(), lm.kv_blocks_used)

        await self.transport.subscribe(load_subject(NS, MODEL), on_load)

    def live(self) -> dict[str, int]:
        now = time.monotonic()
        return {iid: used for iid, (t, used) in self.loads.items() if now - t < 3.0}

    async def held(self, iid: str) -> set[int] | None:
        import msgspec

        from dynamo_rt.errors import DynamoError
        from dynamo_rt.transport import instance_subject

        try:
            stream = await self.transport.call(instance_subject(NS, "backend", "kv_blocks", iid),
                                               f"chaos-{uuid.uuid4().hex[:12]}", b"", timeout=5)
            async for frame in stream:
                payload = getattr(frame, "payload", b"")
                if payload:
                    return set(msgspec.msgpack.decode(payload)["hashes"])
        except DynamoError:
            return None
        return None


async def converge(up: Up, workers: Workers, counts: Counts, limit: float = 5.0) -> None:
    """After the load stopped: blocks back to 0 and the index equal to the engines', each within ``limit``."""
    t0 = time.monotonic()
    live: dict[str, int] = {}
    while time.monotonic() - t0 < limit:
        live = workers.live()
        if live and all(used == 0 for used in live.values()):
            break
        await asyncio.sleep(0.2)
    leaks = [iid for iid, used in live.items() if used]
    counts.block_leaks += len(leaks)
    counts.samples += [f"worker {iid}: {live[iid]} KV blocks still in use {limit:g}s after the load" for iid in leaks]
    pending = set(workers.live())
    why: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=5) as c:
        while pending and time.monotonic() - t0 < limit:
            try:
                index = (await c.get(up.url + "/debug/kv_index")).json()["models"].get(MODEL, {})
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(0.2)
                continue
            for iid in list(pending):
                held = await workers.held(iid)
                indexed = set(index.get("workers", {}).get(iid, []))
                resync = iid in index.get("pending_resyncs", [])
                why[iid] = (f"index {len(indexed)} blocks, engine {len(held or ())}, only in index "
                            f"{len(indexed - (held or set()))}, resync pending {resync}")
                if held is not None and indexed == held:
                    pending.discard(iid)
                    counts.index_converge_s = max(counts.index_converge_s, time.monotonic() - t0)
            if pending:
                await asyncio.sleep(0.2)
    counts.index_diverged += len(pending)
    counts.samples += [f"worker {iid}: router index != engine blocks {limit:g}s after the load ({why.get(iid)})"
                       for iid in pending]


# --------------------------------------------------------------------------------------------- faults


async def strike(up: Up, fault: str, rng: random.Random, workers: int) -> str:
    name = {"kill_etcd": "etcd", "kill_nats": "nats"}.get(fault, f"worker-{rng.randrange(workers)}")
    pid = await asyncio.to_thread(up.pid, name)
    if pid is None:
        return f"{fault}: no pid of {name}"
    try:
        if fault == "stop_worker":
            os.kill(pid, signal.SIGSTOP)
            pause = rng.uniform(2.0, 5.0)
            await asyncio.sleep(pause)
            os.kill(pid, signal.SIGCONT)
            return f"SIGSTOP {name} for {pause:.1f}s"
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"{fault}: {name} already gone"
    return f"SIGKILL {name}"


async def wait_serving(up: Up, workers: Workers, n: int, timeout: float = 90.0) -> None:
    """Until ``n`` workers report load and the frontend's /health counts them (restarts done)."""
    from dynamo_rt.local.harness import get_json, health_instances

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(workers.live()) >= n and health_instances(*await asyncio.to_thread(get_json, up.url + "/health")) >= n:
            return
        await asyncio.sleep(0.3)
    raise SystemExit(f"the stack did not serve {n} workers again within {timeout:.0f}s:\n{up.text()[-3000:]}")


async def run(args: argparse.Namespace, up: Up) -> tuple[Counts, Counter[str]]:
    rng = random.Random(args.seed)
    workers = Workers(up.nats_url)
    await workers.start()
    await wait_serving(up, workers, args.workers)
    async with httpx.AsyncClient(timeout=args.deadline) as c:  # the fault-free answers, one at a time
        ref = [await one(c, up.url, i, args.max_tokens, args.deadline) for i in range(args.prompts)]
    assert all(o == "ok" for o, _ in ref), [o for o, _ in ref]
    want = {i: text for i, (_, text) in enumerate(ref)}
    counts, faults = Counts(), Counter[str]()
    t_end = time.monotonic() + args.seconds
    cycle = 0
    while time.monotonic() < t_end:
        cycle += 1
        fault = FAULTS[rng.randrange(len(FAULTS))]
        stop = asyncio.Event()
        loops = [asyncio.create_task(client_loop(up.url, random.Random(rng.random()), stop, args, want, counts,
                                                 fault)) for _ in range(args.clients)]
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        what = await strike(up, fault, rng, args.workers)
        faults[fault] += 1
        await asyncio.sleep(args.cycle)
        stop.set()
        await asyncio.gather(*loops)
        await wait_serving(up, workers, args.workers)
        await converge(up, workers, counts)
        say(f"cycle {cycle}: {what}; sent {counts.sent}, ok {counts.ok}, silent {counts.silent}, "
            f"mismatched {counts.mismatched}, leaks {counts.block_leaks}, index diverged {counts.index_diverged}")
    await workers.transport.close()
    return counts, faults


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="about 45 s (tests/reliability/test_chaos.py)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds each request must end within")
    ap.add_argument("--cycle", type=float, default=6.0, help="seconds of load after each fault")
    ap.add_argument("--kv-faults", default=None, help="DYN_TEST_KV_EVENTS_FAULT (default drop/dup/reorder 0.1)")
    args = ap.parse_args(argv)
    args.seconds = 30.0 if args.quick else args.minutes * 60
    args.kv_faults = args.kv_faults or f"drop=0.1,dup=0.1,reorder=0.1,seed={args.seed}"
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="dyn-chaos-") as tmp:
        up = Up(Path(tmp), args)
        t0 = time.monotonic()
        try:
            counts, faults = asyncio.run(run(args, up))
        finally:
            up.child.stop(30)
        took = time.monotonic() - t0
        log = up.text()
    # Evidence that the faults struck and were healed: workers started with the KV event faults on, index
    # resyncs the frontend ran (a gap, a reordered or a dropped batch), restarts up made, streams moved.
    healed = {"kv_fault_workers": log.count("test-only KV event faults on"),
              "index_resyncs": log.count("resynced KV index of worker"),
              "index_gaps": log.count("needs a resync"), "restarts": log.count("; restarting in"),
              "migrations": log.count("; migrating (attempt")}
    for line in counts.samples[:20]:
        say(f"invariant broken: {line}")
    broken = counts.silent + counts.mismatched + counts.block_leaks + counts.index_diverged
    plot_bars("chaos", f"chaos on the reference engine (seed {args.seed}, {took:.0f}s)",
              {k: {o: float(n) for o, n in v.items()} for k, v in counts.by_fault.items()}, "requests")
    report({"bench": "chaos", "ours": counts.ok, "baseline": counts.sent,
            "ratio": round(counts.ok / counts.sent, 4) if counts.sent else None, "unit": "requests",
            "silent": counts.silent, "mismatched": counts.mismatched, "block_leaks": counts.block_leaks,
            "index_diverged": counts.index_diverged, "index_converge_s": round(counts.index_converge_s, 2),
            "errors": dict(counts.errors), "faults": dict(faults), **healed,
            "outcomes_by_fault": {k: dict(v) for k, v in counts.by_fault.items()}, "kv_event_faults": args.kv_faults,
            "seed": args.seed, "seconds": round(took, 1), "invariants_ok": broken == 0})
    return 0 if broken == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
