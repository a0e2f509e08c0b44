"""Named fault-injection points: where a test can stop a request, slow it, fail it or drop what it sends.

Each process reads ``DYN_TEST_FAULT_POINTS`` once, at import: a comma-separated list of ``point=action``,
e.g. ``frontend.routed=pause`` or ``frontend.tokenizing=delay:1.5,worker.kv_events=drop``, or ``@PATH``: a file
holding such a list, read again whenever it changes (so one running stack serves a test's cases one after
another). Nothing sets it outside tests; unset, :data:`enabled` is False and every call site costs one
module-level bool check::

    if faults.enabled:
        await faults.hit("frontend.routed", request_id)

Actions:

* ``pause``: wait until the request is cancelled (a client disconnect, a worker cancel), so a test can
  disconnect exactly there; bounded by :data:`PAUSE_LIMIT` so nothing waits forever;
* ``delay:S``: sleep S seconds, then go on (for points a disconnect cannot interrupt, such as tokenizing);
* ``fail``: raise :class:`~dynamo_rt.errors.Unavailable`, as a dying worker would;
* ``drop`` (event points only, :func:`dropped`): what the point would send is discarded.

The points (:data:`POINTS`) name the request's places: frontend admission queue, tokenizing, routed, the
remote prefill (frontend waiting for it / prefill worker finishing it), the decode worker's NIXL read, decoding
and the frontend between two workers (migration); ``worker.kv_events`` is the worker's KV event publisher.
Requests whose id starts with :data:`EXEMPT_PREFIX` (the health canary) pass every point untouched, so a
paused stack still reports its health. Each hit is logged (``fault point P: ACTION (request R)``): a test
waits for that line before it disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dynamo_rt import errors

log = logging.getLogger(__name__)

ENV = "DYN_TEST_FAULT_POINTS"
PAUSE_LIMIT = 600.0
EXEMPT_PREFIX = "canary-"
POINTS = (
    "frontend.queued",  # waiting in the admission queue (--max-concurrency)
    "frontend.tokenizing",  # before the request is templated and tokenized (no disconnect watcher yet)
    "frontend.routed",  # a worker chosen and booked, nothing sent yet
    "frontend.remote_prefill",  # waiting for the prefill worker's answer
    "frontend.migrating",  # the worker failed mid-stream; the next one is not chosen yet
    "worker.remote_prefill",  # prefill worker: prompt computed and pinned, its answer not sent
    "worker.nixl_read",  # decode worker: local blocks allocated, the NIXL read not started
    "worker.decoding",  # after a token the engine decoded went out (the engine goes on meanwhile)
    "worker.kv_events",  # KV event publisher (``drop``)
)
ACTIONS = ("pause", "delay", "fail", "drop")


@dataclass(frozen=True, slots=True)
class Action:
    kind: str  # one of ACTIONS
    seconds: float = 0.0  # delay only


def parse(spec: str) -> dict[str, Action]:
    """``point=action,...`` -> actions by point; ValueError naming the bad entry."""
    out: dict[str, Action] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, sep, act = item.partition("=")
        kind, _, arg = act.partition(":")
        if not sep or point not in POINTS or kind not in ACTIONS:
            raise ValueError(f"{ENV}: bad entry {item!r} (points: {', '.join(POINTS)}; actions: "
                             f"{', '.join(ACTIONS)})")
        out[point] = Action(kind, float(arg) if kind == "delay" else 0.0)
    return out


_actions: dict[str, Action] = {}
_file: Path | None = None
_file_stamp: tuple[int, int] | None = None
enabled = False


def configure(spec: str | None) -> None:
    """Replace the configured points (tests of this module; processes use the environment)."""
    global enabled, _file, _file_stamp
    _actions.clear()
    _file, _file_stamp = None, None
    spec = spec or ""
    if spec.startswith("@"):
        _file = Path(spec[1:])
    else:
        _actions.update(parse(spec))
    enabled = bool(_actions) or _file is not None
    if enabled:
        log.warning("fault injection on: %s", spec)


def _reload() -> None:
    global _file_stamp
    assert _file is not None
    try:
        st = _file.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == _file_stamp:
            return
        text = _file.read_text()
    except OSError:
        stamp, text = (0, 0), ""  # no file: no fault
    _file_stamp = stamp
    _actions.clear()
    _actions.update(parse(text.strip()))


def action(point: str, key: str = "") -> Action | None:
    if key.startswith(EXEMPT_PREFIX):
        return None
    if _file is not None:
        _reload()
    return _actions.get(point)


async def hit(point: str, key: str = "") -> None:
    """Apply ``point``'s action to the request ``key`` (no-op when none is configured)."""
    a = action(point, key)
    if a is None or a.kind == "drop":
        return
    log.warning("fault point %s: %s (request %s)", point, a.kind, key or "-")
    if a.kind == "pause":
        await asyncio.sleep(PAUSE_LIMIT)  # a cancellation ends it
    elif a.kind == "delay":
        await asyncio.sleep(a.seconds)
    else:
        raise errors.Unavailable(f"test fault at {point}")


def dropped(point: str) -> bool:
    """Whether what ``point`` would send is to be discarded."""
    a = action(point)
    return a is not None and a.kind == "drop"


configure(os.environ.get(ENV))
