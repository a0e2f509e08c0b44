"""The interface between the worker runtime and an engine (reference, mocker, vLLM, SGLang, TRT-LLM).

The runtime (``workers.common.runtime``) owns etcd registration, the NATS endpoint, events and metrics;
an engine only turns :class:`~dynamo_rt.protocol.GenerateRequest` into a stream of :class:`EngineOutput`.
Cancellation is the consumer closing the async iterator (``aclose``) or cancelling the task iterating it:
an engine must free the request's KV blocks in its ``finally``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
