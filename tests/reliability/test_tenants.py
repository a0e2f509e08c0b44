"""Tenant isolation end to end: with a keys file of two tenants, a long prompt is a prefix-cache hit for the
tenant that sent it before and a miss for the other, on a real stack (reference engine, KV router, etcd,
NATS; aggregated, and disaggregated with the KV handed over NIXL).

What tells a hit from a miss: the response's ``usage.prompt_tokens_details.cached_tokens``, the worker's
``dynamo_worker_cached_prompt_tokens`` counter, the router's ``dynamo_router_overlap_blocks`` histogram
(the prefix it found in its index, fed by the workers' KV events) and the frontend's prompt piece cache
counters. Time to first token is printed for the record, never asserted (timing goals live in bench/).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.helpers import MODEL, assert_openai_error
from tests.stack import Stack
from tests.workermetrics import metrics_port, samples, scrape

KA1, KA2, KB = ("sk-acme-" + secrets.token_hex(8), "sk-acme2-" + secrets.token_hex(8),
                "sk-beta-" + secrets.token_hex(8))
BLOCK = 16
UNAUTHORIZED = {"error": {"message": "invalid or missing API key", "type": "authentication_error",
                          "param": None, "code": "invalid_api_key"}}


def long_text(seed: int) -> str:
    """A user message well past the piece cache's threshold (2048 characters), distinct per ``seed``."""
    words = ["policy", "tenant", "prefix", "block", "cache", "worker", "router", "salt", "stream", "token"]
    return " ".join(f"{words[(i * 7 + seed) % len(words)]}{(i * 13 + seed) % 97}" for i in range(420))


def keys_file(tmp: Path) -> Path:
    p = tmp / "keys.json"
    p.write_text(json.dumps({"tenants": {"acme": [KA1, KA2], "beta": [KB]}}))
    return p


class Probe:
    """Sends one streamed chat as a tenant and reads what the stack says about its prefix."""

    def __init__(self, st: Stack, pool: str) -> None:
        self.st = st
        self.pool = pool  # the worker (and router pool) whose cache is read: "agg" or "decode"
        self.ports = {p.name.split("-")[1]: metrics_port(p.output) for p in st.workers}

    def counters(self) -> dict[str, float]:
        with httpx.Client(timeout=10) as c:
            front = c.get(self.st.url + "/metrics").text
        out = {"overlap": samples(front, "dynamo_router_overlap_blocks_sum", pool=self.pool),
               "routed": samples(front, "dynamo_router_overlap_blocks_count", pool=self.pool),
               "piece_hits": samples(front, "dynamo_frontend_prompt_piece_cache_hits_total"),
               "piece_misses": samples(front, "dynamo_frontend_prompt_piece_cache_misses_total")}
        for mode, port in self.ports.items():
            text = scrape(port)
            own = mode == self.pool
            cached = samples(text, "dynamo_worker_cached_prompt_tokens_total")
            out["worker_cached" if own else f"{mode}_cached"] = cached
            out["pulls" if own else f"{mode}_pulls"] = samples(text, "dynamo_worker_kv_pulls_total")
        return out

    def send(self, key: str, text: str, header: str = "authorization", **extra: Any) -> dict[str, Any]:
        """Stream a chat; returns its usage, TTFT (seconds) and the counters' deltas."""
        before = self.counters()
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
        headers = {"authorization": f"Bearer {key}"} if header == "authorization" else {header: key}
        usage: dict[str, Any] | None = None
        ttft = None
        t0 = time.perf_counter()
        with httpx.stream("POST", self.st.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            for ln in lines:
                if ln == "data: [DONE]":
                    continue
                chunk = json.loads(ln[6:])
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
        assert lines[-1] == "data: [DONE]" and usage is not None, lines[-3:]
        deadline = time.monotonic() + 10  # the worker counts a request as its final frame goes out
        after = self.counters()
        while after["worker_cached"] < before["worker_cached"] + usage["prompt_tokens_details"]["cached_tokens"] \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            after = self.counters()
        delta = {k: after[k] - before[k] for k in before}
        assert delta["routed"] == 1, delta
        return {"usage": usage, "ttft": ttft, **delta}


def settle() -> None:
    """Give the worker's KV events (published at the end of each engine step) time to reach the router."""
    time.sleep(1.0)


def expect_hit(got: dict[str, Any], prompt_tokens: int) -> None:
    full = (prompt_tokens - 1) // BLOCK  # never the last token: its logits are needed
    assert got["usage"]["prompt_tokens"] == prompt_tokens
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == full * BLOCK, got
    assert got["worker_cached"] == full * BLOCK and got["overlap"] >= full, got


def expect_miss(got: dict[str, Any]) -> None:
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, got
    assert got["worker_cached"] == 0 and got["overlap"] == 0, got


@pytest.fixture(scope="module")
def agg(etcd_server: Any, nats_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probe]:
    st = Stack(etcd_server.client_url, nats_server.url, "tenants-agg")
    st.add_worker("reference", "agg", "--kv-cache-blocks", "1024", "--metrics-port", "0")
    st.start_frontend("--router-mode", "kv", "--api-keys-file", str(keys_file(tmp_path_factory.mktemp("keys"))))
    try:
        st.wait_ready(1, timeout=180)
        yield Probe(st, "agg")
        logs = "".join(p.output() for p in st.procs)
        for k in (KA1, KA2, KB):
            assert k not in logs  # keys are never logged
        assert "API keys required: 3 keys of 2 tenants" in logs
    finally:
        st.stop()


def test_same_tenant_hits_other_tenant_misses(agg: Probe) -> None:
    text = long_text(1)
    first = agg.send(KA1, text)
    expect_miss(first)
    n = first["usage"]["prompt_tokens"]
    assert n > 8 * BLOCK and first["piece_misses"] >= 1
    settle()
    again = agg.send(KA1, text)
    expect_hit(again, n)
    assert again["piece_hits"] >= 1 and again["piece_misses"] == 0  # the rendered prompt's pieces, cached
    other = agg.send(KB, text)
    expect_miss(other)
    assert other["piece_misses"] >= 1 and other["piece_hits"] == first["piece_hits"]  # nor the piece cache
    # The other key of the same tenant shares the tenant's cache.
    settle()
    same = agg.send(KA2, text, header="x-api-key")
    expect_hit(same, n)
    print(f"\nTTFT (s): tenant A first {first['ttft']:.4f}, A again {again['ttft']:.4f}, "
          f"A's second key {same['ttft']:.4f}, tenant B {other['ttft']:.4f} ({n} prompt tokens)")


def test_client_salt_cannot_reach_another_tenant(agg: Probe) -> None:
    text = long_text(2)
    n = agg.send(KA1, text, cache_salt="shared-salt")["usage"]["prompt_tokens"]
    settle()
    # Tenant B names A's client salt (or none): still its own cache.
    expect_miss(agg.send(KB, text, cache_salt="shared-salt"))
    expect_miss(agg.send(KB, text))
    # A's client salt is mixed into A's tenant salt: without it, or with another, A misses too...
    expect_miss(agg.send(KA1, text))
    settle()
    expect_hit(agg.send(KA1, text, cache_salt="shared-salt"), n)
    expect_hit(agg.send(KA2, text, cache_salt="shared-salt"), n)


def test_unknown_or_missing_key_is_401(agg: Probe) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for h in ({}, {"authorization": "Bearer sk-nobody"}, {"x-api-key": "sk-nobody"},
              {"authorization": f"Bearer {KA1}x"}, {"authorization": f"Basic {KB}"}):
        for path, b in (("/v1/chat/completions", body), ("/v1/completions", {**body, "prompt": "hi"})):
            r = httpx.post(agg.st.url + path, json=b, headers=h, timeout=30)
            assert (r.status_code, r.json()) == (401, UNAUTHORIZED), (h, path)
            assert_openai_error(r.json())
    r = httpx.get(agg.st.url + "/v1/models", timeout=30)
    assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
    r = httpx.get(agg.st.url + "/v1/models", headers={"x-api-key": KB}, timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    assert httpx.get(agg.st.url + "/health", timeout=30).status_code == 200  # probes stay open
    r = httpx.post(agg.st.url + "/v1/chat/completions", json={**body, "cache_salt": ""},
                   headers={"authorization": f"Bearer {KA1}"}, timeout=30)
    assert r.status_code == 400 and assert_openai_error(r.json())["param"] == "cache_salt"


def test_stored_responses_belong_to_their_tenant(agg: Probe) -> None:
    """A stored /v1/responses response is continued, fetched and deleted by its own tenant only: another
    tenant's ``previous_response_id`` / GET / DELETE is the same 404 as an id that never existed."""
    url = agg.st.url + "/v1/responses"
    a, b = {"authorization": f"Bearer {KA1}"}, {"authorization": f"Bearer {KB}"}
    body = {"model": MODEL, "input": "hello", "max_output_tokens": 3, "temperature": 0}
    r = httpx.post(url, json=body, headers=a, timeout=60)
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    nope = httpx.post(url, json={**body, "previous_response_id": rid}, headers=b, timeout=60)
    assert nope.status_code == 404 and assert_openai_error(nope.json())["param"] == "previous_response_id"
    assert httpx.get(f"{url}/{rid}", headers=b, timeout=30).status_code == 404
    assert httpx.delete(f"{url}/{rid}", headers=b, timeout=30).status_code == 404
    same = httpx.post(url, json={**body, "previous_response_id": rid}, headers={"x-api-key": KA2}, timeout=60)
    assert same.status_code == 200, same.text  # another key of the same tenant continues it
    assert httpx.get(f"{url}/{rid}", headers=a, timeout=30).json()["id"] == rid


def test_messages_route_answers_401_in_anthropic_shape(agg: Probe) -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(agg.st.url + "/v1/messages", json=body, headers={"x-api-key": "sk-nobody"}, timeout=30)
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error",
                                                   "message": "invalid or missing API key"}}
    ok = httpx.post(agg.st.url + "/v1/messages", json=body, headers={"x-api-key": KB}, timeout=60)
    assert ok.status_code == 200 and ok.json()["type"] == "message"


def test_disaggregated_workers_agree_on_the_tenant_salt(etcd_server: Any, nats_server: Any,
                                                       tmp_path: Path) -> None:
    """Prefill and decode workers hash a salted prompt alike (and as the router does): the decode worker
    registers the blocks it pulled under the tenant's hashes, so the tenant's next request hits there; a
    longer follow-up prefilled remotely hits the prefill worker's copy; the other tenant misses on both."""
    st = Stack(etcd_server.client_url, nats_server.url, "tenants-dis")
    for mode in ("prefill", "decode"):
        st.add_worker("reference", mode, "--kv-cache-blocks", "1024", "--metrics-port", "0")
    # Up to 2 blocks uncached on the decode worker: prefilled there; more: handed over from a prefill worker.
    st.start_frontend("--router-mode", "kv", "--disagg-threshold", str(2 * BLOCK + 1),
                      "--api-keys-file", str(keys_file(tmp_path)))
    try:
        st.wait_ready(2, timeout=180)
        dec = Probe(st, "decode")
        text = long_text(3)
        first = dec.send(KA1, text)
        expect_miss(first)
        assert (first["pulls"], first["prefill_cached"]) == (1, 0)  # handed over
        n = first["usage"]["prompt_tokens"]
        settle()
        again = dec.send(KA2, text)  # A's other key: the decode worker's cache, under A's salted hashes
        expect_hit(again, n)
        assert (again["pulls"], again["prefill_cached"]) == (0, 0)
        other = dec.send(KB, text)  # remote prefill again: a miss there too, though the prefill worker holds A's
        expect_miss(other)
        assert (other["pulls"], other["prefill_cached"]) == (1, 0)
        # A follow-up turn, too long to prefill on the decode worker: the prefill worker finds A's prefix.
        settle()
        follow = [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": long_text(4)}]
        r = httpx.post(st.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KA1}"}, timeout=120,
                       json={"model": MODEL, "messages": follow, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        after = dec.counters()
        assert after["prefill_cached"] >= ((n - 1) // BLOCK - 2) * BLOCK, after
        assert after["prefill_cached"] % BLOCK == 0
    finally:
        st.stop()
