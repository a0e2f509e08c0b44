"""The direct token path (frontend/sse.py): streamed text chunks written from the NATS frame callback are the
same bytes, in the same order, as the response task writes with it off (``DYN_SSE_DIRECT=0``). (A client
that stops reading: tests/frontend/test_sse_writer.py.)

Also the same bytes whichever HTTP server carries them (frontend/http1.py, the builtin one, writes chunks
straight to the transport; under uvicorn frontend.sse.DirectWriter steps its ``send``).

Real etcd, NATS, one mocker worker, three frontend processes in one namespace: builtin server direct, builtin
server through the task, uvicorn direct."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.stack import Stack

MODEL = "dynamo-tiny"


@pytest.fixture(scope="module")
def trio(etcd_server: Any, nats_server: Any) -> Iterator[tuple[Stack, Stack, Stack]]:
    direct = Stack(etcd_server.client_url, nats_server.url, "sse-direct")
    direct.add_worker("mocker", "agg", "--served-model-name", MODEL)
    direct.start_frontend()
    task = Stack(etcd_server.client_url, nats_server.url, "sse-direct")  # same namespace: the same worker
    task.env["DYN_SSE_DIRECT"] = "0"
    task.start_frontend()
    uvi = Stack(etcd_server.client_url, nats_server.url, "sse-direct")
    uvi.env["DYN_HTTP_SERVER"] = "uvicorn"
    uvi.start_frontend()
    try:
        for st in (direct, task, uvi):
            st.wait_ready(1)
        yield direct, task, uvi
    finally:
        for st in (uvi, task, direct):
            st.stop()


def events(text: str) -> list[Any]:
    """The SSE events, without the fields that differ between two runs of one request (id, created)."""
    out: list[Any] = []
    for line in text.splitlines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            out.append("[DONE]")
            continue
        ev = json.loads(line[6:])
        ev.pop("id", None)
        ev.pop("created", None)
        out.append(ev)
    return out


def writes(st: Stack, path: str) -> float:
    with httpx.Client() as c:
        body = c.get(st.url + "/metrics").text
    for line in body.splitlines():
        if line.startswith(f'dynamo_frontend_sse_writes_total{{path="{path}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no dynamo_frontend_sse_writes_total{{path={path!r}}} in /metrics")


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 40,
                              "ignore_eos": True, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 25, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "logprobs please"}], "max_tokens": 12,
                              "ignore_eos": True, "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "count with me", "max_tokens": 30, "ignore_eos": True, "seed": 5,
                         "temperature": 0.8}),
]


@pytest.mark.parametrize("path,body", REQUESTS, ids=["chat-usage", "completion", "chat-logprobs", "seeded"])
def test_direct_chunks_are_the_task_paths_bytes(trio: tuple[Stack, Stack, Stack], path: str,
                                                 body: dict[str, Any]) -> None:
    direct, task, uvi = trio
    before, before_uvi = writes(direct, "direct"), writes(uvi, "direct")
    req = {"model": MODEL, "stream": True, **body}
    a = httpx.post(direct.url + path, json=req, timeout=60)
    b = httpx.post(task.url + path, json=req, timeout=60)
    c = httpx.post(uvi.url + path, json=req, timeout=60)
    assert a.status_code == b.status_code == c.status_code == 200
    for r in (a, b, c):
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["transfer-encoding"] == "chunked"
    ea, eb = events(a.text), events(b.text)
    assert ea == eb == events(c.text)
    assert ea[-1] == "[DONE]"
    text_chunks = sum(1 for e in ea[:-1] if e["choices"] and (
        e["choices"][0].get("text") or (e["choices"][0].get("delta") or {}).get("content")
        or e["choices"][0].get("logprobs")))
    # Every text chunk of the direct frontend's stream left from the frame callback; none of the other's.
    assert writes(direct, "direct") - before == text_chunks > 0
    assert writes(uvi, "direct") - before_uvi == text_chunks
    assert writes(task, "direct") == 0


def test_a_stop_string_ends_the_direct_stream_where_the_task_path_does(trio: tuple[Stack, Stack, Stack]) -> None:
    direct, task, uvi = trio
    req: dict[str, Any] = {"model": MODEL, "stream": True, "prompt": "stop test", "max_tokens": 60,
                           "ignore_eos": True}
    full = events(httpx.post(direct.url + "/v1/completions", json=req, timeout=60).text)
    text = "".join(e["choices"][0]["text"] for e in full[:-1] if e["choices"])
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a string from the middle of the output
    assert stop and text.index(stop) > 0
    a = events(httpx.post(direct.url + "/v1/completions", json={**req, "stop": [stop]}, timeout=60).text)
    b = events(httpx.post(task.url + "/v1/completions", json={**req, "stop": [stop]}, timeout=60).text)
    c = events(httpx.post(uvi.url + "/v1/completions", json={**req, "stop": [stop]}, timeout=60).text)
    assert a == b == c
    got = "".join(e["choices"][0]["text"] for e in a[:-1] if e["choices"])
    assert got == text[:text.index(stop)]
    assert a[-2]["choices"][0]["finish_reason"] == "stop" and a[-1] == "[DONE]"
