"""Test helper: real worker and frontend processes against the test session's etcd and NATS.

Each process is a :class:`dynamo_rt.local.harness.Child` (its own process group, stopped by PID, never by
name; killed if the test run dies) with its command line from :mod:`dynamo_rt.local.commands`. The
frontend's port is chosen up front; readiness is learned from ``/health`` counting the workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dynamo_rt.local import commands
from dynamo_rt.local.harness import Child, health_instances, stop_all, wait_http
from dynamo_rt.local.services import free_port
from tests.workermetrics import samples

ROOT = Path(__file__).resolve().parent.parent


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


class Proc(Child):
    """A role child (:class:`dynamo_rt.local.harness.Child`) run from the repository root, its output in a
    temporary log file that :meth:`stop` removes."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        fd, path = tempfile.mkstemp(prefix=f"dyn-{name}-", suffix=".log")
        os.close(fd)
        super().__init__(name, argv, env=env, cwd=ROOT, log=Path(path))

    def output(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        code = super().stop(timeout)
        assert self.log_path is not None
        self.log_path.unlink(missing_ok=True)
        return code


class Stack:
    """Workers + a frontend in namespace ``ns`` on the given etcd / NATS."""

    def __init__(self, etcd_url: str, nats_url: str, ns: str, *, model: str = "tiny") -> None:
        self.env = dict(os.environ)
        self.env.update({"DYN_ETCD_ENDPOINTS": etcd_url, "DYN_NATS_ENDPOINTS": nats_url, "DYN_NAMESPACE": ns,
                         "DYN_LOG": "info", "PYTHONUNBUFFERED": "1", "DYN_METRICS_PORT": "-1",
                         "DYN_KV_VERIFY_CHECKSUM": "1",  # every block a test's decode worker pulls is checked
                         "DYN_CANARY_INTERVAL": "0"})  # no health canary adds to the counters tests read exactly
        self.model = model
        self.workers: list[Proc] = []
        self.frontend: Proc | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_worker(self, engine: str = "mocker", mode: str = "agg", *extra: str) -> Proc:
        argv = commands.worker(engine, mode, self.model, graceful_timeout=2, extra=extra)
        p = Proc(f"{engine}-{mode}-{len(self.workers)}", argv, self.env)
        self.workers.append(p)
        return p

    def start_frontend(self, *extra: str) -> Proc:
        self.port = free_port()
        self.frontend = Proc("frontend", commands.frontend(self.port, extra=extra), self.env)
        return self.frontend

    @property
    def procs(self) -> list[Proc]:
        """Every process of the stack, workers first."""
        return [*self.workers, *([self.frontend] if self.frontend else [])]

    def get_json(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def metric(self, name: str) -> float:
        """Sum of a frontend metric's samples (all label values); 0 when it has none."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return samples(r.read().decode(), name)

    def wait_ready(self, n_instances: int = 1, timeout: float = 120.0) -> None:
        """Until the frontend's ``/health`` counts ``n_instances`` workers; fails at once, with its log, if a
        process exits first."""
        wait_http(self.url + "/health", self.procs, lambda status, body: health_instances(status, body) >= n_instances,
                  timeout)

    def stop(self) -> None:
        """Stop every process together (SIGTERM, then SIGKILL after 10 s) and remove their logs."""
        stop_all(self.procs)
        for p in self.procs:
            p.stop()  # already stopped: removes the log
