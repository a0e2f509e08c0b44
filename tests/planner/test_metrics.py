"""Observations from the frontend's own Prometheus registry (frontend.metrics.FrontendMetrics), served
in-process through httpx.MockTransport: deltas, model filter, several frontends, restarts, demand."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import generate_latest

from frontend.metrics import FrontendMetrics
from planner.core import Observation
from planner.metrics import FrontendMetricsSource
from tests.conftest import arun


class Frontends:
    """Real FrontendMetrics registries behind a mock transport, one per host."""

    def __init__(self, *hosts: str) -> None:
        self.m = {h: FrontendMetrics() for h in hosts}
        self.down: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            return httpx.Response(503)
        assert request.url.path == "/metrics"
        return httpx.Response(200, content=generate_latest(self.m[host].registry))

    def serve(self, host: str, model: str, n: int, isl: int, osl: int, ttft: float, itl: float) -> None:
        """``n`` requests served, as a frontend that does not count arrivals per model would show them (the
        planner then derives arrivals from the prompt tokens)."""
        m = self.m[host]
        for _ in range(n):
            m.input_tokens.labels(model).inc(isl)
            m.ttft.labels(model).observe(ttft)
            for _ in range(osl - 1):
                m.itl.labels(model).observe(itl)
            m.output_tokens.labels(model).inc(osl)
            m.duration.labels(model).observe(ttft + itl * (osl - 1))
            m.requests.labels("chat", "200").inc()


def _source(fe: Frontends, urls: list[str], model: str | None, clock: list[float]) -> FrontendMetricsSource:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fe.handler))
    return FrontendMetricsSource(urls, model, client=client, clock=lambda: clock[0])


def test_observation_from_counter_deltas() -> None:
    fe = Frontends("fe1")
    clock = [100.0]

    async def main() -> list[Observation | None]:
        src = _source(fe, ["http://fe1:8000"], "m", clock)
        fe.serve("fe1", "m", 3, 100, 10, 0.5, 0.01)  # before the baseline: not counted
        out = [await src.observe()]
        fe.serve("fe1", "m", 4, 200, 20, 0.1, 0.02)
        fe.serve("fe1", "other", 5, 999, 99, 9.0, 9.0)  # another model: filtered out
        fe.m["fe1"].inflight.labels("m").set(2)
        clock[0] = 102.0
        out.append(await src.observe())
        clock[0] = 104.0
        out.append(await src.observe())
        await src.close()
        return out

    first, obs, quiet = arun(main())
    assert first is None
    assert obs is not None and quiet is not None
    assert (obs.duration_s, obs.requests, obs.completed, obs.input_tokens, obs.output_tokens) == (2.0, 4, 4, 800, 80)
    assert (obs.rate, obs.isl, obs.osl, obs.inflight, obs.demand) == (2.0, 200, 20, 2, 0)
    assert obs.mean_ttft == pytest.approx(0.1) and obs.mean_itl == pytest.approx(0.02)
    assert obs.itl_count == 4 * 19
    assert (quiet.requests, quiet.isl, quiet.osl, quiet.inflight, quiet.idle) == (0, None, None, 2, False)


def test_several_frontends_restart_and_demand() -> None:
    fe = Frontends("a", "b")
    clock = [0.0]

    async def main() -> list[Observation | None]:
        src = _source(fe, ["http://a", "http://b/"], None, clock)
        fe.serve("a", "m", 2, 100, 10, 0.2, 0.01)
        await src.observe()
        fe.serve("a", "m", 1, 100, 10, 0.2, 0.01)
        fe.serve("b", "n", 1, 300, 30, 0.4, 0.03)
        clock[0] = 1.0
        both = await src.observe()
        # Frontend a restarts (its counters start again from zero) and b is down for a scrape.
        fe.m["a"] = FrontendMetrics()
        fe.serve("a", "m", 1, 100, 10, 0.2, 0.01)
        fe.down.add("b")
        clock[0] = 2.0
        restarted = await src.observe()
        # At zero: the frontend answers 503 (no --worker-wait-timeout) or parks requests.
        fe.down.clear()
        fe.m["a"].requests.labels("chat", "503").inc(3)
        # b counts arrivals per model: they come from that count.
        arrivals = fe.m["b"].model_requests
        arrivals.labels("n").inc(7)
        fe.m["b"].input_tokens.labels("n").inc(7 * 300)
        fe.m["a"].requests.labels("chat", "404").inc(1)
        fe.m["b"].awaiting_worker.labels("n").set(2)
        clock[0] = 3.0
        demand = await src.observe()
        arrivals.labels("n").inc(4)
        fe.m["b"].input_tokens.labels("n").inc(4 * 250)
        clock[0] = 3.5
        counted = await src.observe()
        fe.down.update({"a", "b"})
        clock[0] = 4.0
        unreadable = await src.observe()
        await src.close()
        return [both, restarted, demand, counted, unreadable]

    both, restarted, demand, counted, unreadable = arun(main())
    assert both is not None and (both.requests, both.input_tokens, both.output_tokens) == (2, 400, 40)
    assert both.mean_ttft == pytest.approx(0.3)
    assert restarted is not None and (restarted.requests, restarted.input_tokens) == (1, 100)
    assert demand is not None and (demand.demand, demand.requests, demand.idle) == (5, 0, False)
    # A series that appears counts from 0 (the counter is created by the first request it counts).
    assert demand.arrivals == 7 and demand.isl == 300
    assert counted is not None and (counted.arrivals, counted.isl, counted.requests) == (4, 250, 0)
    assert counted.rate == pytest.approx(8.0)  # 4 arrivals in 0.5 s, though none has its first token yet
    assert unreadable is None
