"""The planner bench's baselines as pure logic (``bench/planner.py`` runs them; tests/test_bench_planner.py
checks them). Not a bench: run on its own it does nothing.

- :class:`FleetSearch`: the smallest static fleet (prefill, decode replicas) that meets the SLA on the
  trace; cost is total replicas (every replica is one GPU for the whole trace). A measured result rules
  out others by monotonicity (a fleet no larger than a failing one, pool by pool, fails too) and, when
  one SLA component alone is below the threshold, by pool: TTFT is the prefill pool's doing and ITL the
  decode pool's, so a TTFT share below the threshold rules out every fleet with no more prefill
  replicas, whatever its decode pool (likewise ITL and decode). Until a fleet passes, the search gallops
  from (1, 1): it doubles the pool whose component failed (both grow by one when only the combination
  did); then it tries the fleets left that are cheaper than the best pass, cheapest first. It ends when
  none is left (the best pass is proven the smallest) or its run budget is spent.
- :func:`reactive_step`: a queue-depth autoscaler's rule for one pool and one interval (HPA-like):
  out at once to ``ceil(depth / up)`` when the mean requests per replica exceeded ``up``, in by one after
  ``down_intervals`` intervals in a row below ``down``.
- :func:`miss_budget` and :func:`certain_misses`: how many requests may miss before a run cannot reach the
  attainment threshold, and how many already did (finished or not), so a search run that is certain to
  fail stops early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Fleet = tuple[int, int]  # (prefill replicas, decode replicas)


@dataclass
class Sample:
    """One request of the trace as the client saw it (times in wall seconds)."""

    t: float  # scheduled send time from the trace start
    isl: int
    osl: int
    status: int = 0
    ttft: float | None = None  # set when the first token arrives
    itl: float | None = None  # mean, set at the end
    tokens: int = 0
    error: str = ""
    sent: float = 0.0  # time.monotonic() when it was sent; 0: not sent
    done: bool = False

    @property
    def failed(self) -> bool:
        return self.done and (self.status != 200 or bool(self.error) or self.ttft is None)


def miss_budget(requests: int, threshold: float) -> int:
    """Most requests that may miss the SLA while ``met / requests >= threshold`` still holds."""
    return requests - math.ceil(threshold * requests - 1e-9)


def certain_misses(samples: list[Sample], now: float, ttft_target: float, itl_target: float
                   ) -> tuple[int, int, int]:
    """(missed, TTFT missed, ITL missed) among the requests sent so far, counting only what is already
    certain: a failed request (both components), a first token later than the target or still missing
    past it, a finished request's mean ITL over the target."""
    n = n_ttft = n_itl = 0
    for s in samples:
        if not s.sent:
            continue
        failed = s.failed
        ttft = failed or (s.ttft > ttft_target if s.ttft is not None else now - s.sent > ttft_target)
        itl = failed or (s.done and s.itl is not None and s.itl > itl_target)
        n += ttft or itl
        n_ttft += ttft
        n_itl += itl
    return n, n_ttft, n_itl


@dataclass(frozen=True, slots=True)
class Verdict:
    """One static run's outcome. ``ttft_failed`` / ``itl_failed``: that component's share alone was below
    the threshold (a failed request counts against both)."""

    fleet: Fleet
    passed: bool
    ttft_failed: bool = False
    itl_failed: bool = False


@dataclass
class FleetSearch:
    """Cheapest-first search over ``[1, max_prefill] x [1, max_decode]`` (see the module docstring)."""

    max_prefill: int
    max_decode: int
    max_runs: int
    verdicts: list[Verdict] = field(default_factory=list)

    @staticmethod
    def cost(f: Fleet) -> tuple[int, int, int]:
        # Total replicas first (GPU-seconds); among equals, the more even split, then fewer prefill.
        return f[0] + f[1], abs(f[0] - f[1]), f[0]

    def record(self, v: Verdict) -> None:
        self.verdicts.append(v)

    def measured(self, f: Fleet) -> Verdict | None:
        return next((v for v in reversed(self.verdicts) if v.fleet == f), None)

    def ruled_out(self, f: Fleet) -> bool:
        """A failure implied by a measured one (the fleet itself may not have been run)."""
        p, d = f
        for v in self.verdicts:
            if v.passed:
                continue
            if (p <= v.fleet[0] and d <= v.fleet[1]) or (v.ttft_failed and p <= v.fleet[0]) \
                    or (v.itl_failed and d <= v.fleet[1]):
                return True
        return False

    def best(self) -> Fleet | None:
        """The cheapest fleet that passed a run."""
        passed = [v.fleet for v in self.verdicts if v.passed]
        return min(passed, key=self.cost) if passed else None

    def open(self) -> list[Fleet]:
        """Untried fleets not ruled out and cheaper than the best pass, cheapest first."""
        best = self.best()
        out = [(p, d) for p in range(1, self.max_prefill + 1) for d in range(1, self.max_decode + 1)
               if self.measured((p, d)) is None and not self.ruled_out((p, d))
               and (best is None or self.cost((p, d))[0] < self.cost(best)[0])]
        return sorted(out, key=self.cost)

    def next(self) -> Fleet | None:
        """The fleet to run next; None when the search is over."""
        if len(self.verdicts) >= self.max_runs:
            return None
        left = self.open()
        if not left:
            return None
        if self.best() is None and self.verdicts:
            v = self.verdicts[-1]
            p, d = v.fleet
            if v.ttft_failed or v.itl_failed:
                p, d = 2 * p if v.ttft_failed else p, 2 * d if v.itl_failed else d
            else:
                p, d = p + 1, d + 1
            # Past what the component rules already ruled out, within the limits.
            p = min(self.max_prefill, max([p, *(u.fleet[0] + 1 for u in self.verdicts if u.ttft_failed)]))
            d = min(self.max_decode, max([d, *(u.fleet[1] + 1 for u in self.verdicts if u.itl_failed)]))
            if (p, d) in left:
                return p, d
        return left[0]

    @property
    def proven(self) -> bool:
        """The best pass is the smallest (given the rules above): nothing cheaper is left to try."""
        return self.best() is not None and not self.open()


@dataclass(frozen=True, slots=True)
class ReactiveRule:
    """One pool's queue-depth thresholds (requests at a replica, running + waiting) and limits."""

    up: float
    down: float
    down_intervals: int
    min: int
    max: int


def reactive_step(rule: ReactiveRule, replicas: int, depth: float, low_streak: int) -> tuple[int, int]:
    """One interval: ``depth`` is the pool's mean total queue over it. Returns (target replicas, low
    streak)."""
    n = max(replicas, 1)
    if depth / n > rule.up:
        return min(rule.max, max(n + 1, math.ceil(depth / rule.up - 1e-9))), 0
    if depth / n < rule.down:
        streak = low_streak + 1
        if streak >= rule.down_intervals and n > rule.min:
            return n - 1, 0
        return max(rule.min, min(rule.max, n)), streak
    return max(rule.min, min(rule.max, n)), 0


if __name__ == "__main__":
    pass  # a helper module: `make bench` runs every bench/*.py
