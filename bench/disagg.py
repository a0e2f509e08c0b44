"""TTFT of disaggregated serving (prefill worker -> NIXL -> decode worker) against aggregated serving, same run.

Reference-engine workers on the tiny model (fp32, CPU). For each prompt length it reports the median TTFT of
an aggregated worker, of the disaggregated pair with every prompt handed over NIXL (threshold 1), and the
hand-off time the disaggregated path adds. That difference is what ``frontend --disagg-threshold`` weighs:
below the length where remote prefill stops costing more than it saves, prefill locally. Last line JSON:
``{"bench": "disagg_handoff", "ours": disagg TTFT p50 ms at 2048 tokens, "baseline": agg TTFT p50 ms,
"ratio": ..., "unit": "ms"}``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import plot_bars, report
from dynamo_rt.local.services import LocalServices
from tests.stack import Stack

LENGTHS = [16, 128, 512, 1024, 2048]
REPS = 7


def ttft(url: str, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
            "model": "dynamo-tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line:
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("no token")


def main() -> None:
    with tempfile.TemporaryDirectory() as d, LocalServices(Path(d)) as svc:
        agg = Stack(svc.etcd.client_url, svc.nats.url, "bagg")
        agg.add_worker("reference", "agg", "--kv-cache-blocks", "1024")
        agg.start_frontend()
        dis = Stack(svc.etcd.client_url, svc.nats.url, "bdis")
        dis.add_worker("reference", "prefill", "--kv-cache-blocks", "1024")
        dis.add_worker("reference", "decode", "--kv-cache-blocks", "1024")
        dis.start_frontend("--disagg-threshold", "1")
        try:
            print("starting workers ...", flush=True)
            agg.wait_ready(1)
            dis.wait_ready(2)
            rows = []
            for n in LENGTHS:
                a, b = [], []
                for rep in range(REPS):
                    # A fresh prompt every time: no prefix-cache hits on either side.
                    p = [5 + (i * 7 + rep * 1009 + n) % 2000 for i in range(n)]
                    a.append(ttft(agg.url, p))
                    b.append(ttft(dis.url, [t + 1 for t in p]))
                rows.append((n, statistics.median(a), statistics.median(b)))
                print(f"  {n} tokens done", flush=True)
            print(f"{'prompt':>8}{'agg TTFT ms':>14}{'disagg TTFT ms':>16}{'hand-off ms':>13}")
            for n, a50, b50 in rows:
                print(f"{n:>8}{a50:>14.2f}{b50:>16.2f}{b50 - a50:>13.2f}")
        finally:
            agg.stop()
            dis.stop()
    plot_bars("disagg", "TTFT p50: aggregated vs disaggregated (NIXL hand-off), tiny model, CPU",
              {f"{n} tok": {"agg": a, "disagg": b} for n, a, b in rows}, "ms")
    n, a50, b50 = rows[-1]
    report({"bench": "disagg_handoff", "ours": round(b50, 2), "baseline": round(a50, 2),
            "ratio": round(b50 / a50, 3), "unit": "ms", "prompt_tokens": n}, native=True)


if __name__ == "__main__":
    main()
