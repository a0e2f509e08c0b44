"""Every started SSE stream ends with a finish_reason or an error event, then ``[DONE]``: also when the frontend
fails in the middle of a stream (a bug, injected with the frontend's test-only fault hook) and when the frontend
stops while a stream is still running. Real etcd, NATS, a mocker worker and frontend processes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from frontend.serving import TEST_FAULT_ENV
from tests.stack import Stack

MODEL = "dynamo-tiny"
FAULT_AFTER = 3  # tokens of a choice before the fault hook raises

INTERNAL = {"error": {"message": "internal error: RuntimeError", "type": "internal_error", "param": None,
                      "code": "internal"}}
SHUTTING_DOWN = {"error": {"message": "the frontend is shutting down; this stream was stopped",
                           "type": "service_unavailable", "param": None, "code": "unavailable"}}


@pytest.fixture(scope="module")
def faulty(etcd_server: Any, nats_server: Any) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "faults")
    # 100 ms per decode step: a 300-token stream lasts 30 s, past the frontend's 10 s drain when it stops.
    st.add_worker("mocker", "agg", "--decode-ms-base", "100", "--served-model-name", MODEL)
    st.env[TEST_FAULT_ENV] = str(FAULT_AFTER)  # the frontend's environment only (the worker has started)
    st.start_frontend()
    try:
        st.wait_ready(n_instances=1)
        yield st
    finally:
        st.stop()


def events_of(text: str) -> list[Any]:
    return [d if d == "[DONE]" else json.loads(d) for d in
            (line[6:] for line in text.splitlines() if line.startswith("data: "))]


def post(st: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(st.url + path, json=body, timeout=60)


def test_a_fault_mid_chat_stream_ends_it_with_an_error_event_then_done(faulty: Stack) -> None:
    r = post(faulty, "/v1/chat/completions", {"model": MODEL, "stream": True, "max_tokens": 24,
                                               "messages": [{"role": "user", "content": "Hello there"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text)
    assert events[-2:] == [INTERNAL, "[DONE]"]
    chunks = events[:-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"  # the stream had started
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


def test_a_fault_in_a_multi_choice_stream_ends_it_with_an_error_event_then_done(faulty: Stack) -> None:
    r = post(faulty, "/v1/completions", {"model": MODEL, "stream": True, "max_tokens": 24, "n": 2,
                                         "prompt": "Once upon a time"})
    assert r.status_code == 200
    events = events_of(r.text)
    assert events[-2:] == [INTERNAL, "[DONE]"]
    assert all(c["choices"][0]["finish_reason"] is None for c in events[:-2])


def test_a_fault_in_a_non_streaming_request_is_the_openai_error_body(faulty: Stack) -> None:
    r = post(faulty, "/v1/chat/completions", {"model": MODEL, "max_tokens": 24,
                                               "messages": [{"role": "user", "content": "Hello there"}]})
    assert (r.status_code, r.json()) == (500, INTERNAL)


def test_stopping_the_frontend_mid_stream_ends_the_stream_with_an_error_event_then_done(faulty: Stack) -> None:
    second = Stack(faulty.env["DYN_ETCD_ENDPOINTS"], faulty.env["DYN_NATS_ENDPOINTS"], "faults")
    assert TEST_FAULT_ENV not in second.env
    second.start_frontend()
    try:
        second.wait_ready(n_instances=1)
        body = {"model": MODEL, "stream": True, "max_tokens": 300,
                "messages": [{"role": "user", "content": "Tell me a long story"}]}
        lines: list[str] = []
        with httpx.stream("POST", second.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            stopped_at = 0.0
            for line in r.iter_lines():
                lines.append(line)
                if not stopped_at and '"content":"' in line and '"role"' not in line:
                    assert second.frontend is not None
                    second.frontend.signal(signal.SIGTERM)  # uvicorn drains for 10 s, then cancels the stream
                    stopped_at = time.monotonic()
            elapsed = time.monotonic() - stopped_at
        events = events_of("\n".join(lines))
        assert events[-2:] == [SHUTTING_DOWN, "[DONE]"], events[-3:]
        assert all(c["choices"][0]["finish_reason"] is None for c in events[:-2])
        assert 9.0 < elapsed < 25.0  # the drain timeout passed, the 30 s stream did not
        assert second.frontend is not None and second.frontend.proc.wait(30) == 0
    finally:
        second.stop()
