"""Worker gauges read from the engines at scrape time, so a test (or an operator) sees their state now, not as
of the last load report (``WorkerRuntime._publish_load_loop`` sets ``dynamo_worker_kv_blocks_used`` once a
second).

Per model, summed over the process's engines: ``dynamo_worker_kv_blocks_in_use`` (blocks referenced by a
request, a pin or a tier copy), ``dynamo_worker_engine_requests`` (requests an engine holds, running or waiting:
one the runtime let go of but the engine did not is a leak) and, for engines that pin prompt blocks for decode
workers (:class:`HoldsPins`), ``dynamo_worker_kv_pins``. tests/reliability/test_cancel_points.py checks that
they, with ``dynamo_worker_active_requests``, come back to their idle values after every kind of cancellation.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.common.engine import Engine

if TYPE_CHECKING:
    from workers.common.runtime import WorkerMetrics


@runtime_checkable
class HoldsPins(Protocol):
    @property
    def pins_held(self) -> int:
        """Pins (prompt blocks kept for a decode worker) not yet released or expired."""
        ...


class _EngineGauges(Collector):
    def __init__(self) -> None:
        self.engines: list[Engine] = []

    def collect(self) -> Iterator[Metric]:
        blocks = GaugeMetricFamily("dynamo_worker_kv_blocks_in_use", "KV blocks referenced now (by requests, "
                                   "pins or tier copies)", labels=["model"])
        reqs = GaugeMetricFamily("dynamo_worker_engine_requests", "Requests the engine holds now (running or "
                                 "waiting)", labels=["model"])
        pins = GaugeMetricFamily("dynamo_worker_kv_pins", "Prompt block pins held for decode workers",
                                 labels=["model"])
        totals: dict[str, list[int]] = {}
        for eng in self.engines:
            ld = eng.load()
            t = totals.setdefault(eng.info.name, [0, 0, 0])
            t[0] += ld.kv_blocks_used
            t[1] += ld.active_requests + ld.waiting_requests
            t[2] += eng.pins_held if isinstance(eng, HoldsPins) else 0
        for model, (b, r, p) in totals.items():
            blocks.add_metric([model], b)
            reqs.add_metric([model], r)
            pins.add_metric([model], p)
        yield blocks
        yield reqs
        yield pins


_collectors: weakref.WeakKeyDictionary[WorkerMetrics, _EngineGauges] = weakref.WeakKeyDictionary()


def watch_engine(metrics: WorkerMetrics, engine: Engine) -> None:
    """Export ``engine``'s live gauges with ``metrics`` (the engines of one process share them)."""
    col = _collectors.get(metrics)
    if col is None:
        col = _collectors[metrics] = _EngineGauges()
        metrics.registry.register(col)
    col.engines.append(engine)
