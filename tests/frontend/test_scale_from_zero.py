"""Scale from zero: a request for a model whose workers are all gone waits for one to register.

Real etcd, NATS, mocker worker processes and two frontend processes: one parks requests up to 60 s
(``--worker-wait-timeout 60``), the other up to 1.5 s (set through the env twin ``DYN_WORKER_WAIT_TIMEOUT``).
Both see the model served, then its only worker stops (the pool is at zero). Requests sent then are parked
(``dynamo_frontend_awaiting_worker_requests`` counts them: the planner's signal to bring a worker back); a
worker started seconds later serves them, token for token what the first worker gave (the mocker's output
is a function of the prompt); past its timeout the second frontend answers 503 with an OpenAI error body,
not an SSE stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dynamo_rt.local.services import EtcdServer, NatsServer
from tests.conftest import arun
from tests.stack import Stack

MODEL = "zero-tiny"
MAX_TOKENS = 12
COMPLETION = {"model": MODEL, "prompt": "Scale me from zero, please", "max_tokens": MAX_TOKENS, "ignore_eos": True}
STREAM = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "wake up"}], "max_tokens": MAX_TOKENS,
        "ignore_eos": True}
UNAVAILABLE = {"error": {"message": f"model '{MODEL}' has no ready worker (waited 1.5s for one)",
                         "type": "service_unavailable", "param": None, "code": "unavailable"}}


def gauge(url: str, name: str) -> float:
    """The value of ``name{model=MODEL}`` on the frontend's /metrics (0 when not exported yet)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels.get("model") == MODEL:
                return float(s.value)
    return 0.0


def awaiting(url: str) -> float:
    return gauge(url, "dynamo_frontend_awaiting_worker_requests")


def stream_result(text: str) -> tuple[str, int, list[Any]]:
    """(text, completion tokens, error events) of an SSE completion stream ending in [DONE]."""
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", text
    out, tokens, errs = "", -1, []
    for data in map(json.loads, lines[:-1]):
        if "error" in data:
            errs.append(data["error"])
        for ch in data.get("choices") or []:
            out += ch.get("text") or ""
        if data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
    return out, tokens, errs


async def until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def no_instances(url: str) -> bool:
    return httpx.get(url + "/health", timeout=5).status_code == 503


def test_request_waits_for_a_worker_then_503_past_the_timeout(etcd_server: EtcdServer, nats_server: NatsServer,
                                                              ns: str) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, ns)
    short = Stack(etcd_server.client_url, nats_server.url, ns)  # the second frontend, same namespace
    short.env["DYN_WORKER_WAIT_TIMEOUT"] = "1.5"
    worker_args = ("--speedup", "20", "--served-model-name", MODEL)
    st.add_worker("mocker", "agg", *worker_args)
    st.start_frontend("--worker-wait-timeout", "60")
    short.start_frontend()
    try:
        st.wait_ready(1)
        short.wait_ready(1)
        arun(_scenario(st, short, worker_args), timeout=150)
    finally:
        short.stop()
        st.stop()


async def _scenario(st: Stack, short: Stack, worker_args: tuple[str, ...]) -> None:
    async with httpx.AsyncClient(timeout=90) as client:
        # What the first worker gives, to compare with what the woken-up one gives.
        r = await client.post(st.url + "/v1/completions", json=COMPLETION)
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["usage"]["completion_tokens"] == MAX_TOKENS
        r = await client.post(st.url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        first_chat = r.json()["choices"][0]["message"]["content"]

        # The pool goes to zero: both frontends see the model without a worker.
        st.workers[0].stop()
        await until(lambda: no_instances(st.url) and no_instances(short.url), 30, "the worker to leave")

        # Parked on the patient frontend: non-streaming, streaming and chat.
        parked = [asyncio.create_task(client.post(st.url + "/v1/completions", json=COMPLETION)),
                  asyncio.create_task(client.post(st.url + "/v1/completions", json=STREAM)),
                  asyncio.create_task(client.post(st.url + "/v1/chat/completions", json=CHAT))]
        await until(lambda: awaiting(st.url) == 3, 30, "three parked requests")

        # The impatient frontend gives up after 1.5 s: a 503 with an OpenAI error body, streamed or not.
        for body in (COMPLETION, STREAM):
            r = await client.post(short.url + "/v1/completions", json=body)
            assert (r.status_code, r.headers["content-type"], r.json()) == (503, "application/json", UNAVAILABLE)
        assert awaiting(short.url) == 0
        assert gauge(short.url, "dynamo_frontend_awaiting_worker_requests") == 0

        # A few seconds on, still parked (nothing answered them); then a worker comes up and serves them.
        await asyncio.sleep(2)
        assert not any(t.done() for t in parked)
        assert awaiting(st.url) == 3
        st.add_worker("mocker", "agg", *worker_args)
        plain, streamed, chat = await asyncio.wait_for(asyncio.gather(*parked), 90)

        assert plain.status_code == 200, plain.text
        got = plain.json()
        assert got["choices"][0]["text"] == first["choices"][0]["text"]
        assert got["choices"][0]["finish_reason"] == "length"
        assert got["usage"] == first["usage"]
        assert streamed.status_code == 200, streamed.text
        assert stream_result(streamed.text) == (first["choices"][0]["text"], MAX_TOKENS, [])
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] == first_chat
        assert chat.json()["usage"]["completion_tokens"] == MAX_TOKENS
        assert awaiting(st.url) == 0
        # The planner's arrival count saw every request that came in: 2 before, 3 parked.
        assert gauge(st.url, "dynamo_frontend_model_requests_total") == 5
