"""The SLA arithmetic: how many prefill and decode replicas meet the TTFT and ITL targets at a given load,
from a :class:`~planner.profile.Profile`. Pure functions; :class:`~planner.core.Planner` calls them once
per interval with the predicted load and its correction factors.

The model behind the formulas (times in seconds, rates in requests per second):

- Prefill is compute-bound: a prompt of ``isl`` tokens occupies a prefill replica for ``s = ttft(isl)``
  (the profile's TTFT of a lone request). With ``n`` replicas each one is busy ``rho = rate * s / n`` of
  the time, and a request waits on average ``k * rho * s / (1 - rho)`` before its turn, with
  ``k = (1 + cv2) / 2`` (Pollaczek-Khinchine, M/G/1; ``cv2`` is the squared coefficient of variation of
  service times: 0 for identical prompts, 1 (the default) covers spread prompt lengths and scheduling
  noise). The smallest ``n`` whose expected TTFT ``s + wait`` meets the target is::

      rho_max = (target - s) / (k * s + target - s)      n = ceil(rate * s / min(rho_max, u))

- Decode is bandwidth-bound: a replica running ``c`` sequences emits one token per sequence every
  ``itl(c)`` seconds. The ITL target caps ``c`` at ``c_max`` (``itl(c_max) == target``), which caps a
  replica's throughput at ``c_max / itl(c_max)`` tokens per second; the pool must emit ``rate * osl``::

      n = ceil(rate * osl / (u * c_max / itl(c_max)))

  ``u`` (``max_utilization``) keeps headroom for the bursts a mean does not show.

- Aggregated workers do both jobs on one pool, so they need the sum of both pools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.profile import Profile


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """One pool's sizing: replicas and what the model expects of them."""

    replicas: int
    feasible: bool  # False: the target is below what one replica does unloaded; sized for low queueing
    utilization: float  # busy share of each replica at this size
    expected_latency: float  # expected TTFT (prefill) or ITL (decode) in seconds at this size
    detail: str = ""


def prefill_wait(rho: float, service: float, cv2: float = 1.0) -> float:
    """Mean wait before service of an M/G/1 queue at utilization ``rho`` whose service times have squared
    coefficient of variation ``cv2`` (inf at or past saturation)."""
    if rho >= 1.0:
        return math.inf
    return (1.0 + cv2) / 2.0 * rho * service / (1.0 - rho)


def prefill_replicas(rate: float, isl: float, profile: Profile, ttft_target: float, *,
                     correction: float = 1.0, max_utilization: float = 0.9, cv2: float = 1.0) -> PoolPlan:
    """Prefill replicas so the expected TTFT of ``rate`` requests/s of ``isl`` tokens meets the target."""
    s = profile.ttft(isl) * correction
    if rate <= 0:
        return PoolPlan(0, s <= ttft_target, 0.0, s, "no load")
    slack = ttft_target - s
    feasible = slack > 0
    k = (1.0 + cv2) / 2.0
    # Past the target even unloaded: keep queueing small instead (half-busy replicas).
    rho_max = slack / (k * s + slack) if feasible else 0.5
    rho_max = min(rho_max, max_utilization)
    n = max(1, math.ceil(rate * s / rho_max - 1e-9))
    rho = rate * s / n
    detail = f"service {s * 1e3:.1f} ms, rho_max {rho_max:.3f}"
    return PoolPlan(n, feasible, rho, s + prefill_wait(rho, s, cv2), detail)


def decode_replicas(rate: float, osl: float, profile: Profile, itl_target: float, *, isl: float = 0.0,
                    correction: float = 1.0, max_utilization: float = 0.9) -> PoolPlan:
    """Decode replicas so ``rate`` requests/s of ``osl`` output tokens run at or under the ITL target."""
    ctx = isl + osl / 2  # mean context of a sequence over its decode
    c_max = profile.concurrency_for_itl(itl_target, ctx, correction)
    feasible = c_max >= 1.0
    if not feasible:
        c_max = 1.0  # one sequence per replica is the best the engine does
    thpt = c_max / (profile.itl(c_max, ctx) * correction)  # tokens/s of one replica at the cap
    if rate <= 0 or osl <= 0:
        return PoolPlan(0, feasible, 0.0, profile.itl(1.0, ctx) * correction, "no load")
    n = max(1, math.ceil(rate * osl / (thpt * max_utilization) - 1e-9))
    c = _decode_concurrency(rate * osl, n, profile, ctx, correction)
    itl = profile.itl(max(c, 1.0), ctx) * correction
    detail = f"c_max {c_max:.1f}/replica, {thpt:.0f} tok/s/replica"
    return PoolPlan(n, feasible, c / c_max, itl, detail)


def _decode_concurrency(token_rate: float, n: int, profile: Profile, ctx: float, correction: float) -> float:
    """Sequences per replica in steady state: Little's law c = (token_rate / n) * itl(c), by iteration."""
    c = 1.0
    for _ in range(100):
        nxt = token_rate / n * profile.itl(max(c, 1.0), ctx) * correction
        if profile.max_concurrency:
            nxt = min(nxt, float(profile.max_concurrency))
        if abs(nxt - c) < 1e-6:
            return nxt
        c = nxt
    return c
