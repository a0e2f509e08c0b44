"""``dynamo-rt up`` end to end: ready line, a chat request, one SIGINT, no process left behind; the same with
``--planner`` (the planner starts the workers and takes them down with it); and ``make up``'s own default,
``up --disagg`` with the reference engine, where the request's KV must cross over NIXL (the workers' counters
say so)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.stack import ROOT, free_port, read_until_ready
from tests.workermetrics import kv_counts, metrics_port, wait_kv


def _procs_mentioning(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (our unique state dir): how we check nothing is left."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(d.name))
    return out


def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state-up"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_rt", "up", "--engine", "mocker", "--http-port", str(port),
         "--state-dir", str(state), "--", "--speedup", "10"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        ready, lines = read_until_ready(proc, 120)
        assert ready == f"ready: http://127.0.0.1:{port} (model {_tiny_name()})", "".join(lines)[-3000:]
        took = time.monotonic() - t0
        print(f"dynamo-rt up: ready in {took:.1f}s")
        # Both embedded services and all roles are running now, each child in its own process group.
        assert len(_procs_mentioning(str(state))) >= 2
        kids = _children(proc.pid)
        assert len(kids) == 4 and all(os.getpgid(k) == k for k in kids), kids  # etcd, nats, worker, frontend

        out = _post(port, "/v1/chat/completions",
                    {"model": _tiny_name(), "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8})
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 8

        # One Ctrl-C: the terminal sends SIGINT to the whole foreground process group.
        t_stop = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=15)
        stop_took = time.monotonic() - t_stop
        assert proc.returncode == 0, rest[-3000:]
        assert stop_took < 10.0, f"stopping took {stop_took:.1f}s"
        time.sleep(0.2)
        _assert_group_and_services_gone(proc, state)
        assert [k for k in kids if _running(k)] == [], "children left running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_group_and_services_gone(proc: subprocess.Popen[str], state: Path) -> None:
    try:
        os.killpg(proc.pid, 0)
        raise AssertionError("processes of the stack's process group are still alive")
    except ProcessLookupError:
        pass
    assert _procs_mentioning(str(state)) == [], "embedded etcd / nats-server left running"


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc/*/stat)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(d.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_up_planner_starts_and_stops_the_workers(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state-up-planner"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_rt", "up", "--engine", "mocker", "--disagg", "--planner", "--http-port",
         str(port), "--state-dir", str(state), "--planner-args", "--adjustment-interval 2", "--",
         "--speedup", "10"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    workers: list[int] = []
    try:
        ready, lines = read_until_ready(proc, 150)
        assert ready == f"ready: http://127.0.0.1:{port} (model {_tiny_name()})", "".join(lines)[-3000:]

        # up's children: the planner (no worker of its own) and the frontend; the planner's: its workers.
        kids = {pid: _cmdline(pid) for pid in _children(proc.pid)}
        planners = [pid for pid, cmd in kids.items() if " -m dynamo_rt planner --connector local " in cmd]
        assert len(planners) == 1, kids
        assert not any(" -m workers " in cmd for cmd in kids.values()), kids
        planner_cmd = kids[planners[0]]
        assert "--mode disagg" in planner_cmd and "--min-prefill 1 --min-decode 1" in planner_cmd
        assert "--engine-speedup 10" in planner_cmd and "--adjustment-interval 2" in planner_cmd
        assert any("--worker-wait-timeout 120" in cmd for cmd in kids.values())  # the frontend parks requests
        workers = _children(planners[0])
        modes = sorted(_cmdline(w).split("--mode ")[1].split()[0] for w in workers)
        assert modes == ["decode", "prefill"]  # the minimum: one of each

        out = _post(port, "/v1/completions",
                    {"model": _tiny_name(), "prompt": "hello there", "max_tokens": 5, "ignore_eos": True})
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 5
        assert _running(planners[0]) and all(_running(w) for w in workers)

        # One Ctrl-C: up gets it and stops its children (each its own process group); the planner stops its
        # workers (their own groups too) before it exits, and up waits for it.
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest[-3000:]
        deadline = time.monotonic() + 10
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w for w in workers if _running(w)] == [], "workers left running"
        assert [k for k in kids if _running(k)] == [], "children left running"
        _assert_group_and_services_gone(proc, state)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for w in workers:
            if _running(w):
                os.killpg(w, signal.SIGKILL)


def _tiny_name() -> str:
    return "dynamo-tiny"


def _post(port: int, path: str, payload: dict[str, object]) -> dict[str, Any]:
    """POST a JSON body to the local frontend; the decoded JSON answer."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def test_up_disagg_reference_hands_the_kv_over_nixl(tmp_path: Path) -> None:
    """``make up``'s default (``up --disagg``, reference engine): a chat request long enough to be prefilled on
    the prefill worker (past the frontend's default 64-token threshold) answers 200 with text, and the decode
    worker's /metrics count exactly one NIXL pull (its blocks checked against the prefill worker's CRC-32s) and
    no fallback; the prefill worker counts the pin released."""
    port = free_port()
    state = tmp_path / "state-up-disagg"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env.update(PYTHONUNBUFFERED="1", DYN_KV_VERIFY_CHECKSUM="1", DYN_CANARY_INTERVAL="0")  # counts exactly
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_rt", "up", "--disagg", "--http-port", str(port), "--state-dir", str(state)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        ready, lines = read_until_ready(proc, 240)
        assert ready == f"ready: http://127.0.0.1:{port} (model {_tiny_name()})", "".join(lines)[-3000:]
        kids = {pid: _cmdline(pid) for pid in _children(proc.pid)}
        modes = sorted(c.split("--mode ")[1].split()[0] for c in kids.values() if " -m workers " in c)
        assert modes == ["decode", "prefill"] and all("--engine reference" in c for c in kids.values()
                                                      if " -m workers " in c), kids
        # The rest of up's output (its children's logs) is read on: each worker's ready line names its port.
        out = _Tail(proc, lines)
        pre = metrics_port(lambda: out.text("worker[reference/prefill]"))
        dec = metrics_port(lambda: out.text("worker[reference/decode]"))
        before = kv_counts(dec)
        assert (before.pulls, before.fallbacks) == (0, 0), before

        words = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat".split()
        content = " ".join(words[i % len(words)] for i in range(120))
        status, body = _post_status(port, "/v1/chat/completions", {
            "model": _tiny_name(), "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        msg = body["choices"][0]["message"]["content"]
        assert isinstance(msg, str) and msg.strip(), body
        assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] >= 64, body

        c = kv_counts(dec)
        assert (c.pulls, c.failures, c.fallbacks, c.pull_timings) == (1, 0, 0, 1), c
        assert c.pulled_bytes > 0
        p = wait_kv(pre, lambda c: c.pins_released >= 1)
        assert (p.pins_released, p.pins_expired, p.pulls) == (1, 0, 0), p

        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.returncode == 0, out.text("")[-3000:]
        time.sleep(0.2)
        _assert_group_and_services_gone(proc, state)
        assert [k for k in kids if _running(k)] == [], "children left running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class _Tail:
    """Keeps reading a process's output in a thread, after the lines already read."""

    def __init__(self, proc: subprocess.Popen[str], lines: list[str]) -> None:
        self.lines = list(lines)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.lines.append(line)

    def text(self, containing: str) -> str:
        """Every line read so far that contains ``containing``."""
        with self._lock:
            return "".join(line for line in self.lines if containing in line)


def _post_status(port: int, path: str, payload: dict[str, object]) -> tuple[int, dict[str, Any]]:
    """POST a JSON body to the local frontend: the status and the decoded JSON answer (errors included)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
