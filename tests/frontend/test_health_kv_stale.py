"""A worker that serves requests but publishes no KV events (ai-dynamo/dynamo 8264): two real reference
workers behind a KV-routing frontend, one started with its KV event publisher dropping everything
(``DYN_TEST_FAULT_POINTS=worker.kv_events=drop``, read from a file so the test can switch it off).

Before the router notices, a shared prompt prefix sends every request to the worker that publishes (the other
one looks like it caches nothing). Once the silent worker has finished prefills and stayed silent, the router
says so (a log line, ``dynamo_router_kv_events_stale``, ``kv_events_stale`` on /health) and spreads the
requests by load; when its events flow again it recovers, visibly too."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stack import Proc, Stack

MODEL = "dynamo-tiny"
PREFIX = [5 + (i * 53) % 1800 for i in range(64)]  # four full blocks every prompt shares


def _instance(p: Proc) -> str:
    deadline = time.monotonic() + 60
    while (m := re.search(r"worker ([0-9a-f]{16}) serving model", p.output())) is None:
        assert time.monotonic() < deadline, p.output()[-2000:]
        time.sleep(0.1)
    return m.group(1)


@pytest.fixture(scope="module")
def stack(etcd_server: object, nats_server: object, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Stack, str, str, Path]]:
    faults = tmp_path_factory.mktemp("kvstale") / "points"
    faults.write_text("worker.kv_events=drop")
    st = Stack(etcd_server.client_url, nats_server.url, "kvstale")  # type: ignore[attr-defined]
    normal = st.add_worker("reference", "agg", "--kv-cache-blocks", "256")
    env = st.env
    st.env = {**env, "DYN_TEST_FAULT_POINTS": f"@{faults}"}
    silent = st.add_worker("reference", "agg", "--kv-cache-blocks", "256")
    st.env = env
    st.start_frontend("--router-mode", "kv")
    try:
        st.wait_ready(2)
        yield st, _instance(normal), _instance(silent), faults
    finally:
        st.stop()


def _complete(st: Stack, salt: int, pin: str | None = None, prefix: list[int] = PREFIX) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": [*prefix, *(7 + (salt * 11 + i) % 1500 for i in range(40))],
                            "max_tokens": 2, "temperature": 0}
    if pin:
        body["nvext"] = {"backend_instance_id": pin}
    r = httpx.post(st.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text


def _decisions(st: Stack, worker: str) -> float:
    return _sample(httpx.get(st.url + "/metrics", timeout=10).text, "dynamo_router_decisions_total", worker)


def _sample(text: str, name: str, worker: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'worker="{worker}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_silent_worker_is_noticed_and_requests_are_spread_by_load(stack: tuple[Stack, str, str, Path]) -> None:
    st, normal, silent, faults = stack
    # The normal worker caches the prefix and says so.
    _complete(st, 0, pin=normal)
    time.sleep(0.5)
    n0, s0 = _decisions(st, normal), _decisions(st, silent)
    for i in range(6):
        _complete(st, 100 + i)
    assert (_decisions(st, normal) - n0, _decisions(st, silent) - s0) == (6, 0)  # all to one worker
    # The silent worker serves two requests of prompts it did not hold, and tells nothing of them.
    _complete(st, 200, pin=silent)
    _complete(st, 201, pin=silent)
    deadline = time.monotonic() + 30
    while True:
        body = httpx.get(st.url + "/health", timeout=10).json()
        if "kv_events_stale" in body["reasons"]:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    m = body["models"][MODEL]
    assert m["ready"] is True and m["kv_events_stale"] == [silent] and body["status"] == "degraded", body
    metrics = httpx.get(st.url + "/metrics", timeout=10).text
    assert _sample(metrics, "dynamo_router_kv_events_stale", silent) == 1
    assert _sample(metrics, "dynamo_router_kv_events_stale", normal) == 0
    assert st.frontend is not None and st.frontend.output().count("its KV events are stale") == 1
    # Now by load: the same prompts go to both workers.
    n1, s1 = _decisions(st, normal), _decisions(st, silent)
    for i in range(20):
        _complete(st, 300 + i)
    spread = (_decisions(st, normal) - n1, _decisions(st, silent) - s1)
    assert sum(spread) == 20 and min(spread) >= 4, spread
    fallbacks = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(st.url + "/metrics").text.splitlines()
                    if line.startswith("dynamo_router_kv_stale_fallbacks_total{"))
    assert fallbacks == 20
    # Its events flow again: the router hears it once it stores new blocks (a prompt it has not seen), and
    # recovers.
    faults.write_text("")
    deadline = time.monotonic() + 30
    i = 0
    while "kv_events_stale" in httpx.get(st.url + "/health", timeout=10).json()["reasons"]:
        assert time.monotonic() < deadline
        _complete(st, 400 + i, pin=silent, prefix=[])
        i += 1
        time.sleep(0.2)
    assert _sample(httpx.get(st.url + "/metrics").text, "dynamo_router_kv_events_stale", silent) == 0
    assert "KV events from worker " + silent in st.frontend.output()
