"""A worker restarted in place on its shared-memory host tier serves its prefixes again, through a real
frontend (real etcd, NATS, worker and frontend processes, the tiny model): after SIGTERM (drain, then exit)
and after SIGKILL (no chance to flush anything), ``usage.prompt_tokens_details.cached_tokens`` says the
prompts it served before are cache hits. A worker of another model on the same file discards it. Also: the
KV router sends a prompt to the worker holding it in its host tier rather than to one that must recompute.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynamo_rt.kvhash import block_hashes
from tests.kvbm.conftest import tier_slots
from tests.stack import Proc, Stack

MODEL = "dynamo-tiny"
FLAGS = ("--kv-cache-blocks", "48", "--kv-host-tier-blocks", "256")


def prompt_ids(n: int, salt: int) -> list[int]:
    return [7 + (i * 31 + salt * 17) % 2000 for i in range(n)]


def complete(st: Stack, prompt: list[int], **extra: object) -> tuple[str, int]:
    r = httpx.post(st.url + "/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def instances(st: Stack) -> int:
    with contextlib.suppress(OSError, ValueError):
        _, body = st.get_json("/health", 2)
        models = body.get("models") or {}
        return sum(int(m["instances"]) for m in models.values())  # type: ignore[union-attr]
    return -1


def wait_for(cond: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def restart(st: Stack, old: Proc, sig: int, *flags: str) -> Proc:
    old.signal(sig)
    old.proc.wait(60)
    st.workers.remove(old)
    old.stop()  # closes and removes its log
    wait_for(lambda: instances(st) == 0, "the old worker to leave discovery")
    new = st.add_worker("reference", "agg", *flags)
    st.wait_ready(1)
    return new


@pytest.fixture
def shm(ns: str) -> Iterator[Path]:
    """A real shared-memory file, as in a pod (an emptyDir with medium Memory)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    path = base / f"dynamo-test-{ns}.kv"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def stack(etcd_server: object, nats_server: object, ns: str) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, ns)  # type: ignore[attr-defined]
    try:
        yield st
    finally:
        st.stop()


def test_sigterm_and_sigkill_restarts_serve_prefixes_from_the_host_tier(stack: Stack, shm: Path,
                                                                       tiny_seed1: Path) -> None:
    flags = ("--kv-host-tier-path", str(shm), *FLAGS)
    w = stack.add_worker("reference", "agg", *flags)
    stack.start_frontend("--router-mode", "kv")
    stack.wait_ready(1)
    first = [prompt_ids(100, s) for s in range(4)]  # 6 full blocks each (the last token is never cached)
    want = {}
    for p in first:
        text, cached = complete(stack, p)
        assert cached == 0
        want[tuple(p)] = text

    # 1. SIGTERM: the worker drains, lands its queued offloads, exits; a new process on the same file.
    w = restart(stack, w, signal.SIGTERM, *flags)
    assert re.search(r"KV host tier: .* 24 blocks recovered", w.output()), w.output()[-2000:]
    hits = [complete(stack, p) for p in first]
    assert hits == [(want[tuple(p)], 96) for p in first]  # hit rate 24/24 blocks

    # 2. SIGKILL: nothing runs at exit. The blocks were written through to the host tier as they were
    #    computed; wait until the file's index shows them, then kill.
    second = [prompt_ids(140, 10 + s) for s in range(3)]  # 8 full blocks each
    for p in second:
        text, cached = complete(stack, p)
        assert cached == 0
        want[tuple(p)] = text
    needed = {h for p in second for h in block_hashes(p[:-1], 16)}
    wait_for(lambda: needed <= set(tier_slots(shm)), "the host tier to hold the new prompts")
    w = restart(stack, w, signal.SIGKILL, *flags)
    hits = [complete(stack, p) for p in first + second]
    assert hits == [(want[tuple(p)], 96) for p in first] + [(want[tuple(p)], 128) for p in second]

    # 3. Another model (same config.json, other weights) on the same file: discarded, never served from.
    w = restart(stack, w, signal.SIGTERM, *flags, "--model", str(tiny_seed1), "--served-model-name", MODEL)
    assert "discarding its contents: written for another model or KV layout" in w.output()
    assert re.search(r"KV host tier: .* 0 blocks recovered", w.output())
    assert all(complete(stack, p)[1] == 0 for p in first)


def test_kv_router_prefers_a_host_tier_hit_over_recomputing(stack: Stack, shm: Path, tmp_path: Path) -> None:
    """Worker A holds a prompt only in its host tier (evicted from its small primary pool); worker B has
    nothing. The KV router's cost (host hit weight 0.5) sends the prompt to A: a 96-token cache hit. (The
    overlap weight of 10 keeps a load report of A taken while it was busy, up to a second old, from
    outweighing the cache: that trade-off is the policy's, tested in tests/router.)"""
    a = stack.add_worker("reference", "agg", "--kv-host-tier-path", str(shm), "--kv-cache-blocks", "16",
                         "--kv-host-tier-blocks", "256")
    b = stack.add_worker("reference", "agg", "--kv-host-tier-path", str(tmp_path / "b.kv"),
                         "--kv-cache-blocks", "16", "--kv-host-tier-blocks", "256")
    stack.start_frontend("--router-mode", "kv", "--kv-host-hit-weight", "0.5", "--kv-overlap-weight", "10")
    stack.wait_ready(2)
    wait_for(lambda: "serving model" in a.output() and "serving model" in b.output(), "worker ids")
    a_id = re.search(r"worker (\w+) serving model", a.output()).group(1)  # type: ignore[union-attr]
    targets = [prompt_ids(100, 77 + s) for s in range(3)]
    want = []
    for p in targets:
        text, cached = complete(stack, p, nvext={"backend_instance_id": a_id})
        assert cached == 0
        want.append((text, 96))
    # Push the targets out of A's 16-block primary pool (pinned to A: the router's choice is not tested yet).
    for s in range(3):
        complete(stack, prompt_ids(100, 200 + s), nvext={"backend_instance_id": a_id})
    needed = {h for p in targets for h in block_hashes(p[:-1], 16)}
    wait_for(lambda: needed <= set(tier_slots(shm)), "A's host tier to hold the targets")
    time.sleep(1.0)  # A's last KV events reach the router
    # Each target goes to A (B would recompute it: cached 0). By chance that would be 1 in 8.
    assert [complete(stack, p) for p in targets] == want
