"""GPU check of the reference engine: a ~1B-parameter random Llama, our engine on CUDA versus transformers.

Meant for a lent GPU machine with torch + transformers installed and no network: it needs only this
repository. Steps (a few minutes on an H100):

1. Build a random Llama (TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, vocab 32000)
   directly on the device, weights scaled so logits are peaked (no greedy near-ties), save it to
   ``--out`` (default /tmp/dynamo-gpu-check/model) as HF safetensors.
2. fp32 exactness: greedy output of our engine (prompts of 1..300 tokens, submitted concurrently) must
   equal ``transformers`` ``generate(do_sample=False)`` token for token (TF32 off on both sides).
3. bf16 agreement (stated tolerance): for every prompt, over the first token's top-20 (ours), the max
   |log p_bf16 - log p_fp32| of our engine must be at most ``max(2 * e_hf, BF16_FLOOR)``, where e_hf is
   the same error of transformers in bf16; and our bf16 top-1 must be within that bound of the fp32
   top-1's logprob (a near-tie may flip, a wrong token may not). How many leading greedy tokens agree
   with transformers bf16 is printed for information (bf16 rounding makes long runs diverge).
4. Throughput: generated tokens/s of our engine at batch 1 and 32 (fp32 and bf16), with transformers
   ``generate`` in the same run for reference.

The last line is JSON: ``{"bench": "gpu_check", "ours": tok/s fp32 batch 32, "baseline": transformers
tok/s fp32 batch 32, "ratio": ..., "unit": "tok_per_s", "fp32_exact": ..., "bf16_ok": ..., "tok_per_s":
{...}}``; exit status 1 if a check fails. ``--device cpu --small`` runs the same code on a small model on
CPU (a smoke test for machines without a GPU); with no ``--device`` it picks CUDA when present and that
smoke test otherwise (so ``make bench`` passes anywhere).

    python bench/gpu_check.py                      # on the GPU machine
    .venv/bin/python bench/gpu_check.py --device cpu --small
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._common import plot_bars, report
from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from workers.reference.engine import ReferenceEngine

BF16_FLOOR = 0.05  # bf16 error bound floor (log-prob units), see the module docstring
BIG = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
SMALL = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_model(out: Path, shape: dict[str, int], device: torch.device) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **shape)
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=device))
            else:
                gain = 3.0 if "lm_head" in name else 1.5 if "q_proj" in name else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g, device=device) / math.sqrt(p.shape[-1]))
    n = sum(p.numel() for p in model.parameters())
    if out.exists():
        shutil.rmtree(out)
    model.to("cpu").save_pretrained(out, safe_serialization=True)  # older safetensors: CPU tensors only
    log(f"model: {n / 1e9:.2f}B parameters, saved to {out} in {time.perf_counter() - t0:.1f}s")
    del model
    return out


def load_hf(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    m = m.to(device=device, dtype=dtype).eval()  # older versions take unknown kwargs silently
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def hf_greedy(model: Any, prompt: list[int], new: int, device: torch.device) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt], device=device),
            attention_mask=None,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )
    return list(out[0, len(prompt) :].tolist())


def hf_first_logprobs(model: Any, prompt: list[int], device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=device)).logits[0, -1].float()
    return torch.log_softmax(logits, -1).cpu()


def hf_tok_per_s(model: Any, prompts: list[list[int]], new: int, device: torch.device) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        _sync(device)
    return (out.shape[0] * new) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _req(rid: str, prompt: list[int], new: int, logprobs: int | None = None) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        token_ids=prompt,
        sampling=SamplingParams(temperature=0.0, logprobs=logprobs),
        stop=StopConditions(max_tokens=new, ignore_eos=True),
    )


async def ours_generate(
    eng: ReferenceEngine, prompts: list[list[int]], new: int, logprobs: int | None = None
) -> list[list[Any]]:
    async def one(i: int, p: list[int]) -> list[Any]:
        return [o async for o in eng.generate(_req(f"r{i}", p, new, logprobs))]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def ours_tok_per_s(eng: ReferenceEngine, prompts: list[list[int]], new: int) -> float:
    await ours_generate(eng, prompts[:2], 4)  # warm-up
    t0 = time.perf_counter()
    outs = await ours_generate(eng, prompts, new)
    n = sum(len(o.token_ids) for r in outs for o in r)
    return n / (time.perf_counter() - t0)


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        log(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    shape = SMALL if args.small else BIG
    path = build_model(Path(args.out) / "model", shape, device)
    vocab = shape["vocab_size"]
    g = torch.Generator().manual_seed(1)
    lengths = (1, 17, 64, 100, 300) if not args.small else (1, 17, 40, 100)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    bench_prompts = [torch.randint(3, vocab, (args.bench_prompt,), generator=g).tolist() for _ in range(32)]
    result: dict[str, Any] = {"bench": "gpu_check", "device": str(device), "small": bool(args.small)}
    speeds: dict[str, float] = {}
    ok = True

    # ---- fp32: exact
    hf = load_hf(path, torch.float32, device)
    t0 = time.perf_counter()
    refs = [hf_greedy(hf, p, args.new, device) for p in prompts]
    log(f"transformers fp32 greedy: {time.perf_counter() - t0:.1f}s")
    fp32_lp = [hf_first_logprobs(hf, p, device) for p in prompts]
    # 256-token steps: the 300-token prompt is prefilled in two chunks (the second attends via the pool).
    eng = ReferenceEngine(
        path, device=args.device, dtype="float32", num_blocks=args.blocks, max_batch_tokens=256, max_num_seqs=64
    )
    await eng.start()
    try:
        outs = await ours_generate(eng, prompts, args.new)
        mism = 0
        for p, ref, r in zip(prompts, refs, outs, strict=True):
            got = [t for o in r for t in o.token_ids]
            same = got == ref
            mism += not same
            log(
                f"fp32 prompt {len(p):>4}: {'OK   ' if same else 'DIFF '} first divergence at "
                f"{first_divergence(got, ref)} of {args.new}"
            )
        result["fp32_exact"] = mism == 0
        ok &= mism == 0
        eng.max_batch_tokens = 4096  # throughput: prefill the batch in one step
        speeds["ours_fp32_b1"] = await ours_tok_per_s(eng, bench_prompts[:1], args.bench_new)
        speeds["ours_fp32_b32"] = await ours_tok_per_s(eng, bench_prompts, args.bench_new)
    finally:
        await eng.stop()
    speeds["hf_fp32_b1"] = hf_tok_per_s(hf, bench_prompts[:1], args.bench_new, device)
    speeds["hf_fp32_b32"] = hf_tok_per_s(hf, bench_prompts, args.bench_new, device)
    del hf, eng
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- bf16: stated tolerance
    hf = load_hf(path, torch.bfloat16, device)
    hf_lp = [hf_first_logprobs(hf, p, device) for p in prompts]
    hf_bf = [hf_greedy(hf, p, args.new, device) for p in prompts]
    eng = ReferenceEngine(
        path, device=args.device, dtype="bfloat16", num_blocks=args.blocks, max_batch_tokens=256, max_num_seqs=64
    )
    await eng.start()
    try:
        outs = await ours_generate(eng, prompts, args.new)
        bf_ok = True
        for i, (p, r) in enumerate(zip(prompts, outs, strict=True)):
            got = [t for o in r for t in o.token_ids]
            lp = (await ours_generate(eng, [p], 1, logprobs=20))[0][0].logprobs[0]
            ref = fp32_lp[i]
            e_ours = max(abs(v - ref[t].item()) for t, v in lp.top)
            e_hf = max(abs(hf_lp[i][t].item() - ref[t].item()) for t, _ in lp.top)
            bound = max(2 * e_hf, BF16_FLOOR)
            top1_gap = ref.max().item() - ref[lp.token_id].item()
            good = e_ours <= bound and top1_gap <= bound
            bf_ok &= good
            log(
                f"bf16 prompt {len(p):>4}: {'OK  ' if good else 'FAIL'} err vs fp32 ours {e_ours:.4f}, "
                f"transformers {e_hf:.4f} (bound {bound:.4f}); top-1 fp32 gap {top1_gap:.4f}; greedy "
                f"agrees with transformers bf16 for {first_divergence(got, hf_bf[i])}/{args.new} tokens"
            )
        result["bf16_ok"] = bf_ok
        ok &= bf_ok
        eng.max_batch_tokens = 4096
        speeds["ours_bf16_b1"] = await ours_tok_per_s(eng, bench_prompts[:1], args.bench_new)
        speeds["ours_bf16_b32"] = await ours_tok_per_s(eng, bench_prompts, args.bench_new)
    finally:
        await eng.stop()
    speeds["hf_bf16_b1"] = hf_tok_per_s(hf, bench_prompts[:1], args.bench_new, device)
    speeds["hf_bf16_b32"] = hf_tok_per_s(hf, bench_prompts, args.bench_new, device)

    log(f"throughput, prompt {args.bench_prompt} tokens, {args.bench_new} new tokens (tok/s):")
    log(f"{'dtype':>6} {'batch':>5} {'ours':>9} {'transformers':>13} {'ratio':>6}")
    for dt in ("fp32", "bf16"):
        for b in (1, 32):
            o, h = speeds[f"ours_{dt}_b{b}"], speeds[f"hf_{dt}_b{b}"]
            log(f"{dt:>6} {b:>5} {o:>9.0f} {h:>13.0f} {o / h:>6.2f}")
    result.update(
        ours=round(speeds["ours_fp32_b32"], 1),
        baseline=round(speeds["hf_fp32_b32"], 1),
        ratio=round(speeds["ours_fp32_b32"] / speeds["hf_fp32_b32"], 2),
        unit="tok_per_s",
    )
    result["tok_per_s"] = {k: round(v, 1) for k, v in speeds.items()}
    result["ok"] = ok
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="reference engine GPU check")
    ap.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu with --small)"
    )
    ap.add_argument("--small", action="store_true", help="small model (CPU smoke test)")
    ap.add_argument("--out", default="/tmp/dynamo-gpu-check")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens compared per prompt")
    ap.add_argument("--blocks", type=int, default=2048, help="KV blocks of our engine")
    ap.add_argument("--bench-prompt", type=int, default=128)
    ap.add_argument("--bench-new", type=int, default=128)
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            log("no CUDA device: running the CPU smoke test (--device cpu --small)")
            args.small = True
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("no CUDA device here: run with --device cpu --small")
        return 2
    result = asyncio.run(run(args))
    plot_bars("gpu_check", f"reference engine on {args.device} vs transformers, tok/s",
              {k: {"tok/s": float(v)} for k, v in result.get("tok_per_s", {}).items()}, "tok/s")
    report(result, native=args.device == "cpu")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
