"""KV-aware routing end to end: real frontend, three mocker workers, their KV events over NATS."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.stack import Stack


@pytest.fixture(scope="module")
def kv_stack(etcd_server: object, nats_server: object) -> Iterator[Stack]:
    st = Stack(etcd_server.client_url, nats_server.url, "kvr")  # type: ignore[attr-defined]
    st.add_worker("mocker", "agg", "--speedup", "0", "--num-workers", "3")
    st.start_frontend("--router-mode", "kv")
    try:
        st.wait_ready(n_instances=3)
        yield st
    finally:
        st.stop()


def _complete(st: Stack, prompt: str) -> dict[str, object]:
    r = httpx.post(st.url + "/v1/completions", json={"model": "dynamo-tiny", "prompt": prompt, "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_repeated_prompt_returns_to_the_worker_that_cached_it(kv_stack: Stack) -> None:
    import time

    for i in range(6):
        prompt = f"conversation {i}: " + " ".join(f"word{j * (i + 3)}" for j in range(120))
        first = _complete(kv_stack, prompt)
        n_prompt = first["usage"]["prompt_tokens"]  # type: ignore[index]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]
        time.sleep(0.3)  # the worker's KV events reach the router
        again = _complete(kv_stack, prompt)
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
        # Every full block but the last token's is served from the cache of the worker that ran it first.
        assert cached == (n_prompt - 1) // 16 * 16, (i, n_prompt, cached)
