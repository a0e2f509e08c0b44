"""Engine KV cache events -> our :class:`~dynamo_rt.protocol.KvEvent` with our chained block hashes.

Place: the vLLM, SGLang and TensorRT-LLM adapters (``workers.{vllm,sglang,trtllm}.engine``) feed their engine's
KV events through :class:`KvHashMap`; the result goes to the runtime's KV event sink, so the router's index
holds the same hashes for these workers as for every other engine. vLLM and SGLang publish their events on a
ZMQ PUB socket; :class:`ZmqEventSubscriber` is the SUB side both use.

The engines' own block hashes are not ours, but a "stored" event carries the blocks' token ids and the parent
block's engine hash (vLLM 0.32.0 ``vllm/distributed/kv_events.py`` and SGLang 0.5.23
``sglang/srt/disaggregation/kv_events.py``: ``BlockStored(block_hashes, parent_block_hash, token_ids,
block_size, ...)``; TensorRT-LLM 1.x: ``{"type": "stored", "parent_hash", "blocks": [{"block_hash", "tokens"}]}``).
So our hash of each stored block is :func:`dynamo_rt.kvhash.hash_block` of its tokens chained from the
parent's *our* hash, which this map remembers per engine hash; "removed" events carry engine hashes only and
are looked up here.

Blocks whose hash covers something besides tokens (LoRA adapter, multimodal inputs, cache salt), blocks of a
KV cache group other than the first, and children of a block this map never saw are left out: the router just
does not know them (a missed cache hit, never a wrong one). Engine event objects are read by attribute, so
this module imports no engine.

:class:`KvEventFaults` is a test-only fault injector on the runtime's publishing side (every engine): with
``DYN_TEST_KV_EVENTS_FAULT="drop=0.1,dup=0.1,reorder=0.1,seed=7"`` outgoing batches are dropped, sent twice
or held back behind the next one (bench/chaos.py checks that the router's index still converges).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from dynamo_rt import errors
from dynamo_rt.kvhash import ROOT_HASH, hash_block
from dynamo_rt.protocol import KvEvent

log = logging.getLogger(__name__)
T = TypeVar("T")
FAULT_ENV = "DYN_TEST_KV_EVENTS_FAULT"

# An engine's storage medium -> our tier. None / "GPU": the engine's own KV pool (vLLM says GPU on CPU hosts too).
_TIERS = {None: "primary", "GPU": "primary", "CPU": "host", "CPU_PINNED": "host", "STORAGE": "disk", "DISK": "disk",
          "EXTERNAL": "disk"}


def tier_of(medium: str | None) -> str:
    return _TIERS.get(medium, "primary")


class KvHashMap:
    """Translates one engine instance's KV events; knows which of our hashes each tier holds."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._ours: dict[Hashable, int] = {}  # engine block hash -> our hash
        self._tiers: dict[Hashable, set[str]] = {}  # engine block hash -> tiers holding the block
        self._skipped = 0

    def cached(self, tier: str = "primary") -> list[int]:
        """Our hashes of every block ``tier`` holds now (for a router resync)."""
        return [self._ours[h] for h, tiers in self._tiers.items() if tier in tiers]

    # ------------------------------------------------------------------ one event

    def stored(self, block_hashes: Sequence[Hashable], parent: Hashable | None, token_ids: Sequence[int], *,
               tier: str = "primary", plain: Sequence[bool] | None = None) -> KvEvent | None:
        """Blocks ``block_hashes`` (engine hashes; ``token_ids`` holds their tokens, ``block_size`` each) were
        stored after the block whose engine hash is ``parent`` (None: at the start of a sequence). ``plain[i]``
        False: block i's hash covers more than tokens (it and its children are left out)."""
        if parent is None:
            parent_ours: int | None = None
            chain = ROOT_HASH
        elif parent in self._ours:
            parent_ours = chain = self._ours[parent]
        else:
            self._skip("a parent block never reported")
            return None
        bs = self.block_size
        out: list[int] = []
        for i, eh in enumerate(block_hashes):
            if plain is not None and i < len(plain) and not plain[i]:
                break
            tokens = token_ids[i * bs : (i + 1) * bs]
            if len(tokens) != bs:
                break
            known = self._ours.get(eh)
            chain = known if known is not None else hash_block(chain, tokens)
            self._ours[eh] = chain
            self._tiers.setdefault(eh, set()).add(tier)
            out.append(chain)
        if not out:
            return None
        return KvEvent(kind="stored", block_hashes=out, parent_hash=parent_ours, tier=tier)

    def removed(self, block_hashes: Sequence[Hashable], *, tier: str = "primary") -> KvEvent | None:
        out: list[int] = []
        for eh in block_hashes:
            tiers = self._tiers.get(eh)
            if tiers is None or tier not in tiers:
                continue
            out.append(self._ours[eh])
            tiers.discard(tier)
            if not tiers:
                del self._tiers[eh]
                del self._ours[eh]
        if not out:
            return None
        return KvEvent(kind="removed", block_hashes=out, tier=tier)

    def cleared(self) -> KvEvent:
        self._ours.clear()
        self._tiers.clear()
        return KvEvent(kind="cleared")

    # ------------------------------------------------------------------ vLLM / SGLang event objects

    def translate(self, events: Sequence[Any]) -> list[KvEvent]:
        """vLLM / SGLang ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` objects -> our events."""
        out: list[KvEvent] = []
        for ev in events:
            kind = type(ev).__name__
            e: KvEvent | None = None
            if getattr(ev, "group_idx", None) not in (None, 0):
                continue  # a second KV cache group (hybrid models): not what the router indexes
            if kind == "BlockStored":
                if (getattr(ev, "lora_name", None) is not None or getattr(ev, "lora_id", None)
                        or getattr(ev, "cache_salt", None) is not None):
                    continue
                if ev.block_size != self.block_size:
                    self._skip(f"block size {ev.block_size} != {self.block_size}")
                    continue
                extra = getattr(ev, "extra_keys", None) or []
                e = self.stored(ev.block_hashes, ev.parent_block_hash, ev.token_ids,
                                tier=tier_of(getattr(ev, "medium", None)), plain=[not x for x in extra])
            elif kind == "BlockRemoved":
                e = self.removed(ev.block_hashes, tier=tier_of(getattr(ev, "medium", None)))
            elif kind == "AllBlocksCleared":
                e = self.cleared()
            if e is not None:
                out.append(e)
        return out

    def _skip(self, why: str) -> None:
        self._skipped += 1
        if self._skipped == 1 or self._skipped % 1000 == 0:
            log.info("KV events: %d stored event(s) left out of the router's index (%s)", self._skipped, why)


class ZmqEventSubscriber:
    """The SUB end of a vLLM / SGLang KV event publisher, bound on loopback before the engine starts.

    Both engines' publishers *connect* to an endpoint without a wildcard host (``tcp://127.0.0.1:PORT``), so
    binding here needs no free port guessed for the engine, and the engine may start after us. Each message
    is ``(topic, seq, payload)`` with a msgpack ``EventBatch`` payload (``ts, events, rank``).
    """

    def __init__(self, hash_map: KvHashMap, data_parallel_size: int = 1) -> None:
        self.hash_map = hash_map
        self._dp = max(1, data_parallel_size)
        self._sock: Any = None
        self._task: asyncio.Task[None] | None = None
        self.endpoint = ""

    def bind(self) -> str:
        """Bind a run of ``data_parallel_size`` consecutive loopback ports (the engines add the data-parallel
        rank to the port) and return the first one's endpoint."""
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        for _ in range(20):
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            try:
                for r in range(1, self._dp):
                    sock.bind(f"tcp://127.0.0.1:{port + r}")
            except zmq.ZMQError:
                sock.close(linger=0)
                continue
            self._sock = sock
            self.endpoint = f"tcp://127.0.0.1:{port}"
            return self.endpoint
        raise errors.Unavailable("no free run of loopback ports for the engine's KV events")

    def start(self, decode: Callable[[bytes], Any], sink: Callable[[], Callable[[list[KvEvent]], None] | None]) -> None:
        """Decode every batch with ``decode`` (the engine's own msgspec types: passed here, not at bind time,
        because importing the engine's module is slow and the adapters bind before the engine is built),
        translate it and hand it to ``sink()`` (looked up per batch: the runtime may change it)."""
        self._task = asyncio.create_task(self._run(decode, sink), name="kv-events")

    async def _run(self, decode: Callable[[bytes], Any],
                   sink: Callable[[], Callable[[list[KvEvent]], None] | None]) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                batch = decode(frames[-1])
            except Exception as exc:  # an undecodable batch is logged and skipped, never fatal
                log.warning("undecodable KV event batch: %s", exc)
                continue
            events = self.hash_map.translate(batch.events)
            target = sink()
            if events and target is not None:
                target(events)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class KvEventFaults(Generic[T]):
    """Test-only: what to publish for each outgoing KV event batch (none: dropped; two: duplicated; a batch
    held back goes out after the next one: reordered). Seeded, so a chaos run repeats."""

    def __init__(self, drop: float = 0.0, dup: float = 0.0, reorder: float = 0.0, seed: int = 0) -> None:
        self.drop, self.dup, self.reorder = drop, dup, reorder
        self._rng = random.Random(seed)
        self._held: T | None = None
        self.counts = {"drop": 0, "dup": 0, "reorder": 0}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> KvEventFaults[T] | None:
        spec = env.get(FAULT_ENV)
        if not spec:
            return None
        kv = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
        log.warning("test-only KV event faults on: %s", spec)
        return cls(float(kv.get("drop", 0)), float(kv.get("dup", 0)), float(kv.get("reorder", 0)),
                   int(kv.get("seed", 0)))

    def outgoing(self, batch: T) -> list[T]:
        r = self._rng.random()
        if r < self.drop:
            self.counts["drop"] += 1
            return []
        if r < self.drop + self.reorder and self._held is None:
            self.counts["reorder"] += 1
            self._held = batch
            return []
        out = [batch, batch] if r >= 1.0 - self.dup else [batch]
        self.counts["dup"] += len(out) - 1
        if self._held is not None:
            out.append(self._held)
            self._held = None
        return out
