"""KV hand-off with real NIXL between two real processes (dynamo_rt.kv).

The "prefill" peer is this file run as a child process (``python -m tests.test_kv_transfer --peer``): it
fills a pool with known bytes, registers it and prints its NixlRecord on stdout, then blocks on stdin
for commands. The pytest process is the "decode" side and reads blocks from it. The peer is blocked in
``readline`` while we read, which also checks that a READ needs nothing from the owner.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from dynamo_rt.errors import KvTransferError
from dynamo_rt.kv import KvTransfer, coalesce
from dynamo_rt.protocol import NixlRecord
from tests.conftest import arun

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64 << 10
NBLOCKS = 64
SEED = 1234
MARK = "KVPEER "  # protocol lines; anything else a library prints on stdout is skipped


def pattern(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ the peer


def peer_main(name: str, seed: int) -> None:
    pool = pattern(seed, BLOCK * NBLOCKS)
    kv = KvTransfer(name)
    record = kv.register_pool(pool.ctypes.data, BLOCK, NBLOCKS)
    print(MARK + msgspec.json.encode(record).decode(), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "notifs":  # wait (bounded) until n messages arrived, report them
            want, got = int(args[0]), dict[str, list[bytes]]()
            for _ in range(2000):
                for agent, msgs in kv.get_notifs().items():
                    got.setdefault(agent, []).extend(msgs)
                if sum(map(len, got.values())) >= want:
                    break
                threading.Event().wait(0.005)
            print(MARK + msgspec.json.encode(got).decode(), flush=True)
        elif cmd == "exit":
            break
    kv.close()


class Peer:
    """The prefill process: started in its own process group, killed by group id at the end."""

    def __init__(self, name: str, seed: int = SEED, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_kv_transfer", "--peer", name, str(seed)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.record = msgspec.json.decode(self.line(), type=NixlRecord)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._lines.put(line[len(MARK) :])

    def line(self, timeout: float = 30) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {self.name} said nothing in {timeout}s (rc={self.proc.poll()})") from None

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def notifs(self, n: int) -> dict[str, list[bytes]]:
        self.send(f"notifs {n}")
        return msgspec.json.decode(self.line(), type=dict[str, list[bytes]])

    def exit(self) -> None:
        self.send("exit")
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    p = Peer("prefill-shared")
    try:
        yield p
    finally:
        p.stop()


def decode_side(name: str, **kw: object) -> tuple[KvTransfer, np.ndarray]:
    pool = np.zeros(BLOCK * NBLOCKS, dtype=np.uint8)
    kv = KvTransfer(name, **kw)  # type: ignore[arg-type]
    kv.register_pool(pool.ctypes.data, BLOCK, NBLOCKS)
    return kv, pool


def blocks(buf: np.ndarray, ids: list[int]) -> list[bytes]:
    return [buf[i * BLOCK : (i + 1) * BLOCK].tobytes() for i in ids]


# ------------------------------------------------------------------------------------------- tests


def test_coalesce_groups_runs_where_both_sides_are_consecutive() -> None:
    assert coalesce([], []) == []
    assert coalesce([5], [9]) == [(5, 9, 1)]
    assert coalesce([3, 4, 5, 10, 0, 1, 7], [0, 1, 2, 9, 5, 6, 15]) == [
        (3, 0, 3),
        (10, 9, 1),
        (0, 5, 2),
        (7, 15, 1),
    ]
    assert coalesce([30, 31], [3, 8]) == [(30, 3, 1), (31, 8, 1)]  # remote consecutive, local not
    assert coalesce([2, 1, 0], [0, 1, 2]) == [(2, 0, 1), (1, 1, 1), (0, 2, 1)]  # descending
    with pytest.raises(ValueError):
        coalesce([1, 2], [1])


def test_read_scattered_blocks_exact_bytes_and_owner_notified(peer: Peer) -> None:
    remote = pattern(SEED, BLOCK * NBLOCKS)
    kv, local = decode_side("decode-scatter")
    rids = [3, 4, 5, 10, 0, 1, 7, 20, 21, 22, 23, 30, 31, 63]
    lids = [0, 1, 2, 9, 5, 6, 15, 11, 12, 13, 14, 40, 42, 63]

    async def main() -> None:
        kv.add_remote("prefill-1", peer.record)
        stats = await kv.read_blocks("prefill-1", rids, lids, notify=b"req-1 done", timeout=20)
        # runs: 3-5, 10, 0-1, 7, 20-23, 30, 31, 63
        assert (stats.descriptors, stats.bytes) == (8, len(rids) * BLOCK)
        assert stats.descriptors == len(coalesce(rids, lids))

    try:
        arun(main(), 60)
        assert blocks(local, lids) == blocks(remote, rids)
        untouched = sorted(set(range(NBLOCKS)) - set(lids))
        assert not local.reshape(NBLOCKS, BLOCK)[untouched].any()
        assert peer.notifs(1) == {"decode-scatter": [b"req-1 done"]}
    finally:
        kv.close()


def test_read_one_descriptor_per_block_and_split_posts(peer: Peer) -> None:
    remote = pattern(SEED, BLOCK * NBLOCKS)
    rids, lids = [8, 9, 10, 11, 40, 2], [20, 21, 22, 23, 1, 60]

    async def main(kv: KvTransfer, coalesce_runs: bool) -> int:
        kv.add_remote("prefill-1", peer.record)
        stats = await kv.read_blocks("prefill-1", rids, lids, coalesce_runs=coalesce_runs, notify=b"n")
        return stats.descriptors

    kv, local = decode_side("decode-per-block")
    try:
        assert arun(main(kv, False), 60) == len(rids)
        assert blocks(local, lids) == blocks(remote, rids)
    finally:
        kv.close()
    # Posts of at most half a block, on the worker thread: the 4-block run becomes 8 descriptors (8 posts),
    # singletons 2 each.
    kv, local = decode_side("decode-split", max_post_bytes=BLOCK // 2, inline_bytes=0)
    try:
        assert arun(main(kv, True), 60) == 2 * len(rids)
        assert blocks(local, lids) == blocks(remote, rids)
    finally:
        kv.close()
    # Each read's notification arrives once, after its last post.
    assert peer.notifs(2) == {"decode-per-block": [b"n"], "decode-split": [b"n"]}


def test_concurrent_reads_share_one_agent(peer: Peer) -> None:
    remote = pattern(SEED, BLOCK * NBLOCKS)
    jobs = [([0, 1, 2, 3], [10, 11, 12, 13]), ([40, 41, 7], [20, 21, 30]), ([63, 62, 61], [0, 1, 2])]
    kv, local = decode_side("decode-concurrent", max_post_bytes=BLOCK, inline_bytes=0)

    async def main() -> list[int]:
        kv.add_remote("prefill-1", peer.record)
        reads = [kv.read_blocks("prefill-1", r, lo, notify=f"job{i}".encode()) for i, (r, lo) in enumerate(jobs)]
        return [s.descriptors for s in await asyncio.gather(*reads)]

    try:
        assert arun(main(), 60) == [4, 3, 3]  # one post per block (max_post_bytes), one descriptor each
        for r, lo in jobs:
            assert blocks(local, lo) == blocks(remote, r)
        got = peer.notifs(3)
        assert sorted(got["decode-concurrent"]) == [b"job0", b"job1", b"job2"]
    finally:
        kv.close()


def test_invalid_reads_raise_before_any_transfer(peer: Peer) -> None:
    kv, local = decode_side("decode-invalid")

    async def main() -> None:
        with pytest.raises(KvTransferError, match="unknown KV instance 'nobody'"):
            await kv.read_blocks("nobody", [0], [0])
        kv.add_remote("prefill-1", peer.record)
        with pytest.raises(KvTransferError, match="2 remote block ids but 1 local"):
            await kv.read_blocks("prefill-1", [0, 1], [0])
        with pytest.raises(KvTransferError, match=r"remote block ids out of range \[0, 64\): \[64\]"):
            await kv.read_blocks("prefill-1", [64], [0])
        with pytest.raises(KvTransferError, match=r"local block ids out of range \[0, 64\): \[-1\]"):
            await kv.read_blocks("prefill-1", [0], [-1])
        with pytest.raises(KvTransferError, match="local block ids repeat"):
            await kv.read_blocks("prefill-1", [0, 1], [5, 5])
        bad = msgspec.structs.replace(peer.record, block_bytes=BLOCK * 2)
        with pytest.raises(KvTransferError, match="block size"):
            kv.add_remote("prefill-2", bad)
        empty = await kv.read_blocks("prefill-1", [], [])
        assert (empty.bytes, empty.descriptors) == (0, 0)

    try:
        arun(main(), 60)
        assert not local.any()
    finally:
        kv.close()
    with pytest.raises(KvTransferError, match="closed"):
        arun(kv.read_blocks("prefill-1", [0], [0]), 10)
    unregistered = KvTransfer("decode-no-pool")
    try:
        unregistered.add_remote("prefill-1", peer.record)
        with pytest.raises(KvTransferError, match="register_pool"):
            arun(unregistered.read_blocks("prefill-1", [0], [0]), 10)
    finally:
        unregistered.close()


def test_remove_remote_then_read_fails(peer: Peer) -> None:
    remote = pattern(SEED, BLOCK * NBLOCKS)
    kv, local = decode_side("decode-remove")

    async def main() -> None:
        kv.add_remote("prefill-1", peer.record)
        kv.add_remote("prefill-1", peer.record)  # idempotent
        await kv.read_blocks("prefill-1", [1], [1])
        kv.remove_remote("prefill-1")
        kv.remove_remote("prefill-1")  # unknown ids are ignored
        assert not kv.has_remote("prefill-1")
        with pytest.raises(KvTransferError, match="unknown KV instance 'prefill-1'"):
            await kv.read_blocks("prefill-1", [2], [2])
        kv.add_remote("prefill-1", peer.record)  # it came back
        await kv.read_blocks("prefill-1", [3], [3])

    try:
        arun(main(), 60)
        assert blocks(local, [1, 2, 3]) == [*blocks(remote, [1]), bytes(BLOCK), *blocks(remote, [3])]
    finally:
        kv.close()


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_read_from_departed_instance_fails_fast(how: str) -> None:
    """The owner exits (or is SIGKILLed) after we connected: the next read raises, nothing hangs."""
    peer = Peer(f"prefill-{how}", seed=7)
    kv, local = decode_side(f"decode-departed-{how}")
    late = KvTransfer(f"decode-late-{how}")
    late.register_pool(local.ctypes.data, BLOCK, NBLOCKS)

    async def main() -> None:
        kv.add_remote("prefill-x", peer.record)
        await kv.read_blocks("prefill-x", [0, 1], [0, 1], timeout=20)
        peer.exit() if how == "exit" else peer.kill()
        # wait_for only guards against a hang; the error itself comes at once (CMA fails with ESRCH).
        with pytest.raises(KvTransferError, match="prefill-x"):
            await asyncio.wait_for(kv.read_blocks("prefill-x", [2], [2], timeout=60), 30)
        # A worker that learns of the departed instance only now fails when it connects or reads.
        with pytest.raises(KvTransferError, match="prefill-x"):
            late.add_remote("prefill-x", peer.record)
            await asyncio.wait_for(late.read_blocks("prefill-x", [2], [2], timeout=60), 30)

    try:
        arun(main(), 90)
        assert blocks(local, [0, 1]) == blocks(pattern(7, BLOCK * NBLOCKS), [0, 1])
    finally:
        peer.stop()
        kv.close()
        late.close()


def test_in_flight_read_is_polled_and_times_out_when_the_owner_never_progresses() -> None:
    """Over TCP (the owner restricted to ``UCX_TLS=tcp,self``) UCX emulates the READ with messages the
    owner must process: a post returns in flight. While the owner sits in ``readline`` the read times out
    with a TIMEOUT error; once the owner polls (``notifs``) the same kind of read completes."""
    peer = Peer("prefill-tcp", env={"UCX_TLS": "tcp,self"})
    kv, local = decode_side("decode-tcp")

    async def main() -> None:
        kv.add_remote("prefill-tcp", peer.record)
        with pytest.raises(KvTransferError, match=r"timed out after 1\.0s") as err:
            await kv.read_blocks("prefill-tcp", [1, 2], [1, 2], timeout=1.0)
        assert err.value.code == "timeout"
        peer.send("notifs 1")  # the owner now polls its agent until our notification arrives
        stats = await kv.read_blocks("prefill-tcp", [3, 4, 9], [3, 4, 5], notify=b"over tcp", timeout=20)
        assert (stats.descriptors, stats.bytes) == (2, 3 * BLOCK)  # runs 3-4 -> 3-4, 9 -> 5

    try:
        arun(main(), 60)
        assert blocks(local, [3, 4, 5]) == blocks(pattern(SEED, BLOCK * NBLOCKS), [3, 4, 9])
        got = msgspec.json.decode(peer.line(), type=dict[str, list[bytes]])
        assert got == {"decode-tcp": [b"over tcp"]}
    finally:
        peer.stop()
        kv.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--peer"]:
    peer_main(sys.argv[2], int(sys.argv[3]))
