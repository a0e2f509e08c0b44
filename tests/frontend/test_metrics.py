"""The frontend's batched histogram update gives the exposition of one observe() per value."""

from __future__ import annotations

from prometheus_client import generate_latest

from frontend.metrics import FrontendMetrics, observe_many


def _itl_lines(m: FrontendMetrics) -> list[str]:
    text = generate_latest(m.registry).decode()
    return [ln for ln in text.splitlines() if "inter_token" in ln and "_created" not in ln and not ln.startswith("#")]


def test_observe_many_matches_observe_one_by_one() -> None:
    values = [0.0, 1e-9, 0.0005, 0.001, 0.0011, 0.02, 0.025, 0.7, 5.0, 30.0, 31.0, 40.0]
    one, many = FrontendMetrics(), FrontendMetrics()
    for v in values:
        one.itl.labels("m").observe(v)
    observe_many(many.model("m").itl, values[:5])
    observe_many(many.model("m").itl, values[5:])
    observe_many(many.model("m").itl, [])
    # Same buckets and count; the sum is added in one go, so it may differ in the last float digits.
    exact = [ln for ln in _itl_lines(many) if "_sum" not in ln]
    assert exact == [ln for ln in _itl_lines(one) if "_sum" not in ln] and len(exact) == 16
    [total] = [float(ln.rsplit(" ", 1)[1]) for ln in _itl_lines(many) if "_sum" in ln]
    assert abs(total - sum(values)) < 1e-9
    assert 'dynamo_frontend_inter_token_latency_seconds_bucket{le="+Inf",model="m"} 12.0' in _itl_lines(many)
    assert 'dynamo_frontend_inter_token_latency_seconds_bucket{le="0.001",model="m"} 4.0' in _itl_lines(many)


def test_model_children_and_request_counter_are_the_labelled_series() -> None:
    m = FrontendMetrics()
    assert m.model("a") is m.model("a")
    m.model("a").output_tokens.inc(3)
    m.request_done("chat", "200")
    m.request_done("chat", "200")
    text = generate_latest(m.registry).decode()
    assert 'dynamo_frontend_output_tokens_total{model="a"} 3.0' in text
    assert 'dynamo_frontend_requests_total{endpoint="chat",status="200"} 2.0' in text
