"""No leak at any cancellation point: a client that disconnects anywhere leaves nothing held.

One real disaggregated stack (reference engine: a prefill worker, a decode worker handing the KV over NIXL, a
KV-routing frontend, and a second frontend with ``--max-concurrency 1`` for the admission queue), every process
started with ``DYN_TEST_FAULT_POINTS=@FILE`` (dynamo_rt/faults.py): each case writes the file, sends a request
on a raw socket, waits for the process's ``fault point P: pause`` line, checks that the request holds something
there, hangs up, and polls until every gauge is back to its value before the request, exactly:

* workers: requests in flight (runtime and engine), KV blocks referenced, prompt pins held;
* frontends: requests and choices in flight, queued and awaiting-worker requests, the router's book (requests,
  blocks, pending prefill) of every pool;

and no pin was freed by its timeout instead (a leak healed late). The time from the hang-up to the baseline is
printed per point (``-s``); the deadline is generous (the box is shared) but under the pin timeout. A seeded
property test then hangs up at random moments on concurrent requests of random shapes, and checks the same.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.stack import Proc, Stack
from tests.workermetrics import metrics_port, samples, scrape

MODEL = "dynamo-tiny"
THRESHOLD = 32  # prompts this long or longer are prefilled on the prefill worker
DEADLINE = 30.0  # < the prefill worker's 60 s pin timeout: a pin only the timeout frees fails the test
WORKER_GAUGES = ("dynamo_worker_active_requests", "dynamo_worker_engine_requests", "dynamo_worker_kv_blocks_in_use",
                 "dynamo_worker_kv_pins", "dynamo_worker_kv_pins_expired_total")
FRONTEND_GAUGES = ("dynamo_frontend_inflight_requests", "dynamo_frontend_inflight_choices",
                   "dynamo_frontend_queued_requests", "dynamo_frontend_awaiting_worker_requests",
                   "dynamo_frontend_router_inflight_requests", "dynamo_frontend_router_inflight_blocks",
                   "dynamo_frontend_router_pending_prefill_blocks")
TIMES: dict[str, float] = {}


@dataclass
class Env:
    main: Stack  # the workers and the KV-routing frontend
    queued: Stack  # a second frontend on the same workers, --max-concurrency 1
    faults: Path
    prefill: Proc
    decode: Proc
    ports: dict[str, int]  # worker role -> metrics port

    def set_faults(self, spec: str) -> None:
        tmp = self.faults.with_suffix(".tmp")
        tmp.write_text(spec)
        tmp.replace(self.faults)

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, port in self.ports.items():
            text = scrape(port)
            for g in WORKER_GAUGES:
                out[f"{role}:{g}"] = samples(text, g)
        for name, st in (("fe", self.main), ("fe-queued", self.queued)):
            with urllib.request.urlopen(st.url + "/metrics", timeout=5) as r:
                text = r.read().decode()
            for g in FRONTEND_GAUGES:
                out[f"{name}:{g}"] = samples(text, g)
            out[f"{name}:disconnects"] = samples(text, "dynamo_frontend_client_disconnects_total")
        return out

    def idle(self) -> dict[str, float]:
        """The baseline: every gauge at 0 (a pin release of the last request may still be on its way)."""
        snap = self.snapshot()
        zero = {k: 0.0 if _gauge(k) else v for k, v in snap.items()}
        self.wait_state(zero, time.monotonic(), "idle stack")
        return zero

    def wait_state(self, want: dict[str, float], since: float, what: str, prefix: str = "") -> float:
        """Polls until the gauges (named ``prefix``...) equal ``want`` (disconnect counters aside); seconds
        since ``since``."""
        deadline = time.monotonic() + DEADLINE
        last: dict[str, tuple[float, float]] = {}
        while True:
            now = self.snapshot()
            diff = {k: (want[k], v) for k, v in now.items()
                    if v != want[k] and k.startswith(prefix) and not k.endswith(":disconnects")}
            if not diff:
                took = time.monotonic() - since
                if took > 0.5 and last:
                    print(f"\n{what}: {took:.2f}s; last held: {last}")
                return took
            last = diff
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not back to the baseline after {DEADLINE:.0f}s: {diff}")
            time.sleep(0.01)


def _gauge(key: str) -> bool:
    return not key.endswith((":disconnects", "_total"))


@pytest.fixture(scope="module")
def env(etcd_server: object, nats_server: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    faults = tmp_path_factory.mktemp("faults") / "points"
    faults.write_text("")
    main = Stack(etcd_server.client_url, nats_server.url, "cancelpts")  # type: ignore[attr-defined]
    main.env["DYN_TEST_FAULT_POINTS"] = f"@{faults}"
    prefill = main.add_worker("reference", "prefill", "--kv-cache-blocks", "512", "--metrics-port", "0")
    decode = main.add_worker("reference", "decode", "--kv-cache-blocks", "512", "--metrics-port", "0")
    main.start_frontend("--router-mode", "kv", "--disagg-threshold", str(THRESHOLD))
    queued = Stack(etcd_server.client_url, nats_server.url, "cancelpts")  # type: ignore[attr-defined]
    queued.env = dict(main.env)
    queued.start_frontend("--router-mode", "kv", "--disagg-threshold", str(THRESHOLD), "--max-concurrency", "1")
    try:
        main.wait_ready(2)
        queued.wait_ready(2)
        ports = {"prefill": metrics_port(prefill.output), "decode": metrics_port(decode.output)}
        e = Env(main, queued, faults, prefill, decode, ports)
        # One request through each frontend first: tokenizers loaded, NIXL peers known, nothing cold.
        for st in (main, queued):
            _complete(st, _prompt(64, 0), 4)
        yield e
    finally:
        queued.stop()
        main.stop()
        if TIMES:
            print("\ntime to baseline after the hang-up (ms):",
                  json.dumps({k: round(v * 1e3, 1) for k, v in TIMES.items()}))


def _prompt(n: int, salt: int) -> list[int]:
    return [5 + (i * 37 + salt * 101) % 1900 for i in range(n)]


def _complete(st: Stack, prompt: list[int], max_tokens: int) -> dict[str, object]:
    req = urllib.request.Request(st.url + "/v1/completions", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        out: dict[str, object] = json.loads(r.read())
    return out


def _send(st: Stack, prompt: list[int], max_tokens: int = 2000) -> socket.socket:
    """A streaming completion on a raw socket (closing it is the client's disconnect)."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", st.port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def _hang_up(s: socket.socket) -> float:
    with_rst = socket.SO_LINGER
    s.setsockopt(socket.SOL_SOCKET, with_rst, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    return time.monotonic()


def _wait_hit(proc: Proc, point: str, before: int, timeout: float = 60.0, others: tuple[Proc, ...] = ()) -> None:
    line = f"fault point {point}: "
    deadline = time.monotonic() + timeout
    while proc.output().count(line) <= before:
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{p.output()[-2000:]}" for p in (proc, *others))
            raise AssertionError(f"{proc.name} never reached {point}:\n{logs}")
        time.sleep(0.01)


def _hits(proc: Proc, point: str) -> int:
    return proc.output().count(f"fault point {point}: ")


# point -> (process logging it, the fault spec, gauges that must be held while the request waits there)
CASES = {
    "frontend.routed": ("fe", "frontend.routed=pause", ("fe:dynamo_frontend_router_inflight_requests",)),
    "frontend.remote_prefill": ("fe", "frontend.remote_prefill=pause", ("prefill:dynamo_worker_kv_pins",)),
    "worker.remote_prefill": ("prefill", "worker.remote_prefill=pause",
                              ("prefill:dynamo_worker_kv_pins", "prefill:dynamo_worker_active_requests")),
    "worker.nixl_read": ("decode", "worker.nixl_read=pause",
                         ("decode:dynamo_worker_kv_blocks_in_use", "prefill:dynamo_worker_kv_pins")),
    "worker.decoding": ("decode", "worker.decoding=pause",
                        ("decode:dynamo_worker_kv_blocks_in_use", "decode:dynamo_worker_engine_requests")),
    "frontend.migrating": ("fe", "worker.decoding=fail,frontend.migrating=pause",
                           ("fe:dynamo_frontend_inflight_choices",)),
}


def _proc(env: Env, who: str) -> Proc:
    procs = {"fe": env.main.frontend, "prefill": env.prefill, "decode": env.decode}
    p = procs[who]
    assert p is not None
    return p


@pytest.mark.parametrize("point", list(CASES))
def test_hang_up_at_point_leaves_nothing_held(env: Env, point: str) -> None:
    who, spec, held = CASES[point]
    proc = _proc(env, who)
    base = env.idle()
    env.set_faults(spec)
    try:
        n = _hits(proc, point)
        s = _send(env.main, _prompt(100, list(CASES).index(point)))
        _wait_hit(proc, point, n, others=tuple(env.main.procs))
        # The request holds what this point is about (a pin arrives just after the frontend paused).
        deadline = time.monotonic() + DEADLINE
        while True:
            during = env.snapshot()
            if all(during[k] > base[k] for k in held) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert all(during[k] > base[k] for k in held), (point, {k: (base[k], during[k]) for k in held})
        t = _hang_up(s)
        TIMES[point] = env.wait_state(base, t, point)
    finally:
        env.set_faults("")
    after = env.snapshot()
    assert after["fe:disconnects"] == base["fe:disconnects"] + 1  # the frontend saw this client leave


def test_hang_up_while_tokenizing(env: Env) -> None:
    """Before the disconnect watcher exists: the request goes on after the pause and stops at its first wait."""
    base = env.idle()
    env.set_faults("frontend.tokenizing=delay:1.0")
    proc = _proc(env, "fe")
    try:
        n = _hits(proc, "frontend.tokenizing")
        s = _send(env.main, _prompt(100, 7))
        _wait_hit(proc, "frontend.tokenizing", n)
        t = _hang_up(s)
        # Nothing is held during the pause: wait for the frontend to see the client gone, after it.
        deadline = time.monotonic() + DEADLINE
        while env.snapshot()["fe:disconnects"] != base["fe:disconnects"] + 1:
            assert time.monotonic() < deadline, "the frontend never counted the disconnect"
            time.sleep(0.01)
        TIMES["frontend.tokenizing (incl. the rest of the 1 s pause)"] = env.wait_state(base, t, "tokenizing")
    finally:
        env.set_faults("")


def test_hang_up_in_the_admission_queue(env: Env) -> None:
    """--max-concurrency 1: request A holds the slot (paused while decoding), B waits in the queue; B leaves, then A."""
    fe = env.queued.frontend
    assert fe is not None
    base = env.idle()
    env.set_faults("frontend.queued=pause,worker.decoding=pause")
    try:
        n_dec = _hits(env.decode, "worker.decoding")
        a = _send(env.queued, _prompt(100, 11))
        _wait_hit(env.decode, "worker.decoding", n_dec)
        deadline = time.monotonic() + DEADLINE
        while env.snapshot()["fe-queued:dynamo_frontend_router_pending_prefill_blocks"] != 0:
            assert time.monotonic() < deadline, "A's first token never reached its frontend"
            time.sleep(0.01)  # A's first token reached the frontend: its router book entry is steady now
        with_a = env.snapshot()  # B's frontend's state with A alone (the engine runs on ahead with A)
        n_q = _hits(fe, "frontend.queued")
        b = _send(env.queued, _prompt(100, 12))
        _wait_hit(fe, "frontend.queued", n_q)
        assert env.snapshot()["fe-queued:dynamo_frontend_queued_requests"] == 1
        TIMES["frontend.queued"] = env.wait_state(with_a, _hang_up(b), "frontend.queued", prefix="fe-queued:")
        TIMES["worker.decoding (slot holder)"] = env.wait_state(base, _hang_up(a), "slot holder")
    finally:
        env.set_faults("")
    assert env.snapshot()["fe-queued:disconnects"] == base["fe-queued:disconnects"] + 2


def _client(st: Stack, prompt: list[int], max_tokens: int, hang_up_after: float | None, done: list[str]) -> None:
    s = _send(st, prompt, max_tokens)
    s.settimeout(60)
    end = None if hang_up_after is None else time.monotonic() + hang_up_after
    buf = b""
    try:
        while end is None or time.monotonic() < end:
            if end is not None:
                s.settimeout(max(0.001, end - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
            if b"data: [DONE]" in buf:
                done.append("done")
                return
        done.append("hung up")
    finally:
        _hang_up(s)


@pytest.mark.parametrize("seed", [20261207, 7])
def test_random_hang_ups_under_load_leave_nothing_held(env: Env, seed: int) -> None:
    """40 concurrent streaming requests of random prompt lengths (local and remote prefill) and lengths; most
    hang up at a random moment (seeded). Afterwards every gauge is back to the baseline, and the stack still
    answers a greedy request with the same text as before the storm."""
    env.set_faults("")
    rng = random.Random(seed)
    probe = _prompt(80, seed)
    before = _complete(env.main, probe, 16)["choices"]
    base = env.idle()
    outcomes: list[str] = []
    threads = []
    for i in range(40):
        st = env.main if i % 4 else env.queued
        n = rng.choice([rng.randint(4, THRESHOLD - 1), rng.randint(THRESHOLD, 300)])
        hang = None if rng.random() < 0.2 else rng.uniform(0.0, 1.0)
        max_tokens = rng.randint(1, 64) if hang is None else rng.randint(200, 1500)  # long enough to be cut
        th = threading.Thread(target=_client, args=(st, _prompt(n, 2000 + i), max_tokens, hang, outcomes))
        threads.append(th)
        th.start()
        time.sleep(rng.uniform(0.0, 0.05))
    for th in threads:
        th.join(120)
    t = time.monotonic()
    TIMES[f"random hang-ups, seed {seed} (after the last of 40)"] = env.wait_state(base, t, "random hang-ups")
    assert len(outcomes) == 40 and outcomes.count("hung up") >= 10, outcomes
    after = env.snapshot()
    assert after["fe:disconnects"] + after["fe-queued:disconnects"] > base["fe:disconnects"] + \
        base["fe-queued:disconnects"]
    assert _complete(env.main, probe, 16)["choices"] == before
