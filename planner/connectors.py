"""Connectors: how a planner decision becomes running replicas.

- ``dry-run`` (:class:`DryRunConnector`): logs each decision and remembers the numbers; changes nothing.
- ``local`` (:class:`LocalConnector`): starts and stops worker processes on this machine
  (``python -m workers --engine E --mode prefill|decode|agg ...``, each a
  :class:`dynamo_rt.local.harness.Child`); what ``dynamo-rt up --planner`` uses.
- ``rbg`` (:class:`planner.rbg.RbgConnector`): the replicas of a RoleBasedGroup's roles on
  Kubernetes.

Every connector has ``current()`` (replicas per pool as the connector last set or found them) and
``apply(target)``; both are coroutines, so a slow API server never blocks the planner's clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dynamo_rt.errors import Unavailable
from dynamo_rt.local import commands
from dynamo_rt.local.harness import DRAIN, Child
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


@dataclass(eq=False)
class LocalWorker:
    pool: str
    child: Child
    started: float
    stop_sent: float | None = None  # when SIGTERM went out (the worker leaves discovery, then drains)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    @property
    def pid(self) -> int:
        return self.child.pid

    def alive(self) -> bool:
        return self.child.alive()


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
        return commands.worker(self.engine, POOL_MODE[pool], self.model, served_model_name=self.served_model_name,
                               graceful_timeout=self.graceful_timeout, extra=self.extra_args, python=self.python)


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

    @staticmethod
    def _signal(w: LocalWorker, sig: int) -> None:
        w.child.signal(sig)

    def _start(self, pool: str) -> LocalWorker:
        log_file = None
        if self.spec.log_dir is not None:
            self._seq += 1
            log_file = self.spec.log_dir / f"{pool}-{self._seq}.log"
        try:
            # A worker drains on SIGTERM, also when the planner dies without stopping it.
            child = Child(f"{pool}-worker", self.spec.command(pool), env=self.spec.env, log=log_file,
                          death_signal=DRAIN)
        except OSError as exc:
            raise Unavailable(f"cannot start a {pool} worker: {exc}") from None
        w = LocalWorker(pool, child, time.monotonic())
        self.workers.append(w)
        self.started_total += 1
        log.info("started %s worker pid %d", pool, child.pid)
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
