"""KV-cache hand-off between workers with NIXL: the only module that imports ``nixl``.

Place in the disaggregated flow (DESIGN.md, "Disaggregated prefill / decode"): every worker owns one
block-major KV pool (one block = one contiguous region across all layers) and registers it once with
:meth:`KvTransfer.register_pool`; the returned :class:`~dynamo_rt.protocol.NixlRecord` is published under
``/{ns}/nixl/{instance_id}``. A decode worker calls :meth:`KvTransfer.add_remote` with a prefill worker's
record, then :meth:`KvTransfer.read_blocks` pulls the prompt's blocks into its own pool (one NIXL
descriptor per contiguous run) and NIXL delivers ``notify`` to the prefill worker, which polls
:meth:`KvTransfer.get_notifs` to learn when it may free the pinned blocks.

NIXL facts this module relies on (measured with nixl 1.5.1 / its bundled UCX, see bench/kv_transfer.py):

* Agent metadata travels through etcd (``NixlRecord.agent_metadata``); NIXL's own listener thread and
  etcd client stay off.
* The progress thread is off (2 cores): transfers are polled. ``check_xfer_state`` never blocks.
* UCX is created with ``ucx_error_handling_mode=none``. NIXL's default (``peer``) rules out UCX's
  shared-memory transports for active messages (they have no peer-failure handler), so connection setup
  and notifications go over ``tcp/lo`` and a READ does not complete until the *owner* progresses its
  worker: an owner busy elsewhere stalls every reader. With ``none`` the wire-up and notifications use
  shared memory, and a same-host READ is one-sided (CMA, ``process_vm_readv``), so it completes without
  the owner doing anything. A departed owner is still detected at once: CMA fails with ESRCH (NIXL
  reports the agent disconnected) and loading a departed agent's metadata fails because its shared
  memory is gone. No ``UCX_TLS`` setting is needed; UCX's default picks ``cma`` for same-host DRAM reads
  (``tcp`` and ``posix``/``sysv`` move bytes ~10x slower and need the owner to poll). UCX options go
  through NIXL's ``engine_config`` backend parameter (``ucx_config``), never through ``os.environ``.
* With CMA the copy happens inside the post call, which releases the GIL. Reads above ``inline_bytes``
  therefore post on one worker thread (so the event loop never waits for a long copy), in pieces of at
  most ``max_post_bytes`` so that short calls (``get_notifs``, ``add_remote``) never wait long for the
  agent. Smaller reads post on the caller's thread: the copy is shorter than a thread hand-off.

NIXL is imported lazily, so the rest of the runtime works where NIXL is not installed. NIXL exceptions
never leave this module: they become :class:`~dynamo_rt.errors.KvTransferError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dynamo_rt.errors import ErrorCode, KvTransferError
from dynamo_rt.protocol import NixlRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

MEMORY_TYPES = ("DRAM", "VRAM")
DEFAULT_MAX_POST_BYTES = 64 << 20  # ~4 ms of copying at CPU memory bandwidth
DEFAULT_INLINE_BYTES = 4 << 20  # reads up to this size post on the event loop's thread (~0.25 ms)
# UCX settings (without the ``UCX_`` prefix) handed to NIXL's UCX backend, which applies each one unless
# the same ``UCX_*`` variable is set in the environment. CMA copies in 512 KiB system calls by default;
# 64 MiB (one call per descriptor of a post) measured ~4% faster for MiB-sized blocks (bench/kv_transfer.py).
DEFAULT_UCX_CONFIG = {"CMA_SEG_SIZE": "64m"}
# Added for VRAM pools. UCX's cuda_ipc turns its zero-copy GET (our READ) off unless it detects NVLink
# ("auto"), so on a single GPU or PCIe-only GPUs a VRAM READ fell back to software emulation through host
# shared memory: 0.8 GB/s on an H200, against 210-300 GB/s with it on (bench/gpu_kv_check.py, 2026-11-27).
VRAM_UCX_CONFIG = {"CUDA_IPC_ENABLE_GET_ZCOPY": "y"}


@dataclass(frozen=True, slots=True)
class KvRegion:
    """A registered block-major KV region, local or remote."""

    base_addr: int
    block_bytes: int
    num_blocks: int
    memory: str = "DRAM"  # "DRAM" or "VRAM"
    device_id: int = 0

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.num_blocks

    def block_addr(self, block_id: int) -> int:
        return self.base_addr + block_id * self.block_bytes

    @classmethod
    def from_record(cls, record: NixlRecord) -> KvRegion:
        return cls(
            base_addr=record.base_addr,
            block_bytes=record.block_bytes,
            num_blocks=record.num_blocks,
            memory=record.memory,
            device_id=record.device_id,
        )


@dataclass(frozen=True, slots=True)
class TransferStats:
    bytes: int
    descriptors: int  # NIXL descriptors posted (contiguous runs, split at ``max_post_bytes``)
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


_Desc = tuple[int, int, int]  # (address, length, device id)
_Post = tuple[list[_Desc], list[_Desc]]  # (local, remote) descriptors of one NIXL request


@dataclass(frozen=True, slots=True)
class _Remote:
    instance_id: str
    agent_name: str
    metadata: bytes
    pool: KvRegion


def coalesce(remote_ids: Sequence[int], local_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group block pairs into runs ``(remote_start, local_start, count)``.

    A run continues only while both the remote and the local id go up by one, so each run is one
    contiguous region on each side and becomes one NIXL descriptor.
    """
    runs: list[tuple[int, int, int]] = []
    for r, lo in zip(remote_ids, local_ids, strict=True):
        if runs:
            r0, l0, n = runs[-1]
            if r == r0 + n and lo == l0 + n:
                runs[-1] = (r0, l0, n + 1)
                continue
        runs.append((r, lo, 1))
    return runs


def _load_nixl() -> Any:
    """Import ``nixl._api``; NIXL configures its own logger to INFO on stdout at import, tame it."""
    root_raise = logging.raiseExceptions
    try:
        from nixl import _api
    except Exception as e:  # ImportError, or a broken CUDA probe inside nixl's loader
        raise KvTransferError(f"NIXL is not available: {e}") from e
    finally:
        logging.raiseExceptions = root_raise  # nixl's logging setup overwrites this process-wide flag
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return _api


class KvTransfer:
    """One NIXL agent per worker process: registers the local pool and READs remote blocks into it.

    ``name`` is the NIXL agent name (unique per process; owners see it as the key of
    :meth:`get_notifs`). ``memory``/``device_id``: the local pool's memory ("VRAM" and the CUDA ordinal
    on GPUs). ``ucx_error_handling``: "none" (see the module docstring; pass "peer", NIXL's default,
    for transports that should detect dead peers themselves, e.g. RDMA between hosts). ``ucx_config``:
    extra UCX settings, merged over :data:`DEFAULT_UCX_CONFIG` (and :data:`VRAM_UCX_CONFIG` for VRAM).
    ``max_post_bytes``/``inline_bytes``: see the module docstring.

    Thread model: every call into the agent holds ``_lock``; reads above ``inline_bytes`` post on one
    worker thread, smaller ones on the caller's. The owner of a pool never has to call anything for
    reads to proceed, but it should poll :meth:`get_notifs` (every few ms) to learn when readers are done.
    """

    def __init__(
        self,
        name: str,
        *,
        memory: str = "DRAM",
        device_id: int = 0,
        progress_thread: bool = False,
        backends: Sequence[str] = ("UCX",),
        ucx_error_handling: str = "none",
        ucx_config: Mapping[str, str] | None = None,
        max_post_bytes: int = DEFAULT_MAX_POST_BYTES,
        inline_bytes: int = DEFAULT_INLINE_BYTES,
    ) -> None:
        if memory not in MEMORY_TYPES:
            raise KvTransferError(f"memory must be one of {MEMORY_TYPES}, got {memory!r}")
        if max_post_bytes <= 0:
            raise KvTransferError("max_post_bytes must be positive")
        self.name = name
        self.memory = memory
        self.device_id = device_id
        self.max_post_bytes = max_post_bytes
        self.inline_bytes = inline_bytes
        self._api = _load_nixl()
        self._lock = threading.Lock()
        self._pool: KvRegion | None = None
        self._reg: Any = None
        self._remotes: dict[str, _Remote] = {}
        self._closed = False
        try:
            # Backends are created one by one (not via the config) so UCX gets its init parameters.
            conf = self._api.nixl_agent_config(
                enable_prog_thread=progress_thread, enable_listen_thread=False, backends=[]
            )
            self._agent = self._api.nixl_agent(name, conf)
            for backend in backends:
                params: dict[str, str] = {}
                if backend == "UCX":
                    vram = VRAM_UCX_CONFIG if memory == "VRAM" else {}
                    ucx = {**DEFAULT_UCX_CONFIG, **vram, **(ucx_config or {})}
                    params["ucx_error_handling_mode"] = ucx_error_handling
                    params["engine_config"] = ",".join(f"{k}={v}" for k, v in ucx.items())
                self._agent.create_backend(backend, params)
        except Exception as e:
            raise KvTransferError(f"cannot create NIXL agent {name!r} with {list(backends)}: {e}") from e
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"nixl-{name}")

    # ------------------------------------------------------------------------------------------ setup

    @property
    def pool(self) -> KvRegion | None:
        return self._pool

    def register_pool(self, base_addr: int, block_bytes: int, num_blocks: int) -> NixlRecord:
        """Register the whole pool once; return the record to publish under ``/{ns}/nixl/{instance_id}``."""
        self._check_open()
        if self._pool is not None:
            raise KvTransferError(f"agent {self.name!r} already registered a pool")
        if block_bytes <= 0 or num_blocks <= 0 or base_addr <= 0:
            raise KvTransferError(
                f"bad pool: base_addr={base_addr:#x} block_bytes={block_bytes} num_blocks={num_blocks}"
            )
        pool = KvRegion(base_addr, block_bytes, num_blocks, self.memory, self.device_id)
        with self._lock:
            try:
                self._reg = self._agent.register_memory([(base_addr, pool.nbytes, self.device_id, "")], self.memory)
                metadata = bytes(self._agent.get_agent_metadata())
            except Exception as e:
                raise KvTransferError(f"cannot register {pool.nbytes} bytes of {self.memory}: {e}") from e
        self._pool = pool
        return NixlRecord(
            agent_name=self.name,
            agent_metadata=metadata,
            memory=self.memory,
            device_id=self.device_id,
            base_addr=base_addr,
            block_bytes=block_bytes,
            num_blocks=num_blocks,
        )

    def add_remote(self, instance_id: str, record: NixlRecord) -> None:
        """Load a peer's agent metadata (idempotent). Fails if the peer has already gone."""
        self._check_open()
        if record.layout != "block-major":
            raise KvTransferError(f"instance {instance_id}: unsupported KV layout {record.layout!r}")
        if self._pool is not None and record.block_bytes != self._pool.block_bytes:
            raise KvTransferError(
                f"instance {instance_id}: block size {record.block_bytes} B differs from ours "
                f"({self._pool.block_bytes} B)"
            )
        known = self._remotes.get(instance_id)
        if known is not None and known.metadata == record.agent_metadata:
            return
        if known is not None:  # same instance id, new agent (restart): forget the old one first
            self.remove_remote(instance_id)
        with self._lock:
            try:
                loaded = self._agent.add_remote_agent(record.agent_metadata)
            except Exception as e:
                raise KvTransferError(f"cannot connect to KV instance {instance_id}: {e}") from e
        agent_name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if agent_name != record.agent_name:
            log.warning("instance %s: record names agent %r, metadata %r", instance_id, record.agent_name, agent_name)
        region = KvRegion.from_record(record)
        self._remotes[instance_id] = _Remote(instance_id, agent_name, record.agent_metadata, region)

    def remove_remote(self, instance_id: str) -> None:
        """Forget a peer (it left discovery). Unknown ids are ignored."""
        remote = self._remotes.pop(instance_id, None)
        if remote is None or self._closed:
            return
        if any(r.agent_name == remote.agent_name for r in self._remotes.values()):
            return  # another instance id still maps to this agent
        with self._lock:
            try:
                self._agent.remove_remote_agent(remote.agent_name)
            except Exception as e:  # already disconnected: nothing left to undo
                log.debug("remove_remote_agent(%s): %s", remote.agent_name, e)

    def has_remote(self, instance_id: str) -> bool:
        return instance_id in self._remotes

    # ---------------------------------------------------------------------------------------- transfer

    async def read_blocks(
        self,
        instance_id: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        *,
        notify: bytes = b"",
        timeout: float = 10.0,
        coalesce_runs: bool = True,
    ) -> TransferStats:
        """READ ``remote_block_ids`` of ``instance_id`` into ``local_block_ids`` of our pool.

        ``notify`` (if not empty) is delivered to the owner after the last byte is read. Raises
        :class:`KvTransferError` when the peer is unknown or gone, the ids are invalid, NIXL reports an
        error, or ``timeout`` seconds pass. ``coalesce_runs=False`` posts one descriptor per block (for
        benchmarks only).
        """
        t0 = time.perf_counter()
        self._check_open()
        remote = self._remotes.get(instance_id)
        if remote is None:
            raise KvTransferError(f"unknown KV instance {instance_id!r} (never added, or removed)")
        local = self._pool
        if local is None:
            raise KvTransferError("register_pool() must be called before read_blocks()")
        rids, lids = list(remote_block_ids), list(local_block_ids)
        self._validate(instance_id, remote.pool, local, rids, lids)
        if coalesce_runs:
            runs = coalesce(rids, lids)
        else:
            runs = [(r, lo, 1) for r, lo in zip(rids, lids, strict=True)]
        posts = self._split(runs, remote.pool, local)
        nbytes = len(rids) * local.block_bytes
        descriptors = sum(len(p[0]) for p in posts)
        if not posts:
            if notify:
                await self._run(self._send_notif, remote.agent_name, notify)
            return TransferStats(0, 0, time.perf_counter() - t0)

        deadline = t0 + timeout
        loop = asyncio.get_running_loop()
        stop = threading.Event()  # tells the worker thread to post nothing more
        i = 0
        # A small read posts right here: its copy is shorter than a hand-off to the worker thread, which
        # costs milliseconds when the cores are busy. Only if nobody else holds the agent.
        if nbytes <= self.inline_bytes and self._lock.acquire(blocking=False):
            try:
                i, handle = self._post_locked_from(remote, posts, 0, notify)
            finally:
                self._lock.release()
            if handle is not None:
                try:
                    await self._wait_done(instance_id, handle, deadline, timeout)
                finally:
                    await self._run(self._release, handle)
        while i < len(posts):
            fut = loop.run_in_executor(self._executor, self._post_from, remote, posts, i, notify, deadline, stop)
            try:
                i, handle = await asyncio.wait_for(asyncio.shield(fut), max(deadline - time.perf_counter(), 0))
            except (TimeoutError, asyncio.CancelledError) as e:
                stop.set()
                fut.add_done_callback(self._release_later)
                if isinstance(e, asyncio.CancelledError):
                    raise
                raise self._timeout(instance_id, timeout) from None
            if handle is not None:  # in flight (not CMA): poll it before posting the rest
                try:
                    await self._wait_done(instance_id, handle, deadline, timeout)
                finally:
                    await self._run(self._release, handle)
        return TransferStats(nbytes, descriptors, time.perf_counter() - t0)

    def get_notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by reader agent name. Never blocks: while a post
        holds the agent it returns ``{}`` and the messages wait in NIXL for the next call."""
        if self._closed or not self._lock.acquire(blocking=False):
            return {}
        try:
            notifs = self._agent.get_new_notifs()
        except Exception as e:
            raise KvTransferError(f"cannot read NIXL notifications: {e}") from e
        finally:
            self._lock.release()
        return {str(k): [bytes(m) for m in v] for k, v in notifs.items()}

    def close(self) -> None:
        """Deregister the pool and drop the agent. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        with self._lock:
            for agent_name in {r.agent_name for r in self._remotes.values()}:
                try:
                    self._agent.remove_remote_agent(agent_name)
                except Exception as e:
                    log.debug("remove_remote_agent(%s) at close: %s", agent_name, e)
            self._remotes.clear()
            if self._reg is not None:
                try:
                    self._agent.deregister_memory(self._reg)
                except Exception as e:
                    log.warning("deregister_memory at close: %s", e)
                self._reg = None
            self._agent = None

    # -------------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise KvTransferError(f"KV transfer agent {self.name!r} is closed")

    @staticmethod
    def _validate(instance_id: str, rpool: KvRegion, lpool: KvRegion, rids: list[int], lids: list[int]) -> None:
        if len(rids) != len(lids):
            raise KvTransferError(f"{len(rids)} remote block ids but {len(lids)} local block ids")
        if rpool.block_bytes != lpool.block_bytes:
            raise KvTransferError(
                f"instance {instance_id}: block size {rpool.block_bytes} B differs from ours ({lpool.block_bytes} B)"
            )
        bad = [b for b in rids if not 0 <= b < rpool.num_blocks]
        if bad:
            raise KvTransferError(f"remote block ids out of range [0, {rpool.num_blocks}): {bad[:8]}")
        bad = [b for b in lids if not 0 <= b < lpool.num_blocks]
        if bad:
            raise KvTransferError(f"local block ids out of range [0, {lpool.num_blocks}): {bad[:8]}")
        if len(set(lids)) != len(lids):
            raise KvTransferError("local block ids repeat: two remote blocks would land in one local block")

    def _split(self, runs: list[tuple[int, int, int]], rpool: KvRegion, lpool: KvRegion) -> list[_Post]:
        """Descriptor lists ``(local, remote)`` per post; a post carries at most ``max_post_bytes``."""
        posts: list[_Post] = []
        ldescs: list[_Desc] = []
        rdescs: list[_Desc] = []
        used = 0
        for r0, l0, n in runs:
            laddr, raddr, left = lpool.block_addr(l0), rpool.block_addr(r0), n * lpool.block_bytes
            while left > 0:
                if used == self.max_post_bytes:
                    posts.append((ldescs, rdescs))
                    ldescs, rdescs, used = [], [], 0
                take = min(left, self.max_post_bytes - used)
                ldescs.append((laddr, take, lpool.device_id))
                rdescs.append((raddr, take, rpool.device_id))
                laddr, raddr, left, used = laddr + take, raddr + take, left - take, used + take
        if ldescs:
            posts.append((ldescs, rdescs))
        return posts

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _post_from(
        self, remote: _Remote, posts: list[_Post], start: int, notify: bytes, deadline: float, stop: threading.Event
    ) -> tuple[int, Any]:
        """Post ``posts[start:]`` in order on the worker thread until one is still in flight.

        With CMA a post copies everything before it returns ``DONE``, so a whole read is one trip to this
        thread. The lock is released between posts so ``get_notifs``/``add_remote`` wait one post at most.
        Returns the index of the next post and the in-flight handle (``None`` when all are done).
        """
        i = start
        while i < len(posts):
            if stop.is_set() or time.perf_counter() >= deadline:
                raise KvTransferError(f"KV read from {remote.instance_id} stopped before post {i + 1}/{len(posts)}")
            with self._lock:
                i, handle = self._post_locked_from(remote, posts, i, notify, limit=1)
            if handle is not None:
                return i, handle
        return i, None

    def _post_locked_from(
        self, remote: _Remote, posts: list[_Post], start: int, notify: bytes, limit: int = 1 << 30
    ) -> tuple[int, Any]:
        """Post up to ``limit`` of ``posts[start:]`` (caller holds the lock); stop at one still in flight.

        ``notify`` rides on the last post: NIXL sends it once that post, and so the whole read, is done.
        """
        who = f"{remote.instance_id} (agent {remote.agent_name})"
        if self._agent is None:
            raise KvTransferError("KV transfer agent closed during a read")
        end = min(len(posts), start + limit)
        for i in range(start, end):
            msg = notify if i == len(posts) - 1 else b""
            try:
                ldl = self._agent.get_xfer_descs(posts[i][0], self.memory)
                rdl = self._agent.get_xfer_descs(posts[i][1], remote.pool.memory)
                handle = self._agent.initialize_xfer("READ", ldl, rdl, remote.agent_name, msg)
            except Exception as e:
                raise KvTransferError(f"cannot create a KV read from {who}: {e}") from e
            try:
                state = self._agent.transfer(handle)
            except Exception as e:
                self._release_locked(handle)
                raise KvTransferError(f"KV read from {who} failed: {e}") from e
            if state == "PROC":
                return i + 1, handle
            self._release_locked(handle)
            if state != "DONE":
                raise KvTransferError(f"KV read from {who} failed: NIXL state {state}")
        return end, None

    def _check(self, handle: Any) -> str:
        with self._lock:
            if self._agent is None:
                return "ERR"
            try:
                return str(self._agent.check_xfer_state(handle))
            except Exception as e:
                log.debug("check_xfer_state: %s", e)
                return "ERR"

    @staticmethod
    def _timeout(instance_id: str, timeout: float) -> KvTransferError:
        return KvTransferError(f"KV read from {instance_id} timed out after {timeout:.1f}s", code=ErrorCode.TIMEOUT)

    async def _wait_done(self, instance_id: str, handle: Any, deadline: float, timeout: float) -> None:
        delay, state = 0.0, "PROC"
        while state == "PROC":
            if time.perf_counter() >= deadline:
                raise self._timeout(instance_id, timeout)
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, 50e-6), 1e-3)  # sleep(0) first, then 50 µs doubling up to 1 ms
            state = await self._run(self._check, handle)
        if state != "DONE":
            raise KvTransferError(f"KV read from {instance_id} failed: NIXL state {state}")

    def _release_locked(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as e:  # still in flight and not cancellable: NIXL keeps it and frees it later
            log.debug("release_xfer_handle: %s", e)

    def _release(self, handle: Any) -> None:
        with self._lock:
            if self._agent is not None:
                self._release_locked(handle)

    def _release_later(self, fut: asyncio.Future[tuple[int, Any]]) -> None:
        """Posts that finished after their reader gave up: free the in-flight handle on the worker thread."""
        if fut.cancelled() or fut.exception() is not None or self._closed:
            return
        _, handle = fut.result()
        if handle is None:
            return
        try:
            self._executor.submit(self._release, handle)
        except RuntimeError:  # executor shut down by close()
            pass

    def _send_notif(self, agent_name: str, msg: bytes) -> None:
        with self._lock:
            try:
                self._agent.send_notif(agent_name, msg)
            except Exception as e:
                raise KvTransferError(f"cannot notify agent {agent_name}: {e}") from e
