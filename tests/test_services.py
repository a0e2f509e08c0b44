"""dynamo_rt.local.services: embedded etcd and nats-server start healthy, keep their ports and data across a
restart, stop without leaving a process, and die with their parent."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from dynamo_rt.local.services import EtcdServer, LocalServices, NatsServer, ServiceError
from tests.conftest import arun, free_port

REPO = Path(__file__).resolve().parents[1]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


def _etcd_json(url: str, path: str, body: dict[str, str]) -> dict[str, object]:
    """Call etcd's JSON gateway (no grpc client needed to check the server itself)."""
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        out: dict[str, object] = json.loads(resp.read())
        return out


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _etcd_health(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
        out: dict[str, object] = json.loads(resp.read())
        return out


def _nats_info(host: str, port: int) -> dict[str, object]:
    with socket.create_connection((host, port), timeout=5) as s:
        line = s.makefile("rb").readline()
    assert line.startswith(b"INFO ")
    out: dict[str, object] = json.loads(line[5:])
    return out


def test_etcd_start_restart_keeps_port_and_data_stop_leaves_nothing(tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path / "etcd").start()
    try:
        print(f"etcd start: {etcd.start_seconds * 1000:.0f} ms")
        url, pid1 = etcd.client_url, etcd.pid
        assert pid1 is not None and etcd.alive
        assert _etcd_health(url) == {"health": "true", "reason": ""}
        _etcd_json(url, "/v3/kv/put", {"key": _b64("/k"), "value": _b64("v1")})

        etcd.restart()
        print(f"etcd restart: {etcd.start_seconds * 1000:.0f} ms")
        assert etcd.client_url == url
        assert etcd.pid != pid1 and _gone(pid1)
        got = _etcd_json(url, "/v3/kv/range", {"key": _b64("/k")})
        kvs = got["kvs"]
        assert isinstance(kvs, list) and [base64.b64decode(kv["value"]) for kv in kvs] == [b"v1"]

        pid2 = etcd.pid
        assert pid2 is not None
        assert etcd.stop() in (0, -signal.SIGTERM)  # stopped by SIGTERM, no SIGKILL needed
        assert _gone(pid2) and not etcd.alive and etcd.pid is None
        assert etcd.log_path.is_file()
    finally:
        etcd.stop()


def test_etcd_kill_then_start_on_same_port(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd") as etcd:
        url, pid = etcd.client_url, etcd.pid
        assert pid is not None
        etcd.kill()
        assert _gone(pid) and not etcd.alive
        etcd.start()
        assert etcd.client_url == url and _etcd_health(url)["health"] == "true"
        pid = etcd.pid
    assert pid is not None and _gone(pid)


def test_etcd_wipe_gives_an_empty_server(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd") as etcd:
        _etcd_json(etcd.client_url, "/v3/kv/put", {"key": _b64("/k"), "value": _b64("v")})
        with pytest.raises(ServiceError, match="running"):
            etcd.wipe_data()
        etcd.stop()
        etcd.wipe_data()
        etcd.start()
        got = _etcd_json(etcd.client_url, "/v3/kv/range", {"key": _b64("/k")})
        assert "kvs" not in got


def test_nats_start_restart_stop(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats", jetstream=True).start()
    try:
        print(f"nats start: {nats.start_seconds * 1000:.0f} ms")
        assert nats.url == f"nats://127.0.0.1:{nats.port}"
        info = _nats_info(nats.host, nats.port)
        assert info["jetstream"] is True and info["port"] == nats.port
        pid1 = nats.pid
        assert pid1 is not None
        nats.restart()
        print(f"nats restart: {nats.start_seconds * 1000:.0f} ms")
        assert _gone(pid1) and nats.url == f"nats://127.0.0.1:{info['port']}"
        assert _nats_info(nats.host, nats.port)["jetstream"] is True
        pid2 = nats.pid
        assert pid2 is not None
        nats.stop()
        assert _gone(pid2) and not nats.alive
        assert (tmp_path / "nats" / "data" / "jetstream").is_dir()
    finally:
        nats.stop()


def test_nats_without_jetstream(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats", jetstream=False) as nats:
        assert not _nats_info(nats.host, nats.port).get("jetstream", False)


def test_local_services_start_both_and_stop_both(tmp_path: Path) -> None:
    with LocalServices(tmp_path / "state") as s:
        pids = [s.etcd.pid, s.nats.pid]
        assert s.etcd.client_url.startswith("http://127.0.0.1:")
        assert s.nats.url.startswith("nats://127.0.0.1:")
        assert _etcd_health(s.etcd.client_url)["health"] == "true"
        assert _nats_info(s.nats.host, s.nats.port)["jetstream"] is True
        assert s.etcd.state_dir == tmp_path / "state" / "etcd"
    assert all(p is not None and _gone(p) for p in pids)


def test_start_failure_fails_fast_with_log_tail(tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path / "etcd", extra_args=["--no-such-flag"])
    with pytest.raises(ServiceError) as err:
        etcd.start(timeout=20)
    assert "etcd exited with code" in str(err.value)  # noticed the exit, did not wait for the timeout
    assert "no-such-flag" in str(err.value)
    assert not etcd.alive


def test_fixed_port_in_use_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        nats = NatsServer(tmp_path / "nats", port=port, monitor_port=free_port(), jetstream=False)
        with pytest.raises(ServiceError, match="address already in use"):
            nats.start(timeout=10)
        assert nats.port == port  # a fixed port is never swapped for another


_ORPHAN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dynamo_rt.local.services import EtcdServer
    etcd = EtcdServer(Path(sys.argv[1])).start()
    print(etcd.pid, flush=True)
    time.sleep(60)
    """
)


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(tmp_path / "etcd")], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert parent.stdout is not None
        etcd_pid = int(parent.stdout.readline())
        assert not _gone(etcd_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(etcd_pid)
    finally:
        parent.kill()
        parent.wait()


def test_started_from_a_worker_thread_outlives_it(tmp_path: Path) -> None:
    # asyncio.to_thread threads end with asyncio.run; PDEATHSIG must not take the server with them.
    nats = NatsServer(tmp_path / "nats", jetstream=False)

    async def main() -> None:
        await asyncio.to_thread(nats.start)

    try:
        arun(main(), 30)
        time.sleep(0.2)
        assert nats.alive
        assert _nats_info(nats.host, nats.port)["port"] == nats.port
    finally:
        nats.stop()


def test_spawns_survive_busy_etcd_clients(tmp_path: Path) -> None:
    """Children forked while other threads are inside gRPC calls exec cleanly. With gRPC's fork handlers on
    (its default), 16-38 of every 100-300 such spawns aborted before exec (SIGABRT, the embedded nats-server
    "exited with code -6" flake); dynamo_rt turns them off (GRPC_ENABLE_FORK_SUPPORT=false)."""
    from dynamo_rt.discovery import Registry
    from dynamo_rt.local.harness import Child

    with EtcdServer(tmp_path / "etcd") as etcd:

        async def main() -> list[int]:
            regs = [Registry(etcd.client_url, "forks", ttl=2) for _ in range(4)]
            for r in regs:
                await r.start()
            stop = asyncio.Event()

            async def churn(r: Registry) -> None:
                i = 0
                while not stop.is_set():
                    await r.put(f"k{i % 10}", b"v")
                    i += 1

            tasks = [asyncio.create_task(churn(r)) for r in regs]
            codes = []
            try:
                for _ in range(200):
                    p = await asyncio.to_thread(Child, "true", ["/bin/true"], cwd=tmp_path, log=tmp_path / "spawn.log")
                    codes.append(await asyncio.to_thread(p.wait))
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                for r in regs:
                    await r.close()
            return codes

        codes = arun(main(), 120)
    assert codes == [0] * 200


# ------------------------------------------------------------------------------------------ port races
# The seam: ``ManagedProcess.pick_port`` chooses each port not given by the caller. Making it return a port
# another server already holds is the race "two servers picked the same free port", every time.


def _picks(*ports: int) -> Callable[[str], int]:
    """A ``pick_port`` that hands out ``ports`` first, then really free ports."""
    it = iter(ports)
    return lambda host: next(it, None) or free_port()


def test_nats_binds_its_own_ports_and_reports_them(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats", jetstream=False) as nats:
        assert nats.port and nats.monitor_port and nats.port != nats.monitor_port
        assert _nats_info(nats.host, nats.port)["port"] == nats.port
        port, monitor = nats.port, nats.monitor_port
        nats.restart()
        assert (nats.port, nats.monitor_port) == (port, monitor)  # kept across a restart


@pytest.mark.parametrize("which", ["client", "monitor"])
def test_etcd_picking_a_nats_port_retries_on_new_ports(tmp_path: Path, which: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dynamo_rt.local.services")
    with NatsServer(tmp_path / "nats", jetstream=False) as nats:
        taken = nats.port if which == "client" else nats.monitor_port
        etcd = EtcdServer(tmp_path / "etcd")
        etcd.pick_port = _picks(taken)  # etcd's client port := one the nats-server listens on
        with etcd:
            assert etcd.client_port != taken
            assert _etcd_health(etcd.client_url)["health"] == "true"
            assert _nats_info(nats.host, nats.port)["port"] == nats.port  # nats untouched
        assert "etcd: port taken" in caplog.text  # seen (a stranger listens, or bind failed), retried


def test_two_etcds_given_the_same_ports_both_come_up_on_distinct_ports(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # Another etcd answers /health exactly like ours would: only "who holds the port" tells them apart.
    client, peer = free_port(), free_port()
    first, second = EtcdServer(tmp_path / "a"), EtcdServer(tmp_path / "b")
    first.pick_port, second.pick_port = _picks(client, peer), _picks(client, peer)
    caplog.set_level(logging.INFO, logger="dynamo_rt.local.services")
    with first, second:
        assert (first.client_port, first.peer_port) == (client, peer)
        assert second.client_port not in (client, peer) and second.peer_port not in (client, peer)
        assert _etcd_health(first.client_url)["health"] == "true"
        assert _etcd_health(second.client_url)["health"] == "true"
        assert first.pid != second.pid
        assert "etcd: port taken" in caplog.text


def test_a_fixed_port_held_by_another_server_is_an_error_naming_it(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats", jetstream=False) as nats:
        etcd = EtcdServer(tmp_path / "etcd", client_port=nats.port, peer_port=free_port())
        with pytest.raises(ServiceError, match="address already in use") as err:
            etcd.start(timeout=10)
        assert str(nats.port) in str(err.value)
        assert etcd.client_port == nats.port and not etcd.alive


def test_local_services_started_together_many_times_never_collide(tmp_path: Path) -> None:
    for i in range(3):
        with LocalServices(tmp_path / f"s{i}") as s:
            ports = {s.etcd.client_port, s.etcd.peer_port, s.nats.port, s.nats.monitor_port}
            assert len(ports) == 4
            assert _etcd_health(s.etcd.client_url)["health"] == "true"
