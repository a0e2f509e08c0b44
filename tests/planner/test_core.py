"""The planner's arithmetic: replica formulas on known inputs, predictors on synthetic series, profiles,
clamping, stabilization, scale-to-zero and the correction factors. Pure logic, no processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dynamo_rt.errors import InvalidRequest
from planner.core import AGG, DECODE, PREFILL, Observation, Planner, PlannerConfig, PoolLimits, Stabilizer
from planner.predictors import make_predictor
from planner.profile import PROFILE_FORMAT, DecodeCurve, Profile
from planner.sla import decode_replicas, prefill_replicas

# ttft(isl) = 0.02 + 1e-4 * (isl - 100); itl(c) = 0.010 + 1e-4 * (c - 1): easy to do by hand.
PROFILE = Profile(prefill_isl=(100.0, 1000.0), prefill_ttft_s=(0.02, 0.11),
                  decode=(DecodeCurve(0.0, (1.0, 101.0), (0.010, 0.020)),))


# ---------------------------------------------------------------------------------------------------------
# Replica formulas


@pytest.mark.parametrize(
    ("rate", "isl", "target", "util", "corr", "cv2", "replicas", "feasible"),
    [
        # M/D/1 (cv2 0). s = 0.06, slack 0.06: rho_max = 0.06 / (0.5 * 0.06 + 0.06) = 2/3;
        # 10 * 0.06 / (2/3) = 0.9 -> 1
        (10.0, 500, 0.12, 0.9, 1.0, 0.0, 1, True),
        # 50 * 0.06 / (2/3) = 4.5 -> 5
        (50.0, 500, 0.12, 0.9, 1.0, 0.0, 5, True),
        # slack 0.44: rho_max = 0.44 / 0.47 = 0.936, capped by u = 0.9: 3 / 0.9 = 3.33 -> 4
        (50.0, 500, 0.5, 0.9, 1.0, 0.0, 4, True),
        # s = 0.11 > target 0.1: sized for rho 0.5: 1.1 / 0.5 = 2.2 -> 3
        (10.0, 1000, 0.1, 0.9, 1.0, 0.0, 3, False),
        # correction 2: s = 0.12, slack 0.12, rho_max 2/3: 1.2 / (2/3) = 1.8 -> 2
        (10.0, 500, 0.24, 0.9, 2.0, 0.0, 2, True),
        # exactly at the boundary: 100/9 req/s: 100/9 * 0.06 / (2/3) = 1.0 -> 1
        (100 / 9, 500, 0.12, 0.9, 1.0, 0.0, 1, True),
        # past the end of the curve: ttft(1900) = 0.20 (extended), target 0.6: rho_max = 0.4 / 0.5 = 0.8,
        # capped by u = 0.75: 5 * 0.2 / 0.75 = 1.33 -> 2
        (5.0, 1900, 0.6, 0.75, 1.0, 0.0, 2, True),
        # M/G/1 with cv2 1 (the default): rho_max = 0.06 / (0.06 + 0.06) = 0.5: 0.6 / 0.5 = 1.2 -> 2
        (10.0, 500, 0.12, 0.9, 1.0, 1.0, 2, True),
        # slack 0.44: rho_max = 0.44 / 0.5 = 0.88: 3 / 0.88 = 3.41 -> 4
        (50.0, 500, 0.5, 0.9, 1.0, 1.0, 4, True),
        # cv2 3 (k = 2): rho_max = 0.06 / 0.18 = 1/3: 10 * 0.06 * 3 = 1.8 -> 2
        (10.0, 500, 0.12, 0.9, 1.0, 3.0, 2, True),
        (0.0, 500, 0.12, 0.9, 1.0, 1.0, 0, True),
    ],
)
def test_prefill_replicas(rate: float, isl: int, target: float, util: float, corr: float, cv2: float,
                          replicas: int, feasible: bool) -> None:
    plan = prefill_replicas(rate, isl, PROFILE, target, correction=corr, max_utilization=util, cv2=cv2)
    assert (plan.replicas, plan.feasible) == (replicas, feasible)
    if replicas:
        s = PROFILE.ttft(isl) * corr
        k = (1 + cv2) / 2

        def ttft(n: int) -> float:
            rho = rate * s / n
            return s + k * rho * s / (1 - rho) if rho < 1 else math.inf

        assert plan.utilization == pytest.approx(rate * s / replicas)
        assert plan.expected_latency == pytest.approx(ttft(replicas))
        if feasible:
            assert plan.expected_latency <= target + 1e-12
            # One replica fewer would miss the target (or pass the utilization cap): the smallest count.
            if replicas > 1:
                assert rate * s / (replicas - 1) > util or ttft(replicas - 1) > target


@pytest.mark.parametrize(
    ("rate", "osl", "target", "util", "corr", "max_conc", "replicas", "feasible", "c_max"),
    [
        # itl(c) <= 0.015 -> c_max 51, 3400 tok/s; 1000 tok/s / (0.9 * 3400) = 0.33 -> 1
        (10.0, 100, 0.015, 0.9, 1.0, None, 1, True, 51.0),
        # 10000 / 3060 = 3.27 -> 4
        (100.0, 100, 0.015, 0.9, 1.0, None, 4, True, 51.0),
        # no headroom: 10200 / 3400 = 3 exactly -> 3
        (100.0, 102, 0.015, 1.0, 1.0, None, 3, True, 51.0),
        # below one sequence's ITL: one sequence per replica, 100 tok/s: 100 / 90 -> 2
        (1.0, 100, 0.009, 0.9, 1.0, None, 2, False, 1.0),
        # correction 1.5: only c = 1 fits (0.015), 66.7 tok/s: 100 / 60 -> 2
        (1.0, 100, 0.015, 0.9, 1.5, None, 2, True, 1.0),
        # the engine runs at most 20 sequences: 20 / 0.0119 = 1680.7 tok/s; 10000 / 1512.6 = 6.6 -> 7
        (100.0, 100, 0.015, 0.9, 1.0, 20, 7, True, 20.0),
        (0.0, 100, 0.015, 0.9, 1.0, None, 0, True, 51.0),
    ],
)
def test_decode_replicas(rate: float, osl: int, target: float, util: float, corr: float, max_conc: int | None,
                         replicas: int, feasible: bool, c_max: float) -> None:
    prof = Profile(PROFILE.prefill_isl, PROFILE.prefill_ttft_s, PROFILE.decode, max_concurrency=max_conc)
    plan = decode_replicas(rate, osl, prof, target, correction=corr, max_utilization=util)
    assert (plan.replicas, plan.feasible) == (replicas, feasible)
    got_c_max = prof.concurrency_for_itl(target, None, corr)
    assert got_c_max == pytest.approx(c_max if feasible else 0.0, abs=1e-6)
    if replicas and feasible:
        # Steady state satisfies Little's law and stays within the target.
        c = plan.utilization * c_max
        assert c == pytest.approx(rate * osl / replicas * prof.itl(max(c, 1)) * corr, rel=1e-6)
        assert plan.expected_latency <= target + 1e-12


def test_profile_interpolation_and_context() -> None:
    two = Profile((100.0, 1000.0), (0.02, 0.11), (
        DecodeCurve(100.0, (1.0, 101.0), (0.010, 0.020)),
        DecodeCurve(300.0, (1.0, 101.0), (0.012, 0.030)),
    ))
    assert two.ttft(550) == pytest.approx(0.065)
    assert two.ttft(50) == pytest.approx(0.015)  # extended below the first point
    assert two.itl(51, 100) == pytest.approx(0.015)
    assert two.itl(51, 300) == pytest.approx(0.021)
    assert two.itl(51, 200) == pytest.approx(0.018)  # halfway between the two contexts
    assert two.concurrency_for_itl(0.021, 300) == pytest.approx(51.0)
    scaled = two.scaled(4.0)
    assert scaled.ttft(550) == pytest.approx(0.065 / 4)
    assert scaled.itl(51, 200) == pytest.approx(0.018 / 4)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="other/1"), "not a dynamo-rt-profile/1 profile"),
        (lambda d: d["prefill"].update(isl=[100, 50]), "x values must increase"),
        (lambda d: d["prefill"].update(ttft_s=[0.1]), "equally many"),
        (lambda d: d["decode"][0].update(itl_s=[0.01, -1]), "must be positive"),
        (lambda d: d.update(decode=[]), "no decode curve"),
        (lambda d: d.pop("prefill"), "malformed profile"),
    ],
)
def test_profile_rejects_malformed(mutate: object, message: str) -> None:
    doc = PROFILE.to_dict()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(InvalidRequest, match=message):
        Profile.from_dict(doc)


def test_profile_round_trip_and_shipped(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({**PROFILE.to_dict(), "engine": "test"}))
    p = Profile.load(f)
    assert (p.prefill_isl, p.prefill_ttft_s, p.decode) == (PROFILE.prefill_isl, PROFILE.prefill_ttft_s, PROFILE.decode)
    assert p.meta["engine"] == "test" and p.meta["format"] == PROFILE_FORMAT
    shipped = Profile.load("mocker")
    assert shipped.meta["engine"] == "mocker" and shipped.max_concurrency == 256
    # The shipped profile measured the default timing model: TTFT grows with the prompt, ITL with the batch.
    assert list(shipped.prefill_ttft_s) == sorted(shipped.prefill_ttft_s)
    assert list(shipped.decode[0].itl_s) == sorted(shipped.decode[0].itl_s)
    with pytest.raises(InvalidRequest, match="no profile file 'nope'"):
        Profile.load("nope")


# ---------------------------------------------------------------------------------------------------------
# Predictors


def _run(spec: str, window: int, series: list[float]) -> float | None:
    p = make_predictor(spec, window)
    for v in series:
        p.add(v)
    return p.predict()


def max_factory(window: int) -> object:
    class Max:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def add(self, value: float) -> None:
            self.seen = [*self.seen, value][-window:]

        def predict(self) -> float | None:
            return max(self.seen) if self.seen else None

    return Max()


@pytest.mark.parametrize(
    ("spec", "window", "series", "expected"),
    [
        ("constant", 5, [], None),
        ("constant", 5, [1, 2, 3], 3),
        ("moving-average", 3, [1, 2, 3, 4], 3),
        ("moving-average", 5, [2, 4], 3),
        ("linear", 4, [1, 2, 3, 4], 5),
        ("linear", 4, [10, 8, 6, 4], 2),
        ("linear", 4, [6, 4, 2, 0], 0),  # the line goes negative: clamped
        ("linear", 3, [100, 1, 2, 3], 4),  # only the window counts
        ("linear", 4, [7], 7),
        ("linear", 2, [0, 5], 10),
        (f"{__name__}:max_factory", 2, [5, 1, 2], 2),
    ],
)
def test_predictors(spec: str, window: int, series: list[float], expected: float | None) -> None:
    got = _run(spec, window, series)
    assert got == (None if expected is None else pytest.approx(expected))


def test_linear_lookahead() -> None:
    p = make_predictor("linear", 4)
    for v in (1, 2, 3, 4):
        p.add(v)
    assert [p.predict_ahead(h) for h in (1, 2, 3)] == [5, 6, 7]  # type: ignore[attr-defined]
    pl = Planner(_cfg(predictor="linear", lookahead=3), PROFILE)
    for t, rate in enumerate((10.0, 20.0, 30.0)):
        d = pl.step(_obs(rate), {PREFILL: 1, DECODE: 1}, now=t)
    assert d.predicted_rate == pytest.approx(60.0)  # the ramp three intervals on


def test_predictor_errors() -> None:
    with pytest.raises(InvalidRequest, match="unknown predictor 'arima'"):
        make_predictor("arima", 3)
    with pytest.raises(InvalidRequest, match="cannot load predictor"):
        make_predictor("no.such.module:f", 3)
    with pytest.raises(InvalidRequest, match="at least 2"):
        make_predictor("linear", 1)


# ---------------------------------------------------------------------------------------------------------
# Stabilization and clamping


def test_scale_down_stabilization() -> None:
    st = Stabilizer(down_window_s=10)
    assert st.apply(PREFILL, 5, 5, now=0) == 5
    assert st.apply(PREFILL, 2, 5, now=5) == 5  # the 5 of t=0 is still in the window
    assert st.apply(PREFILL, 3, 5, now=9) == 5
    assert st.apply(PREFILL, 2, 5, now=11) == 3  # t=0 left the window; the largest since is 3 (t=9)
    assert st.apply(PREFILL, 2, 3, now=20) == 2
    assert st.apply(PREFILL, 6, 2, now=21) == 6  # growth is immediate
    assert st.apply(DECODE, 1, 4, now=21) == 1  # pools are independent


def test_scale_up_stabilization() -> None:
    st = Stabilizer(down_window_s=0, up_window_s=5)
    assert st.apply(AGG, 2, 2, now=0) == 2
    assert st.apply(AGG, 6, 2, now=1) == 2  # the window still holds a 2
    assert st.apply(AGG, 6, 2, now=6) == 6  # every recommendation of the last 5 s says 6 or more


def _cfg(**kw: object) -> PlannerConfig:
    base: dict[str, object] = {"ttft_target": 0.12, "itl_target": 0.015, "predictor": "constant", "prefill_cv2": 0.0,
                               "correction_settle_s": 0.0,
                               "max_utilization": 0.9, "scale_down_window_s": 10.0, "correction": False,
                               "limits": {PREFILL: PoolLimits(1, 4), DECODE: PoolLimits(1, 3), AGG: PoolLimits(1, 8)}}
    base.update(kw)
    return PlannerConfig(**base)  # type: ignore[arg-type]


def _obs(rate: float, isl: float = 500, osl: float = 100, dt: float = 1.0, **kw: float) -> Observation:
    n = rate * dt
    return Observation(duration_s=dt, requests=n, completed=n, input_tokens=n * isl, output_tokens=n * osl, **kw)


def test_planner_clamps_and_stabilizes() -> None:
    pl = Planner(_cfg(), PROFILE)
    assert pl.clamp({PREFILL: 0, DECODE: 9}) == {PREFILL: 1, DECODE: 3}
    # 80 req/s of 500 in / 100 out: prefill wants 80 * 0.06 / (2/3) = 7.2 -> 8 (max 4),
    # decode 8000 / 3060 = 2.6 -> 3 (max 3).
    d = pl.step(_obs(80), {PREFILL: 1, DECODE: 1}, now=0)
    assert d.recommended == {PREFILL: 4, DECODE: 3} and d.target == {PREFILL: 4, DECODE: 3}
    assert (d.plans[PREFILL].replicas, d.plans[DECODE].replicas) == (8, 3)
    d = pl.step(_obs(10), {PREFILL: 4, DECODE: 3}, now=5)
    assert d.recommended == {PREFILL: 1, DECODE: 1} and d.target == {PREFILL: 4, DECODE: 3}
    assert "held by the stabilization window" in d.reason
    d = pl.step(_obs(10), {PREFILL: 4, DECODE: 3}, now=11)
    assert d.target == {PREFILL: 1, DECODE: 1}
    assert not pl.step(_obs(10), {PREFILL: 1, DECODE: 1}, now=12).changed
    assert pl.step(None, {PREFILL: 1, DECODE: 1}, now=13).reason == "no metrics this interval: holding"


def test_agg_mode_sums_both_jobs() -> None:
    pl = Planner(_cfg(mode="agg"), PROFILE)
    d = pl.step(_obs(50), {AGG: 1}, now=0)
    assert d.target == {AGG: 7}  # 5 prefill + 2 decode
    d = pl.step(_obs(80), {AGG: 7}, now=1)
    assert d.target == {AGG: 8}  # 8 prefill + 3 decode = 11, clamped to 8


def test_scale_to_zero_and_wake() -> None:
    pl = Planner(_cfg(scale_to_zero_after_s=3.0, scale_down_window_s=0.0), PROFILE)
    cur = {PREFILL: 2, DECODE: 1}
    assert pl.step(_obs(10), cur, now=0).target == {PREFILL: 1, DECODE: 1}
    cur = {PREFILL: 1, DECODE: 1}
    assert pl.step(Observation(1.0, inflight=2), cur, now=1).target == cur  # in flight: not idle
    assert pl.step(Observation(2.0), cur, now=3).target == cur  # idle 2 s
    d = pl.step(Observation(1.0), cur, now=4)  # idle 3 s
    assert d.target == {PREFILL: 0, DECODE: 0} and d.reason == "idle for 3.0s: scaling to zero"
    zero = {PREFILL: 0, DECODE: 0}
    assert pl.clamp(zero) == zero  # at zero stays at zero: min applies to running pools
    d = pl.step(Observation(0.5), zero, now=5)
    assert d.target == zero and d.reason == "at zero, no demand"
    d = pl.step(Observation(0.5, demand=1), zero, now=5.5)
    assert d.target == {PREFILL: 1, DECODE: 1} and d.reason.startswith("demand at zero")
    # Woken up, it is not idle any more: the next quiet interval does not send it back at once.
    assert pl.step(Observation(1.0), d.target, now=6.5).target == {PREFILL: 1, DECODE: 1}


def test_wake_replicas_keep_a_decode_replica() -> None:
    cfg = _cfg(limits={PREFILL: PoolLimits(0, 4), DECODE: PoolLimits(0, 3), AGG: PoolLimits(0, 8)})
    assert cfg.wake_replicas() == {PREFILL: 0, DECODE: 1}
    assert _cfg(mode="agg", limits=cfg.limits).wake_replicas() == {AGG: 1}


def test_corrections_follow_observed_latency() -> None:
    pl = Planner(_cfg(correction=True, correction_window=3, correction_min_samples=4), PROFILE)
    cur = {PREFILL: 4, DECODE: 2}
    # 2 req/s of 500 tokens on 4 prefill replicas: rho 0.03, expected TTFT s + wait; observed twice that.
    s, rho = 0.06, 2 * 0.06 / 4
    expected = s + rho * s / (2 * (1 - rho))  # M/D/1: cv2 0 in _cfg
    obs = _obs(2.0, ttft_sum=2 * 2 * expected, ttft_count=2)
    pl.step(obs, cur, now=0)
    assert pl.ttft_correction == 1.0  # 2 samples: not enough to move
    pl.step(obs, cur, now=1)
    assert pl.ttft_correction == pytest.approx(2.0)  # 4 samples, each twice the model
    calm = _obs(2.0, ttft_sum=2 * expected, ttft_count=2)
    for t in (2, 3, 4):
        pl.step(calm, cur, now=t)
    assert pl.ttft_correction == pytest.approx(1.0)  # the window (3 intervals) forgot the slow ones
    # ITL 0.030 s observed at 100 tok/s on 2 replicas: c = 100 * 0.03 / 2 = 1.5, profile itl(1.5) = 0.01005.
    itl_obs = _obs(1.0, itl_sum=0.030 * 50, itl_count=50)
    pl.step(itl_obs, cur, now=5)
    assert pl.itl_correction == pytest.approx(0.030 / 0.01005)
    pl.step(_obs(1.0, ttft_sum=100.0, ttft_count=20), cur, now=6)
    assert pl.ttft_correction == 3.0  # bounded
    # A loaded pool (rho >= 0.5) does not feed the TTFT factor: queueing is what the model predicts there.
    before = pl.ttft_correction
    pl.step(_obs(40.0, ttft_sum=40 * 9.0, ttft_count=40), {PREFILL: 4, DECODE: 2}, now=7)
    assert pl.ttft_correction == before


def test_corrections_wait_for_a_resized_pool_to_settle() -> None:
    pl = Planner(_cfg(correction=True, correction_min_samples=2, correction_settle_s=5.0), PROFILE)
    slow = _obs(2.0, ttft_sum=2 * 1.0, ttft_count=2)  # 1 s TTFTs: a queue, or replicas still starting
    pl.step(slow, {PREFILL: 1, DECODE: 1}, now=0)
    pl.step(slow, {PREFILL: 1, DECODE: 1}, now=4)
    assert pl.ttft_correction == 1.0  # the pool appeared at t=0: not settled before t=5
    pl.step(slow, {PREFILL: 3, DECODE: 1}, now=6)  # resized at t=6
    pl.step(slow, {PREFILL: 3, DECODE: 1}, now=10)
    assert pl.ttft_correction == 1.0
    pl.step(slow, {PREFILL: 3, DECODE: 1}, now=11)
    assert pl.ttft_correction > 1.0


def test_rate_counts_arrivals_by_prompt_tokens() -> None:
    pl = Planner(_cfg(), PROFILE)
    pl.step(_obs(10.0), {PREFILL: 1, DECODE: 1}, now=0)  # ISL 500 learned
    # 20 requests' prompts arrived, but a queue let only 5 reach their first token: the rate is 20/s.
    backlog = Observation(1.0, requests=5, completed=5, input_tokens=20 * 500, output_tokens=500)
    d = pl.step(backlog, {PREFILL: 1, DECODE: 1}, now=1)
    assert d.predicted_rate == pytest.approx(20.0)


def test_config_validation() -> None:
    with pytest.raises(InvalidRequest, match="0 <= min <= max"):
        PoolLimits(3, 2)
    with pytest.raises(InvalidRequest, match="disagg or agg"):
        _cfg(mode="both")
    with pytest.raises(InvalidRequest, match="must be > 0"):
        _cfg(ttft_target=0)
    with pytest.raises(InvalidRequest, match="lookahead must be at least 1"):
        _cfg(lookahead=0)
    assert math.isinf(prefill_replicas(1.0, 500, PROFILE, 0.12).expected_latency) is False


def test_pools_at_zero_not_by_the_planner() -> None:
    pl = Planner(_cfg(), PROFILE)
    # Every worker crashed (or a planner restarted): with minimums of 1 it is brought back at once.
    d = pl.step(Observation(1.0), {PREFILL: 0, DECODE: 0}, now=0)
    assert d.target == {PREFILL: 1, DECODE: 1} and d.reason == "load"
    # Minimums of 0 and no scale-to-zero: no load keeps it at zero; a waiting request wakes it.
    zero_min = {PREFILL: PoolLimits(0, 4), DECODE: PoolLimits(0, 3), AGG: PoolLimits(0, 8)}
    pl = Planner(_cfg(limits=zero_min, scale_down_window_s=0.0), PROFILE)
    assert pl.step(Observation(1.0), {PREFILL: 1, DECODE: 1}, now=0).target == {PREFILL: 0, DECODE: 0}
    assert pl.step(Observation(1.0), {PREFILL: 0, DECODE: 0}, now=1).target == {PREFILL: 0, DECODE: 0}
    d = pl.step(Observation(1.0, demand=2), {PREFILL: 0, DECODE: 0}, now=2)
    assert d.target == {PREFILL: 0, DECODE: 1} and d.reason.startswith("demand at zero")


def test_first_burst_before_any_completion_scales_prefill_and_holds_decode() -> None:
    pl = Planner(_cfg(), PROFILE)
    # 50 req/s started (first tokens seen) but none finished yet: output lengths are unknown.
    first = Observation(1.0, requests=50, input_tokens=50 * 500)
    d = pl.step(first, {PREFILL: 1, DECODE: 2}, now=0)
    assert d.target == {PREFILL: 4, DECODE: 2} and DECODE not in d.plans
    agg = Planner(_cfg(mode="agg"), PROFILE)
    assert agg.step(first, {AGG: 2}, now=0).target == {AGG: 5}  # 5 prefill, decode unknown: at least 2
