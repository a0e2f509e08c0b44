"""Frontend Prometheus metrics (``dynamo_frontend_*``), in a registry of the app's own."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from frontend.preprocess import Preprocessor

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class FrontendMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dynamo_frontend_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.inflight = Gauge("dynamo_frontend_inflight_requests", "Requests in flight", ["model"], registry=r)
        self.model_requests = Counter("dynamo_frontend_model_requests",
                                      "Requests per model, counted as they come in (the planner's arrival rate)",
                                      ["model"], registry=r)
        self.awaiting_worker = Gauge("dynamo_frontend_awaiting_worker_requests",
                                     "Requests waiting for a worker of their model to register (scale from zero)",
                                     ["model"], registry=r)
        self.queued = Gauge("dynamo_frontend_queued_requests", "Requests waiting for a slot", ["model"],
                            registry=r)
        self.ttft = Histogram("dynamo_frontend_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=_LAT, registry=r)
        self.itl = Histogram("dynamo_frontend_inter_token_latency_seconds", "Inter-token latency",
                             ["model"], buckets=_LAT, registry=r)
        self.duration = Histogram("dynamo_frontend_request_duration_seconds", "Request duration",
                                  ["model"], buckets=_LAT, registry=r)
        self.input_tokens = Counter("dynamo_frontend_input_tokens", "Prompt tokens", ["model"], registry=r)
        self.output_tokens = Counter("dynamo_frontend_output_tokens", "Generated tokens", ["model"],
                                     registry=r)
        self.dispatch = Histogram("dynamo_frontend_request_dispatch_seconds",
                                  "From a request's arrival to its publication to a worker: body, validation, chat "
                                  "template, tokenization, routing (the frontend's part of TTFT before the worker)",
                                  ["model"], buckets=(5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                                                      0.5, 1.0, 2.5), registry=r)
        self.router_overhead = Histogram("dynamo_frontend_router_overhead_seconds", "Time spent routing",
                                         buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2),
                                         registry=r)
        self.prefill_fallbacks = Counter("dynamo_frontend_prefill_fallbacks",
                                         "Disaggregated requests prefilled on the decode worker after a failure",
                                         ["model"], registry=r)
        self.migrations = Counter("dynamo_frontend_migrations", "Requests moved to another worker mid-stream",
                                  ["model"], registry=r)
        self.disconnects = Counter("dynamo_frontend_client_disconnects", "Clients that left mid-request",
                                   ["model"], registry=r)
        self.tool_calls = Counter("dynamo_frontend_tool_calls", "Tool calls parsed out of chat output",
                                  ["model"], registry=r)
        self.tool_call_failures = Counter("dynamo_frontend_tool_call_parse_failures",
                                          "Would-be tool calls in chat output that did not decode (sent as content)",
                                          ["model"], registry=r)
        self._models: dict[str, ModelMetrics] = {}
        self._requests: dict[tuple[str, str], Any] = {}

    def model(self, name: str) -> ModelMetrics:
        """The per-model children, resolved once per model (``labels()`` takes a lock and builds tuples: a few
        microseconds per call, several calls per request)."""
        mm = self._models.get(name)
        if mm is None:
            mm = self._models[name] = ModelMetrics(self, name)
        return mm

    def request_done(self, endpoint: str, status: str) -> None:
        """``requests.labels(endpoint, status).inc()`` with the child looked up once."""
        c = self._requests.get((endpoint, status))
        if c is None:
            c = self._requests[endpoint, status] = self.requests.labels(endpoint, status)
        c.inc()

    def watch_sse_writes(self, transport: Any = None) -> None:
        """Report how streamed chunks were written (:mod:`frontend.sse`) and how response frames came in over
        NATS (``transport``'s counters), read at scrape time."""
        self.registry.register(_SseWritesCollector(transport))

    def watch_prompt_caches(self, models: Callable[[], Iterable[tuple[str, Preprocessor]]]) -> None:
        """Report the chat prompt piece caches of the served models' preprocessors, read at scrape time
        (nothing on the request path). A preprocessor shared by models (same tokenizer files) shows under
        each of them."""
        self.registry.register(_PromptCacheCollector(models))


class ModelMetrics:
    """One model's label children of the per-request and per-token metrics."""

    __slots__ = ("dispatch", "duration", "inflight", "input_tokens", "itl", "model_requests", "output_tokens", "ttft")

    def __init__(self, m: FrontendMetrics, name: str) -> None:
        self.ttft = m.ttft.labels(name)
        self.dispatch = m.dispatch.labels(name)
        self.itl = m.itl.labels(name)
        self.duration = m.duration.labels(name)
        self.inflight = m.inflight.labels(name)
        self.input_tokens = m.input_tokens.labels(name)
        self.output_tokens = m.output_tokens.labels(name)
        self.model_requests = m.model_requests.labels(name)


def observe_many(hist: Histogram, values: Sequence[float]) -> None:
    """``hist.observe(v)`` for each of ``values``, one lock round per touched bucket instead of two per value:
    the token loop collects a choice's inter-token gaps and hands them over in one go. Uses the histogram's
    bucket bounds and values (prometheus_client's ``_upper_bounds`` / ``_buckets`` / ``_sum``); observes
    one by one where those are missing."""
    if not values:
        return
    h: Any = hist
    bounds = getattr(h, "_upper_bounds", None)
    buckets = getattr(h, "_buckets", None)
    total = getattr(h, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            hist.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)  # the first bound >= v, as observe() picks it
        counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, c in counts.items():
        if i < len(buckets):
            buckets[i].inc(c)


class _PromptCacheCollector(Collector):
    def __init__(self, models: Callable[[], Iterable[tuple[str, Preprocessor]]]) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily("dynamo_frontend_prompt_piece_cache_hits",
                                   "Chat prompt pieces (text between special tokens) whose token ids came from the "
                                   "frontend's cache", labels=["model"])
        misses = CounterMetricFamily("dynamo_frontend_prompt_piece_cache_misses",
                                     "Chat prompt pieces the frontend had to tokenize", labels=["model"])
        chars = GaugeMetricFamily("dynamo_frontend_prompt_piece_cache_chars",
                                  "Characters of prompt text the piece cache keeps", labels=["model"])
        parallel = CounterMetricFamily("dynamo_frontend_prompt_parallel_pieces",
                                       "New chat prompt pieces long enough to be tokenized in chunks side by side",
                                       labels=["model"])
        for name, pre in self.models():
            parallel.add_metric([name], pre.parallel_pieces)
            stats = pre.piece_cache_stats()
            if stats is None:
                continue
            hits.add_metric([name], stats[0])
            misses.add_metric([name], stats[1])
            chars.add_metric([name], stats[2])
        yield hits
        yield misses
        yield chars
        yield parallel


class _SseWritesCollector(Collector):
    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def collect(self) -> Iterator[Metric]:
        from frontend import sse

        t = self.transport
        if t is not None:
            msgs = CounterMetricFamily("dynamo_frontend_response_messages",
                                       "NATS messages of response frames: handed to their streams by the parser's "
                                       "call (direct) or by nats-py's subscription task (queued)", labels=["path"])
            msgs.add_metric(["direct"], t.mux_frames_direct)
            msgs.add_metric(["queued"], t.mux_frames_queued)
            yield msgs
            yield CounterMetricFamily("dynamo_frontend_response_frames_batched",
                                      "Response frames that came several to a NATS message (a worker's batch of "
                                      "one engine step's frames to this frontend)", value=t.mux_batched_frames)

        c = CounterMetricFamily("dynamo_frontend_sse_writes",
                                "Streamed text chunks written from the NATS frame callback: at once (direct) or "
                                "queued behind a send waiting for the client's socket (deferred); chunks the "
                                "response task writes itself are not counted", labels=["path"])
        c.add_metric(["direct"], sse.stats["direct"])
        c.add_metric(["deferred"], sse.stats["deferred"])
        yield c
