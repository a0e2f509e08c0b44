"""A process's session with etcd: one lease, the keys on it, and watches (:class:`Registry`).

The lease has a TTL of 10 s and is kept alive every TTL/3; every key the process puts hangs on it, so a
crashed process vanishes from discovery within the TTL. When the lease is lost (etcd restarted without its
data, a long network cut) a new one is granted and every remembered key is put back. Calls go through
:class:`~dynamo_rt.discovery.etcd.EtcdClient`, so only :class:`~dynamo_rt.errors.DiscoveryError` is seen
here; ``watch_prefix`` is :func:`dynamo_rt.discovery.watch.follow`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec

from dynamo_rt.discovery import watch as _watch
from dynamo_rt.discovery.etcd import (
    EtcdClient,
    Snapshot,
    lease_not_found,
    parse_endpoints,
    transient,
    unauthenticated,
)
from dynamo_rt.discovery.keys import WatchEvent, instance_key, model_key, new_instance_id, nixl_key
from dynamo_rt.errors import DiscoveryError
from dynamo_rt.protocol import InstanceRecord, ModelCard, NixlRecord

log = logging.getLogger("dynamo_rt.discovery")

T = TypeVar("T")

DEFAULT_TTL = 10
_MIN_BACKOFF = _watch.MIN_BACKOFF
_MAX_BACKOFF = _watch.MAX_BACKOFF
_AUTH_REFRESH_S = 240.0  # etcd's simple tokens expire after 300 s by default


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
        hosts, tls = parse_endpoints(endpoints)
        self._endpoints_text = ",".join(f"{h}:{p}" for h, p in hosts)
        self._etcd = EtcdClient(hosts, tls=tls or ca is not None or cert is not None, ca=ca, cert=cert, key=key)
        self._user, self._password = user, password
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout  # how long put/delete/get_prefix retry while etcd is unreachable

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

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def has_credentials(self) -> bool:
        return self._user is not None

    # -- lifecycle
    async def start(self) -> None:
        """Connect, grant the lease and start keeping it alive. Waits up to ``connect_timeout`` for etcd."""
        if self._started:
            return
        self._etcd.open()
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
                if time.monotonic() + backoff > deadline or not transient(exc):
                    await self._etcd.close()
                    if not transient(exc):
                        raise  # etcd answered and refused (bad credentials, ...): say exactly that
                    raise DiscoveryError(f"cannot reach etcd at {self._endpoints_text}: {exc}") from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        self._started = True
        self._connected = True
        self._keepalive_task = asyncio.create_task(self._keepalive_loop(), name=f"etcd-lease-{self.instance_id}")
        self._channel_task = asyncio.create_task(self._etcd.wait_connection_drops(self._wake.set),
                                                 name=f"etcd-channel-{self.instance_id}")
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
        if revoke and self._lease_valid and self._etcd.is_open:
            try:
                await self._etcd.revoke(self._lease_id, timeout=2.0)
            except DiscoveryError as exc:
                if not lease_not_found(exc):  # a lease etcd no longer has took its keys with it
                    log.warning("could not revoke lease %x (its keys expire within %d s): %s",
                                self._lease_id, self.ttl, exc)  # fmt: skip
        self._connected = False
        await self._etcd.close()

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> EtcdClient:
        if not self._etcd.is_open or self._closed:
            raise DiscoveryError("etcd registry is not started (or already closed)")
        return self._etcd

    async def _authenticate(self) -> None:
        assert self._user is not None and self._password is not None
        await self._client().authenticate(self._user, self._password)
        self._auth_at = time.monotonic()

    # -- lease
    async def _grant_and_put_all(self) -> None:
        """Grant a new lease and put every remembered key on it. Caller holds ``_lock``."""
        etcd = self._client()
        self._lease_id = await etcd.grant(self.ttl)
        self._lease_valid = True
        for k, v in list(self._keys.items()):
            await etcd.put(k, v, self._lease_id)
        self._dirty = False

    async def _recover(self) -> None:
        """After a failure: keep the lease if etcd still has it, else grant a new one; then make etcd hold
        exactly our remembered keys. Caller holds ``_lock``."""
        etcd = self._client()
        if self._user is not None:
            await self._authenticate()  # simple tokens do not survive an etcd restart
        if self._lease_valid and await etcd.time_to_live(self._lease_id) <= 0:
            self._mark_lease_lost("etcd no longer knows it")
        if not self._lease_valid:
            await self._grant_and_put_all()
            log.info("etcd lease re-created: %x, %d keys put back", self._lease_id, len(self._keys))
            return
        # The lease survived (etcd restarted with its data): put back only missing or stale keys, so
        # watchers do not see every key change.
        for k, v in list(self._keys.items()):
            if await etcd.get(k) != (v, self._lease_id):
                await etcd.put(k, v, self._lease_id)
        self._dirty = False

    def _mark_lease_lost(self, why: str) -> None:
        if self._lease_valid:
            self._lease_valid = False
            self.lease_lost_count += 1
            log.warning("etcd lease %x lost (%s); granting a new one and re-putting %d keys",
                        self._lease_id, why, len(self._keys))  # fmt: skip

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
                ttl = await self._client().keep_alive_once(self._lease_id)
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
                if unauthenticated(exc) and self._user is not None:
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
    async def _unary(self, call: Callable[[float], Awaitable[T]]) -> T:
        """One etcd call for a caller: retried while etcd is unreachable (a restart, a leader election) for
        up to ``op_timeout``, with one fresh login when the auth token went stale."""
        deadline = time.monotonic() + self._op_timeout
        backoff = _MIN_BACKOFF
        relogged = False
        while True:
            try:
                return await call(max(deadline - time.monotonic(), 0.1))
            except DiscoveryError as exc:
                if unauthenticated(exc) and self._user is not None and not relogged:
                    relogged = True
                    await self._authenticate()
                    continue
                if not transient(exc) or time.monotonic() + backoff >= deadline:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def put(self, key: str, value: bytes) -> None:
        """Put ``key`` on this process's lease. It is remembered (and put back after a lost lease or once
        etcd is back) even when this call fails with :class:`DiscoveryError`."""
        etcd = self._client()
        self._keys[key] = value
        async with self._lock:
            try:
                try:
                    await self._unary(lambda t: etcd.put(key, value, self._lease_id, timeout=t))
                except DiscoveryError as exc:
                    if not lease_not_found(exc):
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
        etcd = self._client()
        self._keys.pop(key, None)
        async with self._lock:
            await self._unary(lambda t: etcd.delete(key, timeout=t))

    async def register_instance(self, rec: InstanceRecord) -> None:
        key = instance_key(self.namespace, rec.component, rec.endpoint, rec.instance_id)
        await self.put(key, msgspec.json.encode(rec))

    async def register_model(self, card: ModelCard) -> None:
        await self.put(model_key(self.namespace, card.name, self.instance_id), msgspec.json.encode(card))

    async def register_nixl(self, rec: NixlRecord) -> None:
        await self.put(nixl_key(self.namespace, self.instance_id), msgspec.json.encode(rec))

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` with its value, and the etcd revision of that read."""
        snap = await self._range(prefix)
        return {k: v for k, (v, _) in snap.kvs.items()}, snap.revision

    async def _range(self, prefix: str) -> Snapshot:
        etcd = self._client()
        return await self._unary(lambda t: etcd.range(prefix, timeout=t))

    # -- watch
    def watch_prefix(self, prefix: str, *, sync_marks: bool = False) -> AsyncGenerator[WatchEvent, None]:
        """The current state under ``prefix`` as ``put`` events, then every change, forever (until the
        registry closes).

        It survives etcd restarts: after a reconnect it reads the prefix again and yields the difference
        from what it had delivered, or, when etcd lost that history (restarted empty, compacted), a
        ``reset`` followed by the whole state as puts. Each such batch (initial, diff, reset) is yielded
        back to back, with no await in between, so a consumer that handles events synchronously never
        exposes a half-built state; ``sync_marks`` adds a ``synced`` event after each batch.
        """
        return _watch.follow(self, prefix, sync_marks=sync_marks)
