"""POST /v1/responses end to end: real etcd, NATS (JetStream), a mocker worker and two frontend processes, with
the official ``openai`` SDK as the client.

The mocker's output is a pure function of the prompt, so a Responses request must give exactly the text the
equivalent chat request gives (it runs through the chat path); ``--eos-probability`` makes most requests end
on EOS ("completed") rather than at the token limit.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from frontend.serving import TEST_FAULT_ENV
from tests.stack import Stack

MODEL = "dynamo-tiny"
NS = "responses"


@pytest.fixture(scope="module")
def stacks(etcd_server: object, nats_server: object) -> Iterator[tuple[Stack, Stack]]:
    """Two frontends of one namespace (sharing etcd and NATS) and one mocker worker."""
    etcd, nats = etcd_server.client_url, nats_server.url  # type: ignore[attr-defined]
    a = Stack(etcd, nats, NS)
    a.add_worker("mocker", "agg", "--speedup", "5", "--eos-probability", "0.1", "--served-model-name", MODEL)
    a.start_frontend()
    b = Stack(etcd, nats, NS)
    b.start_frontend("--response-ttl", "600")
    try:
        a.wait_ready(n_instances=1)
        b.wait_ready(n_instances=1)
        yield a, b
    finally:
        b.stop()
        a.stop()


def client(st: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=st.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat_text(st: Stack, messages: list[dict[str, object]], max_tokens: int) -> tuple[str, str, int]:
    r = client(st).chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)  # type: ignore[arg-type]
    assert r.usage is not None
    return r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage.prompt_tokens


def test_create_matches_chat(stacks: tuple[Stack, Stack]) -> None:
    a, _ = stacks
    resp = client(a).responses.create(model=MODEL, input="Tell me about the sea.", instructions="Be brief.",
                                      max_output_tokens=64, metadata={"k": "v"})
    text, reason, prompt_tokens = chat_text(a, [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Tell me about the sea."}], 64)
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.output_text == text and text
    assert resp.status == ("incomplete" if reason == "length" else "completed")
    assert [o.type for o in resp.output] == ["message"]
    assert resp.output[0].role == "assistant"  # type: ignore[union-attr]
    assert resp.usage is not None and resp.usage.input_tokens == prompt_tokens
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.metadata == {"k": "v"} and resp.instructions == "Be brief." and resp.store is True
    # stored: GET returns it, from the other frontend too
    _, b = stacks
    got = httpx.get(b.url + f"/v1/responses/{resp.id}", timeout=30)
    assert got.status_code == 200 and got.json()["output"][0]["content"][0]["text"] == text


def test_stream_event_sequence(stacks: tuple[Stack, Stack]) -> None:
    a, _ = stacks
    c = client(a)
    plain = c.responses.create(model=MODEL, input="Hello there", max_output_tokens=64)
    events = list(c.responses.create(model=MODEL, input="Hello there", max_output_tokens=64, stream=True))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    n = types.count("response.output_text.delta")
    assert n >= 1
    terminal = "response.completed" if plain.status == "completed" else "response.incomplete"
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * n
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        terminal])
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == plain.output_text
    done = events[-4]
    assert done.type == "response.output_text.done" and done.text == plain.output_text  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == plain.output_text and final.id == events[0].response.id  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens == plain.usage.output_tokens  # type: ignore[union-attr]


def test_stream_helper_final_response(stacks: tuple[Stack, Stack]) -> None:
    a, _ = stacks
    with client(a).responses.stream(model=MODEL, input="Hello there", max_output_tokens=64) as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert final.status == "completed" and final.output_text == text and text


def test_previous_response_id_across_frontends(stacks: tuple[Stack, Stack]) -> None:
    a, b = stacks
    first = client(a).responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=64)
    # The continuation runs on the other frontend process: the conversation comes from JetStream KV.
    second = client(b).responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                        max_output_tokens=64)
    assert second.previous_response_id == first.id
    text, _, prompt_tokens = chat_text(a, [{"role": "user", "content": "My name is Ada."},
                                           {"role": "assistant", "content": first.output_text},
                                           {"role": "user", "content": "What is my name?"}], 64)
    assert second.output_text == text
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens
    # A third turn, streamed, back on the first frontend: two stored turns deep.
    events = list(client(a).responses.create(model=MODEL, input="And again?", previous_response_id=second.id,
                                             max_output_tokens=64, stream=True))
    final = events[-1].response  # type: ignore[union-attr]
    text3, _, _ = chat_text(b, [{"role": "user", "content": "My name is Ada."},
                                {"role": "assistant", "content": first.output_text},
                                {"role": "user", "content": "What is my name?"},
                                {"role": "assistant", "content": second.output_text},
                                {"role": "user", "content": "And again?"}], 64)
    assert final.output_text == text3


def test_store_false_and_unknown_ids(stacks: tuple[Stack, Stack]) -> None:
    a, b = stacks
    c = client(a)
    r = c.responses.create(model=MODEL, input="Do not keep this.", store=False, max_output_tokens=8)
    assert r.store is False
    for st in (a, b):
        with pytest.raises(openai.NotFoundError) as ei:
            client(st).responses.create(model=MODEL, input="more", previous_response_id=r.id)
        assert ei.value.status_code == 404
        body = ei.value.body
        assert isinstance(body, dict) and body["param"] == "previous_response_id" and r.id in body["message"]
        got = httpx.get(st.url + f"/v1/responses/{r.id}", timeout=30)
        assert got.status_code == 404 and got.json()["error"]["code"] == "not_found"


def test_delete(stacks: tuple[Stack, Stack]) -> None:
    a, b = stacks
    r = client(a).responses.create(model=MODEL, input="Short lived.", max_output_tokens=8)
    d = httpx.delete(b.url + f"/v1/responses/{r.id}", timeout=30)
    assert d.status_code == 200 and d.json() == {"id": r.id, "object": "response", "deleted": True}
    assert httpx.get(a.url + f"/v1/responses/{r.id}", timeout=30).status_code == 404
    assert httpx.delete(a.url + f"/v1/responses/{r.id}", timeout=30).status_code == 404


def test_items_function_call_round_trip(stacks: tuple[Stack, Stack]) -> None:
    """Input items with a function call and its output reach the chat template like the chat equivalent."""
    a, _ = stacks
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    r = client(a).responses.create(model=MODEL, input=items, tools=tools, max_output_tokens=64)  # type: ignore[arg-type]
    chat = client(a).chat.completions.create(model=MODEL, max_tokens=64, tools=[  # type: ignore[list-item]
        {"type": "function", "function": {k: v for k, v in tools[0].items() if k != "type"}}], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    msg = chat.choices[0].message
    if not msg.tool_calls:
        assert r.output_text == msg.content


def test_bad_input(stacks: tuple[Stack, Stack]) -> None:
    a, _ = stacks
    c = client(a)
    cases: list[tuple[dict[str, object], str]] = [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
         "input[0].content[0].type"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as ei:
            c.post("/responses", body={"model": MODEL, **extra}, cast_to=object)
        body = ei.value.body
        assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error", body
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="no-such-model", input="hi")
    r = httpx.post(a.url + "/v1/responses", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_failure_mid_stream(etcd_server: object, nats_server: object, stacks: tuple[Stack, Stack]) -> None:
    """A frontend whose chat path fails after 3 tokens (its test fault hook): streamed, the events end with
    ``error`` then ``response.failed``; not streamed, a 500 with an OpenAI error body; nothing is stored."""
    f = Stack(etcd_server.client_url, nats_server.url, NS)  # type: ignore[attr-defined]
    f.env[TEST_FAULT_ENV] = "3"
    f.start_frontend()
    try:
        f.wait_ready(n_instances=1)
        c = client(f)
        events = list(c.responses.create(model=MODEL, input="Tell me a long story", max_output_tokens=64,
                                         stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
        assert [e.type for e in events][-2:] == ["error", "response.failed"]
        err, failed = events[-2], events[-1]
        assert err.message == "internal error: RuntimeError" and err.code == "internal"  # type: ignore[union-attr]
        resp = failed.response  # type: ignore[union-attr]
        assert resp.status == "failed" and resp.error is not None and resp.error.code == "server_error"
        assert httpx.get(f.url + f"/v1/responses/{resp.id}", timeout=30).status_code == 404
        with pytest.raises(openai.InternalServerError) as ei:
            c.responses.create(model=MODEL, input="Tell me a long story", max_output_tokens=64)
        body = ei.value.body
        assert isinstance(body, dict) and body["message"] == "internal error: RuntimeError"
    finally:
        f.stop()
