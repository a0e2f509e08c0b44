"""dynamo_rt.discovery against a real etcd: registration, watched views, lease expiry of a crashed
process, revoke on close, and recovery from etcd restarts (with and without its data)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from dynamo_rt.discovery import (
    DiscoveryView,
    Registry,
    WatchEvent,
    instance_key,
    model_key,
    new_instance_id,
    nixl_key,
)
from dynamo_rt.discovery.watch import _history_lost
from dynamo_rt.errors import DiscoveryError
from dynamo_rt.local.services import EtcdServer, etcd_binary
from dynamo_rt.protocol import InstanceRecord, Mode, ModelCard, NixlRecord
from tests.conftest import arun, free_port

REPO = Path(__file__).resolve().parents[1]


def _inst(ns: str, iid: str, model: str = "m") -> InstanceRecord:
    return InstanceRecord(
        instance_id=iid, namespace=ns, component="backend", endpoint="generate",
        subject=f"{ns}.backend.generate.{iid}", mode=Mode.AGG, engine="mocker", model=model,
        max_context=2048, host="127.0.0.1", pid=1,
    )  # fmt: skip


def _card(name: str = "m") -> ModelCard:
    return ModelCard(
        name=name, context_length=2048, kv_block_size=16, tokenizer_bucket="tok",
        tokenizer_files={"tokenizer.json": "abc-tokenizer.json"}, tokenizer_digest="abc", eos_token_ids=[2],
    )  # fmt: skip


async def _until(cond: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.05)


def test_keys_and_instance_ids() -> None:
    assert instance_key("dyn", "backend", "generate", "00ff") == "/dyn/instances/backend/generate/00ff"
    assert model_key("dyn", "org/model", "00ff") == "/dyn/models/org/model/00ff"
    assert nixl_key("dyn", "00ff") == "/dyn/nixl/00ff"
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def test_bad_arguments_are_discovery_errors() -> None:
    with pytest.raises(DiscoveryError, match="bad etcd endpoint"):
        Registry("ftp://127.0.0.1:2379", "ns")
    with pytest.raises(DiscoveryError, match="certificate and its key"):
        Registry("https://127.0.0.1:2379", "ns", cert="/nonexistent.pem")
    with pytest.raises(DiscoveryError, match="user and a password"):
        Registry("http://127.0.0.1:2379", "ns", user="root")


def test_unreachable_etcd_is_a_discovery_error() -> None:
    async def main() -> None:
        reg = Registry(f"http://127.0.0.1:{free_port()}", "ns", connect_timeout=0.5)
        with pytest.raises(DiscoveryError, match="cannot reach etcd"):
            await reg.start()
        with pytest.raises(DiscoveryError, match="not started"):
            await reg.put("/ns/x", b"1")
        with pytest.raises(DiscoveryError, match="not started"):
            await DiscoveryView(reg).start(timeout=5)

    arun(main(), 30)


def test_registration_appears_in_view_and_delete_removes_it(etcd_server: EtcdServer, ns: str) -> None:
    async def main() -> None:
        async with (
            Registry(etcd_server.client_url, ns, ttl=3) as worker,
            Registry(etcd_server.client_url, ns) as frontend,
        ):
            view = DiscoveryView(frontend)
            await view.start()
            assert view.instances() == {} and view.models() == {}
            seen: list[tuple[str, str, object | None]] = []
            view.add_listener(lambda kind, key, rec: seen.append((kind, key, rec)))

            iid = worker.instance_id
            inst, card = _inst(ns, iid, "org/model"), _card("org/model")
            nixl = NixlRecord(agent_name=iid, agent_metadata=b"\x00\x01meta", memory="DRAM", device_id=0,
                              base_addr=4096, block_bytes=65536, num_blocks=8)  # fmt: skip
            await worker.register_instance(inst)
            await worker.register_model(card)
            await worker.register_nixl(nixl)
            await view.wait_for(lambda v: v.nixl(iid) is not None, 10)

            assert view.instances() == {iid: inst}
            assert view.instances("backend", "other") == {}
            assert view.models() == {"org/model": {iid: card}}
            assert view.nixl(iid) == nixl
            ikey, mkey, nkey = (instance_key(ns, "backend", "generate", iid),
                                model_key(ns, "org/model", iid), nixl_key(ns, iid))  # fmt: skip
            assert seen == [("put", ikey, inst), ("put", mkey, card), ("put", nkey, nixl)]
            state, rev = await frontend.get_prefix(f"/{ns}/")
            assert state == {ikey: msgspec.json.encode(inst), mkey: msgspec.json.encode(card),
                             nkey: msgspec.json.encode(nixl)}  # fmt: skip
            assert rev > 0

            await worker.delete(mkey)
            await view.wait_for(lambda v: v.models() == {}, 10)
            await worker.delete(ikey)
            await view.wait_for(lambda v: v.instances() == {}, 10)
            assert seen[3:] == [("delete", mkey, card), ("delete", ikey, inst)]
            assert view.nixl(iid) == nixl
            await view.close()

    arun(main(), 60)


def test_model_leaves_with_its_last_instance(etcd_server: EtcdServer, ns: str) -> None:
    async def main() -> None:
        url = etcd_server.client_url
        async with Registry(url, ns) as frontend:
            view = DiscoveryView(frontend)
            await view.start()
            w1, w2 = Registry(url, ns), Registry(url, ns)
            for w in (w1, w2):
                await w.start()
                await w.register_instance(_inst(ns, w.instance_id))
                await w.register_model(_card())
            await view.wait_for(lambda v: len(v.models().get("m", {})) == 2, 10)
            await w1.close()
            await view.wait_for(lambda v: len(v.instances()) == 1, 10)
            assert list(view.models()) == ["m"] and list(view.models()["m"]) == [w2.instance_id]
            await w2.close()
            await view.wait_for(lambda v: v.models() == {} and v.instances() == {}, 10)
            await view.close()

    arun(main(), 60)


def test_close_revokes_the_lease_at_once(etcd_server: EtcdServer, ns: str) -> None:
    async def main() -> None:
        url = etcd_server.client_url
        async with Registry(url, ns) as observer:
            worker = Registry(url, ns, ttl=30)
            await worker.start()
            await worker.register_instance(_inst(ns, worker.instance_id))
            await worker.register_model(_card())
            assert len((await observer.get_prefix(f"/{ns}/"))[0]) == 2
            await worker.close()
            # No waiting: the revoke deleted the keys before close() returned.
            assert (await observer.get_prefix(f"/{ns}/"))[0] == {}

            keeper = Registry(url, ns, ttl=30)
            await keeper.start()
            await keeper.register_model(_card())
            await keeper.close(revoke=False)
            assert list((await observer.get_prefix(f"/{ns}/"))[0]) == [model_key(ns, "m", keeper.instance_id)]

    arun(main(), 60)


def test_watch_prefix_initial_state_then_changes(etcd_server: EtcdServer, ns: str) -> None:
    async def main() -> None:
        url = etcd_server.client_url
        async with Registry(url, ns) as a, Registry(url, ns) as b:
            p = f"/{ns}/w/"
            await a.put(p + "k1", b"v1")
            await a.put(f"/{ns}/other", b"not watched")
            events = b.watch_prefix(p, sync_marks=True)
            assert await anext(events) == WatchEvent("put", p + "k1", b"v1")
            assert await anext(events) == WatchEvent("synced", p)
            await a.put(p + "k2", b"v2")
            await a.put(p + "k1", b"v1b")
            await a.delete(p + "k2")
            got = [await asyncio.wait_for(anext(events), 10) for _ in range(3)]
            assert got == [WatchEvent("put", p + "k2", b"v2"), WatchEvent("put", p + "k1", b"v1b"),
                           WatchEvent("delete", p + "k2")]  # fmt: skip
            await events.aclose()  # type: ignore[attr-defined]

    arun(main(), 60)


def test_malformed_values_are_skipped(etcd_server: EtcdServer, ns: str) -> None:
    async def main() -> None:
        async with Registry(etcd_server.client_url, ns) as reg:
            view = DiscoveryView(reg)
            await view.start()
            seen: list[tuple[str, str]] = []
            view.add_listener(lambda kind, key, rec: seen.append((kind, key)))
            bad_key = instance_key(ns, "backend", "generate", "bad")
            await reg.put(bad_key, b"{not json")
            await reg.put(instance_key(ns, "backend", "generate", "typo"), b'{"instance_id": 5}')
            await reg.put(model_key(ns, "m", "x"), b"\xff\xfe")
            await reg.put(f"/{ns}/instances/too/short", b"{}")  # not a record key: ignored
            good = _inst(ns, reg.instance_id)
            await reg.register_instance(good)
            await view.wait_for(lambda v: reg.instance_id in v.instances(), 10)
            assert view.instances() == {reg.instance_id: good} and view.models() == {}

            fixed = _inst(ns, "bad")
            await reg.put(bad_key, msgspec.json.encode(fixed))
            await view.wait_for(lambda v: "bad" in v.instances(), 10)
            await reg.put(bad_key, b"[]")  # garbage over a valid record removes it
            await view.wait_for(lambda v: "bad" not in v.instances(), 10)
            assert view.instances() == {reg.instance_id: good}
            good_key = instance_key(ns, "backend", "generate", reg.instance_id)
            assert seen == [("put", good_key), ("put", bad_key), ("delete", bad_key)]
            await view.close()

    arun(main(), 60)


_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from dynamo_rt.discovery import Registry
    from dynamo_rt.protocol import InstanceRecord, ModelCard

    async def main() -> None:
        url, ns, ttl = sys.argv[1], sys.argv[2], int(sys.argv[3])
        reg = Registry(url, ns, ttl=ttl)
        await reg.start()
        await reg.register_instance(InstanceRecord(
            instance_id=reg.instance_id, namespace=ns, component="backend", endpoint="generate",
            subject="s", mode="agg", engine="mocker", model="crashy"))
        await reg.register_model(ModelCard(name="crashy", context_length=64, kv_block_size=16,
            tokenizer_bucket="b", tokenizer_files={}, tokenizer_digest=""))
        print(reg.instance_id, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def _killed_worker_leaves_view(url: str, ns: str, ttl: int) -> float:
    """Start a worker process, SIGKILL it, return seconds until the view no longer lists it (failing if
    that takes more than TTL + 1 s)."""
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, url, ns, str(ttl)], stdout=subprocess.PIPE, cwd=REPO)
    try:

        async def main() -> float:
            async with Registry(url, ns) as frontend:
                view = DiscoveryView(frontend)
                await view.start()
                assert proc.stdout is not None
                iid = (await asyncio.to_thread(proc.stdout.readline)).decode().strip()
                await view.wait_for(lambda v: iid in v.instances() and "crashy" in v.models(), 20)
                proc.kill()
                t0 = time.monotonic()
                await view.wait_for(lambda v: iid not in v.instances() and v.models() == {}, ttl + 1.0)
                took = time.monotonic() - t0
                await view.close()
                return took

        return arun(main(), 60)
    finally:
        proc.kill()
        proc.wait()


def test_sigkilled_worker_leaves_within_ttl(etcd_server: EtcdServer, ns: str) -> None:
    took = _killed_worker_leaves_view(etcd_server.client_url, ns, ttl=2)
    print(f"SIGKILLed worker (TTL 2 s) left the view after {took:.2f} s")


@pytest.mark.slow
def test_sigkilled_worker_leaves_within_default_ttl(etcd_server: EtcdServer, ns: str) -> None:
    took = _killed_worker_leaves_view(etcd_server.client_url, ns, ttl=10)
    print(f"SIGKILLed worker (TTL 10 s) left the view after {took:.2f} s")


def test_etcd_restart_keeps_lease_keys_and_watch(fresh_etcd: EtcdServer, ns: str) -> None:
    async def main() -> None:
        url = fresh_etcd.client_url
        async with Registry(url, ns, ttl=3, op_timeout=1) as worker, Registry(url, ns, ttl=3) as frontend:
            view = DiscoveryView(frontend)
            await view.start()
            await worker.register_instance(_inst(ns, worker.instance_id))
            await view.wait_for(lambda v: worker.instance_id in v.instances(), 10)
            lease = worker.lease_id
            assert worker.connected

            await asyncio.to_thread(fresh_etcd.stop)
            with pytest.raises(DiscoveryError):  # etcd is down; the card is remembered all the same
                await worker.register_model(_card())
            await _until(lambda: not worker.connected, 10)
            await asyncio.to_thread(fresh_etcd.start)

            late = Registry(url, ns)
            await late.start()
            await late.register_instance(_inst(ns, late.instance_id))
            both = {worker.instance_id, late.instance_id}
            await view.wait_for(lambda v: set(v.instances()) == both and "m" in v.models(), 15)

            state, _ = await late.get_prefix(f"/{ns}/")
            assert set(state) == {
                instance_key(ns, "backend", "generate", worker.instance_id),
                instance_key(ns, "backend", "generate", late.instance_id),
                model_key(ns, "m", worker.instance_id),
            }
            assert worker.lease_id == lease and worker.lease_lost_count == 0  # etcd kept the lease
            assert view.resets == 0  # same history: the watch resumed, no rebuild
            await _until(lambda: worker.connected, 10)
            await late.close()
            await view.wait_for(lambda v: set(v.instances()) == {worker.instance_id}, 10)
            await view.close()

    arun(main(), 90)


@pytest.mark.parametrize("same_cluster_id", [False, True], ids=["new-cluster", "same-cluster-id"])
def test_etcd_wiped_lease_recreated_and_view_rebuilt(tmp_path: Path, ns: str, same_cluster_id: bool) -> None:
    # With a fixed cluster token the wiped etcd even keeps its cluster id: the watch must notice the lost
    # history from the revisions alone.
    extra = ["--initial-cluster-token", "fixed"] if same_cluster_id else []
    etcd = EtcdServer(tmp_path / "etcd", extra_args=extra).start()

    async def main() -> None:
        url = etcd.client_url
        async with Registry(url, ns, ttl=3) as worker, Registry(url, ns, ttl=3) as frontend:
            view = DiscoveryView(frontend)
            await view.start()
            await worker.register_instance(_inst(ns, worker.instance_id))
            await worker.register_model(_card())
            gone = Registry(url, ns, ttl=60)  # closes without revoking: its key would outlive it
            await gone.start()
            await gone.register_instance(_inst(ns, gone.instance_id))
            await gone.close(revoke=False)
            await view.wait_for(lambda v: len(v.instances()) == 2 and "m" in v.models(), 10)
            seen: list[tuple[str, str]] = []
            view.add_listener(lambda kind, key, rec: seen.append((kind, key)))
            old_lease = worker.lease_id

            await asyncio.to_thread(etcd.stop)
            etcd.wipe_data()
            await asyncio.to_thread(etcd.start)

            mine = {worker.instance_id}
            await view.wait_for(lambda v: v.resets >= 1 and set(v.instances()) == mine and "m" in v.models(), 20)
            assert worker.lease_lost_count == 1 and worker.lease_id != old_lease
            state, _ = await frontend.get_prefix(f"/{ns}/")
            assert set(state) == {instance_key(ns, "backend", "generate", worker.instance_id),
                                  model_key(ns, "m", worker.instance_id)}  # fmt: skip
            gone_key = instance_key(ns, "backend", "generate", gone.instance_id)
            assert ("delete", gone_key) in seen
            assert not any(key == gone_key and kind == "put" for kind, key in seen)
            # The watch goes on after the rebuild.
            await worker.delete(model_key(ns, "m", worker.instance_id))
            await view.wait_for(lambda v: v.models() == {}, 10)
            await view.close()

    try:
        arun(main(), 90)
    finally:
        etcd.stop()


def test_history_lost_detects_a_rewritten_history() -> None:
    known = {"/a": (b"1", 5), "/b": (b"2", 6)}
    # Same history, later writes: resume.
    assert not _history_lost(known, 6, 7, {"/a": (b"1", 5), "/b": (b"3", 9)}, 9, 7)
    assert not _history_lost(known, 6, 7, {"/a": (b"1", 5)}, 8, 7)  # /b deleted after rev 6
    # Other cluster, or a revision behind ours: lost.
    assert _history_lost(known, 6, 8, {"/a": (b"1", 5)}, 9, 7)
    assert _history_lost(known, 6, 7, {"/a": (b"1", 2)}, 3, 7)
    # Revision already past ours, but a key written at or before it that we never saw: rewritten.
    assert _history_lost(known, 6, 7, {"/a": (b"1", 2), "/c": (b"x", 4), "/b": (b"2", 7)}, 9, 7)


def _etcdctl(url: str, *args: str) -> None:
    ctl = etcd_binary().parent / "etcdctl"
    subprocess.run([str(ctl), f"--endpoints={url}", *args], check=True, capture_output=True, timeout=30)


def test_user_password_auth_survives_restart(fresh_etcd: EtcdServer, ns: str) -> None:
    url = fresh_etcd.client_url
    _etcdctl(url, "user", "add", "root:s3cret")
    _etcdctl(url, "auth", "enable")

    async def main() -> None:
        async with Registry(url, ns, op_timeout=1) as anonymous:
            with pytest.raises(DiscoveryError) as err:
                await anonymous.register_model(_card())
            assert "user name is empty" in str(err.value)
        async with Registry(url, ns, ttl=3, user="root", password="s3cret") as reg:
            view = DiscoveryView(reg)
            await view.start()
            await reg.register_instance(_inst(ns, reg.instance_id))
            await view.wait_for(lambda v: reg.instance_id in v.instances(), 10)
            # etcd's simple tokens die with the server: the registry must log in again.
            await asyncio.to_thread(fresh_etcd.restart)
            await reg.register_model(_card())
            await view.wait_for(lambda v: "m" in v.models(), 15)
            await view.close()

    arun(main(), 60)


_FORK_PROBE = """
import os, sys
import dynamo_rt, dynamo_rt.errors, dynamo_rt.config
before = (os.environ.get("GRPC_ENABLE_FORK_SUPPORT"), "grpc" in sys.modules)
import dynamo_rt.discovery
from grpc._cython import cygrpc
print(before, os.environ["GRPC_ENABLE_FORK_SUPPORT"], cygrpc._GRPC_ENABLE_FORK_SUPPORT)
"""


@pytest.mark.parametrize(("env", "expected"), [
    (None, "(None, False) false False"),  # off, set by the etcd client module just before grpc loads
    ("true", "('true', False) true True"),  # an explicit setting is kept
])  # fmt: skip
def test_grpc_fork_handlers_are_set_where_grpc_is_imported(env: str | None, expected: str) -> None:
    """The package import leaves the environment alone; the etcd client module sets the fork setting before
    grpc is first imported, so grpc itself reads it."""
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    if env is not None:
        environ["GRPC_ENABLE_FORK_SUPPORT"] = env
    environ["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", _FORK_PROBE], env=environ, cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == expected, out.stderr
