"""Service discovery on etcd: one lease per process, its keys, and watched views of a namespace.

This is the only module that imports ``etcd3aio`` (and grpc); every etcd or grpc failure is turned into
:class:`~dynamo_rt.errors.DiscoveryError` here, so the client library can be swapped without touching the
rest of the runtime.

* :class:`Registry`: a process's connection to etcd. It holds one lease (TTL 10 s, kept alive every TTL/3)
  and every key it puts hangs on that lease, so a crashed process vanishes within the TTL. When the lease
  is lost (etcd restarted without its data, a long network cut) it grants a new one and puts every key
  back. ``watch_prefix`` streams a prefix as events and survives etcd restarts: after a reconnect it
  reads the prefix again and yields the difference, or a ``reset`` and the full state when etcd lost its
  history.
* :class:`DiscoveryView`: the decoded, in-memory view of ``/{ns}/`` (instances, model cards, NIXL
  records) that the frontend and routers read on every request.

Key layout (values are JSON of the :mod:`dynamo_rt.protocol` structs)::

    /{ns}/instances/{component}/{endpoint}/{instance_id}   InstanceRecord
    /{ns}/models/{model_name}/{instance_id}                 ModelCard
    /{ns}/nixl/{instance_id}                                NixlRecord
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
import msgspec
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub
from etcd3aio.auth import AuthService
from etcd3aio.errors import EtcdConnectionError, EtcdError, EtcdTransientError, EtcdUnauthenticatedError
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

from dynamo_rt.errors import DiscoveryError
from dynamo_rt.protocol import InstanceRecord, ModelCard, NixlRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TTL = 10
_RPC_TIMEOUT = 5.0  # one etcd call; a healthy local etcd answers in about a millisecond
_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 1.0  # reconnect quickly after an etcd restart: a retry per second costs nothing
_AUTH_REFRESH_S = 240.0  # etcd's simple tokens expire after 300 s by default
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


# --------------------------------------------------------------------------------------------- keys


def instance_key(ns: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"/{ns}/instances/{component}/{endpoint}/{instance_id}"


def model_key(ns: str, model: str, instance_id: str) -> str:
    return f"/{ns}/models/{model}/{instance_id}"


def nixl_key(ns: str, instance_id: str) -> str:
    return f"/{ns}/nixl/{instance_id}"


def new_instance_id() -> str:
    """16 lowercase hex digits, random: unique per process start."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    # put: key now holds value; delete: key is gone; reset: etcd lost the history the watcher was
    # following (restart without data, compaction), drop everything, the full state follows as puts;
    # synced: the state read after a (re)connect has been delivered (only with ``sync_marks=True``).
    kind: Literal["put", "delete", "reset", "synced"]
    key: str
    value: bytes = b""


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


def _unauthenticated(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, DiscoveryError) else exc
    if isinstance(cause, EtcdUnauthenticatedError):
        return True
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.UNAUTHENTICATED


def _transient(exc: BaseException) -> bool:
    """etcd unreachable or slow (restarting, leader election): worth retrying."""
    cause = exc.__cause__ if isinstance(exc, DiscoveryError) else exc
    if isinstance(cause, EtcdConnectionError | EtcdTransientError | TimeoutError | OSError):
        return True
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _lease_not_found(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, DiscoveryError) else exc
    return (
        isinstance(cause, grpc.aio.AioRpcError)
        and cause.code() == grpc.StatusCode.NOT_FOUND
        and "lease not found" in (cause.details() or "")
    )


def _parse_endpoints(endpoints: str | Sequence[str]) -> tuple[list[tuple[str, int]], bool]:
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


# --------------------------------------------------------------------------------------------- registry


class Registry:
    """One process's etcd session: a lease, the keys on it, and watches.

    ``put`` remembers each key so it can be put back when the lease is lost; ``close()`` revokes the
    lease, which deletes every key at once (a clean shutdown does not wait for the TTL).
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        namespace: str,
        *,
        ttl: int = DEFAULT_TTL,
        instance_id: str | None = None,
        user: str | None = None,
        password: str | None = None,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        connect_timeout: float = 10.0,
        op_timeout: float = 5.0,
    ) -> None:
        if ttl < 1:
            raise DiscoveryError(f"lease TTL must be >= 1 s, got {ttl}")
        if (cert is None) != (key is None):
            raise DiscoveryError("etcd client TLS needs both a certificate and its key")
        if (user is None) != (password is None):
            raise DiscoveryError("etcd auth needs both a user and a password")
        self.namespace = namespace
        self.instance_id = instance_id or new_instance_id()
        self.ttl = ttl
        self.lease_lost_count = 0  # times the lease was found gone and re-created (tests, metrics)
        self._hosts, tls = _parse_endpoints(endpoints)
        self._endpoints_text = ",".join(f"{h}:{p}" for h, p in self._hosts)
        self._tls = tls or ca is not None or cert is not None
        self._ca, self._cert, self._key = ca, cert, key
        self._user, self._password = user, password
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout  # how long put/delete/get_prefix retry while etcd is unreachable

        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._watch: Any = None  # WatchStub: the watch stream is ours (see watch_prefix)
        self._token: str | None = None
        self._auth: AuthService | None = None

        self._keys: dict[str, bytes] = {}  # what this process has put, for re-puts
        self._lease_id = 0
        self._lease_valid = False
        self._dirty = False  # a write failed: reconcile the remembered keys at the next chance
        self._connected = False
        self._closed = False
        self._started = False
        self._lock = asyncio.Lock()  # serialises writes with lease recovery
        self._wake = asyncio.Event()
        self._keepalive_task: asyncio.Task[None] | None = None
        self._channel_task: asyncio.Task[None] | None = None
        self._auth_at = 0.0

    # -- properties
    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def connected(self) -> bool:
        """True while the last keep-alive reached etcd."""
        return self._connected

    @property
    def endpoints(self) -> str:
        return self._endpoints_text

    # -- lifecycle
    async def start(self) -> None:
        """Connect, grant the lease and start keeping it alive. Waits up to ``connect_timeout`` for etcd."""
        if self._started:
            return
        self._open_channel()
        deadline = time.monotonic() + self._connect_timeout
        backoff = _MIN_BACKOFF
        while True:
            try:
                async with self._lock:
                    if self._user is not None:
                        await self._authenticate()
                    await self._grant_and_put_all()
                break
            except DiscoveryError as exc:
                if time.monotonic() + backoff > deadline or not _transient(exc):
                    await self._close_channel()
                    if not _transient(exc):
                        raise  # etcd answered and refused (bad credentials, ...): say exactly that
                    raise DiscoveryError(f"cannot reach etcd at {self._endpoints_text}: {exc}") from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        self._started = True
        self._connected = True
        self._keepalive_task = asyncio.create_task(self._keepalive_loop(), name=f"etcd-lease-{self.instance_id}")
        self._channel_task = asyncio.create_task(self._channel_watch(), name=f"etcd-channel-{self.instance_id}")
        log.info(
            "etcd connected: %s namespace=%s instance=%s lease=%x ttl=%ds",
            self._endpoints_text, self.namespace, self.instance_id, self._lease_id, self.ttl,
        )  # fmt: skip

    async def close(self, *, revoke: bool = True) -> None:
        """Stop the keep-alive; with ``revoke`` (the default) delete every key of this process at once."""
        if self._closed:
            return
        self._closed = True
        for task in (self._keepalive_task, self._channel_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._keepalive_task = self._channel_task = None
        if revoke and self._lease_valid and self._lease is not None:
            try:
                with _etcd_errors("lease revoke"):
                    await self._lease.revoke(self._lease_id, timeout=2.0, max_attempts=1)
            except DiscoveryError as exc:
                if not _lease_not_found(exc):  # a lease etcd no longer has took its keys with it
                    log.warning("could not revoke lease %x (its keys expire within %d s): %s",
                                self._lease_id, self.ttl, exc)  # fmt: skip
        self._connected = False
        await self._close_channel()

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open_channel(self) -> None:
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
        # Retries are ours (the keep-alive loop and the watch loop), so the services try once.
        self._kv = KVService(self._channel, max_attempts=1)
        self._lease = LeaseService(self._channel, max_attempts=1)
        self._auth = AuthService(self._channel, max_attempts=1)
        self._watch = WatchStub(self._channel)

    async def _close_channel(self) -> None:
        self._kv = self._lease = self._watch = self._auth = None
        if self._channel is not None:
            channel, self._channel = self._channel, None
            with contextlib.suppress(Exception):
                await channel.close()

    def _watch_stub(self) -> Any:
        if self._watch is None or self._closed:
            raise DiscoveryError("etcd registry is not started (or already closed)")
        return self._watch

    def _services(self) -> tuple[KVService, LeaseService]:
        if self._kv is None or self._lease is None or self._closed:
            raise DiscoveryError("etcd registry is not started (or already closed)")
        return self._kv, self._lease

    async def _authenticate(self) -> None:
        assert self._auth is not None and self._user is not None and self._password is not None
        with _etcd_errors("authenticate"):
            resp = await self._auth.authenticate(self._user, self._password, timeout=_RPC_TIMEOUT)
        self._token = resp.token
        for svc in (self._kv, self._lease, self._auth):
            if svc is not None:
                svc.set_token(resp.token)
        self._auth_at = time.monotonic()

    # -- lease
    async def _grant_and_put_all(self) -> None:
        """Grant a new lease and put every remembered key on it. Caller holds ``_lock``."""
        kv, lease = self._services()
        with _etcd_errors("lease grant"):
            resp = await lease.grant(self.ttl, timeout=_RPC_TIMEOUT)
        self._lease_id = int(resp.ID)
        self._lease_valid = True
        with _etcd_errors("put"):
            for k, v in list(self._keys.items()):
                await kv.put(k, v, lease=self._lease_id, timeout=_RPC_TIMEOUT)
        self._dirty = False

    async def _recover(self) -> None:
        """After a failure: keep the lease if etcd still has it, else grant a new one; then make etcd hold
        exactly our remembered keys. Caller holds ``_lock``."""
        kv, lease = self._services()
        if self._user is not None:
            await self._authenticate()  # simple tokens do not survive an etcd restart
        if self._lease_valid:
            with _etcd_errors("lease time-to-live"):
                ttl = int((await lease.time_to_live(self._lease_id, timeout=_RPC_TIMEOUT)).TTL)
            if ttl <= 0:
                self._mark_lease_lost("etcd no longer knows it")
        if not self._lease_valid:
            await self._grant_and_put_all()
            log.info("etcd lease re-created: %x, %d keys put back", self._lease_id, len(self._keys))
            return
        # The lease survived (etcd restarted with its data): put back only missing or stale keys, so
        # watchers do not see every key change.
        with _etcd_errors("reconcile"):
            for k, v in list(self._keys.items()):
                got = await kv.get(k, timeout=_RPC_TIMEOUT)
                if not got.kvs or got.kvs[0].value != v or got.kvs[0].lease != self._lease_id:
                    await kv.put(k, v, lease=self._lease_id, timeout=_RPC_TIMEOUT)
        self._dirty = False

    def _mark_lease_lost(self, why: str) -> None:
        if self._lease_valid:
            self._lease_valid = False
            self.lease_lost_count += 1
            log.warning("etcd lease %x lost (%s); granting a new one and re-putting %d keys",
                        self._lease_id, why, len(self._keys))  # fmt: skip

    async def _keepalive_once(self) -> int:
        _, lease = self._services()
        with _etcd_errors("lease keep-alive"):
            call = lease.keep_alive(self._lease_id)
            try:
                async with asyncio.timeout(_RPC_TIMEOUT):
                    async for resp in call:
                        return int(resp.TTL)
            finally:
                call.cancel()
        raise DiscoveryError("etcd keep-alive stream closed without an answer")

    async def _channel_watch(self) -> None:
        """Wake the keep-alive loop as soon as the connection to etcd drops, rather than at the next
        keep-alive: after an etcd restart without data the lease and keys come back within ~1 s."""
        channel = self._channel
        if channel is None:
            return
        state = channel.get_state()
        while not self._closed:
            await channel.wait_for_state_change(state)
            new = channel.get_state()
            if state == grpc.ChannelConnectivity.READY and new != grpc.ChannelConnectivity.READY:
                self._wake.set()
            state = new

    async def _keepalive_loop(self) -> None:
        interval = self.ttl / 3
        backoff = _MIN_BACKOFF
        failing = False
        while not self._closed:
            try:
                if self._user is not None and time.monotonic() - self._auth_at > _AUTH_REFRESH_S:
                    await self._authenticate()
                if failing or self._dirty or not self._lease_valid:
                    async with self._lock:
                        await self._recover()
                    if failing:
                        log.info("etcd reachable again at %s (lease %x)", self._endpoints_text, self._lease_id)
                    failing = False
                ttl = await self._keepalive_once()
                if ttl <= 0:
                    self._mark_lease_lost("keep-alive answered TTL 0")
                    continue
                self._connected = True
                backoff = _MIN_BACKOFF
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.CancelledError:
                raise
            except DiscoveryError as exc:
                if _unauthenticated(exc) and self._user is not None:
                    self._auth_at = 0.0
                if not failing:
                    log.warning("etcd keep-alive failed, retrying: %s", exc)
                failing = True
                self._connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except Exception:  # a bug here must not silently end the lease
                log.exception("etcd keep-alive loop error")
                failing = True
                await asyncio.sleep(_MAX_BACKOFF)

    # -- keys
    async def _unary(self, what: str, call: Callable[[float], Awaitable[T]]) -> T:
        """One etcd call for a caller: retried while etcd is unreachable (a restart, a leader election) for
        up to ``op_timeout``, with one fresh login when the auth token went stale."""
        deadline = time.monotonic() + self._op_timeout
        backoff = _MIN_BACKOFF
        relogged = False
        while True:
            try:
                with _etcd_errors(what):
                    return await call(max(deadline - time.monotonic(), 0.1))
            except DiscoveryError as exc:
                if _unauthenticated(exc) and self._user is not None and not relogged:
                    relogged = True
                    await self._authenticate()
                    continue
                if not _transient(exc) or time.monotonic() + backoff >= deadline:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def put(self, key: str, value: bytes) -> None:
        """Put ``key`` on this process's lease. It is remembered (and put back after a lost lease or once
        etcd is back) even when this call fails with :class:`DiscoveryError`."""
        kv, _ = self._services()
        self._keys[key] = value
        async with self._lock:
            try:
                try:
                    await self._unary(f"put {key}", lambda t: kv.put(key, value, lease=self._lease_id, timeout=t))
                except DiscoveryError as exc:
                    if not _lease_not_found(exc):
                        raise
                    # The lease expired under us (the keep-alive loop has not noticed yet): recover now.
                    self._mark_lease_lost("put found it gone")
                    await self._grant_and_put_all()
            except DiscoveryError:
                self._dirty = True
                self._wake.set()
                raise

    async def delete(self, key: str) -> None:
        """Delete ``key`` and forget it."""
        kv, _ = self._services()
        self._keys.pop(key, None)
        async with self._lock:
            await self._unary(f"delete {key}", lambda t: kv.delete(key, timeout=t))

    async def register_instance(self, rec: InstanceRecord) -> None:
        key = instance_key(self.namespace, rec.component, rec.endpoint, rec.instance_id)
        await self.put(key, msgspec.json.encode(rec))

    async def register_model(self, card: ModelCard) -> None:
        await self.put(model_key(self.namespace, card.name, self.instance_id), msgspec.json.encode(card))

    async def register_nixl(self, rec: NixlRecord) -> None:
        await self.put(nixl_key(self.namespace, self.instance_id), msgspec.json.encode(rec))

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` with its value, and the etcd revision of that read."""
        resp = await self._range(prefix)
        return {kv.key.decode(): bytes(kv.value) for kv in resp.kvs}, int(resp.header.revision)

    async def _range(self, prefix: str) -> Any:
        kv, _ = self._services()
        start = prefix.encode()
        end = prefix_range_end(start)
        return await self._unary(f"get {prefix}", lambda t: kv.get(start, range_end=end, timeout=t))

    # -- watch
    async def watch_prefix(self, prefix: str, *, sync_marks: bool = False) -> AsyncIterator[WatchEvent]:
        """The current state under ``prefix`` as ``put`` events, then every change, forever (until the
        registry closes).

        It survives etcd restarts: after a reconnect it reads the prefix again and yields the difference
        from what it had delivered, or, when etcd lost that history (restarted empty, compacted), a
        ``reset`` followed by the whole state as puts. Each such batch (initial, diff, reset) is yielded
        back to back, with no await in between, so a consumer that handles events synchronously never
        exposes a half-built state; ``sync_marks`` adds a ``synced`` event after each batch.
        """
        self._services()  # fail now, not by retrying forever, when the registry is not started
        start = prefix.encode()
        end = prefix_range_end(start)
        known: dict[str, tuple[bytes, int]] = {}  # key -> (value, mod revision) as delivered
        last_rev = 0  # every event under the prefix up to this revision has been delivered
        cluster_id: int | None = None
        must_reset = False
        backoff = _MIN_BACKOFF  # between failed reads
        rewatch_backoff = _MIN_BACKOFF  # between watches that etcd cancelled or broke
        failing = False
        while not self._closed:
            # 1. (Re)read the whole prefix.
            try:
                resp = await self._range(prefix)
            except DiscoveryError as exc:
                if self._closed:
                    return
                if not failing:
                    log.warning("watch %s: etcd unreachable, retrying: %s", prefix, exc)
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            if failing:
                log.info("watch %s: etcd reachable again, resynchronising", prefix)
            failing = False
            backoff = _MIN_BACKOFF
            snap = {kv.key.decode(): (bytes(kv.value), int(kv.mod_revision)) for kv in resp.kvs}
            rev = int(resp.header.revision)
            batch: list[WatchEvent] = []
            if cluster_id is None:
                batch = [WatchEvent("put", k, v) for k, (v, _) in snap.items()]
            else:
                lost = must_reset or _history_lost(known, last_rev, cluster_id, snap, rev, resp.header)
                if lost:
                    log.warning("watch %s: etcd lost the watched history (restart without data or "
                                "compaction); rebuilding from %d keys", prefix, len(snap))  # fmt: skip
                    batch = [WatchEvent("reset", prefix)]
                    batch += [WatchEvent("put", k, v) for k, (v, _) in snap.items()]
                else:
                    batch = _diff(known, snap)
            known, last_rev, cluster_id, must_reset = snap, rev, int(resp.header.cluster_id), False
            if sync_marks:
                batch.append(WatchEvent("synced", prefix))
            for ev in batch:
                yield ev
            del batch

            # 2. Follow changes from the revision just read. The stream is driven here rather than by
            # etcd3aio's watch(): its request generator outlives a failed call (grpc only cancels the
            # request task of a live call), leaking a task per reconnect; this one ends with the call.
            ended = asyncio.Event()

            async def requests(rev: int = last_rev + 1, ended: asyncio.Event = ended) -> AsyncIterator[Any]:
                create = WatchCreateRequest(key=start, range_end=end, start_revision=rev)
                yield WatchRequest(create_request=create)
                await ended.wait()

            try:
                with _etcd_errors(f"watch {prefix}"):
                    token = self._token
                    call = self._watch_stub().Watch(requests(), metadata=(("token", token),) if token else None)
                    try:
                        async for wr in call:
                            if wr.canceled or wr.compact_revision:
                                must_reset = wr.compact_revision > 0
                                log.info("watch %s cancelled by etcd (compacted at %d): %s",
                                         prefix, wr.compact_revision, wr.cancel_reason)  # fmt: skip
                                break
                            if wr.events:
                                rewatch_backoff = _MIN_BACKOFF
                            for e in wr.events:
                                k = e.kv.key.decode()
                                last_rev = max(last_rev, int(e.kv.mod_revision))
                                if e.type == _EVENT_DELETE:
                                    if known.pop(k, None) is not None:
                                        yield WatchEvent("delete", k)
                                else:
                                    v = bytes(e.kv.value)
                                    known[k] = (v, int(e.kv.mod_revision))
                                    yield WatchEvent("put", k, v)
                    finally:
                        ended.set()
                        call.cancel()
            except DiscoveryError as exc:
                if self._closed:
                    return
                if _unauthenticated(exc) and self._user is not None:
                    with contextlib.suppress(DiscoveryError):
                        await self._authenticate()
                log.warning("watch %s interrupted, resynchronising: %s", prefix, exc)
            if self._closed:
                return
            # Cancelled or failed: back off, so a watch etcd keeps refusing does not spin.
            await asyncio.sleep(rewatch_backoff)
            rewatch_backoff = min(rewatch_backoff * 2, _MAX_BACKOFF)


def _history_lost(
    known: dict[str, tuple[bytes, int]], last_rev: int, cluster_id: int,
    snap: dict[str, tuple[bytes, int]], rev: int, header: Any,
) -> bool:  # fmt: skip
    """Whether the etcd we reconnected to no longer holds the history we followed."""
    if int(header.cluster_id) != cluster_id or rev < last_rev:
        return True  # a new cluster (our EtcdServer uses a fresh token per data dir), or a rewound one
    # Every key last written at or before ``last_rev`` must be one we saw at that very revision; a key
    # that is not means the history was rewritten (an empty etcd whose revision has already passed ours).
    for k, (_, mod) in snap.items():
        if mod <= last_rev and known.get(k, (b"", -1))[1] != mod:
            return True
    return False


def _diff(known: dict[str, tuple[bytes, int]], snap: dict[str, tuple[bytes, int]]) -> list[WatchEvent]:
    out = [WatchEvent("delete", k) for k in known if k not in snap]
    out += [WatchEvent("put", k, v) for k, (v, mod) in snap.items() if known.get(k, (b"", -1))[1] != mod]
    return out


# --------------------------------------------------------------------------------------------- view

Listener = Callable[[str, str, object | None], None]
_instance_dec = msgspec.json.Decoder(InstanceRecord)
_model_dec = msgspec.json.Decoder(ModelCard)
_nixl_dec = msgspec.json.Decoder(NixlRecord)


class DiscoveryView:
    """In-memory view of ``/{ns}/`` kept current by one watch (the frontend and routers read it).

    Reads are plain dict look-ups on the event loop; a malformed value is logged and skipped. Listeners
    get ``(kind, key, record)``: on ``put`` the new record, on ``delete`` the record that left.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._prefix = f"/{registry.namespace}/"
        self._records: dict[str, object] = {}  # etcd key -> decoded record
        self._instances: dict[tuple[str, str], dict[str, InstanceRecord]] = {}
        self._models: dict[str, dict[str, ModelCard]] = {}
        self._nixl: dict[str, NixlRecord] = {}
        self._listeners: list[Listener] = []
        self._before_reset: dict[str, object] | None = None
        self._loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.resets = 0  # times the watch rebuilt the view from scratch (tests, metrics)
        self._error: BaseException | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Start watching; return once the initial state is loaded (DiscoveryError if it cannot be)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"discovery-view-{self._registry.namespace}")
        loaded = asyncio.ensure_future(self._loaded.wait())
        await asyncio.wait({loaded, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if loaded.done():
            return
        loaded.cancel()
        ended = self._task.done()
        await self.close()
        if ended:
            raise DiscoveryError(f"discovery view of {self._prefix} could not start: {self._error}")
        raise DiscoveryError(f"discovery view of {self._prefix} not loaded after {timeout:.0f} s")

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            async for ev in self._registry.watch_prefix(self._prefix, sync_marks=True):
                self._apply(ev)
        except asyncio.CancelledError:
            raise
        except DiscoveryError as exc:
            self._error = exc
            log.error("discovery view of %s stopped: %s", self._prefix, exc)
        except Exception as exc:
            self._error = exc
            log.exception("discovery view of %s stopped", self._prefix)

    # -- reads
    def instances(self, component: str = "backend", endpoint: str = "generate") -> dict[str, InstanceRecord]:
        return dict(self._instances.get((component, endpoint), {}))

    def models(self) -> dict[str, dict[str, ModelCard]]:
        return {name: dict(cards) for name, cards in self._models.items()}

    def nixl(self, instance_id: str) -> NixlRecord | None:
        return self._nixl.get(instance_id)

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def namespace(self) -> str:
        return self._registry.namespace

    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    async def wait_for(self, predicate: Callable[[DiscoveryView], bool], timeout: float) -> None:
        """Return once ``predicate(self)`` holds; raise TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    # -- updates
    def _apply(self, ev: WatchEvent) -> None:
        if ev.kind == "put":
            self._put(ev.key, ev.value)
        elif ev.kind == "delete":
            self._delete(ev.key, notify=True)
        elif ev.kind == "reset":
            self.resets += 1
            self._before_reset = dict(self._records)
            for k in list(self._records):
                self._delete(k, notify=False)
        elif ev.kind == "synced":
            before, self._before_reset = self._before_reset, None
            if before:
                for k, rec in before.items():
                    if k not in self._records:
                        self._notify("delete", k, rec)
            self._loaded.set()
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _parse_key(self, key: str) -> tuple[str, str, str, str] | None:
        """key -> (kind, a, b, instance_id) for the three record kinds, else None."""
        if not key.startswith(self._prefix):
            return None
        parts = key[len(self._prefix) :].split("/")
        if parts[0] == "instances" and len(parts) == 4 and all(parts[1:]):
            return "instance", parts[1], parts[2], parts[3]
        if parts[0] == "models" and len(parts) >= 3 and all(parts[1:]):
            return "model", "/".join(parts[1:-1]), "", parts[-1]  # model names may contain "/"
        if parts[0] == "nixl" and len(parts) == 2 and parts[1]:
            return "nixl", "", "", parts[1]
        return None

    def _put(self, key: str, value: bytes) -> None:
        parsed = self._parse_key(key)
        if parsed is None:
            return  # not one of ours (other tools may share the namespace)
        kind, a, b, iid = parsed
        rec: InstanceRecord | ModelCard | NixlRecord
        try:
            if kind == "instance":
                rec = _instance_dec.decode(value)
            elif kind == "model":
                rec = _model_dec.decode(value)
            else:
                rec = _nixl_dec.decode(value)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("discovery: skipping malformed value under %s: %s", key, exc)
            self._delete(key, notify=True)  # whatever it held before is no longer true
            return
        self._records[key] = rec
        if isinstance(rec, InstanceRecord):
            self._instances.setdefault((a, b), {})[iid] = rec
        elif isinstance(rec, ModelCard):
            self._models.setdefault(a, {})[iid] = rec
        else:
            self._nixl[iid] = rec
        if self._before_reset is not None and self._before_reset.get(key) == rec:
            return  # rebuilt after a reset, unchanged: listeners already know it
        self._notify("put", key, rec)

    def _delete(self, key: str, *, notify: bool) -> None:
        rec = self._records.pop(key, None)
        if rec is None:
            return
        parsed = self._parse_key(key)
        assert parsed is not None
        kind, a, b, iid = parsed
        if kind == "instance":
            group = self._instances.get((a, b), {})
            group.pop(iid, None)
            if not group:
                self._instances.pop((a, b), None)
        elif kind == "model":
            cards = self._models.get(a, {})
            cards.pop(iid, None)
            if not cards:
                self._models.pop(a, None)  # the model leaves with its last instance
        else:
            self._nixl.pop(iid, None)
        if notify:
            self._notify("delete", key, rec)

    def _notify(self, kind: str, key: str, rec: object | None) -> None:
        for cb in list(self._listeners):
            try:
                cb(kind, key, rec)
            except Exception:
                log.exception("discovery listener %r failed on %s %s", cb, kind, key)
