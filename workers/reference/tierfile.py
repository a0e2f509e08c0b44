"""One KV tier's file: the on-disk / shared-memory format, its identity, its index and block I/O.

Place: :mod:`workers.reference.kvbm` (the tier policy: what goes where, and the threads that move it)
keeps one :class:`TierFile` per tier, opened by :func:`open_tiers`, and serialises index changes under its
lock. Both tiers share this format: the host tier's file lives in shared memory (``/dev/shm/...``) and is
mapped with ``mmap``; the disk tier's is read and written with ``pread`` / ``pwrite``.

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
import time
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynamo_rt import kvhash
from dynamo_rt.errors import DynamoError

log = logging.getLogger(__name__)

HOST = "host"
DISK = "disk"
KIND_CODE = {HOST: 1, DISK: 2}
MAGIC = b"DYNKVT01"
VERSION = 1
HEADER_BYTES = 4096
PAGE = 4096
HEADER = struct.Struct("<8sII32sQQQQ")  # magic, version, kind, fingerprint, block_bytes, slots, index, data
_ENTRY = struct.Struct("<QQII")  # hash, stamp, data crc, state (the entry crc follows, then 4 bytes pad)
ENTRY_BYTES = 32
FREE = 0
VALID = 1
# KV layout this engine writes; a change of it must change the fingerprint (see kv_cache.KvPool).
LAYOUT = "reference block-major [block, layer, slot, K/V, kv_head, head_dim]; K in RoPE pair order; v1"
DISK_FILE = "dynamo-kv-disk.tier"



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

    Not thread-safe: :class:`~workers.reference.kvbm.KvTiers` serialises index changes under its lock; the I/O methods
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
        body = HEADER.pack(MAGIC, VERSION, KIND_CODE[self.kind], self.fingerprint, self.block_bytes,
                            self.num_slots, self.index_off, self.data_off)
        return body + struct.pack("<I", zlib.crc32(body))

    def _validate(self) -> str | None:
        """None if the file can be trusted (the in-memory index is then loaded), else why not."""
        raw = self._pread(HEADER.size + 4, 0)
        body, (crc,) = raw[:HEADER.size], struct.unpack("<I", raw[HEADER.size:])
        magic, version, kind, fp, bb, slots, ioff, doff = HEADER.unpack(body)
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
