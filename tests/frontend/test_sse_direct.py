"""The direct token path (frontend/sse.py): streamed text chunks written from the NATS frame callback are the
same bytes, in the same order, as the response task writes with it off (``DYN_SSE_DIRECT=0``). (A client
that stops reading: tests/frontend/test_sse_writer.py.)

Real etcd, NATS, one mocker worker, two frontend processes in one namespace: one direct, one not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.stack import Stack

MODEL = "dynamo-tiny"


@pytest.fixture(scope="module")
def pair(etcd_server: Any, nats_server: Any) -> Iterator[tuple[Stack, Stack]]:
    direct = Stack(etcd_server.client_url, nats_server.url, "sse-direct")
    direct.add_worker("mocker", "agg", "--served-model-name", MODEL)
    direct.start_frontend()
    task = Stack(etcd_server.client_url, nats_server.url, "sse-direct")  # same namespace: the same worker
    task.env["DYN_SSE_DIRECT"] = "0"
    task.start_frontend()
    try:
        direct.wait_ready(1)
        task.wait_ready(1)
        yield direct, task
    finally:
        task.stop()
        direct.stop()


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
def test_direct_chunks_are_the_task_paths_bytes(pair: tuple[Stack, Stack], path: str, body: dict[str, Any]) -> None:
    direct, task = pair
    before = writes(direct, "direct")
    req = {"model": MODEL, "stream": True, **body}
    a = httpx.post(direct.url + path, json=req, timeout=60)
    b = httpx.post(task.url + path, json=req, timeout=60)
    assert a.status_code == b.status_code == 200
    ea, eb = events(a.text), events(b.text)
    assert ea == eb
    assert ea[-1] == "[DONE]"
    text_chunks = sum(1 for e in ea[:-1] if e["choices"] and (
        e["choices"][0].get("text") or (e["choices"][0].get("delta") or {}).get("content")
        or e["choices"][0].get("logprobs")))
    # Every text chunk of the direct frontend's stream left from the frame callback; none of the other's.
    assert writes(direct, "direct") - before == text_chunks > 0
    assert writes(task, "direct") == 0


def test_a_stop_string_ends_the_direct_stream_where_the_task_path_does(pair: tuple[Stack, Stack]) -> None:
    direct, task = pair
    req: dict[str, Any] = {"model": MODEL, "stream": True, "prompt": "stop test", "max_tokens": 60,
                           "ignore_eos": True}
    full = events(httpx.post(direct.url + "/v1/completions", json=req, timeout=60).text)
    text = "".join(e["choices"][0]["text"] for e in full[:-1] if e["choices"])
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a string from the middle of the output
    assert stop and text.index(stop) > 0
    a = events(httpx.post(direct.url + "/v1/completions", json={**req, "stop": [stop]}, timeout=60).text)
    b = events(httpx.post(task.url + "/v1/completions", json={**req, "stop": [stop]}, timeout=60).text)
    assert a == b
    got = "".join(e["choices"][0]["text"] for e in a[:-1] if e["choices"])
    assert got == text[:text.index(stop)]
    assert a[-2]["choices"][0]["finish_reason"] == "stop" and a[-1] == "[DONE]"
