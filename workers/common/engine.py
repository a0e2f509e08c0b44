"""The interface between the worker runtime and an engine (reference, mocker, vLLM, SGLang, TRT-LLM).

The runtime (``workers.common.runtime``) owns etcd registration, the NATS endpoint, events and metrics;
an engine only turns :class:`~dynamo_rt.protocol.GenerateRequest` into a stream of :class:`EngineOutput`.
Cancellation is the consumer closing the async iterator (``aclose``) or cancelling the task iterating it:
an engine must free the request's KV blocks in its ``finally``.

Optional abilities are small protocols below the :class:`Engine` one; the runtime checks them with
``isinstance`` (each is ``runtime_checkable``), so mypy checks what an engine declares against what the runtime
uses: :class:`OwnsKvPool` (NIXL hand-off of its own KV pool, ``workers.common.kv_handoff``),
:class:`TieredCache` (host / disk tiers in a router resync), :class:`NamedInstance` (learns its instance id),
:class:`AdvertisesInstance` (extra fields of its instance record), :class:`MultiNodeFollower` (nodes of rank > 0
of a multi-node instance, ``workers.main``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dynamo_rt.protocol import GenerateRequest, KvEvent, KvTransferParams, TokenLogprob


@dataclass(slots=True)
class EngineOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set on the last output: "stop" | "length"
    prompt_tokens: int = 0  # set on the first output
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first output)
    kv_transfer: KvTransferParams | None = None  # prefill-only requests: what decode needs


@dataclass(slots=True)
class EngineLoad:
    active_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    active_decode_blocks: int = 0


@dataclass(slots=True)
class ModelInfo:
    """What the runtime publishes in the model card."""

    name: str
    path: str  # folder with tokenizer.json / tokenizer_config.json (may be "" for a mocker without files)
    context_length: int
    block_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None


KvEventSink = Callable[[list[KvEvent]], None]


@runtime_checkable
class Engine(Protocol):
    info: ModelInfo

    async def start(self) -> None:
        """Load weights / allocate the KV pool. Called once before serving."""

    async def stop(self) -> None:
        """Stop stepping and free resources."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        """Stream outputs for one request. Raise ``dynamo_rt.errors.DynamoError`` subclasses for bad input."""
        ...

    def load(self) -> EngineLoad: ...

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Where the engine reports blocks stored / removed (called from the event loop thread)."""

    def cached_block_hashes(self) -> list[int]:
        """Every block hash the engine holds now (for a router resync)."""
        ...

    async def release_pin(self, pin_id: str) -> bool:
        """Prefill side of disagg: free blocks pinned for a decode worker. False if unknown."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Optional abilities

# Fills the given local blocks with a prefill worker's blocks (raises a DynamoError when it cannot).
KvLoader = Callable[[KvTransferParams, list[int]], Awaitable[None]]


class Device(Protocol):
    """Where a KV pool lives (a ``torch.device``)."""

    @property
    def type(self) -> str: ...

    @property
    def index(self) -> int | None: ...


class KvPoolMemory(Protocol):
    """One contiguous KV pool: ``num_blocks`` blocks of ``block_bytes`` bytes from ``data_ptr()``."""

    @property
    def block_bytes(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def device(self) -> Device: ...

    def data_ptr(self) -> int: ...


@runtime_checkable
class OwnsKvPool(Protocol):
    """An engine whose KV pool the runtime registers with NIXL (prefill side) and whose decode requests pull
    their prompt's blocks through ``kv_loader`` (set by the runtime). ``pool`` is None until started."""

    kv_loader: KvLoader | None

    @property
    def pool(self) -> KvPoolMemory | None: ...


@runtime_checkable
class CountsPins(Protocol):
    """A prefill engine that counts the pins it freed by timeout, no decode worker having released them (the
    runtime exports the count)."""

    @property
    def pins_expired(self) -> int: ...


@runtime_checkable
class TieredCache(Protocol):
    """An engine with KV tiers below its pool (host memory, disk), keyed by the same block hashes."""

    def cached_block_hashes_by_tier(self) -> dict[str, list[int]]:
        """Tier name -> every block hash it holds (for a router resync)."""
        ...


@runtime_checkable
class NamedInstance(Protocol):
    """An engine that puts its instance id into the ``KvTransferParams`` it returns (set by the runtime)."""

    instance_id: str


@runtime_checkable
class AdvertisesInstance(Protocol):
    """An engine with fields of its own for its instance record (``InstanceRecord.extra``)."""

    @property
    def instance_extra(self) -> dict[str, Any]: ...


@runtime_checkable
class MultiNodeFollower(Protocol):
    """An engine that runs on every node of a multi-node instance: nodes of rank > 0 only run the engine's
    workers for the leader, until killed; they serve no requests and register nothing."""

    def run_headless(self) -> None: ...
