"""Wires an engine's KV pool to NIXL: publish it (prefill side), pull from peers (decode side), count both.

An engine takes part when it is :class:`~workers.common.engine.OwnsKvPool` (the reference engine is; vLLM /
SGLang / TRT-LLM use their own hand-off and the mocker simulates it). The pool is registered once; its
:class:`~dynamo_rt.protocol.NixlRecord` goes to ``/{ns}/nixl/{instance_id}``. A decode request carrying
``KvTransferParams`` makes the engine call the loader with its freshly allocated local blocks: the loader looks
the prefill worker's record up in etcd (once per peer), READs the blocks (one descriptor per contiguous run)
and returns; a failure makes the engine prefill locally, so the request still completes. The loader releases
the prefill worker's pin once the read is over (done or failed), never before: the engine emits the first
token before it pulls.

Every pull is counted on the worker's metrics (:class:`~workers.common.runtime.WorkerMetrics`): pulls, bytes,
read time, failures by reason and the local-prefill fallbacks they cause. With ``verify_checksum`` the prefill
side puts a CRC-32 of every pinned block into the parameters (``opaque["block_crc32"]``, computed from its
pool) and the decode side checks the blocks it received against them: a mismatch is a failed pull.
"""

from __future__ import annotations

import ctypes
import logging
import os
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, TypeGuard

import msgspec

from dynamo_rt import errors, faults
from dynamo_rt.discovery import Registry, nixl_key
from dynamo_rt.protocol import KvTransferParams, NixlRecord
from workers.common.engine import Engine, KvPoolMemory, OwnsKvPool

if TYPE_CHECKING:
    from workers.common.runtime import WorkerMetrics

log = logging.getLogger(__name__)

PULL_TIMEOUT = 10.0
CHECKSUM_KEY = "block_crc32"  # KvTransferParams.opaque: one CRC-32 per block id, same order

PullOutcome = Literal["pulled", "failed", "cancelled"]
ReleasePin = Callable[[str, str], None]  # (prefill instance id, pin id)


def owner_must_progress(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this worker's NIXL agent needs its progress thread: when ``UCX_TLS`` (which UCX itself reads)
    leaves out CMA, a peer's READ is served by this process's UCX worker (TCP emulates the GET with active
    messages), and nothing else here progresses it between requests, so the read would time out. That is the
    case between containers or pods (no shared PID namespace); on one host UCX's default CMA reads are
    one-sided and the thread would only cost CPU."""
    tls = env.get("UCX_TLS", "")
    # "^x,y" excludes transports (CMA stays available); "all" and "sm" include CMA.
    return bool(tls) and not tls.startswith("^") and not {"cma", "sm", "all"} & set(tls.split(","))


class KvHandoff:
    def __init__(self, engine: OwnsKvPool, registry: Registry, *, metrics: WorkerMetrics | None = None,
                 model: str = "", release: ReleasePin | None = None, verify_checksum: bool = False,
                 fault_corrupt_pulls: int = 0) -> None:
        from dynamo_rt.kv import KvTransfer

        pool: KvPoolMemory | None = engine.pool
        if pool is None:
            raise errors.KvTransferError("the engine has no KV pool yet (start it first)")
        self.engine = engine
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.model = model
        self.release = release
        self.verify_checksum = verify_checksum
        if verify_checksum and pool.device.type != "cpu":
            # Hashing device memory would copy every block to the host: not worth it outside tests.
            log.warning("--kv-verify-checksum is for host-memory KV pools; not checking this %s pool",
                        pool.device.type)
            self.verify_checksum = False
        # Test-only fault hook: corrupt the first received block of the next N pulls (after the read, before
        # the check), as a bad transfer would.
        self.fault_corrupt_pulls = fault_corrupt_pulls
        memory = "VRAM" if pool.device.type == "cuda" else "DRAM"
        self.kt = KvTransfer(f"{registry.namespace}-{registry.instance_id}", memory=memory,
                             device_id=pool.device.index or 0, progress_thread=owner_must_progress())
        self.record = self.kt.register_pool(pool.data_ptr(), pool.block_bytes, pool.num_blocks)
        self.pulls = 0
        self.failures = 0
        self._outcomes: dict[str, PullOutcome] = {}  # pin id -> how its pull ended, until the runtime takes it

    @staticmethod
    def supported(engine: Engine) -> TypeGuard[OwnsKvPool]:
        """The engine owns a KV pool, allocated by now (call after ``start``)."""
        return isinstance(engine, OwnsKvPool) and engine.pool is not None

    async def start(self) -> None:
        await self.registry.register_nixl(self.record)
        self.engine.kv_loader = self.load
        log.info("KV pool registered with NIXL: %d blocks of %d bytes (%s)%s", self.record.num_blocks,
                 self.record.block_bytes, self.record.memory, ", checksums on" if self.verify_checksum else "")

    # ------------------------------------------------------------------------------------------- checksums

    def _block(self, block_id: int) -> ctypes.Array[ctypes.c_char]:
        """One block of the (host) pool, in place."""
        n = self.pool.block_bytes
        return (ctypes.c_char * n).from_address(self.pool.data_ptr() + block_id * n)

    def checksums(self, block_ids: list[int]) -> list[int]:
        return [zlib.crc32(self._block(b)) for b in block_ids]

    def add_checksums(self, params: KvTransferParams) -> None:
        """Prefill side: the pinned blocks' CRC-32s go with the parameters (the blocks are pinned, so no step
        writes them until the decode worker has read them)."""
        if self.verify_checksum:
            params.opaque[CHECKSUM_KEY] = self.checksums(params.block_ids)

    def _verify(self, params: KvTransferParams, local_ids: list[int]) -> None:
        sent = params.opaque.get(CHECKSUM_KEY)
        if sent is None:
            log.debug("no block checksums from %s: the prefill worker does not compute them", params.instance_id)
            return
        for i, (want, got) in enumerate(zip(sent, self.checksums(local_ids), strict=False)):
            if want != got:
                raise _ChecksumMismatch(f"block {i} of {len(local_ids)} from {params.instance_id} has CRC-32 "
                                        f"{got:#010x}, the prefill worker sent {want:#010x}")

    def _corrupt(self, block_id: int) -> None:
        """Inverts the block's first 16 bytes (sign and exponent bits included: used, they would show)."""
        head = memoryview(self._block(block_id)).cast("B")[:16]
        head[:] = bytes(b ^ 0xFF for b in head)

    # ------------------------------------------------------------------------------------------- pulls

    async def _remote(self, instance_id: str) -> None:
        if self.kt.has_remote(instance_id):
            return
        values, _rev = await self.registry.get_prefix(nixl_key(self.registry.namespace, instance_id))
        raw = next(iter(values.values()), None)
        if raw is None:
            raise _PeerGone(f"prefill worker {instance_id} has no NIXL record (it left)")
        rec = msgspec.json.decode(raw, type=NixlRecord)
        self.kt.add_remote(instance_id, rec)

    async def load(self, params: KvTransferParams, local_block_ids: list[int]) -> None:
        """The engine's ``kv_loader``: fill ``local_block_ids`` with the prefill worker's blocks."""
        outcome: PullOutcome = "cancelled"
        m = self.metrics
        try:
            await self._remote(params.instance_id)
            if faults.enabled:
                await faults.hit("worker.nixl_read", params.pin_id)
            n = min(len(params.block_ids), len(local_block_ids))
            local = local_block_ids[:n]
            stats = await self.kt.read_blocks(params.instance_id, params.block_ids[:n], local,
                                              timeout=PULL_TIMEOUT)
            if self.fault_corrupt_pulls > 0 and local:
                self.fault_corrupt_pulls -= 1
                self._corrupt(local[0])
            if self.verify_checksum:
                self._verify(params, local)
            self.pulls += 1
            outcome = "pulled"
            if m is not None:
                m.kv_pulls.labels(self.model).inc()
                m.kv_pulled_bytes.labels(self.model).inc(stats.bytes)
                m.kv_pull_seconds.labels(self.model).observe(stats.seconds)
            log.debug("pulled %d blocks (%d bytes, %d descriptors) from %s in %.2f ms", n, stats.bytes,
                      stats.descriptors, params.instance_id, stats.seconds * 1e3)
        except errors.DynamoError as exc:
            outcome = "failed"
            self.failures += 1
            if m is not None:  # the engine prefills locally now (its kv_loader contract)
                m.kv_pull_failures.labels(self.model, _reason(exc)).inc()
                m.kv_fallbacks.labels(self.model).inc()
            self.kt.remove_remote(params.instance_id)  # a restarted peer gets a fresh look-up
            raise
        finally:
            if params.pin_id:
                self._outcomes[params.pin_id] = outcome
                if self.release is not None:
                    self.release(params.instance_id, params.pin_id)  # the read is over either way

    def outcome(self, pin_id: str) -> PullOutcome | None:
        """How the pull for ``pin_id`` ended, if it did (kept for :meth:`take_outcome`)."""
        return self._outcomes.get(pin_id)

    def take_outcome(self, pin_id: str) -> PullOutcome | None:
        """How the pull for ``pin_id`` ended (None: the engine never called the loader for it); forgets it."""
        return self._outcomes.pop(pin_id, None)

    def close(self) -> None:
        self.engine.kv_loader = None
        self.kt.close()


class _PeerGone(errors.KvTransferError):
    reason = "peer_gone"


class _ChecksumMismatch(errors.KvTransferError):
    reason = "checksum"


def _reason(exc: errors.DynamoError) -> str:
    """The failure reason label: peer_gone, checksum or read (any NIXL error or timeout)."""
    return exc.reason if isinstance(exc, (_PeerGone, _ChecksumMismatch)) else "read"
