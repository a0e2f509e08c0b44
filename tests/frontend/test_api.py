"""The OpenAI API end to end: real etcd, NATS, mocker worker processes and a frontend process.

The mocker emits deterministic token ids of the tiny model's tokenizer (a function of the prompt), so the
same request gives the same text, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator

import httpx
import openai
import pytest

from dynamo_rt.protocol import decode_load
from dynamo_rt.transport import Transport, load_subject
from tests.conftest import arun
from tests.stack import Stack

MODEL = "dynamo-tiny"


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "api")  # type: ignore[attr-defined]
    st.add_worker("mocker", "agg", "--speedup", "5", "--num-workers", "2", "--served-model-name", MODEL)
    st.start_frontend("--max-concurrency", "64", "--max-queue", "64")
    try:
        st.wait_ready(n_instances=2)
        yield st
    finally:
        st.stop()


def post(st: Stack, path: str, body: object, **kw: object) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(st.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30, **kw)  # type: ignore[arg-type]


def sse_events(text: str) -> list[object]:
    out: list[object] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 24}


# ------------------------------------------------------------------------------------------ SDK


def test_openai_sdk_sync_chat_and_completion(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="none")
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage is not None and r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=7)
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == 7


def test_openai_sdk_streaming_equals_non_streaming(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Tell me about 日本 and café ☕"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, seed=3)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, seed=3,  # type: ignore[arg-type]
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 40 and usage.prompt_tokens == full.usage.prompt_tokens  # type: ignore[union-attr]
    # No U+FFFD in the middle of a stream unless the full text has it too.
    assert text.count("\ufffd") == full.choices[0].message.content.count("\ufffd")  # type: ignore[union-attr]


def test_openai_sdk_async(stack: Stack) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="none")
        rs = await asyncio.gather(*[
            client.completions.create(model=MODEL, prompt=f"prompt number {i}", max_tokens=5) for i in range(8)])
        stream = await client.completions.create(model=MODEL, prompt="prompt number 0", max_tokens=5, stream=True)
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        assert streamed == rs[0].choices[0].text
        await client.close()
        return [r.choices[0].text for r in rs]

    texts = arun(main(), 60)
    assert len(texts) == 8 and len(set(texts)) > 1  # different prompts, different outputs


# ------------------------------------------------------------------------------------------ features


def test_n_greater_than_one(stack: Stack) -> None:
    r = post(stack, "/v1/chat/completions", {**CHAT, "n": 3, "max_tokens": 6})
    assert r.status_code == 200
    body = r.json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 18
    r = post(stack, "/v1/chat/completions", {**CHAT, "n": 2, "max_tokens": 4, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    finishes = sorted(e["choices"][0]["index"] for e in events[:-1]  # type: ignore[index]
                      if e["choices"] and e["choices"][0]["finish_reason"])  # type: ignore[index]
    assert finishes == [0, 1]


def test_stop_string_spanning_tokens(stack: Stack) -> None:
    full = post(stack, "/v1/completions", {"model": MODEL, "prompt": "stop test", "max_tokens": 30}).json()
    text = full["choices"][0]["text"]
    assert len(text) > 12
    stop = text[8:12]  # four characters: with a small vocab these span token boundaries
    first = text.index(stop)
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": "stop test", "max_tokens": 30, "stop": stop})
    out = r.json()["choices"][0]
    assert out["text"] == text[:first]
    assert out["finish_reason"] == "stop"
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": "stop test", "max_tokens": 30, "stop": [stop],
                                        "stream": True})
    events = sse_events(r.text)
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])  # type: ignore[index]
    assert streamed == text[:first]


def test_include_usage_chunk(stack: Stack) -> None:
    r = post(stack, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_ev = events[-2]
    assert usage_ev["choices"] == [] and usage_ev["usage"]["completion_tokens"] == 24  # type: ignore[index]
    assert "cached_tokens" in usage_ev["usage"]["prompt_tokens_details"]  # type: ignore[index]


def test_models_endpoints_and_health(stack: Stack) -> None:
    status, body = stack.get_json("/v1/models")
    assert status == 200 and body["data"][0]["id"] == MODEL  # type: ignore[index]
    status, body = stack.get_json(f"/v1/models/{MODEL}")
    assert status == 200 and body["id"] == MODEL
    status, body = stack.get_json("/v1/models/nope")
    assert status == 404 and body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert stack.get_json("/live")[0] == 200
    assert stack.get_json("/health")[0] == 200
    r = httpx.get(stack.url + "/metrics")
    assert r.status_code == 200 and "dynamo_frontend_requests_total" in r.text
    assert "dynamo_frontend_time_to_first_token_seconds_bucket" in r.text
    spec = httpx.get(stack.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


# ------------------------------------------------------------------------------------------ errors


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    assert contains in err["message"]
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    ({**CHAT, "max_tokens": -5}, "max_tokens"),
    ({**CHAT, "temperature": 3.5}, "temperature"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL}, "messages"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "top_p": 0}, "top_p"),
])
def test_bad_requests_get_400(stack: Stack, body: object, param: str | None) -> None:
    err = assert_error(post(stack, "/v1/chat/completions", body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_unknown_model_404(stack: Stack) -> None:
    err = assert_error(post(stack, "/v1/chat/completions", {**CHAT, "model": "nope"}), 404, "model", "nope")
    assert err["type"] == "not_found_error"


def test_prompt_longer_than_context_400(stack: Stack) -> None:
    long_prompt = [100 + i % 1000 for i in range(5000)]
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 1})
    assert_error(r, 400, contains="maximum context length is 4096 tokens")
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000})
    err = assert_error(r, 400, "max_tokens", "in the completion")
    assert err["code"] == "context_length_exceeded"


def test_unknown_route_and_body_too_large(stack: Stack) -> None:
    assert_error(httpx.get(stack.url + "/v1/nothing"), 404)
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]})
    assert_error(post(stack, "/v1/chat/completions", big), 413)


def test_a_client_gone_while_sending_its_body_is_counted_not_logged_as_a_bug(stack: Stack) -> None:
    """Half a body, then the connection closes: no answer is owed; the frontend counts a 499 and logs no
    traceback (it used to map the disconnect to an internal error)."""
    import socket

    before = stack.metric("dynamo_frontend_requests_total")
    s = socket.create_connection(("127.0.0.1", stack.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: 1000\r\n\r\n{\"model\": ")
    time.sleep(0.2)
    s.close()
    deadline = time.monotonic() + 5
    while stack.metric("dynamo_frontend_requests_total") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    with urllib.request.urlopen(stack.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'dynamo_frontend_requests_total{endpoint="chat",status="499"}' in text
    assert stack.metric("dynamo_frontend_requests_total") == before + 1
    assert stack.frontend is not None and "Traceback" not in stack.frontend.output()


def test_client_disconnect_cancels_worker_request(stack: Stack, nats_server: object) -> None:
    async def main() -> None:
        t = Transport(nats_server.url)  # type: ignore[attr-defined]
        await t.connect()
        active: dict[str, int] = {}

        def on_load(data: bytes, subject: str) -> None:
            lm = decode_load(data)
            active[lm.instance_id] = lm.active_requests

        await t.subscribe(load_subject("api", MODEL), on_load)
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("POST", stack.url + "/v1/chat/completions",
                                         json={**CHAT, "max_tokens": 3000, "stream": True}) as r:
                    lines = r.aiter_lines()  # held: dropping it would close the connection at once
                    for _ in range(5):
                        await lines.__anext__()
                    # Wait until a load report shows the request running on a worker.
                    deadline = time.monotonic() + 5
                    while not any(active.values()) and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    assert any(active.values()), "the request should be running on a worker"
                # The response is closed here: the client went away mid-stream (3000 tokens take ~6 s).
            deadline = time.monotonic() + 10
            while any(active.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert not any(active.values()), f"worker still running the request: {active}"
        finally:
            await t.close()

    arun(main(), 60)


def test_long_prompt_is_prepared_off_the_loop_with_exact_tokens(stack: Stack) -> None:
    """A body over OFFLOAD_BODY_BYTES is parsed and tokenized in a worker thread: same prompt tokens as the
    model's tokenizer gives, and a short request sent meanwhile is answered."""
    from tokenizers import Tokenizer

    from dynamo_rt.local.tinymodel import ensure_tiny_model
    from frontend.app import OFFLOAD_BODY_BYTES

    tok = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json"))
    text = ("The quick brown fox jumps over the lazy dog. " * 400)[:OFFLOAD_BODY_BYTES + 1000]
    expected = len(tok.encode(text, add_special_tokens=True).ids)
    assert expected < 4096

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
            body = {"model": MODEL, "prompt": text, "max_tokens": 3}
            return await asyncio.gather(c.post("/v1/completions", json=body),
                                        c.post("/v1/chat/completions", json=CHAT))

    long_r, short_r = arun(main(), 60)
    assert long_r.status_code == 200 and short_r.status_code == 200
    assert long_r.json()["usage"]["prompt_tokens"] == expected
    assert long_r.json()["usage"]["completion_tokens"] == 3


def test_long_chat_turns_reuse_tokenized_pieces(stack: Stack) -> None:
    """A conversation over SEGMENT_MIN_CHARS: every turn's prompt_tokens equal transformers' count, and the
    pieces an earlier turn tokenized (system prompt, earlier user messages) come from the frontend's cache,
    as /metrics counts: 2 misses on turn 1, then 1 miss + 2 hits, then 1 miss + 3 hits."""
    import transformers  # the test extra: a missing install fails, never skips

    from dynamo_rt.local.tinymodel import ensure_tiny_model

    tok = transformers.AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    system = " ".join(f"Rule {i}: be precise about the harbour boats and the library cat." for i in range(60))
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}]
    names = ("dynamo_frontend_prompt_piece_cache_hits_total", "dynamo_frontend_prompt_piece_cache_misses_total")

    def counts() -> tuple[float, float]:
        return stack.metric(names[0]), stack.metric(names[1])

    post(stack, "/v1/chat/completions", CHAT)  # the model is loaded
    hits0, misses0 = counts()
    for turn in range(3):
        msgs.append({"role": "user", "content": f"Question {turn}: " + "where did the crew sort the catch? " * 20})
        r = post(stack, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 2})
        assert r.status_code == 200, r.text
        want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert r.json()["usage"]["prompt_tokens"] == len(want)
        msgs.append({"role": "assistant", "content": "Noted."})
    hits, misses = counts()
    assert (hits - hits0, misses - misses0) == (5, 4)


def test_dispatch_time_counts_each_request_once_and_is_part_of_its_ttft(stack: Stack) -> None:
    """dynamo_frontend_request_dispatch_seconds (arrival -> publication to the worker) gets one observation per
    request: a short chat, a long one prepared off the loop (frontend/offload.py), and an n=2 request (its second
    choice is not a second arrival); the frontend's TTFT, counted from the same arrival, is never below it."""
    from frontend.app import OFFLOAD_BODY_BYTES

    post(stack, "/v1/chat/completions", CHAT)  # the model is loaded
    names = ("dynamo_frontend_request_dispatch_seconds_count", "dynamo_frontend_request_dispatch_seconds_sum",
             "dynamo_frontend_time_to_first_token_seconds_count", "dynamo_frontend_time_to_first_token_seconds_sum")
    long_text = "The harbour master counted the boats again. " * (OFFLOAD_BODY_BYTES // 40)
    bodies = [{**CHAT, "stream": True},
              {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 2},
              {**CHAT, "n": 2, "temperature": 1.0}]
    for body in bodies:
        n0, s0, tn0, ts0 = (stack.metric(n) for n in names)
        r = post(stack, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        n1, s1, tn1, ts1 = (stack.metric(n) for n in names)
        assert n1 - n0 == 1, body.keys()
        assert tn1 - tn0 == body.get("n", 1)
        assert 0 < s1 - s0 <= ts1 - ts0
