"""The compose check's requests and measurements (run by scripts/compose-check.sh once /health is 200).

Against the running disaggregated stack (frontend on 127.0.0.1:8000; the check's second frontend on :8001,
which never hands a prompt to the prefill worker):
1. one streamed chat request with the openai SDK; from the workers' /metrics (read inside their containers)
   it must have gone prefill -> decode with the KV cache pulled over NIXL: the prefill and decode workers'
   request counters, the decode worker's NIXL pull counter (``dynamo_worker_kv_pulls_total`` +1, no pull failure,
   no local-prefill fallback) and no prefill
   fallback on the frontend;
2. the hand-off between the two containers: time to first token through :8000 (prefill, NIXL pull, decode)
   against :8001 (the decode worker prefills itself) on fresh prompts of the same length, medians; and the
   NIXL pull rate from the decode worker's per-pull log lines (bytes, ms).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

MODEL = "dynamo-tiny"
ROUNDS = 5
PROMPT_WORDS = 600  # ~1.5k tokens of the tiny model: a hand-off of a few MB
SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())")


def metrics(compose: list[str], service: str, port: int) -> dict[str, float]:
    """Sample name (with labels) -> value, read inside the service's container (no port is published)."""
    out = subprocess.run([*compose, "exec", "-T", service, "python", "-c", SCRAPE.format(port=port)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    samples: dict[str, float] = {}
    for fam in text_string_to_metric_families(out):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples




def total(samples: dict[str, float], prefix: str, **labels: str) -> float:
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for k, v in samples.items()
               if k.startswith(prefix + "{") or k.startswith(prefix + "_total{")
               if all(w in k for w in want))


def prompt(rng: random.Random) -> str:
    words = ["alpha", "river", "stone", "cloud", "seven", "garden", "tiger", "maple", "copper", "violet", "north"]
    return " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(PROMPT_WORDS))


def ttft(client: OpenAI, text: str, max_tokens: int = 8) -> tuple[float, str]:
    t0 = time.perf_counter()
    first = None
    out = []
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                            max_tokens=max_tokens, stream=True, temperature=0)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            out.append(chunk.choices[0].delta.content)
    if first is None:
        raise SystemExit("stream ended without a token")
    return first, "".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compose", required=True, help="the docker-compose command line, with its -p and -f flags")
    ap.add_argument("--up-seconds", type=float, default=0.0)
    ap.add_argument("--build-figures", default="")
    args = ap.parse_args()
    compose = shlex.split(args.compose)
    rng = random.Random(17)
    disagg = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", timeout=120)
    local = OpenAI(base_url="http://127.0.0.1:8001/v1", api_key="none", timeout=120)

    # 1. One streamed request, and the counters that say how it went.
    before = {s: metrics(compose, s, 9090) for s in ("prefill", "decode")}
    front_before = metrics(compose, "frontend", 8000)
    first, text = ttft(disagg, prompt(rng), max_tokens=16)
    after = {s: metrics(compose, s, 9090) for s in ("prefill", "decode")}
    front_after = metrics(compose, "frontend", 8000)
    prefill_reqs = (total(after["prefill"], "dynamo_worker_requests", outcome="ok")
                    - total(before["prefill"], "dynamo_worker_requests", outcome="ok"))
    decode_reqs = (total(after["decode"], "dynamo_worker_requests", outcome="ok")
                   - total(before["decode"], "dynamo_worker_requests", outcome="ok"))
    def delta(metric: str, svc: str = "decode") -> float:
        return total(after[svc], metric) - total(before[svc], metric)

    proof = "dynamo_worker_kv_pulls_total"
    pulled = delta("dynamo_worker_kv_pulls_total")
    ok_pull = (pulled == 1 and delta("dynamo_worker_kv_pull_failures_total") == 0
               and delta("dynamo_worker_kv_local_prefill_fallbacks_total") == 0)
    fallbacks = (total(front_after, "dynamo_frontend_prefill_fallbacks")
                 - total(front_before, "dynamo_frontend_prefill_fallbacks"))
    print(f"streamed request: {len(text)} chars, TTFT {first * 1e3:.0f} ms; prefill worker +{prefill_reqs:g} "
          f"request(s), decode worker +{decode_reqs:g}, {proof} +{pulled:g}, frontend prefill fallbacks "
          f"+{fallbacks:g}")
    if not (prefill_reqs == 1 and decode_reqs == 1 and ok_pull and fallbacks == 0):
        print("FAIL: the request did not go prefill -> decode with a NIXL pull", file=sys.stderr)
        return 1

    # Structured outputs in the image (xgrammar, installed without the GPU-only triton): a grammar-bound
    # answer through the disaggregated path (the prefill worker samples the first token under the mask too).
    for seed in range(3):
        r = disagg.chat.completions.create(model=disagg.models.list().data[0].id, seed=seed, max_tokens=8,
                                           messages=[{"role": "user", "content": "yes or no?"}],
                                           extra_body={"guided_choice": ["yes", "no"]})
        got = r.choices[0].message.content
        if got not in ("yes", "no") or r.choices[0].finish_reason != "stop":
            print(f"FAIL: guided_choice answered {got!r} ({r.choices[0].finish_reason})", file=sys.stderr)
            return 1
    print("structured outputs: guided_choice answered within its choices 3/3")

    # 2. The hand-off: added TTFT (same prompt length, fresh prompts) and the NIXL pull rate.
    t_disagg, t_local = [], []
    for _ in range(ROUNDS):
        t_disagg.append(ttft(disagg, prompt(rng))[0])
        t_local.append(ttft(local, prompt(rng))[0])
    end = metrics(compose, "decode", 9090)
    nbytes = total(end, "dynamo_worker_kv_pulled_bytes_total")
    secs = total(end, "dynamo_worker_kv_pull_seconds_sum")
    n_pulls = max(int(total(end, "dynamo_worker_kv_pulls_total")), 1)
    gbps = nbytes / secs / 1e9 if secs else 0.0
    med_d, med_l = statistics.median(t_disagg), statistics.median(t_local)
    build_s, size = (Path(args.build_figures).read_text().split() if args.build_figures
                     and Path(args.build_figures).is_file() else ("0", "0"))
    print(f"{'measure':<44} {'value':>12}")
    rows = [
        ("compose up -> /health 200, s", f"{args.up_seconds:.0f}"),
        ("cpu image size, MB", f"{int(size) / 1e6:.0f}"),
        ("cpu image build (this run), s", build_s),
        (f"TTFT via prefill + NIXL pull, median of {ROUNDS}, ms", f"{med_d * 1e3:.1f}"),
        (f"TTFT decode prefills itself, median of {ROUNDS}, ms", f"{med_l * 1e3:.1f}"),
        ("added TTFT of the hand-off, ms", f"{(med_d - med_l) * 1e3:+.1f}"),
        ("NIXL pulls counted by the decode worker", str(n_pulls)),
        ("bytes per pull (mean)", f"{nbytes / n_pulls:.0f}"),
        ("NIXL pull time (mean), ms", f"{secs * 1e3 / n_pulls:.2f}"),
        ("NIXL pull rate between containers, GB/s", f"{gbps:.2f}"),
    ]
    for name, value in rows:
        print(f"{name:<44} {value:>12}")
    print(json.dumps({"bench": "compose_check", "transport": "UCX tcp between containers", "proof": proof,
                      "up_to_ready_s": args.up_seconds, "image_bytes": int(size), "build_s": int(build_s),
                      "ttft_disagg_ms": round(med_d * 1e3, 1), "ttft_local_ms": round(med_l * 1e3, 1),
                      "added_ttft_ms": round((med_d - med_l) * 1e3, 1), "pulls": n_pulls,
                      "pull_bytes_mean": int(nbytes // n_pulls), "pull_gbps": round(gbps, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
