"""Decode throughput of the reference engine versus ``transformers`` generate, on the tiny model, CPU.

Same prompts, same greedy generation length, same process. Ours: ``batch`` concurrent requests through
:class:`workers.reference.engine.ReferenceEngine` (continuous batching, paged KV) with its default thread
setting (usable cores minus one; the event loop keeps a core); baseline: one batched ``model.generate``
(left padding, static batch), run with every torch thread count from 1 to the usable cores and the best
kept, so the ratio is against transformers at its best here. Tokens/s = generated tokens over wall time
from submit to last token (prefill included). Prints a table and a last JSON line
``{"bench": "reference_engine", "ours": tok/s at batch 8, "baseline": transformers tok/s at batch 8,
"ratio": ..., "unit": "tok_per_s"}``.

    .venv/bin/python bench/reference_engine.py [--new 64] [--prompt-len 32] [--threads N] [--repeat 3]

(No PNG plot: matplotlib is not a dependency of this project.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from dynamo_rt.tinymodel import ensure_tiny_model
from workers.reference.engine import ReferenceEngine

BATCHES = (1, 8, 32)


def prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 2000, (length,), generator=g).tolist() for _ in range(n)]


async def ours(path: Path, ps: list[list[int]], new: int, repeat: int, threads: int | None) -> dict[int, float]:
    eng = ReferenceEngine(
        path, num_blocks=max(BATCHES) * 16, max_num_seqs=max(BATCHES), max_batch_tokens=2048, threads=threads
    )
    await eng.start()

    async def one(i: int, p: list[int]) -> int:
        req = GenerateRequest(
            request_id=str(i),
            token_ids=p,
            sampling=SamplingParams(temperature=0.0),
            stop=StopConditions(max_tokens=new, ignore_eos=True),
        )
        return sum([len(o.token_ids) async for o in eng.generate(req)])

    out: dict[int, float] = {0: float(eng.torch_threads or 0)}
    try:
        await asyncio.gather(*(one(i, p) for i, p in enumerate(ps[:8])))  # warm-up
        for b in BATCHES:
            best = 0.0
            for _ in range(repeat):
                t0 = time.perf_counter()
                n = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(ps[:b]))))
                best = max(best, n / (time.perf_counter() - t0))
            out[b] = best
    finally:
        await eng.stop()
    return out


def baseline(path: Path, ps: list[list[int]], new: int, repeat: int, threads: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def run(batch: list[list[int]]) -> int:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return int(out[:, width:].numel())

    torch.set_num_threads(threads)
    run(ps[:8])  # warm-up
    res: dict[int, float] = {}
    for b in BATCHES:
        best = 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = run(ps[:b])
            best = max(best, n / (time.perf_counter() - t0))
        res[b] = best
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads of our engine (default: the engine's default)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per point; the best is kept")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    path = ensure_tiny_model()
    ps = prompts(max(BATCHES), args.prompt_len)
    mine = asyncio.run(ours(path, ps, args.new, args.repeat, args.threads))
    our_threads = int(mine.pop(0))
    per_threads = {t: baseline(path, ps, args.new, args.repeat, t) for t in range(1, cores + 1)}
    base = {b: max(r[b] for r in per_threads.values()) for b in BATCHES}
    print(
        f"tiny model (fp32, CPU), prompt {args.prompt_len} tokens, {args.new} new tokens, greedy; "
        f"ours with {our_threads} torch thread(s); transformers best of 1..{cores} threads"
    )
    tcols = "  ".join(f"{f'hf {t}thr':>8}" for t in per_threads)
    print(f"{'batch':>5}  {'ours tok/s':>11}  {'transformers tok/s':>18}  {'ratio':>6}  {tcols}")
    for b in BATCHES:
        cols = "  ".join(f"{per_threads[t][b]:>8.0f}" for t in per_threads)
        print(f"{b:>5}  {mine[b]:>11.0f}  {base[b]:>18.0f}  {mine[b] / base[b]:>6.2f}  {cols}")
    result = {
        "bench": "reference_engine",
        "ours": round(mine[8], 1),
        "baseline": round(base[8], 1),
        "ratio": round(mine[8] / base[8], 2),
        "unit": "tok_per_s",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
