"""KV block manager tiers of the reference engine (the tier policy): a host-memory tier that outlives the
worker process, and an optional disk tier, below the engine's primary KV pool.

Place: owned by the engine; its :class:`~workers.reference.scheduler.Scheduler` calls :class:`KvTiers` under
the engine's lock (lock order: engine lock, then this module's lock; never the reverse). Each tier is one
:class:`~workers.reference.tierfile.TierFile` (file format, identity, index and block I/O live there). The
tiers own two threads, so the step thread never copies a block and never waits on disk I/O:

* the copy thread: primary -> host offloads and host -> primary onboards (memory-speed copies);
* the disk thread: host -> disk spills, primary -> disk offloads when there is no host tier, and onboards
  whose chain touches the disk tier (it may block on I/O; nobody waits on it).

Tiers, fastest first: primary (the engine's :class:`~workers.reference.kv_cache.KvPool`, device memory on a
GPU, managed by :class:`~workers.common.blocks.BlockManager`); host (a file in shared memory, ``/dev/shm`` or an
emptyDir with medium Memory in Kubernetes, which survives the process: a worker restarted in place serves its
prefixes); disk (a file in a folder).

How blocks move (keys are the chained block hashes of :mod:`dynamo_rt.kvhash`)
  offload  write-through: every block the engine registers in its prefix cache is queued for the first lower
           tier. The engine holds a reference on it until the copy is done, so it is never reused mid-copy;
           a queued copy that has not started is dropped when the step thread needs the block
           (:meth:`KvTiers.reclaim`): offloading is best effort, never a reason to preempt. Write-through,
           not copy-on-evict, also means a SIGKILLed worker leaves every finished block in the host tier.
  spill    a host slot evicted (LRU) to make room is copied into a bounded staging buffer (memory speed)
           and written to disk by the disk thread; with the staging full the spill is dropped.
  onboard  at admission the prompt's full blocks past the primary hit are looked up in host, then disk,
           block by block; the run found is pinned, primary blocks are allocated and the copy or disk
           thread fills them; the sequence then continues as an ordinary prefix hit. A host-only run of
           at most ``onboard_sync_bytes`` is copied by the step thread itself (:meth:`KvTiers.copy_now`):
           a memcpy of a few MiB costs less than the hand-off, which delays the sequence by one step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dynamo_rt.protocol import KvEvent
from workers.reference.tierfile import (
    DISK,
    DISK_FILE,
    ENTRY_BYTES,
    FREE,
    HEADER,
    HEADER_BYTES,
    HOST,
    VALID,
    TierConfig,
    TierFile,
    file_size,
    model_fingerprint,
    open_tiers,
    slots_for_bytes,
)

# The file format's names, reachable from here too (tests/kvbm read tier files by hand through them).
_HEADER = HEADER
__all__ = ["DISK", "DISK_FILE", "ENTRY_BYTES", "FREE", "HEADER", "HEADER_BYTES", "HOST", "VALID", "KvTiers",
           "OnboardJob", "TierConfig", "TierFile", "TierStats", "file_size", "model_fingerprint", "open_tiers",
           "slots_for_bytes"]

log = logging.getLogger(__name__)

STAGING_BYTES = 256 * 2**20  # most bytes of host->disk spills queued at once
OFFLOAD_BATCH = 64  # offload jobs one copy-thread pass takes


# --------------------------------------------------------------------------------------------- jobs


@dataclass(slots=True)
class OnboardJob:
    """A run of prompt blocks found in lower tiers, pinned there: ``src[i]`` = (tier, slot, hash)."""

    src: list[tuple[str, int, int]]
    dst: list[int] = field(default_factory=list)  # primary block ids, filled by the engine
    done: Callable[[bool], None] | None = None

    def __len__(self) -> int:
        return len(self.src)

    @property
    def touches_disk(self) -> bool:
        return any(t == DISK for t, _, _ in self.src)


@dataclass(slots=True)
class TierStats:
    offloaded: int = 0  # primary -> first lower tier
    offloads_dropped: int = 0  # reclaimed before they ran, or no slot
    spilled: int = 0  # host -> disk
    spills_dropped: int = 0
    onboarded_host: int = 0  # blocks brought back into primary
    onboarded_disk: int = 0
    onboard_failures: int = 0
    checksum_failures: int = 0


class KvTiers:
    """The host and disk tiers with their copy and disk threads; see the module docstring.

    ``pool_blocks``: the primary pool as uint8 ``[num_blocks, block_bytes]`` (a view, any device).
    ``emit``: called with tier events (from the copy / disk threads, in the order the changes happened).
    ``release``: called (from those threads, without this module's lock) with primary blocks whose
    offload finished or was abandoned: the engine drops the reference it took for it.
    """

    def __init__(self, pool_blocks: torch.Tensor, host: TierFile | None, disk: TierFile | None, *,
                 emit: Callable[[list[KvEvent]], None], release: Callable[[list[int]], None]) -> None:
        if host is None and disk is None:
            raise ValueError("KvTiers needs a host or a disk tier")
        self.pool_blocks = pool_blocks
        self.block_bytes = int(pool_blocks.shape[1])
        self.host = host
        self.disk = disk
        self._emit = emit
        self._release = release
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._disk_cv = threading.Condition(self._lock)
        self._offload_q: deque[tuple[int, int]] = deque()  # (primary block, hash), not started
        self._queued: set[int] = set()  # hashes queued or being offloaded
        self._onboard_q: deque[OnboardJob] = deque()
        self._disk_q: deque[tuple[int, torch.Tensor]] = deque()  # (hash, staged bytes) to write to disk
        self._disk_onboard_q: deque[OnboardJob] = deque()
        self._disk_queued: set[int] = set()
        n_staging = max(4, min(256, STAGING_BYTES // max(1, self.block_bytes))) if disk is not None else 0
        self._staging: list[torch.Tensor] = [torch.empty(self.block_bytes, dtype=torch.uint8)
                                             for _ in range(n_staging)]
        self.num_staging = n_staging
        self._busy_copy = 0  # jobs the copy thread holds outside the lock
        self._busy_disk = 0
        self._stopping = False
        self.stats = TierStats()
        cuda = pool_blocks.device.type == "cuda"
        self._streams = (torch.cuda.Stream(pool_blocks.device),  # type: ignore[no-untyped-call]
                         torch.cuda.Stream(pool_blocks.device)) if cuda else None  # type: ignore[no-untyped-call]
        self._threads = [threading.Thread(target=self._copy_loop, name="kvbm-copy", daemon=True)]
        if disk is not None:
            self._threads.append(threading.Thread(target=self._disk_loop, name="kvbm-disk", daemon=True))
        for t in self._threads:
            t.start()

    @property
    def first(self) -> TierFile:
        """Where offloads go: host, or disk when there is no host tier."""
        tier = self.host or self.disk
        assert tier is not None
        return tier

    # ------------------------------------------------------------------------------------ engine side

    def offload(self, pairs: Iterable[tuple[int, int]], acquire: Callable[[list[int]], None]) -> int:
        """Queue copies of blocks just registered in primary, ``(block, hash)``, that the first lower tier
        lacks. ``acquire`` takes a reference on the chosen blocks (the engine's lock is held by the caller,
        so the copy thread cannot release them before). Returns how many were queued."""
        with self._lock:
            if self._stopping:
                return 0
            first = self.first
            jobs = [(b, h) for b, h in pairs if h not in self._queued and first.lookup(h) is None]
            if not jobs:
                return 0
            acquire([b for b, _ in jobs])
            for b, h in jobs:
                self._offload_q.append((b, h))
                self._queued.add(h)
            self._cv.notify()
            return len(jobs)

    def reclaim(self, need: int, sole_ref: Callable[[int], bool]) -> list[int]:
        """Drop queued offloads (newest first) whose block only the offload holds, until ``need`` blocks
        are returned. The engine releases them. Called when the step thread is short of blocks."""
        out: list[int] = []
        with self._lock:
            keep: deque[tuple[int, int]] = deque()
            while self._offload_q and len(out) < need:
                b, h = self._offload_q.pop()
                if sole_ref(b):
                    out.append(b)
                    self._queued.discard(h)
                else:
                    keep.appendleft((b, h))
            self._offload_q.extend(keep)
            self.stats.offloads_dropped += len(out)
        return out

    def pin_prefix(self, hashes: Sequence[int]) -> OnboardJob | None:
        """The leading run of ``hashes`` held in host or disk, pinned there (None if the first is not)."""
        src: list[tuple[str, int, int]] = []
        with self._lock:
            if self._stopping:
                return None
            for h in hashes:
                tier = None
                slot = None
                for t in (self.host, self.disk):
                    if t is not None and (slot := t.lookup(h)) is not None:
                        tier = t
                        break
                if tier is None or slot is None:
                    break
                tier.pins[slot] += 1
                src.append((tier.kind, slot, h))
        return OnboardJob(src) if src else None

    def unpin(self, job: OnboardJob) -> None:
        with self._lock:
            self._unpin_locked(job)

    def _unpin_locked(self, job: OnboardJob) -> None:
        for kind, slot, _ in job.src:
            self._tier(kind).unpin(slot)

    def onboard(self, job: OnboardJob, dst: list[int], done: Callable[[bool], None]) -> None:
        """Fill primary blocks ``dst`` from the job's pinned slots, then call ``done(ok)`` (from a tier
        thread). The engine must not touch ``dst`` until then."""
        job.dst = list(dst)
        job.done = done
        with self._lock:
            if job.touches_disk:
                self._disk_onboard_q.append(job)
                self._disk_cv.notify()
            else:
                self._onboard_q.append(job)
                self._cv.notify()

    def copy_now(self, job: OnboardJob, dst: list[int]) -> None:
        """Fill primary blocks ``dst`` from a host-only job in the calling thread (the step thread, for a
        run small enough that a memcpy beats a hand-off to the copy thread and back), then unpin it."""
        host = self.host
        assert host is not None and not job.touches_disk
        ok = False
        try:
            for (_, slot, _), b in zip(job.src, dst, strict=True):
                self.pool_blocks[b].copy_(host.host_view(slot))
            ok = True
        finally:
            self._end_host_onboard(job, ok)

    def _end_host_onboard(self, job: OnboardJob, ok: bool) -> None:
        """A host-tier onboarding ended: its slots count as used, unpinned, and the outcome is counted."""
        host = self.host
        assert host is not None
        with self._lock:
            for _, slot, _ in job.src:
                host.touch(slot)
            self._unpin_locked(job)
            if ok:
                self.stats.onboarded_host += len(job)
            else:
                self.stats.onboard_failures += 1

    def inventory(self) -> dict[str, list[int]]:
        """Hashes held per lower tier (for the router's resync and the start-up announcement)."""
        with self._lock:
            return {t.kind: t.hashes() for t in (self.host, self.disk) if t is not None}

    def idle(self) -> bool:
        """No copy queued or running (tests wait for this before checking accounting)."""
        with self._lock:
            return not (self._offload_q or self._onboard_q or self._disk_q or self._disk_onboard_q
                        or self._busy_copy or self._busy_disk)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = {"offload_queue": len(self._offload_q), "staging_free": len(self._staging),
                   "staging_total": self.num_staging}
            for t in (self.host, self.disk):
                if t is not None:
                    out[f"{t.kind}_slots"] = t.num_slots
                    out[f"{t.kind}_cached"] = t.num_cached
                    out[f"{t.kind}_pinned"] = sum(1 for p in t.pins if p)
                    out[f"{t.kind}_busy"] = len(t.busy)
                    out[f"{t.kind}_free"] = len(t.free)
            for k in TierStats.__slots__:  # type: ignore[attr-defined]
                out[k] = getattr(self.stats, k)
            return out

    def shutdown(self, drain_s: float = 5.0) -> None:
        """Stop the threads: queued offloads get ``drain_s`` seconds to land (a restarted worker finds
        them), queued onboards are failed (``done(False)``), running copies finish."""
        deadline = time.monotonic() + drain_s
        with self._lock:
            while (self._offload_q or self._disk_q) and time.monotonic() < deadline:
                self._cv.notify_all()
                self._disk_cv.notify_all()
                self._cv.wait(0.05)
            self._stopping = True
            offloads = [b for b, _ in self._offload_q]
            self._offload_q.clear()
            self._queued.clear()
            onboards = list(self._onboard_q) + list(self._disk_onboard_q)
            self._onboard_q.clear()
            self._disk_onboard_q.clear()
            for job in onboards:
                self._unpin_locked(job)
            for _, buf in self._disk_q:
                self._staging.append(buf)
            self._disk_q.clear()
            self._disk_queued.clear()
            self._cv.notify_all()
            self._disk_cv.notify_all()
        for t in self._threads:
            t.join()
        if offloads:
            self._release(offloads)
        for job in onboards:
            if job.done is not None:
                job.done(False)

    def close(self) -> None:
        for t in (self.host, self.disk):
            if t is not None:
                t.close()

    # ------------------------------------------------------------------------------------ threads

    def _tier(self, kind: str) -> TierFile:
        t = self.host if kind == HOST else self.disk
        assert t is not None
        return t

    def _copy_loop(self) -> None:
        stream_ctx: Any = torch.cuda.stream(self._streams[0]) if self._streams else contextlib.nullcontext()
        with stream_ctx:
            while True:
                with self._lock:
                    while not (self._onboard_q or self._offload_q or self._stopping):
                        self._cv.wait()
                    if self._onboard_q:
                        job: OnboardJob | None = self._onboard_q.popleft()
                        batch: list[tuple[int, int]] = []
                    elif self._offload_q:
                        job = None
                        batch = [self._offload_q.popleft() for _ in range(min(OFFLOAD_BATCH,
                                                                               len(self._offload_q)))]
                    else:
                        return  # stopping and nothing left
                    self._busy_copy += 1
                try:
                    if job is not None:
                        self._run_onboard(job)
                    else:
                        self._run_offloads(batch)
                except Exception:  # a bug or a device error: never let the thread die silently
                    log.exception("KV tier copy failed")
                finally:
                    with self._lock:
                        self._busy_copy -= 1
                        self._cv.notify_all()

    def _sync(self, which: int) -> None:
        if self._streams is not None:
            self._streams[which].synchronize()

    def _run_offloads(self, batch: list[tuple[int, int]]) -> None:
        first = self.first
        done: list[int] = []
        try:
            for b, h in batch:
                if first is self.host:
                    self._offload_to_host(b, h)
                else:
                    self._offload_via_staging(b, h)
                done.append(b)
        finally:
            with self._lock:
                for _, h in batch:
                    self._queued.discard(h)
            self._release([b for b, _ in batch])

    def _offload_to_host(self, b: int, h: int) -> None:
        host = self.host
        assert host is not None
        spill: torch.Tensor | None = None
        with self._lock:
            if host.lookup(h) is not None:
                return
            got = host.reserve()
            if got is None:
                self.stats.offloads_dropped += 1
                return
            slot, victim = got
            if victim is not None:
                host.write_entry(slot, 0, 0, FREE)
                self._emit([KvEvent(kind="removed", block_hashes=[victim], tier=HOST)])
                if self.disk is not None and self.disk.lookup(victim) is None and victim not in self._disk_queued:
                    if self._staging:
                        spill = self._staging.pop()
                        self._disk_queued.add(victim)
                    else:
                        self.stats.spills_dropped += 1
        if spill is not None:
            assert victim is not None
            spill.copy_(host.host_view(slot))  # before the slot is overwritten
            with self._lock:
                self._disk_q.append((victim, spill))
                self._disk_cv.notify()
        try:
            crc = host.write_from(slot, self.pool_blocks[b])
            self._sync(0)
        except BaseException:
            with self._lock:
                host.abandon(slot)
            raise
        with self._lock:
            stamp = host.next_stamp()
            if host.commit(slot, h, crc):
                host.write_entry(slot, h, crc, VALID, stamp)
                self.stats.offloaded += 1
                self._emit([KvEvent(kind="stored", block_hashes=[h], tier=HOST)])

    def _offload_via_staging(self, b: int, h: int) -> None:
        """No host tier: stage the block (memory speed) for the disk thread."""
        with self._lock:
            if self.disk is None or self.disk.lookup(h) is not None or h in self._disk_queued:
                return
            if not self._staging:
                self.stats.offloads_dropped += 1
                return
            buf = self._staging.pop()
            self._disk_queued.add(h)
        buf.copy_(self.pool_blocks[b])
        self._sync(0)
        with self._lock:
            self._disk_q.append((h, buf))
            self._disk_cv.notify()

    def _run_onboard(self, job: OnboardJob) -> None:
        """Host-only job on the copy thread."""
        host = self.host
        assert host is not None
        ok = False
        try:
            for (_, slot, _), dst in zip(job.src, job.dst, strict=True):
                self.pool_blocks[dst].copy_(host.host_view(slot))
            self._sync(0)
            ok = True
        finally:
            self._end_host_onboard(job, ok)
            if job.done is not None:
                job.done(ok)

    def _disk_loop(self) -> None:
        stream_ctx: Any = torch.cuda.stream(self._streams[1]) if self._streams else contextlib.nullcontext()
        with stream_ctx:
            while True:
                with self._lock:
                    while not (self._disk_onboard_q or self._disk_q or self._stopping):
                        self._disk_cv.wait()
                    if self._disk_onboard_q:
                        job: OnboardJob | None = self._disk_onboard_q.popleft()
                        write = None
                    elif self._disk_q:
                        job = None
                        write = self._disk_q.popleft()
                    else:
                        return
                    self._busy_disk += 1
                try:
                    if job is not None:
                        self._run_disk_onboard(job)
                    elif write is not None:
                        self._write_disk(*write)
                except Exception:
                    log.exception("KV disk tier I/O failed")
                finally:
                    with self._lock:
                        self._busy_disk -= 1
                        self._cv.notify_all()

    def _write_disk(self, h: int, buf: torch.Tensor) -> None:
        disk = self.disk
        assert disk is not None
        slot: int | None = None
        try:
            with self._lock:
                got = None if disk.lookup(h) is not None else disk.reserve()
                if got is None:
                    if disk.lookup(h) is None:
                        self.stats.spills_dropped += 1
                    return
                slot, victim = got
                if victim is not None:
                    self._emit([KvEvent(kind="removed", block_hashes=[victim], tier=DISK)])
            # File I/O outside the lock: the step thread may be waiting for it.
            if victim is not None:
                disk.write_entry(slot, 0, 0, FREE)
            crc = disk.write_from(slot, buf)
            with self._lock:
                stamp = disk.next_stamp()
                committed = disk.commit(slot, h, crc)
            written, slot = slot, None
            if committed:
                disk.write_entry(written, h, crc, VALID, stamp)
                with self._lock:
                    self.stats.spilled += 1
                    self._emit([KvEvent(kind="stored", block_hashes=[h], tier=DISK)])
        finally:
            with self._lock:
                if slot is not None:
                    disk.abandon(slot)
                self._disk_queued.discard(h)
                self._staging.append(buf)

    def _run_disk_onboard(self, job: OnboardJob) -> None:
        disk = self.disk
        assert disk is not None
        ok = False
        tmp = torch.empty(self.block_bytes, dtype=torch.uint8)
        bad: list[tuple[int, int]] = []
        try:
            for (kind, slot, h), dst in zip(job.src, job.dst, strict=True):
                if kind == HOST:
                    assert self.host is not None
                    self.pool_blocks[dst].copy_(self.host.host_view(slot))
                    continue
                crc = disk.read_into(slot, tmp)
                if crc != disk.crc_at[slot]:
                    bad.append((slot, h))
                    break
                self.pool_blocks[dst].copy_(tmp)
            self._sync(1)
            ok = not bad
        finally:
            with self._lock:
                for kind, slot, _ in job.src:
                    self._tier(kind).touch(slot)
                for slot, h in bad:
                    log.error("disk tier %s: slot %d (block %#x) fails its checksum: dropped, recomputing",
                              disk.path, slot, h)
                    self.stats.checksum_failures += 1
                    if disk.drop(slot) is not None:
                        self._emit([KvEvent(kind="removed", block_hashes=[h], tier=DISK)])
                self._unpin_locked(job)
                if ok:
                    self.stats.onboarded_host += sum(1 for k, _, _ in job.src if k == HOST)
                    self.stats.onboarded_disk += sum(1 for k, _, _ in job.src if k == DISK)
                else:
                    self.stats.onboard_failures += 1
            for slot, _ in bad:
                disk.write_entry(slot, 0, 0, FREE)
            if job.done is not None:
                job.done(ok)
