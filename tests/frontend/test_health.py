"""Honest health (frontend/health.py) on a real disaggregated stack: the canary goes tokenize -> route ->
prefill -> NIXL -> decode (the decode worker counts the pulls, though no user sent a request), and /health and
/v1/models/{model}/ready say what is wrong, in machine-readable reasons: ``transfer_failed`` while the prefill
worker is frozen (SIGSTOP: the decode worker prefills the canary itself), ``no_decode_worker`` (503, an OpenAI
error body) once the decode worker is gone."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.reliability.helpers import assert_openai_error
from tests.stack import Stack
from tests.workermetrics import kv_counts, metrics_port

MODEL = "dynamo-tiny"


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "health")  # type: ignore[attr-defined]
    st.add_worker("reference", "prefill", "--kv-cache-blocks", "256", "--metrics-port", "0")
    st.add_worker("reference", "decode", "--kv-cache-blocks", "256", "--metrics-port", "0")
    st.start_frontend("--router-mode", "kv", "--canary-interval", "0.5", "--canary-timeout", "30")
    try:
        st.wait_ready(2)
        yield st
    finally:
        st.stop()


def _get(st: Stack, path: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(st.url + path, timeout=60)
    return r.status_code, r.json()


def _until(st: Stack, path: str, cond: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = _get(st, path)
        if cond(status, body):
            return body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.2)


def test_canary_runs_the_disaggregated_path_and_health_reports_it(stack: Stack) -> None:
    dec_port = metrics_port(stack.workers[1].output)
    # A canary that ran before the prefill worker registered prefilled locally (no pull): wait for one that
    # ran with both workers up (?canary=1 runs one now).
    body = _until(stack, "/health?canary=1", lambda s, b: s == 200 and MODEL in b["models"]
                  and (b["models"][MODEL].get("canary") or {}).get("ok")
                  and b["models"][MODEL]["instances"] == 2
                  and all(w.get("kv_pull") == "pulled" for w in b["models"][MODEL]["canary"]["workers"].values()))
    m = body["models"][MODEL]
    assert (body["status"], body["reasons"], body["discovery"]) == ("healthy", [], "ok"), body
    assert m["ready"] is True and m["reasons"] == [] and m["instances"] == 2 and m["modes"] == ["decode", "prefill"]
    assert m["canary"]["tokens"] == 2 and m["canary"]["transfer_failed"] is False and m["canary"]["error"] is None
    (on_decode,) = m["canary"]["workers"].values()  # one canary per decode worker
    assert on_decode["kv_pull"] == "pulled", on_decode  # the decode worker says its NIXL read worked
    # Through NIXL: the decode worker pulled KV though no user request was sent; no fallback.
    c = kv_counts(dec_port)
    assert c.pulls >= 1 and c.fallbacks == 0 and c.failures == 0, c
    # Not a user request.
    assert stack.metric("dynamo_frontend_model_requests_total") == 0
    assert stack.metric("dynamo_frontend_requests_total") == 0
    assert stack.metric("dynamo_frontend_canary_runs_total") >= 1
    status, ready = _get(stack, f"/v1/models/{MODEL}/ready?canary=1")
    assert status == 200 and ready["ready"] is True and ready["reasons"] == [], ready
    status, missing = _get(stack, "/v1/models/no-such-model/ready")
    assert status == 404 and assert_openai_error(missing)["code"] == "not_found"


def test_frozen_prefill_worker_is_transfer_failed_and_no_decode_worker_is_503(stack: Stack) -> None:
    prefill, decode = stack.workers
    prefill.signal(signal.SIGSTOP)
    try:
        # On demand: the canary waits for the prefill worker's acknowledgement, then prefills on decode.
        status, body = _get(stack, "/health?canary=1")
        assert status == 200, body
        m = body["models"][MODEL]
        assert m["ready"] is True and "transfer_failed" in m["reasons"] and body["status"] == "degraded", body
        assert m["canary"]["ok"] is True and m["canary"]["transfer_failed"] is True
        status, ready = _get(stack, f"/v1/models/{MODEL}/ready")
        assert status == 200 and "transfer_failed" in ready["reasons"]
    finally:
        prefill.signal(signal.SIGCONT)
    _until(stack, "/health?canary=1", lambda s, b: s == 200 and b["models"].get(MODEL, {}).get("reasons") == [])
    decode.stop()  # SIGTERM: it leaves discovery first
    body = _until(stack, "/health", lambda s, b: s == 503)
    assert body["status"] == "unhealthy" and "no_decode_worker" in body["reasons"], body
    assert body["not_ready"][MODEL]["reasons"][0] == "no_decode_worker"
    assert_openai_error({"error": body["error"]})
    status, ready = _get(stack, f"/v1/models/{MODEL}/ready")
    assert status == 503 and ready["ready"] is False and ready["reasons"][0] == "no_decode_worker", ready
    assert ready["error"]["type"] and "no_decode_worker" in ready["error"]["message"]


def test_etcd_gone_is_discovery_lost_until_it_is_back(fresh_etcd: Any, nats_server: Any) -> None:
    """etcd stopped: the frontend still serves from its last view (200), says ``discovery_lost``; etcd back: the
    reason goes away."""
    st = Stack(fresh_etcd.client_url, nats_server.url, "health-etcd")
    st.add_worker("mocker", "agg")
    st.start_frontend("--canary-interval", "0.5")
    try:
        st.wait_ready(1)
        _until(st, "/health", lambda s, b: s == 200 and b["reasons"] == [] and MODEL in b["models"])
        fresh_etcd.stop()
        body = _until(st, "/health", lambda s, b: "discovery_lost" in b["reasons"], timeout=30)
        assert body["discovery"] == "lost" and body["status"] == "degraded", body
        assert "discovery_lost" in body["models"][MODEL]["reasons"] and body["models"][MODEL]["ready"] is True
        fresh_etcd.restart()
        body = _until(st, "/health", lambda s, b: s == 200 and "discovery_lost" not in b["reasons"], timeout=60)
        assert body["discovery"] == "ok"
    finally:
        st.stop()


def test_frozen_worker_is_canary_failed_and_503_though_it_is_registered(etcd_server: Any, nats_server: Any) -> None:
    """The case health checks miss: the worker is registered (discovery lists it) but answers nothing. The
    canary says so: 503, ``canary_failed``, the worker's error; once it answers again, 200."""
    st = Stack(etcd_server.client_url, nats_server.url, "health-frozen")
    worker = st.add_worker("mocker", "agg")
    st.start_frontend("--canary-timeout", "20")
    try:
        st.wait_ready(1)
        assert _get(st, "/health?canary=1")[0] == 200
        worker.signal(signal.SIGSTOP)
        try:
            status, body = _get(st, "/health?canary=1")  # the acknowledgement times out (3 s), well within the lease
        finally:
            worker.signal(signal.SIGCONT)
        assert status == 503 and body["status"] == "unhealthy", body
        entry = body["not_ready"][MODEL]
        assert entry["reasons"] == ["canary_failed"] and entry["instances"] == 1, entry
        (only,) = entry["canary"]["workers"].values()
        assert only["ok"] is False and "did not acknowledge" in only["error"], only
        assert_openai_error({"error": body["error"]})
        assert _get(st, f"/v1/models/{MODEL}/ready")[0] == 503
        status, body = _get(st, "/health?canary=1")
        assert status == 200 and body["models"][MODEL]["reasons"] == [], body
    finally:
        st.stop()


def test_failed_nixl_pull_is_transfer_failed(etcd_server: Any, nats_server: Any) -> None:
    """The decode worker's NIXL read goes wrong (every pulled block corrupted, caught by the CRC-32 check): the
    canary still gets its tokens (prefilled locally), and the health says ``transfer_failed``."""
    st = Stack(etcd_server.client_url, nats_server.url, "health-pull")
    st.add_worker("reference", "prefill", "--kv-cache-blocks", "256")
    st.add_worker("reference", "decode", "--kv-cache-blocks", "256", "--test-fault-kv-corrupt", "1000")
    st.start_frontend("--router-mode", "kv", "--canary-timeout", "30")
    try:
        st.wait_ready(2)
        status, body = _get(st, "/health?canary=1")
        assert status == 200 and body["status"] == "degraded", body
        m = body["models"][MODEL]
        assert m["ready"] is True and m["reasons"] == ["transfer_failed"], m
        (on_decode,) = m["canary"]["workers"].values()
        assert (on_decode["ok"], on_decode["tokens"], on_decode["kv_pull"]) == (True, 2, "failed"), on_decode
    finally:
        st.stop()
