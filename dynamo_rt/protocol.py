"""Every message that crosses a process boundary, in one place.

Three planes use these structs:

* discovery (etcd, JSON values): :class:`InstanceRecord`, :class:`ModelCard`, :class:`NixlRecord`;
* the request plane (NATS, msgpack): :class:`RequestEnvelope` wraps a :class:`GenerateRequest`; the worker
  answers with a stream of :class:`StreamFrame` (tokens, then one final frame, or an error frame);
* the event plane (NATS, msgpack): :class:`KvEvents` and :class:`LoadMetrics`.

Structs are ``msgspec.Struct`` so encoding is a C call and no per-message validation runs in Python.
Tagged unions are dispatched by ``type`` (``tag=True``).
"""

from __future__ import annotations

from array import array
from enum import StrEnum
from typing import Any

import msgspec

PROTOCOL_VERSION = 1


class Mode(StrEnum):
    AGG = "agg"  # prefill and decode on the same worker
    PREFILL = "prefill"  # runs the prompt, returns the first token and pinned KV blocks
    DECODE = "decode"  # pulls KV from a prefill worker and continues generating


class FinishReason(StrEnum):
    STOP = "stop"  # a stop token id (EOS or requested) was produced
    LENGTH = "length"  # max_tokens reached (or the context is full)
    CANCELLED = "cancelled"  # the caller cancelled; never shown to a client as a finish_reason


# --------------------------------------------------------------------------------------------- discovery


class InstanceRecord(msgspec.Struct, kw_only=True):
    """Value of ``/{ns}/instances/{component}/{endpoint}/{instance_id}``."""

    instance_id: str  # 16 hex digits, stable for the life of the process
    namespace: str
    component: str  # "backend" for workers
    endpoint: str  # "generate"
    subject: str  # NATS subject the worker serves
    mode: Mode
    engine: str
    model: str  # served model name
    kv_block_size: int = 16
    max_context: int = 0
    host: str = ""
    pid: int = 0
    # Opaque, engine-specific hand-off info (SGLang bootstrap host/port, vLLM side-channel, ...)
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


class ModelCard(msgspec.Struct, kw_only=True):
    """Value of ``/{ns}/models/{model_name}/{instance_id}``: all the frontend needs to serve the model."""

    name: str
    context_length: int
    kv_block_size: int
    # NATS object-store bucket + object names holding tokenizer.json, tokenizer_config.json, ...
    tokenizer_bucket: str
    tokenizer_files: dict[str, str]  # file name -> object name
    tokenizer_digest: str  # sha256 over the files, lets the frontend cache per content
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    bos_token_id: int | None = None
    created: int = 0
    # Output parsers the model's chat format needs (frontend/parsers/ names; "" = none); the frontend's
    # --tool-call-parser / --reasoning-parser override them.
    tool_call_parser: str = ""
    reasoning_parser: str = ""


class NixlRecord(msgspec.Struct, kw_only=True):
    """Value of ``/{ns}/nixl/{instance_id}``: NIXL agent metadata and KV pool layout."""

    agent_name: str
    agent_metadata: bytes  # nixl get_agent_metadata(), base64 in JSON
    memory: str  # "DRAM" or "VRAM"
    device_id: int
    base_addr: int
    block_bytes: int
    num_blocks: int
    layout: str = "block-major"  # one block = one contiguous region across all layers


# --------------------------------------------------------------------------------------------- requests


class GuidedDecoding(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A constraint on the output, compiled to a token mask per step by the engine.

    ``kind`` is one of "json" (``spec`` a JSON schema, as JSON text), "json_object" (any JSON object),
    "regex", "choice" (``choices``) or "grammar" (``spec`` an EBNF / Lark grammar), or "structural_tag" (``spec``
    xgrammar's structural-tag JSON: how tool_choice required / named is enforced, frontend/structured.py).
    """

    kind: str
    spec: str = ""
    choices: list[str] = msgspec.field(default_factory=list)


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's logprob plus top k
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit before sampling
    guided: GuidedDecoding | None = None  # grammar-constrained decoding (structured outputs)


class StopConditions(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = msgspec.field(default_factory=list)  # in addition to the model's EOS
    ignore_eos: bool = False


class KvTransferParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a prefill worker hands to a decode worker (our own engines; other engines pass ``opaque``)."""

    instance_id: str = ""  # prefill worker
    agent_name: str = ""
    block_ids: list[int] = msgspec.field(default_factory=list)
    num_tokens: int = 0  # prompt tokens whose KV the blocks hold
    first_token: int = -1
    pin_id: str = ""  # what to release on the prefill side
    opaque: dict[str, Any] = msgspec.field(default_factory=dict)  # engine-specific (vLLM/SGLang/TRT-LLM)


class GenerateRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stop: StopConditions = msgspec.field(default_factory=StopConditions)
    model: str = ""
    # Prefill-only request (disagg): run the prompt, produce one token, pin the blocks.
    prefill_only: bool = False
    # Decode request (disagg): pull these blocks instead of prefilling.
    kv_transfer: KvTransferParams | None = None
    annotations: list[str] = msgspec.field(default_factory=list)
    # Replay after a migration: the last ``output_offset`` entries of ``token_ids`` are output the request
    # already produced on another worker. The worker treats them as output (penalties count them, a
    # grammar is advanced over them, the seeded random stream resumes at position ``output_offset``).
    output_offset: int = 0
    # Tenant salt (hex), derived by the frontend from the authenticated API key; it enters every block
    # hash so one tenant's cached prefix is never a hit for another.
    cache_salt: str = ""


class RequestEnvelope(msgspec.Struct, kw_only=True):
    """What goes on the worker's subject. ``reply_to`` is the per-request inbox the frames stream to."""

    request_id: str
    reply_to: str
    deadline: float  # unix seconds; the worker abandons the request past it
    payload: bytes  # msgpack of the endpoint's request struct (GenerateRequest for "generate")
    version: int = PROTOCOL_VERSION
    # Where the worker may send this caller's frames in batches (:class:`FrameBatch`): frames of several
    # requests to one caller that are ready in the same event-loop turn (one engine step) travel as one NATS
    # message. Empty: one message per frame to ``reply_to`` (what a caller that predates batches gets).
    frames_to: str = ""


class CancelRequest(msgspec.Struct, kw_only=True):
    """Sent to ``{subject}.cancel``: the worker cancels the handler task of ``request_id``."""

    request_id: str


# --------------------------------------------------------------------------------------------- responses


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)


class Data(msgspec.Struct, tag="d", array_like=True, omit_defaults=True):
    """One or more payload items (usually token ids)."""

    seq: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    payload: bytes = b""  # for endpoints other than generate


class Final(msgspec.Struct, tag="f", array_like=True, omit_defaults=True):
    """The last frame of a successful stream."""

    seq: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    kv_transfer: KvTransferParams | None = None  # set by a prefill-only request


class Error(msgspec.Struct, tag="e", array_like=True, omit_defaults=True):
    """A handler failure, carried to the caller as a typed error, never as silence."""

    seq: int
    code: str  # see dynamo_rt.errors.ErrorCode
    message: str


class Heartbeat(msgspec.Struct, tag="h", array_like=True):
    """Sent while a request is alive but has nothing to say (a long prefill), so the caller can tell a
    slow worker from a dead one."""

    seq: int


StreamFrame = Data | Final | Error | Heartbeat

# Frames for several requests of one caller, each with its request's ``reply_to``, in send order; sent to the
# envelope's ``frames_to``.
FrameBatch = list[tuple[str, StreamFrame]]


# --------------------------------------------------------------------------------------------- events


class KvEvent(msgspec.Struct, array_like=True, omit_defaults=True):
    kind: str  # "stored" | "removed" | "cleared"
    block_hashes: list[int] = msgspec.field(default_factory=list)
    parent_hash: int | None = None  # for "stored": the hash of the block before the first one
    tier: str = "primary"  # "primary" | "host" | "disk"


class KvEvents(msgspec.Struct, kw_only=True):
    """Published on ``{ns}.kv_events.{model}``; ``seq`` lets a router detect gaps and resync."""

    instance_id: str
    seq: int
    events: list[KvEvent]


class LoadMetrics(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Published on ``{ns}.load.{model}`` about once a second and on every big change."""

    instance_id: str
    mode: str = "agg"
    active_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    active_decode_blocks: int = 0
    ts: float = 0.0


# --------------------------------------------------------------------------------------------- codecs

def _enc_hook(obj: object) -> object:
    # Token ids held as array("i") (the frontend keeps prompts so: no list of int objects per request for the
    # garbage collector to walk) go on the wire as the msgpack array of ints a list[int] field reads.
    if isinstance(obj, array):
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_enc = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
encode = _enc.encode
_frame_dec = msgspec.msgpack.Decoder(StreamFrame)  # type: ignore[arg-type]
_batch_dec = msgspec.msgpack.Decoder(FrameBatch)
_env_dec = msgspec.msgpack.Decoder(RequestEnvelope)
_gen_dec = msgspec.msgpack.Decoder(GenerateRequest)
_cancel_dec = msgspec.msgpack.Decoder(CancelRequest)
_kv_dec = msgspec.msgpack.Decoder(KvEvents)
_load_dec = msgspec.msgpack.Decoder(LoadMetrics)


def decode_frame(data: bytes) -> StreamFrame:
    return _frame_dec.decode(data)  # type: ignore[no-any-return]


def decode_frame_batch(data: bytes) -> FrameBatch:
    return _batch_dec.decode(data)


def decode_envelope(data: bytes) -> RequestEnvelope:
    return _env_dec.decode(data)


def decode_generate(data: bytes) -> GenerateRequest:
    return _gen_dec.decode(data)


def decode_cancel(data: bytes) -> CancelRequest:
    return _cancel_dec.decode(data)


def decode_kv_events(data: bytes) -> KvEvents:
    return _kv_dec.decode(data)


def decode_load(data: bytes) -> LoadMetrics:
    return _load_dec.decode(data)


def to_json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def from_json(data: bytes | str, typ: type[Any]) -> Any:
    return msgspec.json.decode(data, type=typ)
