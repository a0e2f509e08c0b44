"""Shared fixtures: real etcd and nats-server processes on free loopback ports, and small helpers.

Session servers (``etcd_server``, ``nats_server``) serve every test that only needs a working service;
tests isolate themselves with a unique namespace (``ns``). Tests that stop, kill, restart or wipe a
server take a private one (``fresh_etcd``, ``fresh_nats``). Every server is stopped (its process group
killed) and its data removed when its fixture ends.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dynamo_rt.local.services import EtcdServer, NatsServer, free_port

__all__ = ["arun", "free_port", "until"]

T = TypeVar("T")


def arun(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run ``coro`` in a fresh event loop, bounded in time (no pytest-asyncio here)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond: Any, what: str, timeout: float = 20.0) -> None:
    """Wait (bounded, polling every 5 ms) for ``cond()`` to hold, e.g. for an engine's step thread to apply a
    change it learns about asynchronously; a timeout fails the test naming ``what``."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def _serve(server: EtcdServer | NatsServer, state_dir: Path) -> Iterator[Any]:
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(state_dir, ignore_errors=True)  # etcd preallocates a 64 MB WAL per data dir


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    d = tmp_path_factory.mktemp("etcd")
    yield from _serve(EtcdServer(d), d)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    d = tmp_path_factory.mktemp("nats")
    yield from _serve(NatsServer(d, jetstream=True), d)


@pytest.fixture
def fresh_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    d = tmp_path / "etcd"
    yield from _serve(EtcdServer(d), d)


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    d = tmp_path / "nats"
    yield from _serve(NatsServer(d, jetstream=True), d)


@pytest.fixture
def ns() -> str:
    """A namespace no other test uses, so tests can share the session servers."""
    return "t" + secrets.token_hex(4)
