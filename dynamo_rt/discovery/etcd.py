"""The etcd client boundary: the only module that imports ``grpc`` and ``etcd3aio``.

:class:`EtcdClient` is one gRPC channel to etcd with the calls the registry and its watches make (lease,
key-value, auth, watch stream). Every etcd3aio / grpc failure is turned into
:class:`~dynamo_rt.errors.DiscoveryError` here (:func:`_etcd_errors`), and the predicates :func:`transient`,
:func:`unauthenticated` and :func:`lease_not_found` read the cause back, so the client library can be
swapped without touching :mod:`.registry`, :mod:`.watch` or anything above them.
"""

from __future__ import annotations

import os
import sys

# gRPC installs fork handlers by default. When another thread is inside a gRPC call at fork time, the child
# can abort (SIGABRT, "epoll_wait error: Bad file descriptor") before it execs: seen as an embedded
# nats-server "exited with code -6" in the test suite, and 38 of 300 /bin/true spawns while etcd clients
# were busy. Our processes fork only to exec, so the handlers are not needed. gRPC reads the setting when it
# is first imported, which is just below; an explicit setting is kept.
_GRPC_IMPORTED_EARLY = "grpc" in sys.modules and "GRPC_ENABLE_FORK_SUPPORT" not in os.environ
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import ipaddress  # noqa: E402
import logging  # noqa: E402
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub  # noqa: E402
from etcd3aio.auth import AuthService  # noqa: E402
from etcd3aio.errors import (  # noqa: E402
    EtcdConnectionError,
    EtcdError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
)
from etcd3aio.kv import KVService, prefix_range_end  # noqa: E402
from etcd3aio.lease import LeaseService  # noqa: E402

from dynamo_rt.errors import DiscoveryError  # noqa: E402

log = logging.getLogger(__name__)

if _GRPC_IMPORTED_EARLY:
    log.warning("grpc was imported before dynamo_rt.discovery: its fork handlers stay on, and a child forked "
                "during an etcd call may abort before exec")

RPC_TIMEOUT = 5.0  # one etcd call; a healthy local etcd answers in about a millisecond
_EVENT_DELETE = 1  # mvccpb.Event.EventType.DELETE

# grpc's own reconnect backoff grows to 120 s by default; cap it so a restarted etcd is found in ~1 s.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.min_reconnect_backoff_ms", 3_000),  # really the connect timeout of one attempt
]

_ETCD_ERRORS = (EtcdError, grpc.RpcError, grpc.aio.BaseError, TimeoutError, OSError)


# --------------------------------------------------------------------------------------------- errors


@contextlib.contextmanager
def _etcd_errors(what: str) -> Iterator[None]:
    """Translate etcd3aio / grpc failures into DiscoveryError: nothing above this module sees them."""
    try:
        yield
    except DiscoveryError:
        raise
    except _ETCD_ERRORS as exc:
        raise DiscoveryError(f"etcd {what} failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _cause(exc: BaseException) -> BaseException | None:
    return exc.__cause__ if isinstance(exc, DiscoveryError) else exc


def unauthenticated(exc: BaseException) -> bool:
    """The auth token was refused (expired, or etcd restarted and forgot it): log in again."""
    cause = _cause(exc)
    if isinstance(cause, EtcdUnauthenticatedError):
        return True
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.UNAUTHENTICATED


def transient(exc: BaseException) -> bool:
    """etcd unreachable or slow (restarting, leader election): worth retrying."""
    cause = _cause(exc)
    if isinstance(cause, EtcdConnectionError | EtcdTransientError | TimeoutError | OSError):
        return True
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def lease_not_found(exc: BaseException) -> bool:
    cause = _cause(exc)
    return (
        isinstance(cause, grpc.aio.AioRpcError)
        and cause.code() == grpc.StatusCode.NOT_FOUND
        and "lease not found" in (cause.details() or "")
    )


# --------------------------------------------------------------------------------------------- endpoints


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[list[tuple[str, int]], bool]:
    """``http(s)://host:port`` or ``host:port``, comma separated or a list -> ([(host, port)], tls)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[tuple[str, int]] = []
    tls = False
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        url = urlsplit(raw if "://" in raw else f"http://{raw}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise DiscoveryError(f"bad etcd endpoint {raw!r}: expected http(s)://host:port")
        tls = tls or url.scheme == "https"
        out.append((url.hostname, url.port or 2379))
    if not out:
        raise DiscoveryError("no etcd endpoint given")
    return out, tls


def _grpc_target(hosts: list[tuple[str, int]]) -> tuple[str, str | None]:
    """A grpc target for the endpoints, and the TLS server name to verify when it is not in the target."""

    def is_ip(h: str) -> bool:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            return h == "localhost"
        return True

    if all(is_ip(h) for h, _ in hosts):
        v6 = any(":" in h for h, _ in hosts)
        addrs = ",".join(f"[{h}]:{p}" if ":" in h else f"{h.replace('localhost', '127.0.0.1')}:{p}"
                         for h, p in hosts)  # fmt: skip
        # With several addresses the default authority is the whole list, which no certificate names.
        return f"{'ipv6' if v6 else 'ipv4'}:{addrs}", (hosts[0][0] if len(hosts) > 1 else None)
    if len(hosts) == 1:
        # dns: re-resolves on reconnect, so a Kubernetes Service name keeps working when pods move.
        return f"dns:///{hosts[0][0]}:{hosts[0][1]}", None
    # grpc has no target for several host names: use the first one (a Service in front of etcd is the
    # usual set-up) and say so.
    log.warning("several etcd host names given; grpc can use only the first: %s", hosts[0][0])
    return f"dns:///{hosts[0][0]}:{hosts[0][1]}", None


def _read_pem(path: str | os.PathLike[str] | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DiscoveryError(f"cannot read etcd TLS file {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key under a prefix at one revision: key -> (value, mod revision)."""

    kvs: dict[str, tuple[bytes, int]]
    revision: int
    cluster_id: int


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One answer of a watch stream. ``events`` are (key, value, mod revision); a delete has value None."""

    canceled: bool
    compact_revision: int
    cancel_reason: str
    events: list[tuple[str, bytes | None, int]]


class EtcdClient:
    """One gRPC channel to etcd. Each service tries once: retries are the caller's (the registry's
    keep-alive loop and the watch loop), which know what is worth retrying."""

    def __init__(self, hosts: list[tuple[str, int]], *, tls: bool, ca: str | os.PathLike[str] | None,
                 cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None) -> None:
        self._hosts = hosts
        self._tls = tls
        self._ca, self._cert, self._key = ca, cert, key
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._auth: AuthService | None = None
        self._watch: Any = None  # WatchStub: the watch stream is ours (see watch)
        self.token: str | None = None

    @property
    def is_open(self) -> bool:
        return self._channel is not None

    def open(self) -> None:
        target, server_name = _grpc_target(self._hosts)
        options = list(_CHANNEL_OPTIONS)
        if self._tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(self._ca),
                private_key=_read_pem(self._key),
                certificate_chain=_read_pem(self._cert),
            )
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._kv = KVService(self._channel, max_attempts=1)
        self._lease = LeaseService(self._channel, max_attempts=1)
        self._auth = AuthService(self._channel, max_attempts=1)
        self._watch = WatchStub(self._channel)

    async def close(self) -> None:
        self._kv = self._lease = self._watch = self._auth = None
        if self._channel is not None:
            channel, self._channel = self._channel, None
            with contextlib.suppress(Exception):
                await channel.close()

    def _services(self) -> tuple[KVService, LeaseService]:
        if self._kv is None or self._lease is None:
            raise DiscoveryError("etcd registry is not started (or already closed)")
        return self._kv, self._lease

    async def authenticate(self, user: str, password: str) -> None:
        if self._auth is None:
            raise DiscoveryError("etcd registry is not started (or already closed)")
        with _etcd_errors("authenticate"):
            resp = await self._auth.authenticate(user, password, timeout=RPC_TIMEOUT)
        self.token = resp.token
        for svc in (self._kv, self._lease, self._auth):
            if svc is not None:
                svc.set_token(resp.token)

    # -- lease
    async def grant(self, ttl: int) -> int:
        _, lease = self._services()
        with _etcd_errors("lease grant"):
            return int((await lease.grant(ttl, timeout=RPC_TIMEOUT)).ID)

    async def revoke(self, lease_id: int, timeout: float) -> None:
        _, lease = self._services()
        with _etcd_errors("lease revoke"):
            await lease.revoke(lease_id, timeout=timeout, max_attempts=1)

    async def time_to_live(self, lease_id: int) -> int:
        _, lease = self._services()
        with _etcd_errors("lease time-to-live"):
            return int((await lease.time_to_live(lease_id, timeout=RPC_TIMEOUT)).TTL)

    async def keep_alive_once(self, lease_id: int) -> int:
        """One keep-alive round trip; the lease's remaining TTL (0: etcd no longer has it)."""
        _, lease = self._services()
        with _etcd_errors("lease keep-alive"):
            call = lease.keep_alive(lease_id)
            try:
                async with asyncio.timeout(RPC_TIMEOUT):
                    async for resp in call:
                        return int(resp.TTL)
            finally:
                call.cancel()
        raise DiscoveryError("etcd keep-alive stream closed without an answer")

    async def wait_connection_drops(self, on_drop: Callable[[], None]) -> None:
        """Call ``on_drop`` each time the channel leaves READY, until cancelled."""
        channel = self._channel
        if channel is None:
            return
        state = channel.get_state()
        while True:
            await channel.wait_for_state_change(state)
            new = channel.get_state()
            if state == grpc.ChannelConnectivity.READY and new != grpc.ChannelConnectivity.READY:
                on_drop()
            state = new

    # -- keys
    async def put(self, key: str, value: bytes, lease_id: int, timeout: float = RPC_TIMEOUT) -> None:
        kv, _ = self._services()
        with _etcd_errors(f"put {key}"):
            await kv.put(key, value, lease=lease_id, timeout=timeout)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, lease id) of ``key``, None when it is absent."""
        kv, _ = self._services()
        with _etcd_errors(f"get {key}"):
            got = await kv.get(key, timeout=RPC_TIMEOUT)
        return (bytes(got.kvs[0].value), int(got.kvs[0].lease)) if got.kvs else None

    async def delete(self, key: str, timeout: float) -> None:
        kv, _ = self._services()
        with _etcd_errors(f"delete {key}"):
            await kv.delete(key, timeout=timeout)

    async def range(self, prefix: str, timeout: float) -> Snapshot:
        kv, _ = self._services()
        start = prefix.encode()
        with _etcd_errors(f"get {prefix}"):
            resp = await kv.get(start, range_end=prefix_range_end(start), timeout=timeout)
        return Snapshot({k.key.decode(): (bytes(k.value), int(k.mod_revision)) for k in resp.kvs},
                        int(resp.header.revision), int(resp.header.cluster_id))

    # -- watch
    async def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchBatch, None]:
        """Every change under ``prefix`` from ``start_revision`` on, until etcd cancels the watch or the
        stream fails (DiscoveryError). Close it (``contextlib.aclosing``) to end the call.

        The stream is driven here rather than by etcd3aio's watch(): its request generator outlives a failed
        call (grpc only cancels the request task of a live call), leaking a task per reconnect; this one
        ends with the call."""
        if self._watch is None:
            raise DiscoveryError("etcd registry is not started (or already closed)")
        start = prefix.encode()
        ended = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            create = WatchCreateRequest(key=start, range_end=prefix_range_end(start), start_revision=start_revision)
            yield WatchRequest(create_request=create)
            await ended.wait()

        with _etcd_errors(f"watch {prefix}"):
            token = self.token
            call = self._watch.Watch(requests(), metadata=(("token", token),) if token else None)
            try:
                async for wr in call:
                    events = [(e.kv.key.decode(), None if e.type == _EVENT_DELETE else bytes(e.kv.value),
                               int(e.kv.mod_revision)) for e in wr.events]
                    yield WatchBatch(bool(wr.canceled), int(wr.compact_revision), str(wr.cancel_reason), events)
            finally:
                ended.set()
                call.cancel()
