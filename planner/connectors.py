"""Connectors: how a planner decision becomes running replicas.

- ``dry-run`` (:class:`DryRunConnector`): logs each decision and remembers the numbers; changes nothing.
- ``local`` (:class:`LocalConnector`): starts and stops worker processes on this machine
  (``python -m workers --engine E --mode prefill|decode|agg ...``); what ``dynamo-rt up --planner`` uses.
- ``rbg`` (:class:`planner.rbg.RbgConnector`): the replicas of a RoleBasedGroup's roles on
  Kubernetes.

Every connector has ``current()`` (replicas per pool as the connector last set or found them) and
``apply(target)``; both are coroutines, so a slow API server never blocks the planner's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from dynamo_rt.errors import Unavailable
from planner.core import AGG, DECODE, PREFILL, Replicas

log = logging.getLogger(__name__)

POOL_MODE = {PREFILL: "prefill", DECODE: "decode", AGG: "agg"}


class Connector(Protocol):
    name: str

    async def current(self) -> Replicas: ...

    async def apply(self, target: Mapping[str, int]) -> None: ...

    async def close(self) -> None: ...


class DryRunConnector:
    """Logs what it would do; ``current()`` is what it was last told."""

    name = "dry-run"

    def __init__(self, initial: Mapping[str, int]) -> None:
        self.replicas: Replicas = dict(initial)
        self.history: list[tuple[float, Replicas]] = []

    async def current(self) -> Replicas:
        return dict(self.replicas)

    async def apply(self, target: Mapping[str, int]) -> None:
        log.info("dry-run: would scale %s -> %s", self.replicas, dict(target))
        self.replicas.update(target)
        self.history.append((time.monotonic(), dict(self.replicas)))

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------
# local


def _die_with_parent() -> None:  # between fork and exec: one prctl call
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: drain, then go


@dataclass(eq=False)
class LocalWorker:
    pool: str
    proc: subprocess.Popen[bytes]
    started: float
    log_file: IO[bytes] | None = None
    stop_sent: float | None = None  # when SIGTERM went out (the worker leaves discovery, then drains)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalWorkerSpec:
    """How to start one worker of each pool."""

    engine: str = "mocker"
    model: str = "tiny"
    served_model_name: str | None = None
    extra_args: Sequence[str] = ()
    graceful_timeout: float = 30.0
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Path | None = None  # None: workers write to our stdout / stderr
    python: str = sys.executable

    def command(self, pool: str) -> list[str]:
        argv = [self.python, "-m", "workers", "--engine", self.engine, "--mode", POOL_MODE[pool],
                "--model", self.model, "--graceful-timeout", f"{self.graceful_timeout:g}"]
        if self.served_model_name:
            argv += ["--served-model-name", self.served_model_name]
        return [*argv, *self.extra_args]


class LocalConnector:
    """Worker processes on this machine, one per replica.

    Scaling out starts processes; scaling in sends SIGTERM to the newest ones, and each leaves discovery
    and finishes its in-flight requests before it exits (killed after ``graceful_timeout`` + 10 s). A
    worker that dies on its own is dropped from the count, so the next decision replaces it.
    """

    name = "local"

    def __init__(self, spec: LocalWorkerSpec, pools: Sequence[str]) -> None:
        self.spec = spec
        self.pools = tuple(pools)
        self.workers: list[LocalWorker] = []  # running, oldest first
        self.stopping: list[LocalWorker] = []
        self.started_total = 0
        self.exits: list[tuple[str, int, int | None]] = []  # (pool, pid, exit code) of each finished worker
        self._seq = 0

    def _reap(self) -> None:
        now = time.monotonic()
        for w in list(self.workers):
            if not w.alive():
                self.workers.remove(w)
                self._exited(w)
                log.warning("%s worker pid %d exited on its own (code %s)", w.pool, w.pid, w.proc.returncode)
        for w in list(self.stopping):
            if not w.alive():
                self.stopping.remove(w)
                self._exited(w)
            elif w.stop_sent is not None and now - w.stop_sent > self.spec.graceful_timeout + 10:
                log.warning("%s worker pid %d did not stop in time; killing it", w.pool, w.pid)
                self._signal(w, signal.SIGKILL)

    def _exited(self, w: LocalWorker) -> None:
        self.exits.append((w.pool, w.pid, w.proc.returncode))
        if w.log_file is not None:
            w.log_file.close()

    @staticmethod
    def _signal(w: LocalWorker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.pid, sig)

    def _start(self, pool: str) -> LocalWorker:
        argv = self.spec.command(pool)
        out: IO[bytes] | None = None
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            out = open(self.spec.log_dir / f"{pool}-{self._seq}.log", "ab")  # closed when the worker exits
        try:
            proc = subprocess.Popen(argv, env=dict(self.spec.env), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if out is not None else None,
                                    start_new_session=True, preexec_fn=_die_with_parent, close_fds=True)
        except OSError as exc:
            if out is not None:
                out.close()
            raise Unavailable(f"cannot start a {pool} worker: {exc}") from None
        w = LocalWorker(pool, proc, time.monotonic(), out)
        self.workers.append(w)
        self.started_total += 1
        log.info("started %s worker pid %d", pool, proc.pid)
        return w

    def _stop(self, w: LocalWorker) -> None:
        self.workers.remove(w)
        w.stop_sent = time.monotonic()
        self._signal(w, signal.SIGTERM)
        self.stopping.append(w)
        log.info("stopping %s worker pid %d (it drains its requests first)", w.pool, w.pid)

    def counts(self) -> Replicas:
        self._reap()
        return {p: sum(1 for w in self.workers if w.pool == p) for p in self.pools}

    async def current(self) -> Replicas:
        return self.counts()

    async def apply(self, target: Mapping[str, int]) -> None:
        now = self.counts()
        for pool in self.pools:
            want = int(target.get(pool, now[pool]))
            mine = [w for w in self.workers if w.pool == pool]
            for _ in range(want - len(mine)):
                self._start(pool)
            for w in reversed(mine[want:] if want < len(mine) else []):
                self._stop(w)

    async def wait_stopped(self, timeout: float) -> bool:
        """Wait until every stopping worker has exited (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            if not self.stopping:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for w in list(self.workers):
            self._stop(w)
        if not await self.wait_stopped(self.spec.graceful_timeout + 5):
            for w in self.stopping:
                self._signal(w, signal.SIGKILL)
            await self.wait_stopped(5)
