"""The planner's decision: :class:`Planner` turns one :class:`Observation` per interval into target replica
counts (:class:`Decision`) within each pool's limits. Pure logic, no I/O.

Its place: :mod:`planner.metrics` turns the frontend's Prometheus counters into observations, the
:class:`Planner` predicts the next interval's load (:mod:`planner.predictors`), sizes each pool for the
TTFT / ITL targets (:mod:`planner.sla`, over the engine's :mod:`planner.profile`), clamps, stabilizes
scale-down and scales to zero after an idle spell; a connector (:mod:`planner.connectors`,
:mod:`planner.rbg`) applies the decision, and :mod:`planner.runner` is the loop that ties them together.

Observed TTFT and ITL feed back as correction factors on the profile (the stack adds hand-off, network and
scheduling time that a profile of the engine alone does not see).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dynamo_rt.errors import InvalidRequest
from planner.predictors import MovingAveragePredictor, Predictor, make_predictor
from planner.profile import Profile
from planner.sla import PoolPlan, decode_replicas, prefill_replicas, prefill_wait

# Pools a planner sizes. Disaggregated deployments have prefill + decode, aggregated ones agg.
PREFILL = "prefill"
DECODE = "decode"
AGG = "agg"

Replicas = dict[str, int]


@dataclass(frozen=True, slots=True)
class Observation:
    """What the frontend saw during one interval (counter deltas) plus gauges read at its end."""

    duration_s: float
    requests: float = 0.0  # requests that got their first token (arrivals, shifted by their TTFT)
    completed: float = 0.0  # requests that finished
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0
    inflight: float = 0.0  # requests in flight at the end of the interval
    demand: float = 0.0  # requests turned away or parked for want of a worker (the scale-from-zero signal)
    arrivals: float | None = None  # requests counted as they came in, when the frontend exports that count

    @property
    def rate(self) -> float:
        n = self.requests if self.arrivals is None else self.arrivals
        return n / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def isl(self) -> float | None:
        n = self.requests if self.arrivals is None else self.arrivals
        return self.input_tokens / n if n > 0 else None

    @property
    def osl(self) -> float | None:
        return self.output_tokens / self.completed if self.completed > 0 else None

    @property
    def mean_ttft(self) -> float | None:
        return self.ttft_sum / self.ttft_count if self.ttft_count > 0 else None

    @property
    def mean_itl(self) -> float | None:
        return self.itl_sum / self.itl_count if self.itl_count > 0 else None

    @property
    def idle(self) -> bool:
        return (self.requests <= 0 and self.completed <= 0 and self.inflight <= 0 and self.demand <= 0
                and not self.arrivals)


def clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))


class Stabilizer:
    """Scale-down stabilization (as Kubernetes' HPA does it): a pool shrinks only to the largest
    recommendation of the last ``down_window_s`` seconds, so a short lull does not tear down replicas the
    next burst needs. Scaling up is immediate unless ``up_window_s`` asks for the same for growth."""

    def __init__(self, down_window_s: float, up_window_s: float = 0.0) -> None:
        self.down_window_s = down_window_s
        self.up_window_s = up_window_s
        self._recs: dict[str, deque[tuple[float, int]]] = {}

    def apply(self, pool: str, recommended: int, current: int, now: float) -> int:
        recs = self._recs.setdefault(pool, deque())
        recs.append((now, recommended))
        keep = max(self.down_window_s, self.up_window_s)
        while recs and recs[0][0] < now - keep - 1e-9:
            recs.popleft()
        down = [r for t, r in recs if t >= now - self.down_window_s - 1e-9]
        up = [r for t, r in recs if t >= now - self.up_window_s - 1e-9]
        up_limit = min(up)
        down_limit = max(down)
        if current < up_limit:
            return up_limit
        if current > down_limit:
            return down_limit
        return current

    def reset(self) -> None:
        self._recs.clear()


@dataclass(frozen=True, slots=True)
class PoolLimits:
    min: int
    max: int

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < self.min:
            raise InvalidRequest(f"replica limits need 0 <= min <= max (got min {self.min}, max {self.max})")


@dataclass(slots=True)
class PlannerConfig:
    ttft_target: float = 0.5
    itl_target: float = 0.05
    mode: str = "disagg"  # "disagg": prefill + decode pools; "agg": one agg pool
    limits: dict[str, PoolLimits] = field(default_factory=lambda: {
        PREFILL: PoolLimits(1, 8), DECODE: PoolLimits(1, 8), AGG: PoolLimits(1, 8)})
    predictor: str = "moving-average"
    predictor_window: int = 3
    max_utilization: float = 0.9
    prefill_cv2: float = 1.0  # service-time variability in the prefill queueing model
    scale_down_window_s: float = 180.0
    scale_up_window_s: float = 0.0
    scale_to_zero_after_s: float = 0.0  # 0: never
    lookahead: int = 1  # intervals ahead the load is predicted for (cover the time a new replica takes)
    correction: bool = True
    correction_bounds: tuple[float, float] = (0.5, 3.0)
    correction_window: int = 10  # intervals the correction factors average over
    correction_min_samples: int = 20  # requests (TTFT; x10 tokens for ITL) before a factor moves
    correction_settle_s: float = 180.0  # a pool feeds its factor only this long after its size last changed

    def __post_init__(self) -> None:
        if self.mode not in ("disagg", "agg"):
            raise InvalidRequest(f"planner mode must be disagg or agg (got {self.mode!r})", param="mode")
        if self.ttft_target <= 0 or self.itl_target <= 0:
            raise InvalidRequest("TTFT and ITL targets must be > 0")
        if not 0 < self.max_utilization <= 1:
            raise InvalidRequest("max utilization must be in (0, 1]", param="max_utilization")
        if self.lookahead < 1:
            raise InvalidRequest("lookahead must be at least 1 interval", param="lookahead")

    @property
    def pools(self) -> tuple[str, ...]:
        return (PREFILL, DECODE) if self.mode == "disagg" else (AGG,)

    def wake_replicas(self) -> Replicas:
        """What a pool at zero comes back with: its minimum, at least one decode-capable replica."""
        out = {p: self.limits[p].min for p in self.pools}
        if self.mode == "disagg":
            out[DECODE] = max(1, out[DECODE])
            out[PREFILL] = max(out[PREFILL], 0)
        else:
            out[AGG] = max(1, out[AGG])
        return out


@dataclass(slots=True)
class Decision:
    """One adjustment: what the planner saw, predicted and decided, and why."""

    time: float
    current: Replicas
    target: Replicas
    reason: str
    predicted_rate: float | None = None
    predicted_isl: float | None = None
    predicted_osl: float | None = None
    recommended: Replicas = field(default_factory=dict)
    plans: dict[str, PoolPlan] = field(default_factory=dict)
    ttft_correction: float = 1.0
    itl_correction: float = 1.0
    observation: Observation | None = None

    @property
    def changed(self) -> bool:
        return any(self.target.get(p, 0) != self.current.get(p, 0) for p in self.target)

    def to_dict(self) -> dict[str, Any]:
        obs = self.observation
        return {
            "time": round(self.time, 3), "current": self.current, "target": self.target, "reason": self.reason,
            "predicted": {"rate": self.predicted_rate, "isl": self.predicted_isl, "osl": self.predicted_osl},
            "recommended": self.recommended,
            "plans": {p: {"replicas": v.replicas, "feasible": v.feasible, "utilization": round(v.utilization, 4),
                          "expected_latency_s": v.expected_latency, "detail": v.detail}
                      for p, v in self.plans.items()},
            "correction": {"ttft": round(self.ttft_correction, 4), "itl": round(self.itl_correction, 4)},
            "observed": None if obs is None else {
                "duration_s": obs.duration_s, "rate": obs.rate, "isl": obs.isl, "osl": obs.osl,
                "ttft_s": obs.mean_ttft, "itl_s": obs.mean_itl, "inflight": obs.inflight, "demand": obs.demand},
        }


class Planner:
    """Observations in, target replica counts out (see the module docstring for the model)."""

    def __init__(self, cfg: PlannerConfig, profile: Profile) -> None:
        self.cfg = cfg
        self.profile = profile
        self._rate = make_predictor(cfg.predictor, cfg.predictor_window)
        # Lengths are means of a few requests per interval: a trend through them extrapolates noise, so
        # they are smoothed whatever predicts the rate.
        self._isl: Predictor = MovingAveragePredictor(max(3, cfg.predictor_window))
        self._osl: Predictor = MovingAveragePredictor(max(3, cfg.predictor_window))
        self.stabilizer = Stabilizer(cfg.scale_down_window_s, cfg.scale_up_window_s)
        self.ttft_correction = 1.0
        self.itl_correction = 1.0
        self._ttft_window: deque[tuple[float, float, float]] = deque(maxlen=cfg.correction_window)
        self._itl_window: deque[tuple[float, float, float]] = deque(maxlen=cfg.correction_window)
        self.idle_s = 0.0
        self._last_cur: Replicas = {}
        self._changed_at: dict[str, float] = {}
        self.zeroed = False  # this planner took the pools to zero (after an idle spell)

    def clamp(self, replicas: Mapping[str, int], keep_zero: bool = True) -> Replicas:
        """Replica counts within each pool's [min, max]; pools at zero stay there unless ``keep_zero`` is
        False (a planner that starts finds no idle history that would justify zero)."""
        if keep_zero and self.at_zero(replicas):
            return {p: 0 for p in self.cfg.pools}
        return {p: clamp(replicas.get(p, 0), self.cfg.limits[p].min, self.cfg.limits[p].max)
                for p in self.cfg.pools}

    def at_zero(self, replicas: Mapping[str, int]) -> bool:
        return all(replicas.get(p, 0) == 0 for p in self.cfg.pools)

    # -- feedback

    def _update_corrections(self, obs: Observation, current: Mapping[str, int], now: float) -> None:
        """Observed / expected latency over the last ``correction_window`` intervals, once they hold
        ``correction_min_samples`` samples: a few requests that happened to collide say nothing."""
        cfg = self.cfg
        prof = self.profile
        pre_pool, dec_pool = (PREFILL, DECODE) if cfg.mode == "disagg" else (AGG, AGG)
        # Replicas that are still starting (or a queue built before they came) are not the engine's speed.
        settled = {p: now - self._changed_at.get(p, now) >= cfg.correction_settle_s for p in cfg.pools}
        isl, ttft = obs.isl, obs.mean_ttft
        n_pre = current.get(pre_pool, 0)
        if isl is not None and ttft is not None and n_pre > 0 and settled[pre_pool]:
            s = prof.ttft(isl)
            rho = obs.rate * s / n_pre
            # Only a lightly loaded pool tells the engine's speed apart from queueing the model may misjudge.
            if rho < 0.5:
                expected = s + prefill_wait(rho, s, cfg.prefill_cv2)
                self._ttft_window.append((obs.ttft_sum, expected * obs.ttft_count, obs.ttft_count))
                self.ttft_correction = self._window_ratio(self._ttft_window, self.ttft_correction)
        itl = obs.mean_itl
        n_dec = current.get(dec_pool, 0)
        if itl is not None and n_dec > 0 and obs.duration_s > 0 and settled[dec_pool]:
            c = obs.output_tokens / obs.duration_s * itl / n_dec  # Little's law per replica
            ctx = (obs.isl or 0.0) + (obs.osl or 0.0) / 2
            expected = prof.itl(max(c, 1.0), ctx)
            self._itl_window.append((obs.itl_sum, expected * obs.itl_count, obs.itl_count))
            self.itl_correction = self._window_ratio(self._itl_window, self.itl_correction,
                                                     self.cfg.correction_min_samples * 10)

    def _window_ratio(self, window: deque[tuple[float, float, float]], current: float,
                      min_samples: int | None = None) -> float:
        observed = sum(o for o, _, _ in window)
        expected = sum(e for _, e, _ in window)
        samples = sum(n for _, _, n in window)
        if samples < (min_samples or self.cfg.correction_min_samples) or expected <= 0:
            return current
        lo, hi = self.cfg.correction_bounds
        return clamp_f(observed / expected, lo, hi)

    # -- one interval

    def step(self, obs: Observation | None, current: Mapping[str, int], now: float) -> Decision:
        """Feed one interval's observation (None: the metrics could not be read) and decide."""
        cfg = self.cfg
        cur = {p: int(current.get(p, 0)) for p in cfg.pools}
        for p in cfg.pools:
            if self._last_cur.get(p) != cur[p]:
                self._changed_at[p] = now
        self._last_cur = dict(cur)
        if obs is None:
            return Decision(now, cur, dict(cur), "no metrics this interval: holding")
        if obs.idle:
            self.idle_s += obs.duration_s
        else:
            self.idle_s = 0.0
        at_zero = self.at_zero(cur)
        demand = obs.demand > 0 or obs.requests > 0 or obs.inflight > 0
        if at_zero and demand:
            # Put there by us after an idle spell, or minimums of 0: either way a request is waiting.
            self.zeroed = False
            self.stabilizer.reset()
            return Decision(now, cur, cfg.wake_replicas(), f"demand at zero ({obs.demand:g} waiting or "
                            f"refused): waking", observation=obs)
        if self.zeroed:
            if at_zero:
                return Decision(now, cur, dict(cur), "at zero, no demand", observation=obs)
            self.zeroed = False  # someone else started workers meanwhile: plan from here

        if obs.arrivals is not None:
            self._rate.add(obs.rate)
        else:
            # No arrival count: the prompt tokens, counted as requests come in, over the prompt length seen
            # so far (the first-token count lags behind a queue, the very thing to catch).
            isl_ref = self._isl.predict() or obs.isl
            self._rate.add(obs.input_tokens / isl_ref / obs.duration_s if isl_ref and obs.duration_s > 0
                           else obs.rate)
        if obs.isl is not None:
            self._isl.add(obs.isl)
        if obs.osl is not None:
            self._osl.add(obs.osl)
        if cfg.correction:
            self._update_corrections(obs, cur, now)

        if cfg.scale_to_zero_after_s > 0 and self.idle_s >= cfg.scale_to_zero_after_s and not at_zero:
            self.zeroed = True
            self.stabilizer.reset()
            return Decision(now, cur, {p: 0 for p in cfg.pools},
                            f"idle for {self.idle_s:.1f}s: scaling to zero", observation=obs,
                            ttft_correction=self.ttft_correction, itl_correction=self.itl_correction)

        # Only a trend extends further ahead; a constant or a mean is the same value at any horizon.
        ahead = getattr(self._rate, "predict_ahead", None)
        rate = (ahead(cfg.lookahead) if ahead is not None and cfg.lookahead > 1 else self._rate.predict()) or 0.0
        isl = self._isl.predict()
        osl = self._osl.predict()
        plans: dict[str, PoolPlan] = {}
        raw = {p: 0 for p in cfg.pools}  # no load seen yet: the minimum
        if isl is not None and rate > 0:
            plans[PREFILL] = prefill_replicas(rate, isl, self.profile, cfg.ttft_target,
                                              correction=self.ttft_correction,
                                              max_utilization=cfg.max_utilization, cv2=cfg.prefill_cv2)
            if osl is not None:
                plans[DECODE] = decode_replicas(rate, osl, self.profile, cfg.itl_target, isl=isl,
                                                correction=self.itl_correction,
                                                max_utilization=cfg.max_utilization)
            # No request has finished yet (a first burst): output lengths are unknown, decode holds.
            n_dec = plans[DECODE].replicas if DECODE in plans else cur.get(DECODE, cur.get(AGG, 0))
            if cfg.mode == "disagg":
                raw = {PREFILL: plans[PREFILL].replicas, DECODE: n_dec}
            else:
                raw = {AGG: plans[PREFILL].replicas + (plans[DECODE].replicas if DECODE in plans else 0)}
                if DECODE not in plans:
                    raw[AGG] = max(raw[AGG], cur[AGG])
        recommended = {p: clamp(raw[p], cfg.limits[p].min, cfg.limits[p].max) for p in cfg.pools}
        target = {p: clamp(self.stabilizer.apply(p, recommended[p], cur[p], now),
                           cfg.limits[p].min, cfg.limits[p].max) for p in cfg.pools}
        held = [p for p in cfg.pools if target[p] > recommended[p]]
        reason = "load" if not held else f"load; scale-down held by the stabilization window for {held}"
        return Decision(now, cur, target, reason, rate, isl, osl, recommended, plans,
                        self.ttft_correction, self.itl_correction, obs)


def clamp_f(value: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, value))
