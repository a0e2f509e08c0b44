"""Restart policy of ``dynamo-rt up`` (:mod:`dynamo_rt.local.launcher`): a child that exits while the stack
runs is started again after a backoff, and the rest keeps serving.

Each supervised process (a role :class:`~dynamo_rt.local.harness.Child`, or the embedded etcd / nats-server
of :mod:`dynamo_rt.local.services`, restarted on the same ports and data) is a :class:`Supervised` with its
own :class:`Backoff`: the first restart waits ``first`` seconds, each next one twice as long up to ``cap``;
a process that then ran for ``stable`` seconds counts as healthy again (the delay starts over). More than
``limit`` crashes within ``window`` seconds is a crash loop: :meth:`Supervisor.poll` raises
:class:`GaveUp` and ``up`` stops the stack with that message instead of restarting forever.

The loop is polled (``up`` calls :meth:`Supervisor.poll` twice a second) and takes the clock as an
argument, so the policy is tested without processes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo_rt.errors import Unavailable

log = logging.getLogger("dynamo_rt.up")


class GaveUp(Unavailable):
    """A process crashed too often within the window: restarting it again would only hide the fault."""


@dataclass
class Backoff:
    """Delays between restarts of one process (see the module docstring)."""

    first: float = 0.5
    cap: float = 30.0
    stable: float = 60.0
    limit: int = 10
    window: float = 300.0
    _next: float = 0.0
    _started: float = 0.0
    _crashes: deque[float] = field(default_factory=deque)

    def started(self, now: float) -> None:
        self._started = now

    def crashed(self, now: float) -> float | None:
        """The delay before the next start, or None past ``limit`` crashes within ``window``."""
        if not self._next or now - self._started >= self.stable:
            self._next = self.first
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.window:
            self._crashes.popleft()
        if len(self._crashes) > self.limit:
            return None
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay


@dataclass
class Supervised:
    """One process ``up`` keeps running: how to tell it runs, its exit code, and how to start it again
    (``restart`` returns the new pid; it may raise, which counts as one more crash)."""

    name: str
    alive: Callable[[], bool]
    exit_code: Callable[[], int | None]
    restart: Callable[[], int | None]
    backoff: Backoff = field(default_factory=Backoff)
    restarts: int = 0
    due: float | None = None  # when the pending restart happens (None: running, or nothing pending)


class Supervisor:
    """Polls its processes and restarts the ones that exited (see the module docstring)."""

    def __init__(self) -> None:
        self.items: list[Supervised] = []

    def add(self, item: Supervised, now: float) -> Supervised:
        item.backoff.started(now)
        self.items.append(item)
        return item

    def poll(self, now: float) -> None:
        """Schedule a restart for every process seen exited, run the restarts that are due; :class:`GaveUp`
        on a crash loop."""
        for it in self.items:
            if it.due is None and not it.alive():
                self._schedule(it, now, f"{it.name} exited with code {it.exit_code()}")
            if it.due is not None and now >= it.due:
                it.due = None
                it.restarts += 1
                try:
                    pid = it.restart()
                except Exception as exc:  # a start that failed is one more crash, with its own backoff
                    self._schedule(it, now, f"{it.name} failed to restart ({exc})")
                    continue
                it.backoff.started(now)
                log.info("restarted %s (pid %s, restart %d)", it.name, pid, it.restarts)

    def _schedule(self, it: Supervised, now: float, what: str) -> None:
        delay = it.backoff.crashed(now)
        if delay is None:
            raise GaveUp(f"{what}: {it.backoff.limit} restarts within {it.backoff.window:g}s already; giving up "
                         "and stopping the stack")
        it.due = now + delay
        log.warning("%s; restarting in %.1fs (restart %d)", what, delay, it.restarts + 1)
