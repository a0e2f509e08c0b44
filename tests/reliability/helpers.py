"""Shared pieces of the reliability tests: a streaming client that classifies every outcome, the OpenAI
error-shape check, stack start-up, certificates, and a watcher of the workers' load reports.

Every client call here is bounded in time: a request that hangs is an outcome of its own (``hung``), never
a stuck test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme

from dynamo_rt.local.services import TlsFiles
from dynamo_rt.protocol import LoadMetrics, decode_load
from dynamo_rt.transport import NatsOptions, Transport, load_subject
from tests.stack import Stack

MODEL = "dynamo-tiny"
ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(obj: object) -> dict[str, Any]:
    """``obj`` is ``{"error": {"message": str, "type": str, "param": str|None, "code": str|None}}`` exactly;
    returns the inner object."""
    assert isinstance(obj, dict) and set(obj) == {"error"}, obj
    err = obj["error"]
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def chat_body(content: str, max_tokens: int, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Outcome:
    """What one request ended as. Exactly one of: ``completed`` (finish_reason + usage + [DONE]),
    ``error`` set (an OpenAI error body or SSE error event), ``closed`` (we hung up on purpose),
    ``hung`` (nothing for ``timeout`` seconds) or ``broken`` (the stream ended without [DONE])."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    completion_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False
    error: dict[str, Any] | None = None
    closed: bool = False
    hung: bool = False
    broken: str = ""
    latency: float = 0.0

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.finish_reason is not None

    def kind(self) -> str:
        if self.hung:
            return "hung"
        if self.closed:
            return "closed"
        if self.error is not None:
            return f"error:{self.status}:{self.error.get('type')}"
        if self.completed:
            return "completed"
        return f"broken:{self.broken or self.status}"


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any], *, timeout: float = 30.0,
                      close_after: int | None = None, headers: dict[str, str] | None = None,
                      hold: asyncio.Event | None = None) -> Outcome:
    """POST a chat request and read it to the end (or hang up after ``close_after`` SSE events, once
    ``hold`` is set when given).

    A non-streaming body or an error status is read as one JSON body. Never raises for what the server
    does; ``timeout`` bounds the whole request (``hung`` then)."""
    out = Outcome()
    t0 = time.monotonic()
    try:
        await _stream_into(out, client, url, body, timeout, close_after, headers, hold)
    finally:
        out.latency = time.monotonic() - t0
    return out


async def _stream_into(out: Outcome, client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout: float,
                       close_after: int | None, headers: dict[str, str] | None, hold: asyncio.Event | None) -> None:
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
                out.status = r.status_code
                out.headers = {k.lower(): v for k, v in r.headers.items()}
                if r.status_code != 200 or not body.get("stream"):
                    raw = await r.aread()
                    _read_json(out, raw)
                    return
                async for line in sse_lines(r):
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        out.done = True
                        break
                    try:
                        ev = json.loads(data)
                    except ValueError:
                        out.broken = f"an SSE event that is not JSON: {data[:300]!r}"
                        return
                    if "error" in ev:
                        out.error = assert_openai_error(ev)
                        continue
                    out.chunks += 1
                    for ch in ev.get("choices") or []:
                        if ch.get("finish_reason"):
                            out.finish_reason = ch["finish_reason"]
                    if ev.get("usage"):
                        out.completion_tokens = ev["usage"]["completion_tokens"]
                    if close_after is not None and out.chunks >= close_after:
                        if hold is not None:
                            await hold.wait()
                        out.closed = True
                        break  # leaving the block closes the connection mid-stream
                if not out.done and not out.closed and out.error is None:
                    out.broken = "stream ended without [DONE]"
    except TimeoutError:
        out.hung = True
    except httpx.HTTPError as exc:
        out.broken = f"{type(exc).__name__}: {exc}"


async def sse_lines(r: httpx.Response) -> AsyncIterator[bytes]:
    """The lines of an SSE body, split where SSE splits (CR, LF, CRLF). httpx's ``aiter_lines`` also splits
    on U+0085, U+2028, U+2029..., which JSON strings may hold unescaped: it would cut an event in two."""
    buf = b""
    async for piece in r.aiter_bytes():
        buf += piece
        *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line
    if buf:
        yield buf


def _read_json(out: Outcome, raw: bytes) -> None:
    try:
        obj = json.loads(raw)
    except ValueError:
        out.broken = f"status {out.status} with a non-JSON body: {raw[:200]!r}"
        return
    if out.status != 200:
        out.error = assert_openai_error(obj)
        return
    out.done = True
    out.finish_reason = obj["choices"][0]["finish_reason"]
    out.completion_tokens = obj["usage"]["completion_tokens"]


def tally(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.kind()] = counts.get(o.kind(), 0) + 1
    return dict(sorted(counts.items()))


def start_stack(st: Stack, workers: Sequence[Sequence[str]], frontend_args: Sequence[str] = (), *,
                instances: int | None = None, timeout: float = 90.0) -> None:
    """Start ``workers`` (each ``(engine, mode, *flags)``) and a frontend, return once the frontend sees
    ``instances`` instances (default: one per worker)."""
    for w in workers:
        st.add_worker(*w)
    st.start_frontend(*frontend_args)
    st.wait_ready(n_instances=instances if instances is not None else len(workers), timeout=timeout)


def health_instances(st: Stack) -> int:
    try:
        status, body = st.get_json("/health", 2)
    except (OSError, ValueError):
        return -1
    if status != 200:
        return 0
    models = body.get("models") or {}
    return sum(int(m["instances"]) for m in models.values())  # type: ignore[union-attr]


@dataclass
class Certs:
    """A test CA, a server certificate for 127.0.0.1 / localhost, and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of the above

    def server_tls(self, *, verify_clients: bool = False) -> TlsFiles:
        return TlsFiles(cert=self.server_cert, key=self.server_key, ca=self.ca, verify_clients=verify_clients,
                        client_cert=self.client_cert, client_key=self.client_key)


def make_certs(d: Path) -> Certs:
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("dynamo-client@example.org", common_name="dynamo-client")
    out = Certs(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
                client_cert=d / "client.pem", client_key=d / "client.key", other_ca=d / "other-ca.pem")
    ca.cert_pem.write_to_path(str(out.ca))
    server.cert_chain_pems[0].write_to_path(str(out.server_cert))
    server.private_key_pem.write_to_path(str(out.server_key))
    client.cert_chain_pems[0].write_to_path(str(out.client_cert))
    client.private_key_pem.write_to_path(str(out.client_key))
    trustme.CA().cert_pem.write_to_path(str(out.other_ca))
    return out


class LoadWatch:
    """The latest load report of every worker of a model, from ``{ns}.load.{model}`` on NATS."""

    def __init__(self, nats: NatsOptions | str, namespace: str, model: str = MODEL) -> None:
        self.transport = Transport(nats)
        self.subject = load_subject(namespace, model)
        self.latest: dict[str, LoadMetrics] = {}
        self.peak_used: dict[str, int] = {}  # most KV blocks each worker reported in use
        self._changed = asyncio.Event()

    async def __aenter__(self) -> LoadWatch:
        await self.transport.connect(timeout=10)
        await self.transport.subscribe(self.subject, self._on_load)
        await self.transport.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    def _on_load(self, data: bytes, subject: str) -> None:
        lm = decode_load(data)
        self.latest[lm.instance_id] = lm
        self.peak_used[lm.instance_id] = max(self.peak_used.get(lm.instance_id, 0), lm.kv_blocks_used)
        self._changed.set()

    async def wait(self, predicate: Any, timeout: float) -> bool:
        """True once ``predicate(latest)`` holds, False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.latest):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return bool(predicate(self.latest))
        return True


class LoadRun:
    """``clients`` concurrent loops of streaming chat requests until :meth:`stop`; every outcome is kept
    with its start and end times (``time.monotonic()``)."""

    def __init__(self, url: str, clients: int, max_tokens: int, *, timeout: float = 30.0) -> None:
        self.url = url
        self.clients = clients
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.records: list[tuple[float, float, Outcome]] = []
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> LoadRun:
        self._client = httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_connections=self.clients + 8))
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _loop(self, i: int) -> None:
        assert self._client is not None
        n = 0
        while not self._stopping:
            t0 = time.monotonic()
            o = await stream_chat(self._client, self.url, chat_body(f"client {i} request {n}", self.max_tokens),
                                  timeout=self.timeout)
            self.records.append((t0, time.monotonic(), o))
            n += 1
            if not o.completed:
                await asyncio.sleep(0.05)  # an error comes back at once: do not spin

    async def stop(self) -> None:
        """Let every loop finish its current request (each bounded by ``timeout``), then close."""
        self._stopping = True
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def outcomes(self, since: float = 0.0, until: float = float("inf")) -> list[Outcome]:
        """Requests that started in [since, until)."""
        return [o for t0, _, o in self.records if since <= t0 < until]

    def completed_after(self, t: float) -> float | None:
        """End time of the first request started at or after ``t`` that completed."""
        ends = [t1 for t0, t1, o in self.records if t0 >= t and o.completed]
        return min(ends) if ends else None


def instance_ids(etcd: Any, namespace: str) -> set[str]:
    """Worker instance ids registered in etcd right now (read with etcdctl, outside our own client)."""
    try:
        out = etcd.etcdctl("get", "--prefix", f"/{namespace}/instances/", "--keys-only", timeout=5)
    except Exception:
        return set()
    return {line.rsplit("/", 1)[1] for line in out.split() if line.startswith(f"/{namespace}/instances/")}


def metric(st: Stack, name: str) -> float:
    """Sum of a frontend metric's samples (all label values): :meth:`Stack.metric`, as a function for
    ``asyncio.to_thread``."""
    return st.metric(name)
