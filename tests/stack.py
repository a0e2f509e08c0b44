"""Test helper: real worker and frontend processes against the test session's etcd and NATS.

Each process runs in its own process group and is stopped by PID (never by name). The frontend's port is
chosen up front; readiness is learned from ``/v1/models`` listing the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def read_until_ready(proc: subprocess.Popen[str], timeout: float) -> tuple[str | None, list[str]]:
    """Read ``dynamo-rt up``'s output until its ``ready: ...`` line (returned stripped) or ``timeout``
    seconds, EOF included (then None); also every line read, for the failure message."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready: "):
            return line.strip(), lines
    return None, lines

class Proc:
    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"dyn-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(list(argv), env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


class Stack:
    """Workers + a frontend in namespace ``ns`` on the given etcd / NATS."""

    def __init__(self, etcd_url: str, nats_url: str, ns: str, *, model: str = "tiny") -> None:
        self.env = dict(os.environ)
        self.env.update({"DYN_ETCD_ENDPOINTS": etcd_url, "DYN_NATS_ENDPOINTS": nats_url, "DYN_NAMESPACE": ns,
                         "DYN_LOG": "info", "PYTHONUNBUFFERED": "1", "DYN_METRICS_PORT": "-1"})
        self.model = model
        self.workers: list[Proc] = []
        self.frontend: Proc | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_worker(self, engine: str = "mocker", mode: str = "agg", *extra: str) -> Proc:
        argv = [sys.executable, "-m", "workers", "--engine", engine, "--mode", mode, "--model", self.model,
                "--graceful-timeout", "2", *extra]
        p = Proc(f"{engine}-{mode}-{len(self.workers)}", argv, self.env)
        self.workers.append(p)
        return p

    def start_frontend(self, *extra: str) -> Proc:
        self.port = free_port()
        argv = [sys.executable, "-m", "frontend", "--http-host", "127.0.0.1", "--http-port", str(self.port),
                *extra]
        self.frontend = Proc("frontend", argv, self.env)
        return self.frontend

    def get_json(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def metric(self, name: str) -> float:
        """Sum of a frontend metric's samples (all label values); 0 when it has none."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_ready(self, n_instances: int = 1, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in [*self.workers, *([self.frontend] if self.frontend else [])]:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited ({p.proc.returncode}):\n{p.output()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                status, body = self.get_json("/health", 2)
                if status == 200:
                    models = body.get("models") or {}
                    if sum(int(m["instances"]) for m in models.values()) >= n_instances:  # type: ignore[union-attr]
                        return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in [*self.workers, self.frontend] if p)
        raise TimeoutError(f"stack not ready after {timeout}s\n{logs}")

    def stop(self) -> None:
        if self.frontend is not None:
            self.frontend.stop()
        for w in self.workers:
            w.stop()
