"""KV hand-off throughput: dynamo_rt.kv.KvTransfer between two processes versus a plain memcpy.

Shape: an 8B-class model (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks) in block-major
layout, so one block is 32 * 2 (K, V) * 8 * 128 * 2 B * 16 = 2 MiB. Each side owns a pool of
``--pool-blocks`` blocks (default 640 = 1.25 GiB). A request of 16 MiB / 256 MiB / 1 GiB reads 8 / 128 /
512 blocks scattered over both pools: the request is cut into runs whose lengths follow Geometric(p=0.3)
on {1, 2, ...} (30% singletons, 21% pairs, ...) capped at 16, mean ~3.1 blocks; each run is placed at a
random free spot of the owner's pool and, independently, of the reader's pool, so every run is one
descriptor on each side (~2.8 / 42 / 167 descriptors per request).

Per size and repetition (a fresh scatter each time; the four methods run back to back in a rotating
order, each after a 64 MiB write that evicts the 32 MiB L3, so background load and caches treat them
alike):
* ``ours``: ``KvTransfer.read_blocks`` (coalesced: one descriptor per run), wall time of the await;
* ``per-block``: the same read with one descriptor per block, for the per-descriptor penalty;
* ``memcpy``: baseline, ``np.copyto`` of the same runs between two pools of the reader process (the
  same bytes, same layout, one process, no transport);
* ``raw CMA``: ``process_vm_readv`` of the same runs from the owner (via ctypes): what the kernel's
  cross-process copy costs without NIXL or UCX, the ceiling for UCX's CMA transport.
The per-descriptor penalty is the median over repetitions of
``(t_per_block - t_ours) / (descs_per_block - descs_ours)`` (paired: same scatter, moments apart); at
2 MiB blocks it drowns in copy-time noise, so the fixed cost of a descriptor is also measured alone:
1024 blocks of 4 KiB read as 1 descriptor and as 1024. The owner polls ``get_notifs`` every millisecond,
like a prefill worker.

UCX transport sweep (256 MiB, ``--transports``): each variant runs in a fresh pair of processes with its
environment, because UCX reads ``UCX_*`` variables when the agent is created.

Prints a table (median and best repetition, and the median of per-repetition ratios); the last line is
JSON: ``{"bench": "kv_transfer", "ours": GB/s at 256 MiB, "baseline": memcpy GB/s, "ratio": ..., "unit":
"GB_per_s"}`` from the best repetition of each, because on a shared 2-core host other processes only
ever add time (the medians are printed beside it). Run: ``.venv/bin/python bench/kv_transfer.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import plot_bars, report  # noqa: E402
from dynamo_rt.kv import KvTransfer, coalesce  # noqa: E402
from dynamo_rt.protocol import NixlRecord  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES, BLOCK_TOKENS = 32, 8, 128, 2, 16
BLOCK = LAYERS * 2 * KV_HEADS * HEAD_DIM * DTYPE_BYTES * BLOCK_TOKENS  # 2 MiB
MIB = 1 << 20
MARK = "KVBENCH "
SMALL_BLOCK, SMALL_POOL = 4096, 2048  # for the per-descriptor cost: 4 KiB blocks, where descriptors dominate

# name -> (extra environment, KvTransfer keyword arguments)
TRANSPORTS: dict[str, tuple[dict[str, str], dict[str, object]]] = {
    "default (cma, 64m segments)": ({}, {}),
    "cma, 512k segments (UCX's)": ({}, {"ucx_config": {"CMA_SEG_SIZE": "512k"}}),
    "UCX_TLS=cma,sm,self": ({"UCX_TLS": "cma,sm,self"}, {}),
    "UCX_TLS=tcp,self": ({"UCX_TLS": "tcp,self"}, {}),
    "UCX_TLS=posix,sysv,self": ({"UCX_TLS": "posix,sysv,self"}, {}),
    "nixl default err mode (peer)": ({}, {"ucx_error_handling": "peer"}),
}


# ------------------------------------------------------------------------------------------- owner


def owner_main(pool_blocks: int, block: int, kw: dict[str, object]) -> None:
    pool = np.empty(pool_blocks * block, dtype=np.uint8)
    words = pool.view(np.uint64)
    for b in range(pool_blocks):  # every 8-byte word holds its own index (and every page is faulted in)
        words[b * block // 8 : (b + 1) * block // 8] = block_words(b, block)
    kv = KvTransfer(f"bench-owner-{block}", **kw)  # type: ignore[arg-type]
    record = kv.register_pool(pool.ctypes.data, block, pool_blocks)
    print(MARK + msgspec.json.encode(record).decode(), flush=True)
    stop = threading.Event()

    def wait_for_eof() -> None:  # the reader closes our stdin when it is done
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    notifs = 0
    while not stop.wait(0.001):  # a prefill worker polls for "done" notifications like this
        notifs += sum(len(v) for v in kv.get_notifs().values())
    kv.close()


# ------------------------------------------------------------------------------------------ reader


def block_words(b: int, block: int = BLOCK) -> np.ndarray:
    w = block // 8
    return np.arange(b * w, (b + 1) * w, dtype=np.uint64)


def scatter(rng: np.random.Generator, n: int, pool_blocks: int) -> tuple[list[int], list[int]]:
    """``n`` block pairs in runs of Geometric(0.3) blocks (cap 16), placed independently on each side."""
    lengths: list[int] = []
    while sum(lengths) < n:
        lengths.append(min(int(rng.geometric(0.3)), 16, n - sum(lengths)))

    def place() -> list[int]:
        # Cut the pool into slots of the run lengths plus random gaps, then shuffle the slot order.
        free = pool_blocks - n
        gaps = rng.multinomial(free, np.ones(len(lengths) + 1) / (len(lengths) + 1))
        order = rng.permutation(len(lengths))
        starts, pos = {}, int(gaps[0])
        for k, i in enumerate(order):
            starts[int(i)] = pos
            pos += lengths[i] + int(gaps[k + 1])
        return [starts[i] + j for i in range(len(lengths)) for j in range(lengths[i])]

    return place(), place()


def memcpy_runs(dst: np.ndarray, src: np.ndarray, rids: list[int], lids: list[int]) -> None:
    for r, lo, n in coalesce(rids, lids):
        np.copyto(dst[lo * BLOCK : (lo + n) * BLOCK], src[r * BLOCK : (r + n) * BLOCK])


class Owner:
    """The owner process (this script with ``--owner``), in its own process group."""

    def __init__(self, pool_blocks: int, block: int, kw: dict[str, object]) -> None:
        cmd = [sys.executable, __file__, "--owner", "--pool-blocks", str(pool_blocks), "--block", str(block)]
        self.proc = subprocess.Popen(
            [*cmd, "--kw", json.dumps(kw)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = ""
        while not line.startswith(MARK):
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise SystemExit(f"owner exited before publishing its record (rc={self.proc.wait()})")
        self.record = msgspec.json.decode(line[len(MARK) :], type=NixlRecord)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t


def cma_runs(pid: int, dst: np.ndarray, remote_base: int, rids: list[int], lids: list[int]) -> None:
    """The kernel's ceiling for what UCX's CMA transport does: one ``process_vm_readv`` per run."""
    for r, lo, n in coalesce(rids, lids):
        local = _Iovec(dst.ctypes.data + lo * BLOCK, n * BLOCK)
        remote = _Iovec(remote_base + r * BLOCK, n * BLOCK)
        got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got != n * BLOCK:
            raise OSError(ctypes.get_errno(), f"process_vm_readv returned {got}")


def reader_main(
    pool_blocks: int, sizes_mib: list[int], reps: int, kw: dict[str, object], check: bool, desc_cost: bool
) -> None:
    owner = Owner(pool_blocks, BLOCK, kw)
    small = Owner(SMALL_POOL, SMALL_BLOCK, kw) if desc_cost else None
    try:
        results = asyncio.run(_measure(owner.record, owner.proc.pid, pool_blocks, sizes_mib, reps, kw, check))
        cost = asyncio.run(_descriptor_cost(small.record, kw)) if small else 0.0
        print(MARK + json.dumps({"rows": results, "desc_cost_us": cost}), flush=True)
    finally:
        owner.stop()
        if small:
            small.stop()


async def _descriptor_cost(record: NixlRecord, kw: dict[str, object]) -> float:
    """Microseconds per extra descriptor: 1024 blocks of 4 KiB read as 1 descriptor vs as 1024 (paired)."""
    local = np.zeros(SMALL_POOL * SMALL_BLOCK, dtype=np.uint8)
    kv = KvTransfer("bench-reader-4k", **kw)  # type: ignore[arg-type]
    kv.register_pool(local.ctypes.data, SMALL_BLOCK, SMALL_POOL)
    kv.add_remote("owner", record)
    ids = list(range(1024))
    diffs = []
    try:
        for _ in range(41):
            t0 = time.perf_counter()
            await kv.read_blocks("owner", ids, ids)
            t1 = time.perf_counter()
            await kv.read_blocks("owner", ids, ids, coalesce_runs=False)
            diffs.append((time.perf_counter() - t1 - (t1 - t0)) / (len(ids) - 1))
    finally:
        kv.close()
    return statistics.median(diffs) * 1e6


async def _measure(
    record: NixlRecord,
    owner_pid: int,
    pool_blocks: int,
    sizes_mib: list[int],
    reps: int,
    kw: dict[str, object],
    check: bool,
) -> list[dict[str, float]]:
    local = np.zeros(pool_blocks * BLOCK, dtype=np.uint8)
    local.fill(1)
    src = np.empty_like(local)  # the memcpy baseline's "remote" pool, in this process
    src.fill(2)
    kv = KvTransfer("bench-reader", **kw)  # type: ignore[arg-type]
    kv.register_pool(local.ctypes.data, BLOCK, pool_blocks)
    kv.add_remote("owner", record)
    rng = np.random.default_rng(0)
    evict = np.zeros(64 * MIB // 8, dtype=np.uint64)
    out = []
    try:
        await kv.read_blocks("owner", [0], [0], timeout=60)  # connect, warm up
        for mib in sizes_mib:
            n = mib * MIB // BLOCK
            t: dict[str, list[float]] = {"ours": [], "per_block": [], "memcpy": [], "cma": []}
            descs: dict[str, list[int]] = {"ours": [], "per_block": []}
            penalty: list[float] = []
            for rep in range(reps):
                rids, lids = scatter(rng, n, pool_blocks)
                methods = list(t)
                for m in methods[rep % 4 :] + methods[: rep % 4]:  # rotate: no method always goes first
                    evict += 1  # 2x the L3 cache: every method starts with the pools out of cache
                    t0 = time.perf_counter()
                    if m == "memcpy":
                        memcpy_runs(local, src, rids, lids)
                    elif m == "cma":
                        cma_runs(owner_pid, local, record.base_addr, rids, lids)
                    else:
                        stats = await kv.read_blocks(
                            "owner", rids, lids, timeout=60, notify=b"done", coalesce_runs=m == "ours"
                        )
                        descs[m].append(stats.descriptors)
                    t[m].append(time.perf_counter() - t0)
                    if check and m != "memcpy":  # (cma too: it reads the owner's pool)
                        for r, lo in zip(rids, lids, strict=True):
                            got = local[lo * BLOCK : (lo + 1) * BLOCK].view(np.uint64)
                            assert np.array_equal(got, block_words(r)), f"block {r} -> {lo}: bytes differ"
                if descs["per_block"][-1] > descs["ours"][-1]:  # paired: same scatter, moments apart
                    extra = descs["per_block"][-1] - descs["ours"][-1]
                    penalty.append((t["per_block"][-1] - t["ours"][-1]) / extra)
            nbytes = n * BLOCK
            med = {k: statistics.median(v) for k, v in t.items()}
            best = {k: min(v) for k, v in t.items()}
            d_ours, d_block = statistics.mean(descs["ours"]), statistics.mean(descs["per_block"])
            out.append(
                {
                    "mib": mib,
                    "ours": nbytes / med["ours"] / 1e9,
                    "per_block": nbytes / med["per_block"] / 1e9,
                    "memcpy": nbytes / med["memcpy"] / 1e9,
                    "cma": nbytes / med["cma"] / 1e9,
                    "cma_best": nbytes / best["cma"] / 1e9,
                    "ours_best": nbytes / best["ours"] / 1e9,
                    "memcpy_best": nbytes / best["memcpy"] / 1e9,
                    "paired_ratio": statistics.median(m / o for m, o in zip(t["memcpy"], t["ours"], strict=True)),
                    "descs": d_ours,
                    "descs_per_block": d_block,
                    "penalty_us": statistics.median(penalty) * 1e6 if penalty else 0.0,
                    "ours_ms": med["ours"] * 1e3,
                }
            )
    finally:
        kv.close()
    return out


# ------------------------------------------------------------------------------------ orchestrator


def run_variant(
    name: str, pool_blocks: int, sizes: list[int], reps: int, check: bool, desc_cost: bool = False
) -> list[dict[str, float]]:
    extra_env, kw = TRANSPORTS[name]
    env = {**os.environ, **extra_env, "NIXL_LOG_LEVEL": os.environ.get("NIXL_LOG_LEVEL", "ERROR")}
    cmd = [sys.executable, __file__, "--reader", "--pool-blocks", str(pool_blocks), "--reps", str(reps)]
    cmd += ["--sizes", ",".join(map(str, sizes)), "--kw", json.dumps(kw)]
    cmd += (["--check"] if check else []) + (["--desc-cost"] if desc_cost else [])
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, start_new_session=True)
    except subprocess.TimeoutExpired:
        print(f"  {name}: timed out (a transfer hung)", flush=True)
        return []
    for line in res.stdout.splitlines():
        if line.startswith(MARK):
            got = json.loads(line[len(MARK) :])
            rows: list[dict[str, float]] = got["rows"]
            for r in rows:
                r["desc_cost_us"] = got["desc_cost_us"]
            return rows
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    print(f"  {name}: failed rc={res.returncode}: {' | '.join(tail)}", flush=True)
    return []


def _pair(row: dict[str, float], key: str) -> str:
    return f"{row[key]:.2f}/{row[key + '_best']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kw", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--pool-blocks", type=int, default=640, help="blocks of 2 MiB per side")
    ap.add_argument("--block", type=int, default=BLOCK, help=argparse.SUPPRESS)
    ap.add_argument("--desc-cost", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="16,256,1024", help="request sizes in MiB")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--check", action="store_true", help="verify the bytes of every read")
    ap.add_argument("--transports", action="store_true", help="also sweep UCX transport settings at 256 MiB")
    args = ap.parse_args()
    kw = json.loads(args.kw)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.owner:
        return owner_main(args.pool_blocks, args.block, kw)
    if max([*sizes, 256 if args.transports else 0]) * MIB > args.pool_blocks * BLOCK:
        raise SystemExit(f"a request must fit in the pool ({args.pool_blocks} blocks of {BLOCK // MIB} MiB)")
    if args.reader:
        return reader_main(args.pool_blocks, sizes, args.reps, kw, args.check, args.desc_cost)

    print(f"block {BLOCK // MIB} MiB, pool {args.pool_blocks} blocks per side, median of {args.reps}", flush=True)
    rows = run_variant("default (cma, 64m segments)", args.pool_blocks, sizes, args.reps, args.check, True)
    if not rows:
        raise SystemExit("the default transport failed")
    print("GB/s as median/best over repetitions; ratio = ours / memcpy (median, best, median of paired ratios)")
    print(
        f"{'request':>8} {'descs':>6} {'ours':>11} {'raw CMA':>11} {'memcpy':>11} {'ratio med/best/paired':>22} "
        f"{'per-block':>11} {'descs':>6} {'us/extra desc':>13}"
    )
    for r in rows:
        ratios = f"{r['ours'] / r['memcpy']:.2f}/{r['ours_best'] / r['memcpy_best']:.2f}/{r['paired_ratio']:.2f}"
        print(
            f"{int(r['mib']):>5} MiB {r['descs']:>6.1f} {_pair(r, 'ours'):>11} {_pair(r, 'cma'):>11} "
            f"{_pair(r, 'memcpy'):>11} {ratios:>22} {r['per_block']:>11.2f} {int(r['descs_per_block']):>6} "
            f"{r['penalty_us']:>13.1f}"
        )
    cost = rows[0]["desc_cost_us"]
    print(
        f"per-descriptor cost: {cost:.2f} us (1024 blocks of 4 KiB read as 1 descriptor vs 1024, paired median); "
        f"a 2 MiB block copies in ~{BLOCK / (rows[-1]['ours'] * 1e3):.0f} us, so one descriptor per block costs "
        f"~{cost / (BLOCK / (rows[-1]['ours'] * 1e3)) * 100:.1f}% there"
    )
    if args.transports:
        print("\nUCX transports, 256 MiB requests (each in a fresh pair of processes):")
        print(f"{'setting':>30} {'ours':>11} {'memcpy':>11} {'ratio med/best/paired':>22}")
        for name in TRANSPORTS:
            got = run_variant(name, args.pool_blocks, [256], max(3, args.reps // 2), False)
            if got:
                g = got[0]
                ratios = (
                    f"{g['ours'] / g['memcpy']:.2f}/{g['ours_best'] / g['memcpy_best']:.2f}/{g['paired_ratio']:.2f}"
                )
                ours, memcpy = f"{g['ours']:.2f}/{g['ours_best']:.2f}", f"{g['memcpy']:.2f}/{g['memcpy_best']:.2f}"
                print(f"{name:>30} {ours:>11} {memcpy:>11} {ratios:>22}", flush=True)
    head = next((r for r in rows if r["mib"] == 256), rows[0])
    plot_bars("kv_transfer", "KV hand-off read: NIXL (ours) vs CMA vs memcpy, median GB/s",
              {f"{int(r['mib'])} MiB": {"ours (NIXL)": r["ours"], "cma": r["cma"], "memcpy": r["memcpy"]}
               for r in rows}, "GB/s")
    report({"bench": "kv_transfer", "ours": round(head["ours_best"], 2), "baseline": round(head["memcpy_best"], 2),
            "ratio": round(head["ours_best"] / head["memcpy_best"], 3), "unit": "GB_per_s"})


if __name__ == "__main__":
    main()
