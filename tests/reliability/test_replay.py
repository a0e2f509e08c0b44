"""Exact replay after a crash (issue 21, point 1): seeded sampled requests whose worker is SIGKILLed at
token positions spread over their streams end, for the client, with the same text, token bytes,
finish_reason, usage and logprobs as a fault-free run of the same requests. Real reference-engine workers,
etcd, NATS and NIXL.

Why it holds: the sampler's random draw is a function of ``(seed, position)`` (workers/reference/sampler.py),
the frontend sends the tokens already streamed as ``output_offset`` (penalties count them as output, the
stream resumes at that position), and gives each choice of an n > 1 request its own seed.

Kills: the aggregated and decode workers are SIGKILLed by the test once the last of a staggered set of
streams has a few tokens (each request was started a random number of tokens after the one before, so they
die at different positions); the "during the NIXL read" and prefill cases use the engine's test kill
switches (workers/reference/testfaults.py) for a precise point. The positions come from the frontend's own
"failed after N tokens" lines and are printed with the figures.

The workers run with ``--dtype float64`` (fp32 logits), where everything, logprobs included, is compared
bit for bit. In float32 they are not bit-identical: a resumed request's prompt + earlier output is computed
by one prefill (torch matmuls over all those rows) where the first worker computed the output one decode
step at a time (the native C step, or torch with another batch shape), and the float sums come out in
another order; the same happens with no fault at all when other requests share the steps. The differences
are ~1e-5 in a logprob, and a token changes when its uniform falls that close to a CDF boundary (seen once
in a few thousand draws here). In float64 the same reorderings differ by ~1e-16, which rounding the logits
to fp32 removes (``LP_TOL`` is the bound a float32 run would be held to).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from dynamo_rt.discovery import DiscoveryView, Registry
from frontend.serving import choice_seed
from tests.conftest import arun
from tests.stack import Proc, Stack

MODEL = "dynamo-tiny"
LP_TOL = 1e-4  # |d logprob| a float32 run stays within (measured ~1.3e-5)
# float64 compute with fp32 logits: the replayable mode (see the module docstring).
BLOCKS = ("--kv-cache-blocks", "1024", "--dtype", "float64")
KV_FLAGS = ("--kv-verify-checksum",)
WORDS = ("river stone light north garden window paper silver morning letter quiet market winter bridge "
         "music table forest yellow engine harbor story candle orange thunder").split()
_FAILED = re.compile(r"request (\S+): worker \S+ failed after (\d+) tokens")
_SERVING = re.compile(r"worker (\w+) serving model")


@dataclass
class Out:
    """What the client saw of one streamed request."""

    text: dict[int, str] = field(default_factory=dict)
    toks: dict[int, list[bytes]] = field(default_factory=dict)
    lps: dict[int, list[float]] = field(default_factory=dict)
    tops: dict[int, list[list[tuple[bytes, float]]]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    received: int = 0
    done: bool = False
    rid: str = ""


def bodies(rnd: random.Random, n: int, tag: str) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        words = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 40)))
        b: dict[str, Any] = {
            "model": MODEL, "messages": [{"role": "user", "content": f"{tag} {i}: {words}"}],
            "max_tokens": rnd.randint(90, 130), "seed": rnd.getrandbits(63),
            "temperature": rnd.choice([0.6, 0.9, 1.0, 1.3]), "logprobs": True, "top_logprobs": 2,
            "stream": True, "stream_options": {"include_usage": True}}
        kind = i % 6
        if kind == 1:
            b["top_p"] = 0.9
        elif kind == 2:
            b.update(top_k=40, min_p=0.02)
        elif kind == 3:
            b.update(presence_penalty=0.8, frequency_penalty=0.4)  # count the output before the kill too
        elif kind == 4:
            b["n"] = 2  # each choice has its own seed and migrates on its own
        elif kind == 5:
            b["stop"] = ["ing", "ter"]  # a stop string may straddle the kill
        out.append(b)
    return out


async def stream(url: str, body: dict[str, Any], out: Out) -> Out:
    async with httpx.AsyncClient(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions",
                                                            json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.done = True
                break
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            out.rid = ev.get("id", out.rid)
            if ev.get("usage"):
                out.usage = ev["usage"]
            for ch in ev["choices"]:
                i = ch["index"]
                out.text[i] = out.text.get(i, "") + (ch["delta"].get("content") or "")
                for c_ in (ch.get("logprobs") or {}).get("content") or []:
                    out.toks.setdefault(i, []).append(bytes(c_["bytes"]))
                    out.lps.setdefault(i, []).append(c_["logprob"])
                    out.tops.setdefault(i, []).append([(bytes(t["bytes"]), t["logprob"])
                                                       for t in c_["top_logprobs"]])
                    out.received += 1
                if ch.get("finish_reason"):
                    out.finish[i] = ch["finish_reason"]
    return out


async def _until(cond: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def pinned(bs: Sequence[dict[str, Any]], instance: str) -> list[dict[str, Any]]:
    return [{**b, "nvext": {"backend_instance_id": instance}} for b in bs]


async def clean_run(url: str, bs: Sequence[dict[str, Any]]) -> list[Out]:
    return list(await asyncio.gather(*(stream(url, b, Out()) for b in bs)))


async def staggered(url: str, bs: Sequence[dict[str, Any]], rnd: random.Random,
                    kill: Callable[[], None] | None = None, kill_after: int = 0) -> list[Out]:
    """Start the requests one after another, each a random 1..4 tokens after the one before (so they are at
    different positions at any moment); with ``kill``, call it once the last one has ``kill_after`` tokens."""
    outs = [Out() for _ in bs]
    tasks: list[asyncio.Future[Out]] = []
    for i, b in enumerate(bs):
        tasks.append(asyncio.ensure_future(stream(url, b, outs[i])))
        gap = rnd.randint(1, 4)
        t = tasks[-1]
        await _until(lambda o=outs[i], g=gap, t=t: o.received >= g or t.done())  # type: ignore[misc]
    if kill is not None:
        last, lt = outs[-1], tasks[-1]
        await _until(lambda: last.received >= kill_after or lt.done())
        kill()
    return list(await asyncio.gather(*tasks))


def compare(clean: Sequence[Out], got: Sequence[Out], log: str, bit_exact: bool = True) -> tuple[int, int]:
    """Assert every faulted stream equals its fault-free run: text, token bytes, finish_reason, usage, and
    logprobs with their top alternatives bit for bit (``bit_exact``) or within ``LP_TOL``; returns (choices
    compared, choices whose logprobs are bit-identical)."""
    n = exact = 0
    for k, (a, b) in enumerate(zip(clean, got, strict=True)):
        assert a.done and b.done, k
        for i in a.toks:
            pairs = list(zip(a.toks[i], b.toks.get(i, []), strict=False))
            first = next((j for j, (x, y) in enumerate(pairs) if x != y), len(pairs))
            assert a.toks[i] == b.toks[i], (
                f"request {k} choice {i} ({b.rid}) differs from token {first} on "
                f"of {len(a.toks[i])} / {len(b.toks[i])} (there: {a.tops[i][first:first + 1]} / "
                f"{b.tops[i][first:first + 1]}; before it max |d logprob| "
                f"{max((abs(x - y) for x, y in zip(a.lps[i][:first], b.lps[i][:first], strict=True)), default=0)}); "
                f"migrated at "
                f"{[n for r, n in _FAILED.findall(log) if r.startswith(f'{b.rid}-{i}')]}")
        assert b.finish == a.finish, k
        assert b.text == a.text, (k, a.text, b.text)
        assert b.usage["completion_tokens"] == a.usage["completion_tokens"], k
        for i in a.lps:
            n += 1
            exact += a.lps[i] == b.lps[i] and a.tops[i] == b.tops[i]
            if not bit_exact:
                assert all(abs(x - y) <= LP_TOL for x, y in zip(a.lps[i], b.lps[i], strict=True)), (k, i)
    if bit_exact:
        assert exact == n, f"logprobs bit-identical in {exact} of {n} choices"
    return n, exact


def instance_of(p: Proc, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _SERVING.search(p.output())
        if m:
            return m.group(1)
        assert p.alive(), p.output()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{p.name} never said which instance it is")


def wait_routable(st: Stack, instance: str, timeout: float = 60) -> None:
    """Until the frontend routes a pinned request to ``instance`` (it knows the worker)."""
    deadline = time.monotonic() + timeout
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "nvext": {"backend_instance_id": instance}}
    while True:
        r = httpx.post(st.url + "/v1/chat/completions", json=body, timeout=60)
        if r.status_code == 200:
            return
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)


def kill_positions(st: Stack) -> list[int]:
    """Tokens each choice had streamed when its worker failed, in log order (the frontend's own lines)."""
    assert st.frontend is not None
    return [int(n) for _rid, n in _FAILED.findall(st.frontend.output())]


async def _registered(etcd_url: str, ns: str) -> set[str]:
    reg = Registry(etcd_url, ns)
    await reg.start()
    view = DiscoveryView(reg)
    await view.start()
    out = set(view.instances())
    await view.close()
    await reg.close()
    return out


def wait_registered(etcd_url: str, ns: str, present: str, gone: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ids = arun(_registered(etcd_url, ns), 30)
        if present in ids and gone not in ids:
            time.sleep(1.0)  # the frontend's watch has it too
            return
        assert time.monotonic() < deadline, ids
        time.sleep(0.3)


def test_agg_worker_killed_at_spread_positions_replays_exactly(etcd_server: object, nats_server: object) -> None:
    rnd = random.Random(2101)
    st = Stack(etcd_server.client_url, nats_server.url, "replay-agg")  # type: ignore[attr-defined]
    victim = st.add_worker("reference", "agg", *BLOCKS)
    survivor = st.add_worker("reference", "agg", *BLOCKS)
    st.start_frontend("--migration-limit", "3")
    try:
        st.wait_ready(n_instances=2)
        v, s = instance_of(victim), instance_of(survivor)
        bs = bodies(rnd, 20, "agg")
        kill_after = rnd.randint(1, 6)

        async def main() -> tuple[list[Out], list[Out]]:
            clean = await clean_run(st.url, pinned(bs, s))
            got = await staggered(st.url, pinned(bs, v), rnd, lambda: victim.signal(signal.SIGKILL), kill_after)
            return clean, got

        clean, got = arun(main(), 400)
        n, exact = compare(clean, got, st.frontend.output() if st.frontend else "")
        pos = kill_positions(st)
        print(f"replay agg: {len(bs)} requests, {n} choices equal to the fault-free run; "
              f"{len(pos)} migrated at tokens {sorted(pos)}; logprobs bit-identical in {exact}/{n}")
        assert not victim.alive() and len(pos) >= len(bs) // 2
    finally:
        st.stop()


def test_disagg_decode_prefill_and_nixl_read_kills_replay_exactly(etcd_server: object,
                                                                   nats_server: object) -> None:
    rnd = random.Random(2102)
    st = Stack(etcd_server.client_url, nats_server.url, "replay-dis")  # type: ignore[attr-defined]
    pre = st.add_worker("reference", "prefill", *BLOCKS, *KV_FLAGS)
    dec = st.add_worker("reference", "decode", *BLOCKS, *KV_FLAGS)
    survivor = st.add_worker("reference", "decode", *BLOCKS, *KV_FLAGS)
    st.start_frontend("--migration-limit", "3", "--disagg-threshold", "8")
    try:
        st.wait_ready(n_instances=3)
        d, s = instance_of(dec), instance_of(survivor)
        decode_bs, nixl_bs, prefill_bs = bodies(rnd, 12, "dec"), bodies(rnd, 12, "nixl"), bodies(rnd, 6, "pre")
        clean = arun(clean_run(st.url, pinned(decode_bs + nixl_bs + prefill_bs, s)), 400)
        figures: list[str] = []
        seen = 0

        def check(name: str, clean_part: list[Out], got: list[Out]) -> None:
            nonlocal seen
            n, exact = compare(clean_part, got, st.frontend.output() if st.frontend else "")
            pos = kill_positions(st)[seen:]
            seen += len(pos)
            figures.append(f"{name}: {len(got)} requests, {n} choices equal; {len(pos)} migrated at tokens "
                           f"{sorted(pos)}; logprobs bit-identical in {exact}/{n}")

        # 1. The decode worker dies mid-stream: each request is prefilled again (prompt + output so far, with
        #    output_offset) and continues on the other decode worker.
        got = arun(staggered(st.url, pinned(decode_bs, d), rnd, lambda: dec.signal(signal.SIGKILL),
                             rnd.randint(1, 6)), 400)
        check("decode killed", clean[:12], got)
        assert not dec.alive()

        # 2. A decode worker dies while the m-th request's KV is being read over NIXL; the ones before it
        #    are decoding by then (the ones after find it gone and start elsewhere).
        m = rnd.randint(8, 11)
        st.env["DYN_TEST_KILL_IN_KV_LOAD"] = str(m)
        reader = st.add_worker("reference", "decode", *BLOCKS, *KV_FLAGS)
        del st.env["DYN_TEST_KILL_IN_KV_LOAD"]
        r = instance_of(reader)
        wait_routable(st, r)
        got = arun(staggered(st.url, pinned(nixl_bs, r), rnd), 400)
        assert "KV read" in reader.output() and not reader.alive()
        check(f"decode killed during KV read {m}", clean[12:24], got)

        # 3. The prefill worker dies right after sampling the first token of its k-th request: that request
        #    is prefilled on the decode worker, which draws position 0 itself.
        k = rnd.randint(2, 4)
        st.env["DYN_TEST_KILL_AFTER_TOKENS"] = str(k)
        pre2 = st.add_worker("reference", "prefill", *BLOCKS, *KV_FLAGS)
        del st.env["DYN_TEST_KILL_AFTER_TOKENS"]
        pre.signal(signal.SIGTERM)  # the killable one is the only prefill worker left
        wait_registered(etcd_server.client_url, "replay-dis", instance_of(pre2), instance_of(pre))  # type: ignore[attr-defined]
        got = arun(staggered(st.url, pinned(prefill_bs, s), rnd), 400)
        assert not pre2.alive() and "tokens sampled" in pre2.output()
        check(f"prefill killed after {k} first tokens", clean[24:], got)
        fallbacks = st.metric("dynamo_frontend_prefill_fallbacks_total")
        figures.append(f"prefill fallbacks (frontend counter, whole test): {fallbacks:g}")
        assert fallbacks >= 1
        print("replay disagg:\n  " + "\n  ".join(figures))
    except BaseException:
        assert st.frontend is not None
        print("".join(ln + "\n" for ln in st.frontend.output().splitlines() if "WARNING" in ln or "ERROR" in ln))
        raise
    finally:
        st.stop()


def test_choice_seeds_are_the_request_seed_then_mixed_per_index() -> None:
    assert choice_seed(7, 0) == 7
    seeds = {choice_seed(s, i) for s in range(50) for i in range(1, 8)}
    assert len(seeds) == 350 and all(0 <= x < 2**63 for x in seeds)
    assert choice_seed(7, 1) != choice_seed(8, 0)  # seed + index made these one stream
