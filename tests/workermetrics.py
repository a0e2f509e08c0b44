"""Test helper: a worker process's Prometheus metrics, the KV hand-off counters in particular.

A worker started with ``--metrics-port 0`` binds a free port and says which in its ready line (``worker
ready: ... metrics port N``); :func:`metrics_port` finds it in the worker's output. :func:`kv_counts` reads
the disaggregation counters (``dynamo_worker_kv_*``, see ``workers.common.runtime.WorkerMetrics``) of one
worker, summed over models and reasons; :func:`wait_kv` polls until they reach what a test expects, since a
pin release reaches the prefill worker just after the response.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

READY = re.compile(r"worker ready: .* metrics port (\d+)")


def metrics_port_in(text: str) -> int | None:
    """The metrics port of the first worker ready line in ``text`` (None if there is none yet)."""
    m = READY.search(text)
    return int(m.group(1)) if m else None


def metrics_port(output: Callable[[], str], timeout: float = 60.0) -> int:
    """Polls ``output()`` (a worker's log so far) until its ready line names the metrics port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        port = metrics_port_in(output())
        if port is not None:
            return port
        time.sleep(0.1)
    raise AssertionError("the worker never logged its metrics port:\n" + output()[-3000:])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def samples(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if any(f'{k}="{v}"' not in line for k, v in labels.items()):
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass(frozen=True)
class KvCounts:
    pulls: int = 0
    pulled_bytes: int = 0
    failures: int = 0
    fallbacks: int = 0
    pins_released: int = 0
    pins_expired: int = 0
    pull_timings: int = 0  # observations of the pull-time histogram
    failure_reasons: dict[str, int] = field(default_factory=dict)


def kv_counts(port: int) -> KvCounts:
    text = scrape(port)
    reasons = {r: int(samples(text, "dynamo_worker_kv_pull_failures_total", reason=r))
               for r in ("read", "peer_gone", "checksum")}
    return KvCounts(
        pulls=int(samples(text, "dynamo_worker_kv_pulls_total")),
        pulled_bytes=int(samples(text, "dynamo_worker_kv_pulled_bytes_total")),
        failures=int(samples(text, "dynamo_worker_kv_pull_failures_total")),
        fallbacks=int(samples(text, "dynamo_worker_kv_local_prefill_fallbacks_total")),
        pins_released=int(samples(text, "dynamo_worker_kv_pins_released_total")),
        pins_expired=int(samples(text, "dynamo_worker_kv_pins_expired_total")),
        pull_timings=int(samples(text, "dynamo_worker_kv_pull_seconds_count")),
        failure_reasons={r: n for r, n in reasons.items() if n},
    )


def wait_kv(port: int, cond: Callable[[KvCounts], bool], timeout: float = 10.0) -> KvCounts:
    """Polls the worker's KV counters until ``cond`` holds; fails with the last counts after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        c = kv_counts(port)
        if cond(c):
            return c
        if time.monotonic() > deadline:
            raise AssertionError(f"KV counters never reached the expected values: {c}")
        time.sleep(0.1)
