"""The one process harness: how every role and service child is started, watched and stopped.

Used by ``dynamo-rt up`` (:mod:`dynamo_rt.local.launcher`), the embedded etcd / nats-server
(:mod:`dynamo_rt.local.services`), the planner's local connector and the profiler's own stack, and by
tests/stack.py and the benches. A :class:`Child` is one process:

- in its own process group (``start_new_session``): a stop signals the group, so the grandchildren a role
  starts (an engine's helper processes) go with it, and our own group is never hit;
- with a parent-death signal (``PR_SET_PDEATHSIG``): if we die without stopping it, the kernel signals it.
  The signal fires when the *thread* that forked the child exits, not the process, so children started from
  any thread but the main one are forked by one long-lived spawner thread (a child started from an
  ``asyncio.to_thread`` worker would otherwise die when ``asyncio.run`` shuts that pool down);
- with its output in a log file (or our own stdout / stderr when no file is given);
- stopped by :meth:`Child.stop`: SIGTERM to the group, a bounded wait, then SIGKILL to the group.

Which parent-death signal (``death_signal``; one default, :data:`DEATH_SIGNAL`):

- SIGKILL (the default) for servers and for test and bench children: the parent is gone, nobody waits for a
  drain, and a child that hangs on SIGTERM must not outlive it;
- SIGTERM (:data:`DRAIN`) for the roles of a serving stack (``dynamo-rt up``'s children, the planner's
  workers): they leave discovery and finish their streams, and a planner stops its own workers first.

A :class:`Stack` is several children started together: :meth:`Stack.wait_http` polls a URL until it says
ready and fails fast (:class:`ChildExited`: the child's name, exit code and log tail) when any child exits
first; :meth:`Stack.restart` starts an exited one again in its place (``dynamo-rt up``'s supervision,
:mod:`dynamo_rt.local.supervise`); :meth:`Stack.stop` stops them all under one deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from dynamo_rt.errors import Unavailable

T = TypeVar("T")

DEATH_SIGNAL = signal.SIGKILL  # servers, tests, benches: nothing to drain once the parent is gone
DRAIN = signal.SIGTERM  # roles of a serving stack: leave discovery, finish streams, stop own workers
STOP_TIMEOUT = 10.0


class ChildExited(Unavailable):
    """A child exited while it was expected to run (before its stack was ready)."""

    def __init__(self, name: str, code: int | None, tail: str) -> None:
        super().__init__(f"{name} exited with code {code} before it was ready" + (f":\n{tail}" if tail else ""))
        self.name, self.exit_code, self.tail = name, code, tail


class NotReady(Unavailable):
    """A stack did not become ready in time (its children's log tails are in the message)."""


# --------------------------------------------------------------------------------------------- spawning

_PR_SET_PDEATHSIG = 1
_prctl: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved now: nothing to load after fork


def _die_with(sig: int, parent: int) -> Callable[[], None]:
    """The ``preexec_fn`` of a child: a prctl() call and a getppid(), safe between fork and exec."""

    def in_child() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl(): the signal would never come
            os.kill(os.getpid(), sig)

    return in_child


class _Spawner:
    """Forks on behalf of threads that may end before their children (see the module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is threading.main_thread():
            return fn()
        with self._lock:
            if self._thread is None:
                # A daemon thread lives until the process exits, and so do the parent-death signals it holds.
                self._thread = threading.Thread(target=self._serve, name="dyn-spawn", daemon=True)
                self._thread.start()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut.result()

    def _serve(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                fut.set_exception(exc)


_spawner = _Spawner()


def read_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    if path is None:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """One child process (see the module docstring); it is running once the constructor returns.

    ``log``: a file its stdout and stderr are appended to, after a header line with the time and command;
    None: they go to our own stdout / stderr. ``death_signal``: what it gets if we die without stopping it.
    """

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, log: Path | None = None,
                 death_signal: int = DEATH_SIGNAL) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log
        self.death_signal = death_signal
        self._spawn_kw: dict[str, Any] = {"env": env, "cwd": cwd, "log": log, "death_signal": death_signal}
        out: Any = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = log.open("ab")
            out.write(f"\n=== {time.strftime('%F %T')} {' '.join(self.argv)}\n".encode())
            out.flush()
        try:
            self.proc: subprocess.Popen[bytes] = _spawner.run(lambda: subprocess.Popen(
                self.argv, env=None if env is None else dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT if out is not None else None, close_fds=True,
                start_new_session=True, preexec_fn=_die_with(int(death_signal), os.getpid())))
        finally:
            if out is not None:
                out.close()  # the child holds its own copy

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group (a no-op once the group is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the group, wait up to ``timeout`` seconds, then SIGKILL the group; the exit code."""
        running = self.alive()
        if running:
            self.signal(signal.SIGTERM)
        return self._finish(time.monotonic() + timeout, running)

    def kill(self) -> int:
        """SIGKILL the group at once (a crash, as far as the child can tell); the exit code."""
        if self.alive():
            self.signal(signal.SIGKILL)
        return self.proc.wait()

    def _finish(self, deadline: float, running: bool) -> int:
        if running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(max(0.0, deadline - time.monotonic()))
            # Also after a clean exit: a grandchild that ignored SIGTERM would be left behind. Only for a child
            # seen running at the stop: the group id of one long gone may name someone else's group by now.
            self.signal(signal.SIGKILL)
        return self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        return read_tail(self.log_path, lines)

    def respawn(self) -> Child:
        """A new child with the same name, command line, environment and log (this one must have exited)."""
        return Child(self.name, self.argv, **self._spawn_kw)

    def __repr__(self) -> str:
        return f"Child({self.name}, pid {self.proc.pid}, code {self.proc.poll()})"


# --------------------------------------------------------------------------------------------- waiting


def first_exited(children: Sequence[Child]) -> Child | None:
    return next((c for c in children if not c.alive()), None)


def wait_until(ready: Callable[[], T | None], children: Sequence[Child], timeout: float, what: str = "ready",
               interval: float = 0.2) -> T:
    """Poll ``ready()`` until it returns something true (returned); raise :class:`ChildExited` as soon as
    one of ``children`` exits, :class:`NotReady` after ``timeout`` seconds. Polls start at 5 ms and back
    off to ``interval``, so a fast child is seen at once."""
    t0 = time.monotonic()
    delay = 0.005
    while True:
        dead = first_exited(children)
        if dead is not None:
            raise ChildExited(dead.name, dead.returncode, dead.log_tail())
        got = ready()
        if got:
            return got
        if time.monotonic() - t0 > timeout:
            tails = "".join(f"\n--- {c.name}\n{c.log_tail(20)}" for c in children if c.log_path is not None)
            raise NotReady(f"not {what} after {timeout:.0f}s{tails}")
        time.sleep(delay)
        delay = min(delay * 1.5, interval)


def get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, decoded JSON body) of a GET; (0, None) while nothing answers; the body is None if not JSON."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (OSError, ValueError):  # not listening yet, reset, a bad URL
        return 0, None
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, None


def wait_http(url: str, children: Sequence[Child], ready: Callable[[int, Any], T | None], timeout: float,
              what: str | None = None) -> T:
    """Poll ``GET url`` until ``ready(status, json_body)`` returns something true (returned), failing fast
    when a child exits (see :func:`wait_until`)."""
    def check() -> T | None:
        status, body = get_json(url)
        try:
            return ready(status, body)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # a body of another shape
            return None

    return wait_until(check, children, timeout, what or f"ready at {url}")


def health_instances(status: int, body: Any) -> int:
    """Worker instances our frontend's ``/health`` counts, over all models (0 unless it answers 200)."""
    if status != 200 or not isinstance(body, dict):
        return 0
    return sum(int(m.get("instances", 0)) for m in (body.get("models") or {}).values())


def stop_all(children: Sequence[Child], timeout: float = STOP_TIMEOUT) -> None:
    """Stop every child under one deadline: SIGTERM to every group (newest first), wait, SIGKILL the rest."""
    running = [c for c in reversed(children) if c.alive()]
    for c in running:
        c.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in reversed(children):
        c._finish(deadline, c in running)


class Stack:
    """Children started together, waited for together, stopped together (a context manager)."""

    def __init__(self, *, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.children: list[Child] = []
        self.stop_timeout = stop_timeout

    def start(self, name: str, argv: Sequence[str], **kw: Any) -> Child:
        """Start a child (keywords as :class:`Child`) and add it to the stack."""
        return self.add(Child(name, argv, **kw))

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def restart(self, child: Child) -> Child:
        """Start an exited ``child`` again (:meth:`Child.respawn`), in its place in the stack."""
        new = child.respawn()
        self.children[self.children.index(child)] = new
        return new

    def exited(self) -> Child | None:
        """The first child that is no longer running, if any."""
        return first_exited(self.children)

    def wait_http(self, url: str, ready: Callable[[int, Any], T | None], timeout: float) -> T:
        return wait_http(url, self.children, ready, timeout)

    def stop(self, timeout: float | None = None) -> None:
        stop_all(self.children, self.stop_timeout if timeout is None else timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
