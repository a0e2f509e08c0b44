"""KV block manager tiers of the reference engine: a host-memory tier that outlives the worker process, and
an optional disk tier, below the engine's primary KV pool.

Place: owned by :mod:`workers.reference.engine`, which calls :class:`KvTiers` under its own lock (lock
order: engine lock, then this module's lock; never the reverse). The tiers own two threads, so the step
thread never copies a block and never waits on disk I/O:

* the copy thread: primary -> host offloads and host -> primary onboards (memory-speed copies);
* the disk thread: host -> disk spills, primary -> disk offloads when there is no host tier, and onboards
  whose chain touches the disk tier (it may block on I/O; nobody waits on it).

Tiers, fastest first
  primary  the engine's :class:`~workers.reference.kv_cache.KvPool` (device memory on a GPU, the paged pool
           on a CPU host), managed by :class:`~workers.common.blocks.BlockManager`;
  host     one file in shared memory (``/dev/shm/...``; an emptyDir with medium Memory in Kubernetes),
           mapped with ``mmap``. It survives the process: a worker restarted in place serves its prefixes;
  disk     one file in a folder, read and written with ``pread`` / ``pwrite`` by the disk thread only.

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

File layout (both tiers; little endian)
  [0, 4096)  header: magic ``DYNKVT01``, version, kind (1 host, 2 disk), fingerprint (sha256 of the model
             and KV layout, :func:`model_fingerprint`), block_bytes, num_slots, index and data offsets, and
             the crc32 of all of that.
  index      ``num_slots`` entries of 32 bytes: block hash, LRU stamp, crc32 of the slot's data, state
             (0 free, 1 valid), crc32 of the entry's first 24 bytes.
  data       ``num_slots`` x ``block_bytes``, page aligned.
  Writing a slot: entry marked free, data written, entry written valid with the data's crc. A process
  killed in the middle leaves a free or torn entry (ignored), never a valid entry over half-written data,
  so a valid entry whose data fails its crc means the file was damaged from outside. On open, a header that
  does not match (another model, dtype, layout or size), a damaged header, two valid entries with one
  hash, or (host tier) a valid slot failing its data crc discard the whole file with a log line, and it is
  re-initialised empty: never trusted. Disk slots are checked when read (reading a big disk tier at start
  would take minutes); a bad one is dropped and that onboard falls back to recomputing.
  One process per file: ``flock``. A file locked by a live process is not used (the tier is disabled with
  an error line) rather than shared.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynamo_rt import kvhash
from dynamo_rt.errors import DynamoError
from dynamo_rt.protocol import KvEvent

log = logging.getLogger(__name__)

HOST = "host"
DISK = "disk"
KIND_CODE = {HOST: 1, DISK: 2}
MAGIC = b"DYNKVT01"
VERSION = 1
HEADER_BYTES = 4096
PAGE = 4096
_HEADER = struct.Struct("<8sII32sQQQQ")  # magic, version, kind, fingerprint, block_bytes, slots, index, data
_ENTRY = struct.Struct("<QQII")  # hash, stamp, data crc, state (the entry crc follows, then 4 bytes pad)
ENTRY_BYTES = 32
FREE = 0
VALID = 1
# KV layout this engine writes; a change of it must change the fingerprint (see kv_cache.KvPool).
LAYOUT = "reference block-major [block, layer, slot, K/V, kv_head, head_dim]; K in RoPE pair order; v1"
DISK_FILE = "dynamo-kv-disk.tier"
STAGING_BYTES = 256 * 2**20  # most bytes of host->disk spills queued at once
OFFLOAD_BATCH = 64  # offload jobs one copy-thread pass takes


class TierError(DynamoError):
    """A tier could not be opened (locked by another process, no space, bad path)."""


# --------------------------------------------------------------------------------------------- identity


def model_fingerprint(model_dir: str | Path, *, dtype: str, block_size: int, num_layers: int,
                      num_kv_heads: int, head_dim: int, block_bytes: int) -> bytes:
    """sha256 naming the KV a model produces in this layout: config.json, dtype, block geometry, the block
    hash scheme, and a sample of the weights (two models with one config.json, e.g. two fine-tunes or two
    tiny models of different seeds, produce different KV for the same tokens)."""
    d = Path(model_dir)
    h = hashlib.sha256(b"dynamo-rt kv tier\0")
    h.update((d / "config.json").read_bytes())
    layout = {"dtype": dtype, "block_size": block_size, "num_layers": num_layers, "num_kv_heads": num_kv_heads,
              "head_dim": head_dim, "block_bytes": block_bytes, "layout": LAYOUT,
              "kvhash_root": kvhash.ROOT_HASH, "kvhash": "blake2b-8 chained, 63 bits"}
    h.update(json.dumps(layout, sort_keys=True).encode())
    h.update(weights_digest(d))
    return h.digest()


def weights_digest(model_dir: Path, sample: int = 64) -> bytes:
    """Digest of every safetensors file's header plus the first and last ``sample`` bytes of each tensor:
    a few small reads per tensor, so it costs milliseconds even for a large checkpoint, and any retrained
    tensor changes it."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise DynamoError(f"{f}: not a safetensors file")
            (n,) = struct.unpack("<Q", raw_len)
            header = fh.read(n)
            h.update(f.name.encode() + b"\0" + size.to_bytes(8, "little") + header)
            try:
                meta = json.loads(header)
            except ValueError as e:
                raise DynamoError(f"{f}: unreadable safetensors header") from e
            base = 8 + n
            for name in sorted(k for k in meta if k != "__metadata__"):
                start, end = meta[name]["data_offsets"]
                for off in {start, max(start, end - sample)}:
                    fh.seek(base + off)
                    h.update(fh.read(min(sample, end - off)))
    return h.digest()


# --------------------------------------------------------------------------------------------- one file


def _align(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def file_size(num_slots: int, block_bytes: int) -> int:
    return _data_offset(num_slots) + num_slots * block_bytes


def _data_offset(num_slots: int) -> int:
    return _align(HEADER_BYTES + num_slots * ENTRY_BYTES)


def slots_for_bytes(total: int, block_bytes: int) -> int:
    """Most slots whose file (header + index + data) fits in ``total`` bytes."""
    n = max(0, (total - HEADER_BYTES) // (block_bytes + ENTRY_BYTES))
    while n > 0 and file_size(n, block_bytes) > total:
        n -= 1
    return n


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A CPU uint8 tensor's memory as a writable byte view (for crc32, pwrite, preadv)."""
    arr: Any = t.numpy()
    return memoryview(arr).cast("B")


def _entry_bytes(h: int, stamp: int, crc: int, state: int) -> bytes:
    body = _ENTRY.pack(h, stamp, crc, state)
    return body + struct.pack("<I", zlib.crc32(body)) + b"\0\0\0\0"


@dataclass(slots=True)
class OpenResult:
    recovered: int = 0  # valid blocks found in an existing file
    discarded: str | None = None  # why an existing file was thrown away (None: kept or new)


class TierFile:
    """One tier's file: header, index and slots, plus the in-memory index over them.

    Not thread-safe: :class:`KvTiers` serialises index changes under its lock; the I/O methods
    (:meth:`read_into`, :meth:`write_from`, :meth:`write_entry`) touch only slots the caller reserved or
    pinned, so they run outside it.
    """

    def __init__(self, kind: str, path: Path, fingerprint: bytes, block_bytes: int, num_slots: int) -> None:
        if kind not in KIND_CODE:
            raise ValueError(kind)
        if num_slots < 1:
            raise TierError(f"{kind} tier at {path}: room for no block of {block_bytes} bytes")
        self.kind = kind
        self.path = path
        self.fingerprint = fingerprint
        self.block_bytes = block_bytes
        self.num_slots = num_slots
        self.index_off = HEADER_BYTES
        self.data_off = _data_offset(num_slots)
        self.size = file_size(num_slots, block_bytes)
        self.slot_of: dict[int, int] = {}  # hash -> slot (valid slots only)
        self.hash_at: list[int | None] = [None] * num_slots
        self.crc_at: list[int] = [0] * num_slots
        self.lru: OrderedDict[int, None] = OrderedDict()  # valid slots, least recently used first
        self.free: deque[int] = deque()
        self.pins = [0] * num_slots  # readers (onboards, spills) of a valid slot
        self.busy: set[int] = set()  # slots being written (not valid, not free)
        self.stamp = 0
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._data: torch.Tensor | None = None  # host: the data region as uint8 [num_slots, block_bytes]

    # ------------------------------------------------------------------------------------ open / close

    def open(self) -> OpenResult:
        """Open or create the file, lock it, validate it; an untrustworthy file is re-initialised."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise TierError(f"{self.kind} tier: cannot open {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise TierError(f"{self.kind} tier: {self.path} is in use by another process") from e
        self._fd = fd
        try:
            res = self._attach()
        except BaseException:
            self.close()
            raise
        return res

    def _attach(self) -> OpenResult:
        res = OpenResult()
        existing = os.fstat(self._fd).st_size
        why = None
        if existing == 0:
            why = "new"
        elif existing != self.size:
            why = f"its size {existing} is not {self.size} (another tier size or block layout)"
        if why is None:
            self._map()
            why = self._validate()
        if why is None:
            res.recovered = len(self.slot_of)
            return res
        if why != "new":
            log.warning("%s tier %s: discarding its contents: %s", self.kind, self.path, why)
            res.discarded = why
        self._reset()
        return res

    def _map(self) -> None:
        if self.kind == HOST and self._mm is None:
            self._mm = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            n = self.num_slots * self.block_bytes
            self._data = torch.frombuffer(self._mm, dtype=torch.uint8, count=n, offset=self.data_off
                                          ).view(self.num_slots, self.block_bytes)

    def _reset(self) -> None:
        """An empty, valid file of the configured size (space reserved now, so a full /dev/shm fails here
        with an error instead of killing the process with SIGBUS on a later write)."""
        self._unmap()
        os.ftruncate(self._fd, 0)
        try:
            os.posix_fallocate(self._fd, 0, self.size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(self._fd, self.size)
            else:
                os.ftruncate(self._fd, 0)
                raise TierError(f"{self.kind} tier: cannot reserve {self.size} bytes at {self.path}: "
                                f"{e.strerror}") from e
        self._pwrite(self._header(), 0)  # the index is zeros (every entry free): the file was just emptied
        self._map()
        self.slot_of.clear()
        self.hash_at = [None] * self.num_slots
        self.crc_at = [0] * self.num_slots
        self.lru.clear()
        self.free = deque(range(self.num_slots))
        self.stamp = 0

    def _header(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, KIND_CODE[self.kind], self.fingerprint, self.block_bytes,
                            self.num_slots, self.index_off, self.data_off)
        return body + struct.pack("<I", zlib.crc32(body))

    def _validate(self) -> str | None:
        """None if the file can be trusted (the in-memory index is then loaded), else why not."""
        raw = self._pread(_HEADER.size + 4, 0)
        body, (crc,) = raw[:_HEADER.size], struct.unpack("<I", raw[_HEADER.size:])
        magic, version, kind, fp, bb, slots, ioff, doff = _HEADER.unpack(body)
        if magic != MAGIC:
            return "not a dynamo-rt KV tier file (bad magic)"
        if zlib.crc32(body) != crc:
            return "header checksum mismatch"
        if version != VERSION or kind != KIND_CODE[self.kind]:
            return f"format version {version} / kind {kind}, expected {VERSION} / {KIND_CODE[self.kind]}"
        if fp != self.fingerprint:
            return "written for another model or KV layout (fingerprint mismatch)"
        if (bb, slots, ioff, doff) != (self.block_bytes, self.num_slots, self.index_off, self.data_off):
            return f"geometry {bb} B x {slots} slots, expected {self.block_bytes} B x {self.num_slots}"
        index = self._pread(self.num_slots * ENTRY_BYTES, self.index_off)
        entries: list[tuple[int, int, int, int]] = []  # (stamp, slot, hash, crc)
        seen: set[int] = set()
        torn = 0
        for slot in range(self.num_slots):
            e = index[slot * ENTRY_BYTES:(slot + 1) * ENTRY_BYTES]
            h, stamp, dcrc, state = _ENTRY.unpack_from(e)
            if state == FREE:
                continue
            (ecrc,) = struct.unpack_from("<I", e, _ENTRY.size)
            if state != VALID or zlib.crc32(e[:_ENTRY.size]) != ecrc:
                torn += 1  # a write cut short by a kill: the slot is free
                continue
            if h in seen:
                return f"block hash {h:#x} appears in two slots"
            seen.add(h)
            entries.append((stamp, slot, h, dcrc))
        if self.kind == HOST and entries:
            # crc32 runs at several GB/s per core and releases the GIL: a big tier is checked in parallel.
            workers = max(1, min(8, len(os.sched_getaffinity(0)), len(entries)))
            parts = [entries[i::workers] for i in range(workers)]

            def first_bad(part: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
                return next(((slot, h) for _, slot, h, dcrc in part if self.data_crc(slot) != dcrc), None)

            with ThreadPoolExecutor(workers, thread_name_prefix="kvbm-verify") as ex:
                bad = next((b for b in ex.map(first_bad, parts) if b is not None), None)
            if bad is not None:
                return f"slot {bad[0]} (block {bad[1]:#x}) fails its checksum"
        if torn:
            log.info("%s tier %s: %d torn index entries ignored (a write was cut short)", self.kind, self.path,
                     torn)
        self.slot_of.clear()
        self.hash_at = [None] * self.num_slots
        self.crc_at = [0] * self.num_slots
        self.lru.clear()
        for stamp, slot, h, dcrc in sorted(entries):
            self.slot_of[h] = slot
            self.hash_at[slot] = h
            self.crc_at[slot] = dcrc
            self.lru[slot] = None
            self.stamp = max(self.stamp, stamp)
        self.free = deque(s for s in range(self.num_slots) if self.hash_at[s] is None)
        return None

    def _unmap(self) -> None:
        self._data = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a tensor view is still referenced somewhere: the GC unmaps it later
                log.debug("%s tier %s: mapping still referenced at close", self.kind, self.path)
            self._mm = None

    def close(self) -> None:
        self._unmap()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------------------------ raw I/O

    def _pread(self, n: int, off: int) -> bytes:
        if self._mm is not None:
            return self._mm[off:off + n]
        out = b""
        while len(out) < n:
            chunk = os.pread(self._fd, n - len(out), off + len(out))
            if not chunk:
                raise OSError(errno.EIO, f"short read at {off} in {self.path}")
            out += chunk
        return out

    def _pwrite(self, data: bytes | memoryview, off: int) -> None:
        if self._mm is not None:
            self._mm[off:off + len(data)] = data
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, off)
            view = view[n:]
            off += n

    def slot_offset(self, slot: int) -> int:
        return self.data_off + slot * self.block_bytes

    def data_crc(self, slot: int) -> int:
        if self._data is not None:
            return zlib.crc32(_bytes_of(self._data[slot]))
        return zlib.crc32(self._pread(self.block_bytes, self.slot_offset(slot)))

    def write_entry(self, slot: int, h: int, crc: int, state: int, stamp: int = 0) -> None:
        self._pwrite(_entry_bytes(h, stamp, crc, state), self.index_off + slot * ENTRY_BYTES)

    def host_view(self, slot: int) -> torch.Tensor:
        """The host slot's bytes as a uint8 tensor over the mapping (host tier only)."""
        assert self._data is not None
        return self._data[slot]

    def write_from(self, slot: int, src: torch.Tensor) -> int:
        """Store ``src`` (uint8 [block_bytes], any device) in ``slot``; returns the data crc."""
        if self._data is not None:
            dst = self._data[slot]
            dst.copy_(src)
            return zlib.crc32(_bytes_of(dst))
        view = _bytes_of(src if src.device.type == "cpu" else src.cpu())
        self._pwrite(view, self.slot_offset(slot))
        return zlib.crc32(view)

    def read_into(self, slot: int, dst: torch.Tensor) -> int:
        """Copy ``slot`` into the CPU uint8 tensor ``dst`` (disk tier); returns the crc of what was read."""
        view = _bytes_of(dst)
        off = self.slot_offset(slot)
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], off + got)
            if n <= 0:
                raise OSError(errno.EIO, f"short read of slot {slot} in {self.path}")
            got += n
        return zlib.crc32(view)

    # ------------------------------------------------------------------------------------ index (locked)

    def lookup(self, h: int) -> int | None:
        return self.slot_of.get(h)

    def reserve(self) -> tuple[int, int | None] | None:
        """A slot to write: a free one, else the least recently used unpinned one (its hash is forgotten
        and returned). None if every slot is pinned or being written."""
        if self.free:
            slot = self.free.popleft()
            self.busy.add(slot)
            return slot, None
        for slot in self.lru:
            if self.pins[slot] == 0:
                break
        else:
            return None
        del self.lru[slot]
        h = self.hash_at[slot]
        assert h is not None
        del self.slot_of[h]
        self.hash_at[slot] = None
        self.busy.add(slot)
        return slot, h

    def commit(self, slot: int, h: int, crc: int) -> bool:
        """Make a reserved slot hold ``h`` (entry written by the caller). False if ``h`` arrived meanwhile in
        another slot: this one is freed."""
        self.busy.discard(slot)
        if h in self.slot_of:
            self.free.append(slot)
            return False
        self.slot_of[h] = slot
        self.hash_at[slot] = h
        self.crc_at[slot] = crc
        self.lru[slot] = None
        return True

    def abandon(self, slot: int) -> None:
        self.busy.discard(slot)
        self.free.append(slot)

    def drop(self, slot: int) -> int | None:
        """Forget a valid slot (a failed checksum); its entry must then be written free by the caller."""
        h = self.hash_at[slot]
        if h is None:
            return None
        del self.slot_of[h]
        self.hash_at[slot] = None
        self.lru.pop(slot, None)
        if self.pins[slot] == 0:
            self.free.append(slot)
        else:
            self.busy.add(slot)  # freed by the last unpin
        return h

    def touch(self, slot: int) -> None:
        if slot in self.lru:
            self.lru.move_to_end(slot)

    def next_stamp(self) -> int:
        self.stamp += 1
        return self.stamp

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and self.hash_at[slot] is None and slot in self.busy:
            self.busy.discard(slot)  # dropped while pinned
            self.free.append(slot)

    @property
    def num_cached(self) -> int:
        return len(self.slot_of)

    def hashes(self) -> list[int]:
        return [h for s in self.lru if (h := self.hash_at[s]) is not None]


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


# --------------------------------------------------------------------------------------------- factory


@dataclass(slots=True)
class TierConfig:
    """What the engine's flags ask for (sizes in bytes or blocks; blocks win)."""

    host_path: str | None = None
    host_bytes: int | None = None
    host_blocks: int | None = None
    disk_path: str | None = None
    disk_bytes: int | None = None
    disk_blocks: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.host_path or self.disk_path)


def open_tiers(cfg: TierConfig, fingerprint: bytes, block_bytes: int) -> tuple[TierFile | None, TierFile | None]:
    """Open the configured tiers. A tier that cannot be opened is logged and left out (the worker serves
    without it rather than not at all)."""
    out: list[TierFile | None] = []
    for kind, path, nbytes, nblocks in ((HOST, cfg.host_path, cfg.host_bytes, cfg.host_blocks),
                                        (DISK, cfg.disk_path, cfg.disk_bytes, cfg.disk_blocks)):
        if not path:
            out.append(None)
            continue
        file = Path(path) / DISK_FILE if kind == DISK else Path(path)
        slots = nblocks if nblocks is not None else slots_for_bytes(nbytes or 0, block_bytes)
        try:
            tier = TierFile(kind, file, fingerprint, block_bytes, slots)
            t0 = time.monotonic()
            res = tier.open()
        except TierError as e:
            log.error("KV %s tier disabled: %s", kind, e.message)
            out.append(None)
            continue
        log.info("KV %s tier: %s, %d slots of %d bytes (%.1f MiB), %d blocks recovered%s (%.2fs)", kind, file,
                 slots, block_bytes, tier.size / 2**20, res.recovered,
                 f", previous contents discarded: {res.discarded}" if res.discarded else "",
                 time.monotonic() - t0)
        out.append(tier)
    return out[0], out[1]
