"""Honest health: ``GET /health`` and ``GET /v1/models/{model}/ready`` say whether a request would be served,
because a canary request just was.

Every ``--canary-interval`` seconds (``frontend.main``; ``--canary-timeout`` bounds one) and on demand
(``?canary=1``) a 2-token greedy request runs for each model and each of its agg / decode workers (pinned
there; its prefill worker is the router's choice) through the real path, the
:class:`~frontend.serving.Dispatcher`: tokenized by the model's preprocessor, routed, prefilled on a prefill
worker and pulled over NIXL when the model has a prefill pool (its prompt starts with a fresh nonce, so no
cache makes the hand-off unnecessary), decoded. Its id starts with ``canary-``, so the fault
points pass it and no user metric counts it (``dynamo_frontend_canary_runs`` does).

A model is *ready* when it has a worker that takes requests and, if canaries ran since its workers last
changed, one of them produced tokens. Machine-readable reasons:

* ``no_decode_worker``: no agg or decode worker is registered (not ready);
* ``canary_failed``: a worker's last canary ended in an error (not ready when every worker's did);
* ``transfer_failed``: the canary's prefill hand-off failed (the prefill worker did not answer, or the decode
  worker's NIXL pull failed: our decode workers tell a canary how its pull went) and it was prefilled locally;
* ``kv_events_stale``: a worker's KV events do not reach the router (it routes by load meanwhile,
  :mod:`dynamo_rt.router.staleness`);
* ``discovery_lost``: etcd did not answer the last probe (the frontend serves from its last view of it).

``/health`` is 200 when any model is ready (the models listed under ``models``, the others under
``not_ready``), else 503 with an error body and the reasons. The monitor also exports the router's in-flight
book and the choices in flight (``dynamo_frontend_router_*``, ``dynamo_frontend_inflight_choices``), which a
cancellation must return to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dynamo_rt import errors
from dynamo_rt.protocol import Final, SamplingParams, StopConditions
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager, ServedModel
from frontend.serving import Dispatcher, Prepared, error_body

log = logging.getLogger(__name__)

REASONS = ("no_decode_worker", "canary_failed", "transfer_failed", "kv_events_stale", "discovery_lost")
CANARY_TOKENS = 2
_FILLER = " the quick brown fox jumps over the lazy dog"


@dataclass
class CanaryResult:
    ok: bool
    at: float  # time.time() when it ended
    seconds: float
    tokens: int = 0
    worker: str = ""  # the agg / decode worker that answered
    transfer_failed: bool = False
    kv_pull: str = ""  # the decode worker's NIXL pull: pulled / failed / cancelled / not_tried ("": none sent)
    error: str = ""
    instances: frozenset[str] = frozenset()  # the model's workers when it ran

    def json(self) -> dict[str, Any]:
        return {"ok": self.ok, "age_s": round(time.time() - self.at, 3), "latency_ms": round(self.seconds * 1e3, 2),
                "tokens": self.tokens, "worker": self.worker, "transfer_failed": self.transfer_failed,
                "kv_pull": self.kv_pull or None,
                "error": self.error or None}


@dataclass
class ModelHealth:
    ready: bool
    reasons: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


class HealthMonitor:
    def __init__(self, manager: ModelManager, dispatcher: Dispatcher, metrics: FrontendMetrics, *,
                 interval: float = 0.0, timeout: float = 10.0) -> None:
        self.manager = manager
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        self.results: dict[str, dict[str, CanaryResult]] = {}  # model -> worker -> its last canary
        self.discovery_ok = True
        self._nonce = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one round of canaries at a time
        r = metrics.registry
        self.runs = Counter("dynamo_frontend_canary_runs", "Health canary requests by outcome",
                            ["model", "outcome"], registry=r)
        self.ready_gauge = Gauge("dynamo_frontend_model_ready", "1 while the model is ready (see /health)",
                                 ["model"], registry=r)
        r.register(_BookCollector(manager))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="health-canary")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # the monitor must outlive any one failure
                log.exception("health check failed")
            await asyncio.sleep(self.interval)

    # ------------------------------------------------------------------ checks

    async def check(self, model: str | None = None) -> None:
        """Probe etcd and run one canary per model (or for ``model``) now."""
        async with self._lock:
            await self._probe_discovery()
            names = [model] if model is not None else list(self.manager.models)
            for name in names:
                sm = self.manager.models.get(name)
                if sm is not None and sm.has_decode_pool:
                    await self.canary(sm)
            for name in list(self.manager.models):
                self.ready_gauge.labels(name).set(1 if self.model_health(name).ready else 0)

    async def _probe_discovery(self) -> None:
        view = self.manager.view
        try:
            await asyncio.wait_for(view.registry.get_prefix(f"/{view.namespace}/models/"), 3.0)
            ok = True
        except (errors.DynamoError, TimeoutError, OSError) as exc:
            ok = False
            if self.discovery_ok:
                log.warning("health: etcd did not answer (%s): discovery_lost", exc)
        if ok and not self.discovery_ok:
            log.info("health: etcd answers again")
        self.discovery_ok = ok

    def _prompt(self, sm: ServedModel, nonce: int) -> list[int]:
        """A prompt starting with a fresh nonce (no worker has it cached), long enough for the disaggregated
        path when the model has prefill workers."""
        want = self.dispatcher.disagg_threshold + sm.card.kv_block_size if sm.pool("prefill") else 1
        limit = max(1, sm.card.context_length - CANARY_TOKENS - 1)
        text = f"health canary {nonce}:"
        ids = sm.pre.encode_prompt(text)
        while len(ids) < min(want, limit):
            text += _FILLER
            ids = sm.pre.encode_prompt(text)
        return ids[:limit]

    async def canary(self, sm: ServedModel) -> dict[str, CanaryResult]:
        """Run one canary per worker that takes requests (agg, else decode; the prefill worker is the router's
        choice) for ``sm``, one after the other, and record the results."""
        pool = "agg" if sm.pool("agg") else "decode"
        out = {wid: await self._canary_on(sm, wid) for wid in sm.pool(pool)}
        prev = self.results.get(sm.name, {})
        for wid, res in out.items():
            was = prev.get(wid)
            if not res.ok and (was is None or was.ok):
                log.warning("health: model %r canary on worker %s failed: %s", sm.name, wid, res.error)
            elif res.ok and was is not None and not was.ok:
                log.info("health: model %r canary on worker %s ok again", sm.name, wid)
        self.results[sm.name] = out
        return out

    async def _canary_on(self, sm: ServedModel, worker: str) -> CanaryResult:
        nonce = next(self._nonce)
        t0 = time.perf_counter()
        fallbacks = self._fallbacks(sm.name)
        res = CanaryResult(ok=False, at=time.time(), seconds=0.0, worker=worker, instances=frozenset(sm.instances))
        try:
            prompt = await asyncio.to_thread(self._prompt, sm, nonce)
            rid = f"canary-{nonce:x}-{int(time.time() * 1000):x}"
            p = Prepared(kind="completion", model=sm, prompts=[prompt], sampling=SamplingParams(temperature=0.0),
                         stop=StopConditions(max_tokens=CANARY_TOKENS, ignore_eos=True), stop_strings=[], n=1,
                         stream=True, include_usage=False, logprobs=None, pinned=worker, request_id=rid,
                         created=int(time.time()), deadline=time.time() + self.timeout)
            async with asyncio.timeout(self.timeout):
                await self._run(p, prompt, res)
            res.ok = res.tokens > 0
            if not res.ok:
                res.error = "the worker answered without a token"
        except TimeoutError:
            res.error = f"no answer within {self.timeout:g}s"
        except errors.DynamoError as exc:
            res.error = exc.message
        res.seconds = time.perf_counter() - t0
        res.at = time.time()
        res.transfer_failed = res.kv_pull == "failed" or (bool(sm.pool("prefill"))
                                                          and self._fallbacks(sm.name) > fallbacks)
        outcome = "ok" if res.ok and not res.transfer_failed else ("transfer_failed" if res.ok else "failed")
        self.runs.labels(sm.name, outcome).inc()
        return res

    async def _run(self, p: Prepared, prompt: list[int], res: CanaryResult) -> None:
        stream, done, res.worker, first = await self.dispatcher.open(p, prompt, p.request_id + "-0", 0)
        try:
            async for frame in stream:
                if isinstance(frame, Final):
                    return
                if frame.payload:  # our decode workers say how the NIXL pull of a canary's prompt went
                    res.kv_pull = str(msgspec.msgpack.decode(frame.payload).get("kv_pull", ""))
                if frame.token_ids and not res.tokens:
                    first()
                res.tokens += len(frame.token_ids)
            raise errors.Unavailable("the worker's stream ended without a final frame")
        finally:
            done()
            await stream.cancel()

    def _fallbacks(self, model: str) -> float:
        v = self.metrics.registry.get_sample_value("dynamo_frontend_prefill_fallbacks_total", {"model": model})
        return v or 0.0

    # ------------------------------------------------------------------ status

    def model_health(self, name: str) -> ModelHealth:
        sm = self.manager.models.get(name)
        reasons: list[str] = []
        detail: dict[str, Any] = {}
        if sm is None or not sm.has_decode_pool:
            reasons.append("no_decode_worker")
        ready = not reasons
        runs = self.results.get(name) or {}
        if runs:
            first = next(iter(runs.values()))
            errs = [r.error for r in runs.values() if not r.ok]
            detail["canary"] = {"ok": not errs, "tokens": min(r.tokens for r in runs.values()),
                                "transfer_failed": any(r.transfer_failed for r in runs.values()),
                                "error": errs[0] if errs else None,
                                "workers": {w: r.json() for w, r in runs.items()}}
            # A result from before the workers changed says nothing about them now.
            if sm is not None and first.instances == frozenset(sm.instances):
                if errs:
                    reasons.append("canary_failed")
                    ready = ready and len(errs) < len(runs)  # a worker that answers keeps the model ready
                if any(r.ok and r.transfer_failed for r in runs.values()):
                    reasons.append("transfer_failed")
        if sm is not None:
            stale = sorted({w for r in sm.routers.values() for w in r.stale_workers()})
            if stale:
                reasons.append("kv_events_stale")
                detail["kv_events_stale"] = stale
            detail["instances"] = len(sm.instances)
            detail["modes"] = sorted({r.mode.value for r in sm.instances.values()})
        if not self.discovery_ok:
            reasons.append("discovery_lost")
        return ModelHealth(ready=ready, reasons=reasons, detail=detail)

    def known_models(self) -> list[str]:
        return sorted(set(self.manager.models) | self.manager.departed)

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``: (status, body)."""
        ready: dict[str, Any] = {}
        not_ready: dict[str, Any] = {}
        for name in self.known_models():
            h = self.model_health(name)
            entry = {"ready": h.ready, "reasons": h.reasons, **h.detail}
            (ready if h.ready else not_ready)[name] = entry
        reasons = sorted({r for e in (*ready.values(), *not_ready.values()) for r in e["reasons"]}
                         | ({"discovery_lost"} if not self.discovery_ok else set()))
        body: dict[str, Any] = {"status": "healthy" if not reasons else "degraded", "reasons": reasons,
                                "discovery": "ok" if self.discovery_ok else "lost", "models": ready,
                                "not_ready": not_ready}
        if ready:
            return 200, body
        why = "no model has a ready worker" if not not_ready else "no model can be served: " + "; ".join(
            f"{n}: {', '.join(e['reasons'])}" for n, e in not_ready.items())
        body.update(status="unhealthy", reason=why, **error_body(errors.Unavailable(why)))
        return 503, body

    def ready(self, model: str) -> tuple[int, dict[str, Any]]:
        """``/v1/models/{model}/ready``: (status, body); NotFound for a model never served."""
        if model not in self.known_models():
            raise errors.NotFound(f"The model `{model}` does not exist.", param="model")
        h = self.model_health(model)
        body: dict[str, Any] = {"model": model, "ready": h.ready, "reasons": h.reasons, **h.detail}
        if h.ready:
            return 200, body
        return 503, {**body, **error_body(errors.Unavailable(f"model {model!r} is not ready: "
                                                             f"{', '.join(h.reasons)}"))}


class _BookCollector(Collector):
    """The router's in-flight book and the choices in flight, per model and pool, read at scrape time."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        mp = ["model", "pool"]
        reqs = GaugeMetricFamily("dynamo_frontend_router_inflight_requests",
                                 "Requests the router booked on a worker and has not seen end", labels=mp)
        blocks = GaugeMetricFamily("dynamo_frontend_router_inflight_blocks",
                                   "KV blocks of the router's booked requests (per request)", labels=mp)
        prefill = GaugeMetricFamily("dynamo_frontend_router_pending_prefill_blocks",
                                    "Prompt blocks of booked requests still to prefill", labels=mp)
        choices = GaugeMetricFamily("dynamo_frontend_inflight_choices", "Choices being generated",
                                    labels=["model"])
        for sm in list(self.manager.models.values()):
            choices.add_metric([sm.name], sm.inflight)
            for pool, router in sm.routers.items():
                book = router.active
                ws = book.workers()
                reqs.add_metric([sm.name, pool], sum(book.requests(w) for w in ws))
                blocks.add_metric([sm.name, pool], sum(book.total_blocks(w) for w in ws))
                prefill.add_metric([sm.name, pool], sum(book.pending_prefill(w) for w in ws))
        yield reqs
        yield blocks
        yield prefill
        yield choices
