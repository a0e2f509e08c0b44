"""The planner bench's baselines (bench/_planner_baselines.py): the static fleet search, the reactive
autoscaler's rule and the early-stop arithmetic. Pure logic, no processes."""

from __future__ import annotations

from bench._planner_baselines import (
    FleetSearch,
    ReactiveRule,
    Sample,
    Verdict,
    certain_misses,
    miss_budget,
    reactive_step,
)


def test_miss_budget_is_the_most_misses_that_still_meet_the_threshold() -> None:
    assert miss_budget(100, 0.95) == 5
    assert miss_budget(468, 0.95) == 23
    assert miss_budget(20, 0.95) == 1
    assert miss_budget(10, 1.0) == 0
    for n in (1, 7, 20, 99, 468, 1000):
        b = miss_budget(n, 0.95)
        assert (n - b) / n >= 0.95 and (n - b - 1) / n < 0.95


def _sample(**kw: object) -> Sample:
    s = Sample(t=0.0, isl=10, osl=10, sent=100.0)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_certain_misses_counts_only_what_is_already_known() -> None:
    now, ttft, itl = 102.0, 1.0, 0.05
    cases = [
        (Sample(t=0.0, isl=1, osl=1), (0, 0, 0)),  # never sent
        (_sample(done=True, status=200, ttft=0.5, itl=0.04, tokens=10), (0, 0, 0)),
        (_sample(done=True, status=200, ttft=1.5, itl=0.04, tokens=10), (1, 1, 0)),
        (_sample(done=True, status=200, ttft=0.5, itl=0.06, tokens=10), (1, 0, 1)),
        (_sample(done=True, status=500, error="boom"), (1, 1, 1)),  # a failure misses both
        (_sample(), (1, 1, 0)),  # in flight, no first token 2 s after it was sent
        (_sample(sent=101.5), (0, 0, 0)),  # in flight, still within the TTFT target
        (_sample(status=200, ttft=0.5), (0, 0, 0)),  # streaming, first token in time, ITL not known yet
    ]
    for s, want in cases:
        assert certain_misses([s], now, ttft, itl) == want, s
    assert certain_misses([s for s, _ in cases], now, ttft, itl) == (4, 3, 2)


def _truth(p_min: int, d_min: int):  # type: ignore[no-untyped-def]
    """A fleet passes when both pools are big enough; each short pool fails its own SLA component."""
    def run(f: tuple[int, int]) -> Verdict:
        return Verdict(f, f[0] >= p_min and f[1] >= d_min, f[0] < p_min, f[1] < d_min)
    return run


def _search(s: FleetSearch, truth) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    tried = []
    while (f := s.next()) is not None:
        tried.append(f)
        s.record(truth(f))
    return tried


def test_search_gallops_to_a_pass_then_proves_the_minimum() -> None:
    s = FleetSearch(8, 4, max_runs=10)
    # (1,1) fails both components: both pools double; (2,2) fails TTFT: prefill doubles; (4,2) passes;
    # the one cheaper fleet left (prefill >= 3, decode >= 2, under 6 replicas) is (3,2): it passes.
    assert _search(s, _truth(3, 2)) == [(1, 1), (2, 2), (4, 2), (3, 2)]
    assert s.best() == (3, 2) and s.proven


def test_search_finds_a_lopsided_minimum() -> None:
    s = FleetSearch(8, 4, max_runs=10)
    # (4,2) fails TTFT too, (8,2) passes; of the fleets under 10 replicas only (5,2) and up are left.
    assert _search(s, _truth(5, 2)) == [(1, 1), (2, 2), (4, 2), (8, 2), (5, 2)]
    assert s.best() == (5, 2) and s.proven


def test_search_gallop_respects_the_limits_and_the_rules() -> None:
    s = FleetSearch(6, 3, max_runs=10)
    # Doubling stops at the limits; after the pass at (6,3) the one cheaper fleet left, (5,3), fails.
    assert _search(s, _truth(6, 3)) == [(1, 1), (2, 2), (4, 3), (6, 3), (5, 3)]
    assert s.best() == (6, 3) and s.proven


def test_search_stops_at_its_run_budget_unproven() -> None:
    s = FleetSearch(8, 4, max_runs=2)
    assert _search(s, _truth(3, 2)) == [(1, 1), (2, 2)]
    assert s.best() is None and not s.proven and s.next() is None


def test_search_when_nothing_passes_ends_at_the_largest_fleet() -> None:
    s = FleetSearch(3, 2, max_runs=20)
    tried = _search(s, lambda f: Verdict(f, False))  # no component alone below: both pools grow by one
    assert tried == [(1, 1), (2, 2), (3, 2)]
    assert s.best() is None and not s.proven


def test_a_failure_rules_out_what_it_dominates_and_its_failed_component() -> None:
    s = FleetSearch(8, 4, max_runs=10)
    s.record(Verdict((2, 2), False))
    assert s.ruled_out((1, 2)) and s.ruled_out((2, 1)) and s.ruled_out((2, 2))
    assert not s.ruled_out((3, 1)) and not s.ruled_out((1, 3))
    s.record(Verdict((2, 1), False, ttft_failed=True))
    assert s.ruled_out((2, 4)) and s.ruled_out((1, 4)) and not s.ruled_out((3, 1))
    s.record(Verdict((4, 1), False, itl_failed=True))
    assert s.ruled_out((8, 1)) and not s.ruled_out((3, 2))


def test_a_pass_bounds_the_search_to_cheaper_fleets() -> None:
    s = FleetSearch(8, 4, max_runs=10)
    s.record(Verdict((4, 2), True))
    assert s.best() == (4, 2)
    assert all(p + d < 6 for p, d in s.open())
    assert s.next() == (1, 1)
    assert FleetSearch.cost((2, 2)) < FleetSearch.cost((1, 3)) < FleetSearch.cost((3, 1))


RULE = ReactiveRule(up=3.0, down=1.0, down_intervals=3, min=1, max=8)


def test_reactive_scales_out_at_once_to_the_depth_over_up() -> None:
    assert reactive_step(RULE, 2, 9.0, 2) == (3, 0)  # 4.5 per replica: ceil(9 / 3)
    assert reactive_step(RULE, 2, 6.5, 0) == (3, 0)  # just over: at least one more
    assert reactive_step(RULE, 2, 30.0, 0) == (8, 0)  # capped at max
    assert reactive_step(RULE, 8, 40.0, 0) == (8, 0)


def test_reactive_holds_between_the_thresholds_and_resets_the_streak() -> None:
    assert reactive_step(RULE, 2, 4.0, 2) == (2, 0)
    assert reactive_step(RULE, 2, 6.0, 1) == (2, 0)  # exactly up: not over it


def test_reactive_scales_in_by_one_after_enough_quiet_intervals() -> None:
    n, streak = 3, 0
    seen = []
    for _ in range(7):
        n, streak = reactive_step(RULE, n, 0.5, streak)
        seen.append(n)
    assert seen == [3, 3, 2, 2, 2, 1, 1]
    assert reactive_step(RULE, 1, 0.0, 5) == (1, 6)  # at the minimum it stays
