"""``dynamo-rt up`` supervises: under streamed load on the reference engine, each kind of child is killed in
turn (a worker, etcd, nats-server, the frontend; disaggregated: a prefill and a decode worker; with
``--planner``, the planner on mocker workers) and every stream is read to its end: each ends with a
finish_reason or an error event, then ``[DONE]``. The killed child is restarted (``up``'s log line, a new
pid, the worker registered again) and the stack serves afterwards. SIGTERM to ``up`` under load drains: a
new request gets 503 with the OpenAI error body, the streams in flight end within the drain timeout
(finished, or an error event + ``[DONE]``), then ``up`` exits 0.

The frontend is the one child whose death the client sees at the TCP level: the process that would write
``[DONE]`` is gone, so its streams end without one (a client retries; nothing server-side can do better).
For it the test asserts what ``up`` owes: the frontend is restarted on the same port and serves again.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from dynamo_rt.local.harness import get_json, health_instances
from tests.reliability.helpers import Outcome, assert_openai_error, chat_body, stream_chat, tally
from tests.stack import ROOT, free_port, read_until_ready

DRAIN = 3.0
STREAMS = 6
# Long enough (~1500 tokens) that every stream is under way when the child is killed, short enough that a
# migrated one finishes in seconds on a shared CPU.
TOKENS = 1500
LONG_PROMPT = " ".join(f"word{i}" for i in range(120))  # > the 64-token disagg threshold: remote prefill


class Up:
    """``dynamo-rt up`` as a child of the test (own process group), its output collected by a thread."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
        env.update(PYTHONUNBUFFERED="1", DYN_METRICS_PORT="0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_rt", "up", "--http-port", str(self.port), "--state-dir",
             str(tmp / "state"), "--drain-timeout", f"{DRAIN:g}", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        ready, self.lines = read_until_ready(self.proc, 180)
        assert ready is not None, "".join(self.lines)[-4000:]
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def pid(self, name: str) -> int:
        """The pid of ``name``'s current process, from up's "started" / "restarted" lines."""
        pids = re.findall(rf"(?:started|restarted) {re.escape(name)} \(pid (\d+)", self.text())
        assert pids, f"no pid of {name} in up's output"
        return int(pids[-1])

    def wait_for(self, what: Callable[[], object], timeout: float = 60.0, why: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, f"up exited ({self.proc.returncode}):\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"not {why} after {timeout:.0f}s:\n{self.text()[-4000:]}"
            time.sleep(0.2)

    def instances(self) -> int:
        return health_instances(*get_json(self.url + "/health"))

    def stop(self) -> None:
        """SIGTERM (up stops its children, the planner its workers), SIGKILL to the group after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def agg(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path, "--engine", "reference", "--workers", "2")
    try:
        up.wait_for(lambda: up.instances() == 2, why="2 workers registered")
        yield up
    finally:
        up.stop()


async def _load_and(url: str, action: Callable[[], None], prompt: str = "Tell me a story", n: int = STREAMS,
                    tokens: int = TOKENS) -> list[Outcome]:
    """``n`` greedy streams; ``action`` once every one is under way (the frontend counts them in flight);
    every stream read to its end."""
    async with httpx.AsyncClient(timeout=120) as c:
        tasks = [asyncio.create_task(stream_chat(c, url, chat_body(f"{prompt} {i}", tokens), timeout=120))
                 for i in range(n)]
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(_inflight, url) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # tokens are flowing on every stream
        action()
        return list(await asyncio.gather(*tasks))


def _inflight(url: str) -> float:
    from tests.workermetrics import samples

    try:
        with httpx.Client(timeout=5) as c:
            return samples(c.get(url + "/metrics").text, "dynamo_frontend_inflight_requests")
    except httpx.HTTPError:
        return 0.0


def _assert_every_stream_ends(outs: list[Outcome]) -> None:
    """A finish_reason (and usage), or an OpenAI error event; ``[DONE]`` in both cases."""
    for o in outs:
        assert o.status == 200 and o.done and (o.completed or o.error is not None), tally(outs)


def _kill(pid: int) -> Callable[[], None]:
    return lambda: os.kill(pid, signal.SIGKILL)


def _serves(up: Up, prompt: str = "hello again") -> None:
    body = chat_body(prompt, 16, stream=False)
    r = httpx.post(up.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 16


def _restarted(up: Up, name: str, old: int, restarts: int = 1) -> None:
    up.wait_for(lambda: re.search(rf"{re.escape(name)} exited with code -9; restarting in [0-9.]+s "
                                  rf"\(restart {restarts}\)", up.text()), why=f"{name}'s exit logged")
    up.wait_for(lambda: f"restarted {name} (pid " in up.text(), why=f"{name} restarted")
    assert up.pid(name) != old


def test_up_restarts_each_child_and_every_stream_ends(agg: Up) -> None:
    up = agg
    registered = up.text().count("worker ready:")
    for victim in ("worker-0", "etcd", "nats"):
        old = up.pid(victim)
        outs = asyncio.run(_load_and(up.url, _kill(old)))
        print(victim, tally(outs))
        _assert_every_stream_ends(outs)
        _restarted(up, victim, old)
        if victim == "worker-0":  # a fresh registration: a new "ready" line and two instances again
            up.wait_for(lambda: up.text().count("worker ready:") > registered, why="worker-0 registered again")
            # Killed mid-stream, greedy: the worker-0 streams moved to worker-1 and finished there.
            assert all(o.completed for o in outs), tally(outs)
        up.wait_for(lambda: up.instances() == 2, why="2 workers registered")
        _serves(up, f"after {victim}")

    # The frontend: its own streams are cut (TCP); up restarts it on the same port and it serves again.
    old = up.pid("frontend")
    outs = asyncio.run(_load_and(up.url, _kill(old)))
    assert all(not o.done for o in outs), tally(outs)
    _restarted(up, "frontend", old)
    up.wait_for(lambda: up.instances() == 2, why="the new frontend sees both workers")
    _serves(up, "after the frontend")


def test_sigterm_drains_streams_then_stops(agg: Up) -> None:
    up = agg
    answers: list[httpx.Response] = []

    def sigterm_then_post() -> None:
        t_signal.append(time.monotonic())
        up.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the frontend has the signal and refuses new requests
            r = httpx.post(up.url + "/v1/chat/completions", json=chat_body("late", 4, stream=False), timeout=10)
            if r.status_code == 503:
                answers.append(r)
                return
            time.sleep(0.05)

    t_signal: list[float] = []
    # 3000 tokens do not finish within the 3 s drain here: those streams are ended by the drain.
    outs = asyncio.run(_load_and(up.url, sigterm_then_post, tokens=3000))
    took = time.monotonic() - t_signal[0]
    _assert_every_stream_ends(outs)
    assert answers, "no request was answered 503 while draining"
    err = assert_openai_error(answers[0].json())
    assert err["code"] == "unavailable" and "shutting down" in err["message"], err
    stopped = [o for o in outs if o.error is not None]
    assert stopped, "no stream was still running at the drain timeout: make them longer"
    assert all("shutting down" in str(o.error["message"]) for o in stopped), tally(outs)
    assert all(o.latency < 120 for o in outs)
    assert took < DRAIN + 5, f"the streams ended {took:.1f}s after SIGTERM (drain timeout {DRAIN:g}s)"
    assert up.proc.wait(30) == 0, up.text()[-3000:]
    assert "drained:" in up.text()


def test_up_disagg_restarts_prefill_and_decode(tmp_path: Path) -> None:
    up = Up(tmp_path, "--engine", "reference", "--disagg", "--prefill-workers", "1", "--decode-workers", "2")
    try:
        up.wait_for(lambda: up.instances() == 3, why="3 workers registered")
        for victim in ("prefill-0", "decode-0"):
            old = up.pid(victim)
            outs = asyncio.run(_load_and(up.url, _kill(old), prompt=LONG_PROMPT))
            print(victim, tally(outs))
            _assert_every_stream_ends(outs)
            _restarted(up, victim, old)
            up.wait_for(lambda: up.instances() == 3, why="3 workers registered")
            _serves(up, f"{LONG_PROMPT} after {victim}")
    finally:
        up.stop()



def test_up_restarts_the_planner_and_its_workers(tmp_path: Path) -> None:
    """``--planner`` (mocker workers, the planner's own children): SIGKILL the planner under load. Its workers
    get their parent-death SIGTERM and drain; every stream ends; up restarts the planner, whose new worker
    registers, and the stack serves again."""
    up = Up(tmp_path, "--engine", "mocker", "--planner", "--", "--speedup", "1")
    try:
        up.wait_for(lambda: up.instances() == 1, why="the planner's worker registered")
        old = up.pid("planner")
        outs = asyncio.run(_load_and(up.url, _kill(old), tokens=400))
        print("planner", tally(outs))
        _assert_every_stream_ends(outs)
        _restarted(up, "planner", old)
        up.wait_for(lambda: up.text().count("worker ready:") >= 2, why="the new planner's worker registered")
        _serves(up, "after the planner")
    finally:
        up.stop()
