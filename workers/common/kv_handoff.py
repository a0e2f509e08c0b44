"""Wires an engine's KV pool to NIXL: publish it (prefill side), pull from peers (decode side).

An engine takes part when it is :class:`~workers.common.engine.OwnsKvPool` (the reference engine is; vLLM /
SGLang / TRT-LLM use their own hand-off and the mocker simulates it). The pool is registered once; its
:class:`~dynamo_rt.protocol.NixlRecord` goes to ``/{ns}/nixl/{instance_id}``. A decode request carrying
``KvTransferParams`` makes the engine call the loader with its freshly allocated local blocks: the loader looks
the prefill worker's record up in etcd (once per peer), READs the blocks (one descriptor per contiguous run)
and returns; a failure makes the engine prefill locally, so the request still completes. The prefill pin is
released by the runtime after the first token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TypeGuard

import msgspec

from dynamo_rt import errors
from dynamo_rt.discovery import Registry, nixl_key
from dynamo_rt.protocol import KvTransferParams, NixlRecord
from workers.common.engine import Engine, KvPoolMemory, OwnsKvPool

log = logging.getLogger(__name__)

PULL_TIMEOUT = 10.0


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
    def __init__(self, engine: OwnsKvPool, registry: Registry) -> None:
        from dynamo_rt.kv import KvTransfer

        pool: KvPoolMemory | None = engine.pool
        if pool is None:
            raise errors.KvTransferError("the engine has no KV pool yet (start it first)")
        self.engine = engine
        self.registry = registry
        memory = "VRAM" if pool.device.type == "cuda" else "DRAM"
        self.kt = KvTransfer(f"{registry.namespace}-{registry.instance_id}", memory=memory,
                             device_id=pool.device.index or 0, progress_thread=owner_must_progress())
        self.record = self.kt.register_pool(pool.data_ptr(), pool.block_bytes, pool.num_blocks)
        self.pulls = 0
        self.failures = 0

    @staticmethod
    def supported(engine: Engine) -> TypeGuard[OwnsKvPool]:
        """The engine owns a KV pool, allocated by now (call after ``start``)."""
        return isinstance(engine, OwnsKvPool) and engine.pool is not None

    async def start(self) -> None:
        await self.registry.register_nixl(self.record)
        self.engine.kv_loader = self.load
        log.info("KV pool registered with NIXL: %d blocks of %d bytes (%s)", self.record.num_blocks,
                 self.record.block_bytes, self.record.memory)

    async def _remote(self, instance_id: str) -> None:
        if self.kt.has_remote(instance_id):
            return
        values, _rev = await self.registry.get_prefix(nixl_key(self.registry.namespace, instance_id))
        raw = next(iter(values.values()), None)
        if raw is None:
            raise errors.KvTransferError(f"prefill worker {instance_id} has no NIXL record (it left)")
        rec = msgspec.json.decode(raw, type=NixlRecord)
        self.kt.add_remote(instance_id, rec)

    async def load(self, params: KvTransferParams, local_block_ids: list[int]) -> None:
        """The engine's ``kv_loader``: fill ``local_block_ids`` with the prefill worker's blocks."""
        try:
            await self._remote(params.instance_id)
            n = min(len(params.block_ids), len(local_block_ids))
            stats = await self.kt.read_blocks(params.instance_id, params.block_ids[:n], local_block_ids[:n],
                                              timeout=PULL_TIMEOUT)
            self.pulls += 1
            log.debug("pulled %d blocks (%d bytes, %d descriptors) from %s in %.2f ms", n, stats.bytes,
                      stats.descriptors, params.instance_id, stats.seconds * 1e3)
        except errors.DynamoError:
            self.failures += 1
            self.kt.remove_remote(params.instance_id)  # a restarted peer gets a fresh look-up
            raise

    def close(self) -> None:
        self.engine.kv_loader = None
        self.kt.close()
