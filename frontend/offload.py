"""Long request preparation (render, tokenize) off the event loop, at a lower CPU priority than the loop.

A ~32k-token prompt costs the frontend 20-45 ms of tokenizer work when it is new and ~1 ms of Python when its
pieces are cached (frontend/preprocess.py). On the event loop that would stall every stream in flight, so a
request with a body over ``OFFLOAD_BODY_BYTES`` is prepared on one of these threads. Two things keep those
threads from stalling the loop anyway, both measured with a loop-lag probe while 100 long prompts arrive at
once on a 2-core box (bench/frontend_overhead.py's long phase):

- **few threads**: asyncio's default executor has ``cpu_count + 4`` threads. Six threads holding the GIL in
  turn (the cached-pieces path is Python) make the loop wait for it; six tokenizing without it take six CFS
  shares of the CPU against the loop's one. The pool here has one thread less than the CPUs the process may
  use (at least 1, at most 4) unless ``--prepare-threads`` says otherwise: the loop keeps a core's worth.
- **niced threads** (``--prepare-nice``, default 10): Linux gives each thread its own nice value, so the loop
  thread (nice 0) wins the CPU whenever it has a token to send; preparation gets what is left, which on an
  idle frontend is all of it (a lone long prompt is not slowed down).

Loop lag measured (max per run, same load): 143 ms with the default executor, 55 ms with one niced thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from dynamo_rt.cpus import usable_cpus

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

DEFAULT_NICE = 10


def _nice_this_thread(nice: int) -> int | None:
    """Add ``nice`` to the calling thread's nice value (Linux: PRIO_PROCESS with a thread id sets that thread's
    only); its native id, or None when ``nice`` is 0 or the system refuses (not Linux, a seccomp profile)."""
    if nice <= 0:
        return None
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (OSError, AttributeError) as exc:
        log.warning("thread %d keeps its priority: %s", tid, exc)
        return None
    return tid


def default_threads() -> int:
    return max(1, min(4, usable_cpus() - 1))


class Offload:
    """A small pool of niced threads for CPU work that must not run on the event loop."""

    def __init__(self, threads: int = 0, nice: int = DEFAULT_NICE) -> None:
        self.threads = threads if threads > 0 else default_threads()
        self.nice = nice
        self.niced: list[int] = []  # native ids of the threads whose nice value was raised (tests read it)
        self._pool = ThreadPoolExecutor(self.threads, "prepare", initializer=self._init_thread)

    def _init_thread(self) -> None:
        tid = _nice_this_thread(self.nice)
        if tid is not None:
            self.niced.append(tid)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# The process's tokenizer threads: one long new prompt piece is tokenized in chunks side by side (the tokenizer
# releases the GIL), ~Nx faster on N cores; niced like the preparation threads, created on first use.
_tok_pool: ThreadPoolExecutor | None = None
_tok_lock = threading.Lock()
_tok_nice = DEFAULT_NICE


def set_tokenizer_nice(nice: int) -> None:
    """The nice value added to the tokenizer threads (``--prepare-nice``); before their first use."""
    global _tok_nice
    _tok_nice = nice


def _nice_me() -> None:
    _nice_this_thread(_tok_nice)


@functools.cache
def tokenizer_threads() -> int:
    """Threads beside the caller that :func:`parallel_map` uses: one less than the CPUs this process may use
    (affinity and cgroup quota, :func:`dynamo_rt.cpus.usable_cpus`; read once, not per long prompt)."""
    return usable_cpus() - 1


def parallel_map(fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
    """``[fn(x) for x in items]``, the first item in the calling thread and the others on the tokenizer threads
    at the same time (``fn`` should release the GIL); the caller then takes over the items no thread has
    started yet. In the caller alone on a 1-CPU machine. The caller must not be a tokenizer thread itself."""
    global _tok_pool
    if len(items) < 2 or tokenizer_threads() == 0:
        return [fn(x) for x in items]
    with _tok_lock:
        if _tok_pool is None:
            _tok_pool = ThreadPoolExecutor(tokenizer_threads(), "tokenize", initializer=_nice_me)
    futs = [_tok_pool.submit(fn, x) for x in items[1:]]
    try:
        out = [fn(items[0])]
        for x, f in zip(items[1:], futs, strict=True):
            out.append(fn(x) if f.cancel() else f.result())  # not started: the caller does it
        return out
    finally:
        for f in futs:
            f.cancel()
