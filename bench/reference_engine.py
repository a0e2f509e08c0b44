"""Decode throughput of the reference engine versus ``transformers`` generate, on the tiny model, CPU.

Same prompts, same greedy generation length, same process. Ours: ``batch`` concurrent requests through
:class:`workers.reference.engine.ReferenceEngine` (continuous batching, paged KV) with its default thread
setting (usable cores minus one; the event loop keeps a core) and its default decode step (native,
workers/reference/decode.c, where a C compiler exists; ``--no-native`` for torch operators only);
baseline: one batched ``model.generate`` (left padding, static batch, ``inference_mode``, fp32, its
default cache), run with every torch thread count
from 1 to the usable cores and the best kept, so the ratio is against transformers at its best here. The
runs are interleaved (ours, then transformers at each thread count, repeated), so a change of machine
load between them biases neither side; each point keeps its best repeat. Tokens/s = generated tokens over
wall time from submit to last token (prefill included). Prints a table and a last JSON line
``{"bench": "reference_engine", "ours": tok/s at batch 8, "baseline": transformers tok/s at batch 8,
"ratio": ..., "unit": "tok_per_s"}``.

    .venv/bin/python bench/reference_engine.py [--new 64] [--prompt-len 32] [--threads N] [--repeat 3]

Plot: bench/out/reference_engine.png (with the ``bench`` extra's matplotlib). ``--profile`` instead times
each op of one batch-8 native decode step, for this CPU's build and for the build an AVX2-only CPU gets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._common import plot_bars, report
from dynamo_rt.heap import freeze_startup_heap
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from workers.reference.engine import ReferenceEngine

BATCHES = (1, 8, 32)
# Kernel builds --profile compares: this CPU's own, and the same source without AVX-512 (what a CPU with
# AVX2 only, say an EPYC Zen 3 of the same machine kind, compiles with -march=native).
VARIANTS = (("native", ()), ("no-avx512", ("-mno-avx512f",)))


def profile(path: Path, threads: int, batch: int = 8, position: int = 64, steps: int = 300) -> list[dict[str, Any]]:
    """Per-op microseconds of one native decode step (``batch`` rows at ``position``), for each kernel build
    of :data:`VARIANTS` (a ``-DDRT_PROFILE`` build times each op; the plain build gives the step time)."""
    from workers.reference.model import DecoderModel, ModelConfig
    from workers.reference.native import NativeDecode, NativeStep, kernel_info, load_variant, read_profile

    cfg = ModelConfig.load(path)
    model = DecoderModel.load(path, cfg, torch.device("cpu"), torch.float32)
    bs = 16
    nb = position // bs + 1
    pool = torch.zeros((batch * nb, cfg.num_layers, bs, 2, cfg.num_kv_heads, cfg.head_dim))
    step = NativeStep(list(range(10, 10 + batch)), [position] * batch,
                      [[r * nb + i for i in range(nb)] for r in range(batch)])
    rows = []
    for name, extra in VARIANTS:
        row: dict[str, Any] = {"variant": name}
        for prof in (False, True):
            lib = load_variant((*extra, "-DDRT_PROFILE") if prof else extra)
            nd = NativeDecode(model, bs, lib, threads=threads)
            for _ in range(30):
                nd.run(step, pool)
            read_profile(lib)
            t0 = time.thread_time()  # CPU time of this thread (the step's, with one thread): robust to load
            for _ in range(steps):
                nd.run(step, pool)
            us = (time.thread_time() - t0) / steps * 1e6
            nd.close()
            if prof:
                row["ops_us"] = read_profile(lib)[1]
            else:
                row["step_us"] = us
                row["kernel"] = kernel_info(lib, extra)
        rows.append(row)
    return rows


def print_profile(rows: list[dict[str, Any]], threads: int, batch: int = 8) -> None:
    ops = list(rows[0]["ops_us"])
    print(f"native decode step, batch {batch} at position 64, {threads} thread(s): CPU microseconds per step")
    print(f"{'op':<12}" + "".join(f"{r['variant']:>12}" for r in rows))
    for op in ops:
        print(f"{op:<12}" + "".join(f"{r['ops_us'][op]:>12.1f}" for r in rows))
    print(f"{'step (plain)':<12}" + "".join(f"{r['step_us']:>12.1f}" for r in rows))
    for r in rows:
        k = r["kernel"]
        print(f"  {r['variant']}: {k['cc']}, {k['flags']} (native = {k['march_native']}), {k['vector_bits']}-bit")


def prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 2000, (length,), generator=g).tolist() for _ in range(n)]


def load_baseline(path: Path, new: int) -> Callable[[list[list[int]]], int]:
    """transformers' generate on a static left-padded batch; returns a function running one batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def run(batch: list[list[int]]) -> int:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return int(out[:, width:].numel())

    return run


async def measure(path: Path, ps: list[list[int]], new: int, repeat: int, threads: int | None, cores: int,
                  native: bool) -> tuple[int, bool, dict[int, float], dict[int, dict[int, float]]]:
    """(our torch threads, native step used, ours[batch], transformers[threads][batch]): best tok/s of
    ``repeat`` interleaved runs. transformers runs on the event loop thread while our engine is idle."""
    eng = ReferenceEngine(
        path, num_blocks=max(BATCHES) * 16, max_num_seqs=max(BATCHES), max_batch_tokens=2048, threads=threads,
        native=native,
    )
    await eng.start()
    our_threads = eng.torch_threads or torch.get_num_threads()
    used_native = eng.model is not None and eng.native_decode is not None  # stop() drops it
    hf = load_baseline(path, new)
    freeze_startup_heap()  # as the worker does after start-up (both sides gain: no full collections)

    async def one(i: int, p: list[int]) -> int:
        req = GenerateRequest(
            request_id=str(i),
            token_ids=p,
            sampling=SamplingParams(temperature=0.0),
            stop=StopConditions(max_tokens=new, ignore_eos=True),
        )
        return sum([len(o.token_ids) async for o in eng.generate(req)])

    def hf_run(batch: list[list[int]], t: int) -> float:
        torch.set_num_threads(t)
        t0 = time.perf_counter()
        n = hf(batch)
        return n / (time.perf_counter() - t0)

    mine = dict.fromkeys(BATCHES, 0.0)
    base = {t: dict.fromkeys(BATCHES, 0.0) for t in range(1, cores + 1)}
    try:
        await asyncio.gather(*(one(i, p) for i, p in enumerate(ps[:8])))  # warm-up
        for t in base:
            hf_run(ps[:8], t)
        torch.set_num_threads(our_threads)
        for _ in range(repeat):
            for b in BATCHES:
                t0 = time.perf_counter()
                n = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(ps[:b]))))
                mine[b] = max(mine[b], n / (time.perf_counter() - t0))
                for t in base:
                    base[t][b] = max(base[t][b], hf_run(ps[:b], t))
                # MKL's thread count is process-wide: give our engine back its own setting.
                torch.set_num_threads(our_threads)
    finally:
        await eng.stop()
    return int(eng.torch_threads or 0), used_native, mine, base


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads of our engine (default: the engine's default)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per point; the best is kept")
    ap.add_argument("--no-native", action="store_true", help="ours without the native decode step (torch only)")
    ap.add_argument("--profile", action="store_true",
                    help="only profile the native decode step per op (this CPU's build and an AVX2 build)")
    ap.add_argument("--profile-batch", type=int, default=8, help="rows of the profiled step")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    path = ensure_tiny_model()
    if args.profile:
        threads = args.threads or max(1, cores - 1)
        rows = profile(path, threads, batch=args.profile_batch)
        print_profile(rows, threads, args.profile_batch)
        out = {"bench": "reference_engine_profile", "threads": threads, "batch": args.profile_batch,
               "step_us": {r["variant"]: round(r["step_us"], 1) for r in rows},
               "ops_us": {r["variant"]: {k: round(v, 1) for k, v in r["ops_us"].items()} for r in rows}}
        plot_bars("reference_engine_profile", f"native decode step per op, batch {args.profile_batch}, "
                  f"{threads} thread(s)",
                  {op: {r["variant"]: r["ops_us"][op] for r in rows} for op in rows[0]["ops_us"]}, "CPU us / step")
        return report(out, native=True, threads=threads)
    ps = prompts(max(BATCHES), args.prompt_len)
    our_threads, native, mine, per_threads = asyncio.run(
        measure(path, ps, args.new, args.repeat, args.threads, cores, not args.no_native)
    )
    base = {b: max(r[b] for r in per_threads.values()) for b in BATCHES}
    print(
        f"tiny model (fp32, CPU), prompt {args.prompt_len} tokens, {args.new} new tokens, greedy; "
        f"ours with {our_threads} torch thread(s), decode steps {'native (decode.c)' if native else 'torch'}; "
        f"transformers best of 1..{cores} threads"
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
    plot_bars("reference_engine", "decode tok/s: ours vs transformers generate, tiny model, CPU",
              {f"batch {b}": {"ours": mine[b], "transformers (best threads)": base[b]} for b in BATCHES}, "tok/s")
    return report(result, native=native, threads=our_threads or None)


if __name__ == "__main__":
    main()
