"""KV tiers: TTFT of a multi-turn chat whose working set is 4x the primary KV pool, on the reference engine
(tiny model, CPU), with the host tier versus without it, measured in the same run.

Part 1 (the headline). ``--conversations`` chats of ``--turns`` turns, served round robin (every chat's
turn 1, then every chat's turn 2, ...), one request at a time, greedy; a turn's prompt is the whole history
(a long first message, then per turn the model's answer and a new user message). Two engines with the same
primary pool (``--pool`` blocks): the baseline (prefix cache only: by the time a chat comes back its prefix
was evicted, so it is recomputed) and ours (the same plus a host tier big enough for the working set, so the
prefix is onboarded from the host tier). Each request goes to the baseline, then the same request to ours,
so background load hits both alike. TTFT = ``generate()`` called -> first output. Turn 1 is a miss for both
(it is in the p50 all the same); the table also shows the p50 of later turns and the hit rates.

Part 2 (where onboarding pays and where it does not). One prompt whose first N blocks are in the host tier
(written by an earlier engine on the same file, so primary is empty: the restart case) versus the same prompt
recomputed, for several N, on the tiny model and on a wider, deeper config built with
``make_tiny_model(dir, hidden_size=..., num_layers=...)``: recomputing costs FLOPs that grow with the model
while onboarding copies ``block_bytes`` per block, so the gap widens with model size and prompt length.

    .venv/bin/python bench/kvbm.py [--pool 64] [--conversations 6] [--turns 6] [--repeat 3] [--quick]

Prints tables, saves ``bench/out/kvbm.png`` (when matplotlib is installed), and a last JSON line
``{"bench": "kvbm", "ours": TTFT p50 with tiers, "baseline": TTFT p50 without, "ratio": ..., "unit": "ms"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._common import OUT_DIR, pct, report, say, table
from dynamo_rt.local.tinymodel import ensure_tiny_model, make_tiny_model
from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from workers.reference.engine import ReferenceEngine

BLOCK = 16
FIRST_MESSAGE = 256  # tokens of each chat's first message
USER = 64  # tokens of each later user message
ANSWER = 16  # tokens generated per turn
LARGE = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 1376}


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2000, (n,), generator=g).tolist()


async def ttft(eng: ReferenceEngine, rid: str, prompt: list[int], max_tokens: int) -> tuple[float, list[int], int]:
    """(seconds to the first output, generated tokens, cached_tokens)."""
    req = GenerateRequest(request_id=rid, token_ids=prompt, sampling=SamplingParams(temperature=0.0),
                          stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    first = 0.0
    out: list[int] = []
    cached = 0
    async for o in eng.generate(req):
        if not out:
            first = time.perf_counter() - t0
            cached = o.cached_tokens
        out += o.token_ids
    return first, out, cached


async def idle(eng: ReferenceEngine) -> None:
    """Let the tier threads finish the previous request's offloads (both engines are given the same pause)."""
    for _ in range(2000):
        if eng.tiers_idle():
            return
        await asyncio.sleep(0.001)


# ------------------------------------------------------------------------------------------------ part 1


async def chat_run(model: Path, pool: int, host_blocks: int, conversations: int, turns: int, rep: int,
                   tmp: Path, sync_bytes: int) -> dict[str, Any]:
    base = ReferenceEngine(model, num_blocks=pool, max_batch_tokens=2048)
    ours = ReferenceEngine(model, num_blocks=pool, max_batch_tokens=2048, onboard_sync_bytes=sync_bytes,
                           host_tier_path=str(tmp / f"host-{rep}.kv"), host_tier_blocks=host_blocks)
    await base.start()
    await ours.start()
    res: dict[str, Any] = {"base": [], "ours": [], "turn": [], "base_cached": 0, "ours_cached": 0,
                           "prompt_tokens": 0, "mismatches": 0}
    try:
        for eng in (base, ours):  # warm-up: first-call allocations, kernels
            await ttft(eng, "warm", ids(300, 999_000 + rep), 4)
        hist = [ids(FIRST_MESSAGE, 1000 * rep + c) for c in range(conversations)]
        for t in range(turns):
            for c in range(conversations):
                p = hist[c]
                tb, out_b, cb = await ttft(base, f"b{c}-{t}", p, ANSWER)
                await idle(base)
                to, out_o, co = await ttft(ours, f"o{c}-{t}", p, ANSWER)
                await idle(ours)
                res["mismatches"] += out_b != out_o
                res["base"].append(tb)
                res["ours"].append(to)
                res["turn"].append(t)
                res["base_cached"] += cb
                res["ours_cached"] += co
                res["prompt_tokens"] += len(p)
                hist[c] = p + out_o + ids(USER, 10_000 * rep + 100 * c + t)
        res["working_set_blocks"] = sum(len(h) // BLOCK for h in hist)
        res["stats"] = ours.block_stats()
    finally:
        await base.stop()
        await ours.stop()
    return res


# ------------------------------------------------------------------------------------------------ part 2


async def background(eng: ReferenceEngine, k: int, tag: str) -> list[asyncio.Task[None]]:
    """``k`` requests decoding on ``eng`` (started, first token out) until cancelled."""
    started = asyncio.Event()
    count = [0]

    async def one(i: int) -> None:
        req = GenerateRequest(request_id=f"bg-{tag}-{i}", token_ids=ids(64, 77_000 + i),
                              sampling=SamplingParams(temperature=0.0),
                              stop=StopConditions(max_tokens=192, ignore_eos=True))
        async for _ in eng.generate(req):
            if count[0] < k:
                count[0] += 1
                if count[0] == k:
                    started.set()

    tasks = [asyncio.create_task(one(i)) for i in range(k)]
    await asyncio.wait_for(started.wait(), 60)
    return tasks


async def onboard_vs_recompute(model: Path, blocks: list[int], samples: int, tmp: Path, tag: str,
                               busy: int = 0) -> dict[int, tuple[float, float, float]]:
    """Per N: TTFT p50 of (onboarding N host blocks into an empty primary by the step thread, the same
    through the copy thread, recomputing them); with ``busy`` > 0, while that many requests decode on the
    engine measured (the copy-thread hand-off then costs a step)."""
    shm = tmp / f"host-{tag}.kv"
    need = max(blocks) + 2 + busy * 16  # 64 + 192 tokens per background request
    prompts = {n: [ids(n * BLOCK + 1, 50_000 + 100 * n + s) for s in range(samples)] for n in blocks}
    host_blocks = sum(n for n in blocks) * samples + 64
    writer = ReferenceEngine(model, num_blocks=need * 2, max_batch_tokens=4096, host_tier_path=str(shm),
                             host_tier_blocks=host_blocks)
    await writer.start()
    try:
        for n in blocks:
            for s, p in enumerate(prompts[n]):
                await ttft(writer, f"w{n}-{s}", p, 1)
    finally:
        await writer.stop()  # lands every offload
    shm2 = tmp / f"host-{tag}-async.kv"
    shutil.copyfile(shm, shm2)  # the same blocks for the copy-thread engine (one process per file)
    ours = ReferenceEngine(model, num_blocks=need, max_batch_tokens=4096, host_tier_path=str(shm),
                           host_tier_blocks=host_blocks, onboard_sync_bytes=2**40)
    ours_async = ReferenceEngine(model, num_blocks=need, max_batch_tokens=4096, host_tier_path=str(shm2),
                                 host_tier_blocks=host_blocks, onboard_sync_bytes=0)
    base = ReferenceEngine(model, num_blocks=need, max_batch_tokens=4096)
    engines = (ours, ours_async, base)
    for eng in engines:
        await eng.start()
    out: dict[int, tuple[float, float, float]] = {}
    try:
        for eng in engines:
            await ttft(eng, "warm", ids(BLOCK * 4 + 1, 7), 1)
        for n in blocks:
            times: list[list[float]] = [[], [], []]
            for s, p in enumerate(prompts[n]):
                for k, eng in enumerate(engines):
                    bg = await background(eng, busy, f"{k}-{n}-{s}") if busy else []
                    t, _, cached = await ttft(eng, f"{k}-{n}-{s}", p, 1)
                    for task in bg:
                        task.cancel()
                    await asyncio.gather(*bg, return_exceptions=True)
                    assert cached == (n * BLOCK if eng is not base else 0), (k, n, cached)
                    times[k].append(t)
                    await idle(eng)
            out[n] = (pct(times[0], 0.5), pct(times[1], 0.5), pct(times[2], 0.5))
    finally:
        for eng in engines:
            await eng.stop()
    return out


# ------------------------------------------------------------------------------------------------ main


def plot(part1: dict[str, list[float]], part2: dict[str, dict[int, tuple[float, float, float]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for name in ("baseline", "ours"):
        xs = sorted(v * 1e3 for v in part1[name])
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("multi-turn chat, working set 4x the primary pool")
    ax.legend()
    ax = axes[1]
    for tag, pts in part2.items():
        ns = sorted(pts)
        ax.plot(ns, [pts[n][0] * 1e3 for n in ns], marker="o", label=f"{tag}: onboard (step thread)")
        ax.plot(ns, [pts[n][1] * 1e3 for n in ns], marker="s", linestyle=":", label=f"{tag}: onboard (copy thread)")
        ax.plot(ns, [pts[n][2] * 1e3 for n in ns], marker="x", linestyle="--", label=f"{tag}: recompute")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefix blocks (16 tokens)")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("onboard vs recompute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    say(f"plot: {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=int, default=64, help="primary KV pool, blocks (both engines)")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3, help="passes of the whole chat workload (fresh engines)")
    ap.add_argument("--samples", type=int, default=5, help="part 2: prompts per point")
    ap.add_argument("--quick", action="store_true", help="smaller part 2 (no larger model)")
    ap.add_argument("--onboard-sync-mib", type=float, default=8.0,
                    help="part 1, ours: host runs up to this size are copied in by the step thread (engine default)")
    args = ap.parse_args(argv)
    tiny = ensure_tiny_model()
    tmp = Path(tempfile.mkdtemp(prefix="dyn-kvbm-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        final_hist = FIRST_MESSAGE + args.turns * (ANSWER + USER)
        host_blocks = 2 * args.conversations * (final_hist // BLOCK + 1)
        say(f"part 1: {args.conversations} chats x {args.turns} turns, pool {args.pool} blocks, host tier "
            f"{host_blocks} blocks, {args.repeat} passes")
        part1: dict[str, list[float]] = {"baseline": [], "ours": []}
        later: dict[str, list[float]] = {"baseline": [], "ours": []}
        hits = {"baseline": 0, "ours": 0}
        prompt_tokens = 0
        mismatches = 0
        ws = 0
        stats: dict[str, int] = {}
        for rep in range(args.repeat):
            r = asyncio.run(chat_run(tiny, args.pool, host_blocks, args.conversations, args.turns, rep, tmp,
                                     int(args.onboard_sync_mib * 2**20)))
            for name, key in (("baseline", "base"), ("ours", "ours")):
                part1[name] += r[key]
                later[name] += [v for v, t in zip(r[key], r["turn"], strict=True) if t > 0]
            hits["baseline"] += r["base_cached"]
            hits["ours"] += r["ours_cached"]
            prompt_tokens += r["prompt_tokens"]
            mismatches += r["mismatches"]
            ws = r["working_set_blocks"]
            stats = r["stats"]
            say(f"pass {rep}: TTFT p50 baseline {pct(r['base'], 0.5) * 1e3:.2f} ms, "
                f"ours {pct(r['ours'], 0.5) * 1e3:.2f} ms")
        b50, o50 = pct(part1["baseline"], 0.5), pct(part1["ours"], 0.5)
        rows = []
        for name in ("baseline", "ours"):
            xs = part1[name]
            rows.append([name, pct(xs, 0.5) * 1e3, pct(xs, 0.9) * 1e3, pct(later[name], 0.5) * 1e3,
                         f"{hits[name] / prompt_tokens:.0%}"])
        print(f"\nPart 1: multi-turn chat on the tiny model (CPU, fp32), working set {ws} blocks = "
              f"{ws / args.pool:.1f}x the {args.pool}-block primary pool; {len(part1['ours'])} requests each; "
              f"outputs differing between the two engines: {mismatches}")
        print(table(["engine", "TTFT p50 ms", "TTFT p90 ms", "p50 turns>1 ms", "prompt tokens cached"], rows, 12))
        print(f"ours: onboarded {stats.get('onboarded_host', 0)} blocks from host in the last pass, "
              f"offloaded {stats.get('offloaded', 0)}, dropped {stats.get('offloads_dropped', 0)}")

        part2: dict[str, dict[int, tuple[float, float, float]]] = {}
        models: list[tuple[str, Path, list[int], int]] = [("tiny", tiny, [1, 2, 4, 16, 64], 0),
                                                           ("tiny, 4 decoding", tiny, [1, 4, 16], 4)]
        if not args.quick:
            big = Path(tempfile.mkdtemp(prefix="dyn-kvbm-model-"))
            say(f"building the larger config {LARGE} in {big}")
            make_tiny_model(big, progress=lambda s: None, **LARGE)  # type: ignore[arg-type]
            models.append(("hidden512-8L", big, [1, 2, 4, 16, 32], 0))
        for tag, path, blocks, busy in models:
            say(f"part 2: {tag}, onboard vs recompute, {args.samples} prompts per point")
            part2[tag] = asyncio.run(onboard_vs_recompute(path, blocks, args.samples, tmp, tag.replace(" ", ""),
                                                          busy))
        print("\nPart 2: TTFT p50 of one prompt whose first N blocks are in the host tier (primary empty), "
              "onboarded by the step thread / by the copy thread, vs recomputed")
        rows2 = []
        for tag, pts in part2.items():
            for n, (on, on_async, rc) in sorted(pts.items()):
                rows2.append([f"{tag}, N={n}", on * 1e3, on_async * 1e3, rc * 1e3, on / rc, on_async / rc])
        print(table(["model, prefix blocks", "step-thr ms", "copy-thr ms", "recompute ms", "ratio", "ratio async"],
                    rows2, 22))
        if not args.quick:
            shutil.rmtree(models[-1][1], ignore_errors=True)
        plot(part1, part2, OUT_DIR / "kvbm.png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"bench": "kvbm", "ours": round(o50 * 1e3, 3), "baseline": round(b50 * 1e3, 3),
              "ratio": round(o50 / b50, 3), "unit": "ms"}
    return report(result, native=True)


if __name__ == "__main__":
    main()
