"""GPU check of the KV hand-off: VRAM -> VRAM between two processes on one GPU (NIXL, UCX ``cuda_ipc``).

For a lent GPU machine. Two processes share GPU 0: the owner fills a 2 GiB block-major pool (2 MiB
blocks, the 8B-class shape of bench/kv_transfer.py) with known words and publishes its NixlRecord; the
reader registers its own VRAM pool and READs 256 MiB and 1 GiB requests of scattered runs (same scatter
as bench/kv_transfer.py) with ``dynamo_rt.kv.KvTransfer(memory="VRAM")``. Checked: exact bytes of every
block read, the owner's notification. Measured: GB/s against a device-to-device copy
(``cuMemcpyDtoD`` of the same runs inside the reader) in the same run. Two variants: reads posted on the
calling thread (where the CUDA context is current) and on KvTransfer's worker thread (the default path
for large reads), since UCX must find the right CUDA context on either.

Memory comes from the CUDA driver API (``cuMemAlloc``, IPC-capable) through ctypes, so the check needs
only the NVIDIA driver, numpy, msgspec and NIXL, not torch. (With torch, allocate the pool outside
``expandable_segments``: VMM memory cannot be exported over ``cuda_ipc`` and UCX silently falls back to
a slow emulated path.)

NIXL must be importable where this runs. The lent GPU machines have CUDA 13 and Python 3.12 and reach no
network: carry ``nixl==1.5.1`` and ``nixl-cu13==1.5.1`` (56 MiB) and ``msgspec`` as wheels for cp312 and
install them with ``pip --no-deps --target``. Without a GPU it prints SKIP and exits 0 (``make bench`` runs
every script here).

Measured on an H200 (2026-11-27): 235-250 GB/s (worker thread) against 334-335 GB/s DtoD at 256 MiB, exact
bytes and one notification per read. Before ``CUDA_IPC_ENABLE_GET_ZCOPY=y`` (``dynamo_rt.kv.VRAM_UCX_CONFIG``)
UCX's cuda_ipc refused GETs on this NVLink-less single GPU and the same reads ran at 0.8 GB/s through host
shared memory ("software emulation" in ``UCX_PROTO_INFO=y``).

Last line: ``{"bench": "gpu_kv_check", "ours": GB/s at 256 MiB (worker thread), "baseline": DtoD GB/s,
"ratio": ..., "unit": "GB_per_s"}``.
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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import plot_bars, report  # noqa: E402

MIB = 1 << 20
BLOCK = 2 * MIB  # 32 layers * 2 (K, V) * 8 KV heads * 128 * 2 B (bf16) * 16 tokens
MARK = "GPUKV "
SKIP, MISSING = 0, 3  # exit codes: no GPU here / GPU but a dependency is missing


class Cuda:
    """The few CUDA driver calls this check needs; every call is checked."""

    def __init__(self, device: int = 0) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._ok(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._ok(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        self._ok(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self.ctx = ctx
        self.make_current()
        name = ctypes.create_string_buffer(128)
        self._ok(self.lib.cuDeviceGetName(name, 128, dev), "cuDeviceGetName")
        self.name = name.value.decode()

    def _ok(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA error {rc}")

    def make_current(self) -> None:
        self._ok(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._ok(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cuMemAlloc")
        return ptr.value

    def htod(self, dst: int, src: Any) -> None:
        self._ok(
            self.lib.cuMemcpyHtoD_v2(
                ctypes.c_uint64(dst), ctypes.c_void_p(src.ctypes.data), ctypes.c_size_t(src.nbytes)
            ),
            "cuMemcpyHtoD",
        )

    def dtoh(self, dst: Any, src: int) -> None:
        self._ok(
            self.lib.cuMemcpyDtoH_v2(
                ctypes.c_void_p(dst.ctypes.data), ctypes.c_uint64(src), ctypes.c_size_t(dst.nbytes)
            ),
            "cuMemcpyDtoH",
        )

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        self._ok(
            self.lib.cuMemcpyDtoD_v2(ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes)),
            "cuMemcpyDtoD",
        )

    def memset0(self, dst: int, nbytes: int) -> None:
        self._ok(self.lib.cuMemsetD8_v2(ctypes.c_uint64(dst), ctypes.c_ubyte(0), ctypes.c_size_t(nbytes)), "cuMemsetD8")

    def sync(self) -> None:
        self._ok(self.lib.cuCtxSynchronize(), "cuCtxSynchronize")


def block_words(b: int) -> Any:
    import numpy as np

    w = BLOCK // 8
    return np.arange(b * w, (b + 1) * w, dtype=np.uint64)


def preflight() -> None:
    """Exit with a clear message unless a GPU and every dependency are here."""
    try:
        cuda = Cuda()
    except (OSError, RuntimeError) as e:
        print(f"SKIP gpu_kv_check: no usable CUDA GPU here ({e})")
        # Still one JSON line, so `make bench` records a skip rather than a bench that printed no result.
        print(json.dumps({"bench": "gpu_kv_check", "ours": None, "baseline": None, "ratio": None, "unit": "GB_per_s",
                          "skipped": f"no usable CUDA GPU ({e})"}))
        raise SystemExit(SKIP) from None
    missing = []
    for mod in ("numpy", "msgspec"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        print(f"gpu_kv_check: GPU {cuda.name} found but Python packages are missing: {', '.join(missing)}")
        raise SystemExit(MISSING)
    from dynamo_rt.errors import KvTransferError
    from dynamo_rt.kv import KvTransfer

    try:
        KvTransfer("gpu-kv-preflight", memory="VRAM").close()
    except KvTransferError as e:
        print(
            f"gpu_kv_check: GPU {cuda.name} found but NIXL is not usable: {e}. Install nixl==1.5.1 and "
            "nixl-cu12==1.5.1 or nixl-cu13==1.5.1 (whichever matches the CUDA major version) with --no-deps."
        )
        raise SystemExit(MISSING) from None


# ------------------------------------------------------------------------------------------- owner


def owner_main(pool_blocks: int) -> None:
    import msgspec

    from dynamo_rt.kv import KvTransfer

    cuda = Cuda()
    base = cuda.alloc(pool_blocks * BLOCK)
    for b in range(pool_blocks):
        cuda.htod(base + b * BLOCK, block_words(b))
    cuda.sync()
    # NIXL's progress thread on: a READ over a two-sided UCX path (no cuda_ipc: tcp + cuda_copy staging)
    # only completes while the owner progresses, and this process otherwise sits reading stdin.
    kv = KvTransfer("gpu-owner", memory="VRAM", device_id=0, progress_thread=True)
    record = kv.register_pool(base, BLOCK, pool_blocks)
    print(MARK + msgspec.json.encode(record).decode(), flush=True)
    got = 0
    for line in sys.stdin:  # "notifs": poll (bounded) for the reader's notifications, report the count
        if line.strip() == "notifs":
            for _ in range(2000):
                got += sum(len(v) for v in kv.get_notifs().values())
                if got:
                    break
                time.sleep(0.005)
            print(MARK + json.dumps({"notifs": got}), flush=True)
            got = 0
    kv.close()


# ------------------------------------------------------------------------------------------ reader


async def measure(owner: subprocess.Popen[str], pool_blocks: int, reps: int, timeout: float) -> list[dict[str, Any]]:
    import msgspec
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from kv_transfer import scatter  # the same run-length distribution as the CPU benchmark

    from dynamo_rt.kv import KvTransfer, coalesce
    from dynamo_rt.protocol import NixlRecord

    assert owner.stdin is not None and owner.stdout is not None

    def owner_line() -> str:
        assert owner.stdout is not None
        while True:
            line = owner.stdout.readline()
            if not line:
                raise SystemExit(f"gpu_kv_check: the owner process exited (rc={owner.wait()})")
            if line.startswith(MARK):
                return line[len(MARK) :]

    cuda = Cuda()
    local = cuda.alloc(pool_blocks * BLOCK)
    src = cuda.alloc(pool_blocks * BLOCK)  # the DtoD baseline's "remote" pool, in this process
    cuda.memset0(local, pool_blocks * BLOCK)
    cuda.sync()
    record = msgspec.json.decode(owner_line(), type=NixlRecord)
    rows: list[dict[str, Any]] = []
    variants = {"calling thread": 1 << 40, "worker thread": 0}  # inline_bytes
    kvs = {
        v: KvTransfer(f"gpu-reader-{i}", memory="VRAM", inline_bytes=ib) for i, (v, ib) in enumerate(variants.items())
    }
    rng = np.random.default_rng(0)
    try:
        for kv in kvs.values():
            kv.register_pool(local, BLOCK, pool_blocks)
            kv.add_remote("owner", record)
        for mib in (256, 1024):
            n = mib * MIB // BLOCK
            t: dict[str, list[float]] = {"DtoD copy": [], **{v: [] for v in kvs}}
            descs = 0
            for rep in range(reps):
                rids, lids = scatter(rng, n, pool_blocks)
                descs = len(coalesce(rids, lids))
                for name, kv in kvs.items():
                    cuda.make_current()
                    t0 = time.perf_counter()
                    await kv.read_blocks("owner", rids, lids, timeout=timeout, notify=b"done" if rep == 0 else b"")
                    t[name].append(time.perf_counter() - t0)
                    if rep == 0:  # exact bytes of every block, once per size and variant
                        host = np.empty(BLOCK // 8, dtype=np.uint64)
                        for r, lo in zip(rids, lids, strict=True):
                            cuda.dtoh(host, local + lo * BLOCK)
                            if not np.array_equal(host, block_words(r)):
                                raise SystemExit(f"gpu_kv_check: {name}: block {r} -> {lo}: bytes differ")
                        cuda.memset0(local, pool_blocks * BLOCK)
                        cuda.sync()
                        owner.stdin.write("notifs\n")
                        owner.stdin.flush()
                        if json.loads(owner_line())["notifs"] != 1:
                            raise SystemExit(f"gpu_kv_check: {name}: the owner got no notification")
                t0 = time.perf_counter()
                for r, lo, k in coalesce(rids, lids):
                    cuda.dtod(local + lo * BLOCK, src + r * BLOCK, k * BLOCK)
                cuda.sync()
                t["DtoD copy"].append(time.perf_counter() - t0)
            gbs = {k: mib * MIB / statistics.median(v) / 1e9 for k, v in t.items()}
            rows.append({"mib": mib, "descs": descs, **gbs})
    finally:
        for kv in kvs.values():
            kv.close()
    print(f"GPU: {cuda.name}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pool-blocks", type=int, default=1024, help="blocks of 2 MiB per side")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds allowed for one read")
    args = ap.parse_args()
    if args.owner:
        return owner_main(args.pool_blocks)
    preflight()
    owner = subprocess.Popen(
        [sys.executable, __file__, "--owner", "--pool-blocks", str(args.pool_blocks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        rows = asyncio.run(measure(owner, args.pool_blocks, args.reps, args.timeout))
    finally:
        if owner.stdin is not None:
            owner.stdin.close()
        try:
            owner.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(owner.pid, 9)
            owner.wait()
    print(
        f"{'request':>8} {'descs':>6} {'calling thr GB/s':>17} {'worker thr GB/s':>16} {'DtoD GB/s':>10} {'ratio':>6}"
    )
    for r in rows:
        ratio = r["worker thread"] / r["DtoD copy"]
        print(
            f"{r['mib']:>5} MiB {r['descs']:>6} {r['calling thread']:>17.1f} {r['worker thread']:>16.1f} "
            f"{r['DtoD copy']:>10.1f} {ratio:>6.2f}"
        )
    head = rows[0]
    plot_bars("gpu_kv_check", "GPU KV read over NIXL vs a device-to-device copy, GB/s",
              {f"{r['mib']} MiB": {k: r[k] for k in ("calling thread", "worker thread", "DtoD copy")} for r in rows},
              "GB/s")
    report({"bench": "gpu_kv_check", "ours": round(head["worker thread"], 1),
            "baseline": round(head["DtoD copy"], 1),
            "ratio": round(head["worker thread"] / head["DtoD copy"], 3), "unit": "GB_per_s"})


if __name__ == "__main__":
    main()
