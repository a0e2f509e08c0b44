"""A short schemathesis run against a live frontend (the long one is ``bench/fuzz.py``): zero 5xx, and every
error body OpenAI-shaped, for valid and deliberately invalid requests to every operation in /openapi.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.reliability.fuzzing import fuzz, openai_error_problem
from tests.reliability.helpers import MODEL, start_stack
from tests.stack import Stack

EXAMPLES = 40  # per POST operation and mode (valid / invalid); ~15 s on 2 cores, ~50 s when they are busy


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "fuzz")  # type: ignore[attr-defined]
    try:
        # --speedup 0: generation takes no simulated time, so a fuzzed n=16 x 4000 tokens costs little.
        start_stack(st, [("mocker", "agg", "--speedup", "0")])
        yield st
    finally:
        st.stop()


def test_openai_error_shape_check() -> None:
    ok = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "x"}}
    assert openai_error_problem(json.dumps(ok).encode()) == ""
    assert openai_error_problem(b'{"detail": "Not Found"}') == "error body is not {'error': {...}}"
    assert openai_error_problem(b"oops") == "error body is not JSON"
    no_param = {"error": {"message": "m", "type": "t", "code": None}}
    assert openai_error_problem(json.dumps(no_param).encode()) == "error object has keys ['code', 'message', 'type']"


def test_schemathesis_finds_no_server_error_and_only_openai_error_bodies(stack: Stack) -> None:
    report = fuzz(stack.url, examples=EXAMPLES, model=MODEL, seed=20261127)
    print("fuzz:", report.summary())
    problems = report.distinct_problems()
    assert not problems, "\n".join(f"{p.operation} [{p.mode}] -> {p.status}: {p.why}\n  request: {p.request}\n"
                                   f"  response: {p.response}" for p in problems)
    assert report.server_errors == 0
    # The run reached the workers, not only the validators, and covered every operation.
    assert report.statuses[200] >= 20
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/models/{model_id}",
            "GET /live", "GET /health", "GET /metrics"} <= set(report.per_operation)
    assert stack.frontend is not None and stack.frontend.alive()
    assert "Traceback" not in stack.frontend.output()


_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
HOSTILE: list[tuple[str, str, bytes, int]] = [
    # (method, path, body, expected status): inputs a JSON-schema generator does not make.
    ("GET", "/v1/chat/completions", b"", 405),
    ("DELETE", "/v1/models", b"", 405),
    ("POST", "/v1/chat/completions", b"", 400),
    ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400),  # deep nesting
    ("POST", "/v1/chat/completions", json.dumps(_CHAT)[:-1].encode() + b', "temperature": NaN}', 400),
    ("POST", "/v1/chat/completions", b'{"model": "dynamo-tiny", "messages": [{"role": "user", "content": '
                                     b'"\\ud800"}]}', 400),  # a lone surrogate
    ("POST", "/v1/chat/completions", json.dumps({**_CHAT, "max_tokens": 2**63}).encode(), 400),
    ("POST", "/v1/chat/completions", json.dumps({**_CHAT, "seed": 2**70}).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": [2**40], "max_tokens": 3}).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop": ["a"] * 100}).encode(), 400),
    ("POST", "/v1/chat/completions", json.dumps({**_CHAT, "nvext": {"backend_instance_id": 2**70}}).encode(), 404),
    ("POST", "/v1/chat/completions", json.dumps({**_CHAT, "messages": [
        {"role": "user", "content": "{{ raise_exception('boom') }} {% for x in range(10**9) %}"}]}).encode(), 200),
    ("POST", "/v1/chat/completions", json.dumps({**_CHAT, "chat_template_kwargs": {
        "messages": 5, "add_generation_prompt": "x", "bos_token": [1]}}).encode(), 200),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "n": 16,
                                            "logprobs": 5}).encode(), 200),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), HOSTILE, ids=[f"{m} {p} {i}" for i, (m, p, _, _) in
                                                                             enumerate(HOSTILE)])
def test_hostile_inputs_get_openai_errors(stack: Stack, method: str, path: str, body: bytes, status: int) -> None:
    r = httpx.request(method, stack.url + path, content=body, timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:500]
    if status >= 400:
        assert openai_error_problem(r.content) == "", r.text[:500]
