"""Where the planner's observations come from: the frontends' Prometheus ``/metrics``.

Each scrape reads the ``dynamo_frontend_*`` series (names in :mod:`frontend.metrics`) of every frontend,
and the difference between two scrapes becomes one :class:`~planner.core.Observation`:

- arrivals: ``dynamo_frontend_model_requests_total`` (per model, counted as requests come in), or, from a
  frontend that does not export it, derived from ``dynamo_frontend_input_tokens_total`` (also counted on
  arrival); requests served:
  ``dynamo_frontend_time_to_first_token_seconds_count``; completions:
  ``dynamo_frontend_request_duration_seconds_count``;
- ISL / OSL: ``dynamo_frontend_input_tokens_total`` / ``dynamo_frontend_output_tokens_total`` over those;
- TTFT / ITL: the ``_sum`` / ``_count`` of ``dynamo_frontend_time_to_first_token_seconds`` and
  ``dynamo_frontend_inter_token_latency_seconds``;
- in flight: the ``dynamo_frontend_inflight_requests`` gauge;
- demand while a pool is at zero: requests answered 503 (``dynamo_frontend_requests_total{status="503"}``,
  what a frontend without ``--worker-wait-timeout`` answers when a model has no worker) plus the
  ``dynamo_frontend_awaiting_worker_requests`` gauge (requests parked until a worker registers).

Several frontends are summed. A host name can stand for all of its addresses (``resolve_all``: the
headless Service of a frontend role lists one address per pod). A counter that went backwards (a restarted
frontend) counts from zero. Any HTTP error is mapped to :class:`dynamo_rt.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dynamo_rt.errors import Unavailable
from planner.core import Observation

log = logging.getLogger(__name__)

P = "dynamo_frontend_"
TTFT = P + "time_to_first_token_seconds"
ITL = P + "inter_token_latency_seconds"
DURATION = P + "request_duration_seconds"
INPUT = P + "input_tokens_total"
OUTPUT = P + "output_tokens_total"
REQUESTS = P + "requests_total"
INFLIGHT = P + "inflight_requests"
AWAITING = P + "awaiting_worker_requests"
ARRIVALS = P + "model_requests_total"

# Counters summed per model: (sample name, observation field).
_COUNTERS = (
    (TTFT + "_count", "requests"),
    (DURATION + "_count", "completed"),
    (INPUT, "input_tokens"),
    (OUTPUT, "output_tokens"),
    (TTFT + "_sum", "ttft_sum"),
    (TTFT + "_count", "ttft_count"),
    (ITL + "_sum", "itl_sum"),
    (ITL + "_count", "itl_count"),
)

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


class MetricsSource(Protocol):
    """Anything that yields one observation per call (None: nothing to compare with yet, or unreadable)."""

    async def observe(self) -> Observation | None: ...

    async def close(self) -> None: ...


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (sample name, sorted labels)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _select(samples: Samples, name: str, model: str | None, **labels: str) -> dict[Labels, float]:
    out: dict[Labels, float] = {}
    for (n, lbl), v in samples.items():
        if n != name:
            continue
        d = dict(lbl)
        if model is not None and "model" in d and d["model"] != model:
            continue
        if any(d.get(k) != want for k, want in labels.items()):
            continue
        out[lbl] = v
    return out


def _delta(new: Mapping[Labels, float], old: Mapping[Labels, float] | None) -> float:
    total = 0.0
    for k, v in new.items():
        prev = 0.0 if old is None else old.get(k, 0.0)
        total += v - prev if v >= prev else v  # went backwards: the frontend restarted, counting from 0
    return total


@dataclass
class _Endpoint:
    samples: Samples = field(default_factory=dict)
    seen: bool = False


class FrontendMetricsSource:
    """Scrapes ``{url}/metrics`` of every frontend and returns the change since the previous scrape."""

    def __init__(self, urls: Sequence[str], model: str | None = None, *, resolve_all: bool = False,
                 timeout: float = 5.0, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("at least one frontend URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.resolve_all = resolve_all
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._own_client = client is None
        self._clock = clock
        self._state: dict[str, _Endpoint] = {}
        self._last_t: float | None = None

    async def close(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def _targets(self) -> list[str]:
        if not self.resolve_all:
            return list(self.urls)
        out: list[str] = []
        loop = asyncio.get_running_loop()
        for url in self.urls:
            u = urllib.parse.urlsplit(url)
            host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve frontend host %s: %s", host, exc)
                continue
            for addr in sorted({str(i[4][0]) for i in infos}):
                h = f"[{addr}]" if ":" in addr else addr
                out.append(urllib.parse.urlunsplit((u.scheme, f"{h}:{port}", u.path, "", "")))
        return out

    async def scrape(self) -> dict[str, Samples]:
        """Current samples of every reachable frontend, keyed by URL."""
        targets = await self._targets()

        async def one(url: str) -> tuple[str, Samples | None]:
            try:
                r = await self._client.get(url + "/metrics")
                r.raise_for_status()
                return url, parse_samples(r.text)
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("scraping %s/metrics failed: %s", url, exc)
                return url, None

        got = await asyncio.gather(*(one(u) for u in targets))
        out = {u: s for u, s in got if s is not None}
        if not out:
            raise Unavailable(f"no frontend metrics could be read from {', '.join(targets) or self.urls}")
        return out

    async def observe(self) -> Observation | None:
        now = self._clock()
        try:
            scraped = await self.scrape()
        except Unavailable as exc:
            log.warning("%s", exc)
            return None
        fields: dict[str, float] = {name: 0.0 for _, name in _COUNTERS}
        demand = inflight = 0.0
        arrivals: float | None = None
        have_baseline = self._last_t is not None
        for url, samples in scraped.items():
            ep = self._state.setdefault(url, _Endpoint())
            if ep.seen:
                for name, attr in _COUNTERS:
                    fields[attr] += _delta(_select(samples, name, self.model), _select(ep.samples, name, self.model))
                demand += _delta(_select(samples, REQUESTS, None, status="503"),
                                 _select(ep.samples, REQUESTS, None, status="503"))
                if any(name == ARRIVALS for name, _ in samples):
                    arrivals = (arrivals or 0.0) + _delta(_select(samples, ARRIVALS, self.model),
                                                          _select(ep.samples, ARRIVALS, self.model))
            inflight += sum(_select(samples, INFLIGHT, self.model).values())
            demand += sum(_select(samples, AWAITING, self.model).values())
            ep.samples = samples
            ep.seen = True
        last, self._last_t = self._last_t, now
        if not have_baseline or last is None:
            return None
        return Observation(duration_s=max(now - last, 1e-6), inflight=inflight, demand=demand, arrivals=arrivals,
                           **fields)
