"""Structured outputs across worker boundaries (real processes): a worker SIGKILLed mid-document still gives the
client one valid document (the new worker advances the grammar over the tokens already sent, from
``output_offset``), and in disaggregated mode the prefill worker samples the first token under the grammar."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import httpx
import jsonschema

from tests.conftest import arun
from tests.stack import Stack
from tests.workermetrics import kv_counts, metrics_port

MODEL = "dynamo-tiny"
# A long document (hundreds of tokens) so the kill lands in the middle of it.
LONG = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": 80, "maxItems": 80},
    "done": {"type": "boolean"}}, "required": ["items", "done"], "additionalProperties": False}
FMT = {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG, "strict": True}}


async def _stream(url: str, body: dict[str, Any], progress: list[int], i: int) -> tuple[str, str | None]:
    text = ""
    finish = None
    async with httpx.AsyncClient(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            for ch in ev["choices"]:
                text += ch["delta"].get("content") or ""
                finish = ch.get("finish_reason") or finish
            progress[i] += 1
    return text, finish


def test_worker_killed_mid_document_yields_one_valid_document(etcd_server: object, nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "smig")  # type: ignore[attr-defined]
    a = st.add_worker("reference", "agg", "--kv-cache-blocks", "1024")
    b = st.add_worker("reference", "agg", "--kv-cache-blocks", "1024")
    st.start_frontend("--migration-limit", "3")
    try:
        st.wait_ready(n_instances=2)
        # Compile once on each worker first (the first guided request imports xgrammar: seconds here).
        for _ in range(4):
            r = httpx.post(st.url + "/v1/chat/completions", timeout=120, json={
                "model": MODEL, "messages": [{"role": "user", "content": "warm"}], "max_tokens": 4,
                "guided_choice": ["x"]})
            assert r.status_code == 200, r.text
        n = 6
        progress = [0] * n

        async def main() -> list[tuple[str, str | None]]:
            # Unseeded sampling (a seeded sampler's stream is not replayed by this frontend yet) and greedy.
            tasks = [asyncio.ensure_future(_stream(st.url, {
                "model": MODEL, "messages": [{"role": "user", "content": f"list {i}"}], "max_tokens": 1000,
                "temperature": 0 if i % 2 else 1.0, "response_format": FMT, "stream": True}, progress, i))
                for i in range(n)]
            while min(progress) < 5:  # every document is under way
                await asyncio.sleep(0.01)
                if any(t.done() for t in tasks):
                    break
            a.signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

        results = arun(main(), 300)
        for text, finish in results:
            assert finish == "stop", (finish, text[-80:])
            jsonschema.validate(json.loads(text), LONG)  # one document: no duplicated prefix
        assert b.alive()
        assert st.metric("dynamo_frontend_migrations_total") >= 1
    finally:
        st.stop()


def test_disaggregated_guided_request(etcd_server: object, nats_server: object) -> None:
    st = Stack(etcd_server.client_url, nats_server.url, "sdis")  # type: ignore[attr-defined]
    st.add_worker("reference", "prefill", "--kv-cache-blocks", "1024", "--metrics-port", "0")
    dec = st.add_worker("reference", "decode", "--kv-cache-blocks", "1024", "--metrics-port", "0")
    st.start_frontend("--disagg-threshold", "1")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    try:
        st.wait_ready(n_instances=2)
        for i in range(3):
            r = httpx.post(st.url + "/v1/chat/completions", timeout=120, json={
                "model": MODEL, "messages": [{"role": "user", "content": f"a longer prompt number {i}"}],
                "max_tokens": 60, "seed": i, "guided_json": schema})
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            assert ch["finish_reason"] == "stop"
            jsonschema.validate(json.loads(ch["message"]["content"]), schema)
        # A choice the prefill worker's first token must already respect (a lone "{"-less answer).
        r = httpx.post(st.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": "pick a colour for me please"}],
            "max_tokens": 20, "temperature": 0, "guided_choice": ["magenta", "teal"]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] in ("magenta", "teal")
        assert kv_counts(metrics_port(dec.output)).pulls == 4  # every request was prefilled remotely
    finally:
        st.stop()
