"""Cost of structured outputs in the reference engine: tokens/s with a JSON-schema grammar versus without, on the
tiny model, CPU, same run.

Same prompts, same batch, same generation length, same engine instance: ``batch`` concurrent requests through
:class:`workers.reference.engine.ReferenceEngine`, unconstrained (``ignore_eos``) and constrained by a JSON schema
(:mod:`workers.reference.guided`, xgrammar: a token mask per row per step, ANDed with the engine's control-byte
and UTF-8 masks, applied before sampling). The schema is a list of bounded objects (strings with ``maxLength``,
integers, enums, booleans) with ``minItems`` far above what fits in ``--new`` tokens, so every constrained row
runs to the same length as the unconstrained ones and the batch keeps its size: the difference is the grammar's
cost, not shorter outputs. The grammar is compiled and the prompts are in the prefix cache before timing (both
sides then skip the same prefill). Greedy (the headline) and sampled at temperature 1 with a seed per row. The
runs alternate (plain then guided, guided then plain, ...) and each keeps its best. Tokens/s = generated tokens
over wall time from submit to last token (prefill included).

Prints a table and a last JSON line ``{"bench": "structured_output", "ours": guided tok/s at batch 8 greedy,
"baseline": unconstrained tok/s at batch 8 greedy, "ratio": ..., "goal": 0.9, "unit": "tok_per_s", "mask_us": ...}``
(``mask_us``: one matcher's mean mask fill per token on this schema, outside the engine).

    .venv/bin/python bench/structured_output.py [--new 64] [--prompt-len 32] [--repeat 5]

Plot: bench/out/structured_output.png (with the ``bench`` extra's matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import plot_bars, report
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, GuidedDecoding, SamplingParams, StopConditions
from workers.reference.engine import ReferenceEngine

BATCHES = (1, 8, 32)
HEADLINE_BATCH = 8
# Greedy is the headline: it isolates the grammar's cost. Sampled (T=1) the guided side gains: its masked rows
# make the sampler's sort of the vocabulary cheap (at batch 32 here 0.5 ms instead of 3.3 ms a step).
TEMPERATURES = (0.0, 1.0)
GOAL = 0.9
ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["name", "age", "role", "active", "tags"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 10_000}  # never complete within --new tokens
GUIDED = GuidedDecoding(kind="json", spec=json.dumps(SCHEMA))


def prompts(n: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, 2048) for _ in range(length)] for _ in range(n)]


async def run_batch(eng: ReferenceEngine, batch: list[list[int]], new: int, guided: bool, tag: str,
                    temperature: float = 0.0) -> float:
    """Tokens/s of one batch run (every row must produce ``new`` tokens)."""
    async def one(i: int, prompt: list[int]) -> int:
        sp = SamplingParams(temperature=temperature, seed=i, guided=GUIDED if guided else None)
        req = GenerateRequest(request_id=f"{tag}-{i}", token_ids=prompt, sampling=sp,
                              stop=StopConditions(max_tokens=new, ignore_eos=True))
        n = 0
        async for out in eng.generate(req):
            n += len(out.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*[one(i, p) for i, p in enumerate(batch)])
    dt = time.perf_counter() - t0
    assert all(c == new for c in counts), counts  # same work on both sides
    return sum(counts) / dt


def mask_cost_us(eng: ReferenceEngine, steps: int = 400) -> float:
    """Mean microseconds to fill one row's mask on SCHEMA, walking a seeded random path of allowed tokens."""
    import torch
    import xgrammar as xgr

    assert eng.grammars is not None
    guide = eng.grammars.guide(GUIDED)
    mask = xgr.allocate_token_bitmask(1, eng.vocab_size)
    rng = random.Random(0)
    total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        guide.matcher.fill_next_token_bitmask(mask, 0)
        total += time.perf_counter() - t0
        logits = torch.zeros(1, eng.vocab_size)
        xgr.apply_token_bitmask_inplace(logits, mask)
        allowed = (logits[0] == 0).nonzero().flatten().tolist()
        guide.accept(rng.choice(allowed))
    return 1e6 * total / steps


async def main(args: argparse.Namespace) -> dict[str, Any]:
    eng = ReferenceEngine(ensure_tiny_model(), num_blocks=max(BATCHES) * ((args.prompt_len + args.new) // 16 + 2),
                          max_num_seqs=max(BATCHES))
    await eng.start()
    try:
        await run_batch(eng, prompts(2, args.prompt_len), 4, True, "warm")  # compiles the grammar
        await run_batch(eng, prompts(2, args.prompt_len), 4, False, "warm2")
        for b in BATCHES:  # both sides then find the prompts' blocks in the prefix cache alike
            await run_batch(eng, prompts(b, args.prompt_len), 2, False, f"cache{b}")
        best: dict[tuple[float, int, bool], float] = {}
        for rep in range(args.repeat):
            for temp in TEMPERATURES:
                for b in BATCHES:
                    batch = prompts(b, args.prompt_len)
                    for guided in ((False, True) if rep % 2 == 0 else (True, False)):
                        tps = await run_batch(eng, batch, args.new, guided, f"r{rep}t{temp}b{b}{guided}", temp)
                        best[(temp, b, guided)] = max(best.get((temp, b, guided), 0.0), tps)
        mask_us = mask_cost_us(eng)
    finally:
        await eng.stop()
    def ratio(temp: float, b: int) -> float:
        return best[(temp, b, True)] / best[(temp, b, False)]

    print(f"{'sampling':>10} {'batch':>6} {'unconstrained tok/s':>20} {'json schema tok/s':>18} {'ratio':>6}")
    for temp in TEMPERATURES:
        for b in BATCHES:
            print(f"{'greedy' if temp == 0 else f'T={temp:g}':>10} {b:>6} {best[(temp, b, False)]:>20.0f} "
                  f"{best[(temp, b, True)]:>18.0f} {ratio(temp, b):>6.2f}")
    print(f"xgrammar mask fill, one row: {mask_us:.1f} us/token")
    plot_bars("structured_output", f"reference engine, tiny model, greedy, {args.new} new tokens: guided vs "
              "unconstrained", {f"batch {b}": {"unconstrained": best[(0.0, b, False)],
                                               "json schema": best[(0.0, b, True)]} for b in BATCHES}, "tokens/s")
    h = HEADLINE_BATCH
    return {"bench": "structured_output", "ours": round(best[(0.0, h, True)], 1),
            "baseline": round(best[(0.0, h, False)], 1), "ratio": round(ratio(0.0, h), 3), "goal": GOAL,
            "unit": "tok_per_s", "batch": h, "sampling": "greedy", "mask_us": round(mask_us, 1),
            "ratios": {f"{'greedy' if t == 0 else f'T={t:g}'} batch {b}": round(ratio(t, b), 3)
                       for t in TEMPERATURES for b in BATCHES}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    report(asyncio.run(main(ap.parse_args())), native=True)
