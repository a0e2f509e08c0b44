"""Shared helpers of the KV tier tests: the tiny model, greedy requests, multi-turn chats, and a sink that
replays an engine's KV events into a real router index while checking tier capacities."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
import torch

from dynamo_rt.local.tinymodel import ensure_tiny_model, make_tiny_model
from dynamo_rt.protocol import GenerateRequest, KvEvent, KvEvents, SamplingParams, StopConditions
from dynamo_rt.router import KvIndexer
from tests.conftest import until  # noqa: F401  (the kvbm tests import it from here)
from workers.reference import kvbm
from workers.reference.engine import ReferenceEngine


@pytest.fixture(scope="session")
def tiny() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_seed1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same config.json and tokenizer as ``tiny``, other weights: its KV must never be mixed with tiny's."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-seed1"), seed=1)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2048, (n,), generator=g).tolist()


def req(rid: str, tokens: list[int], max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=tokens, sampling=SamplingParams(temperature=0.0),
                           stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))


async def generate(eng: ReferenceEngine, rid: str, tokens: list[int], max_tokens: int = 8) -> tuple[list[int], int]:
    """(generated tokens, cached_tokens of the first output)."""
    out: list[int] = []
    cached = -1
    async for o in eng.generate(req(rid, tokens, max_tokens)):
        if cached < 0:
            cached = o.cached_tokens
        out += o.token_ids
    return out, cached


async def chat(eng: ReferenceEngine, conversations: int, turns: int, *, tag: str = "") -> list[tuple[list[int], int]]:
    """Multi-turn chats, the turns of all conversations at once: each turn's prompt is the whole history
    (earlier prompts, the model's answers, a new user message)."""
    hist = [prompt(64 + 16 * c, c) for c in range(conversations)]
    outs: list[tuple[list[int], int]] = []
    for t in range(turns):
        res = await asyncio.gather(*(generate(eng, f"{tag}{c}-{t}", hist[c]) for c in range(conversations)))
        for c, (toks, cached) in enumerate(res):
            outs.append((toks, cached))
            hist[c] = hist[c] + toks + prompt(24, 1000 + 10 * c + t)
    return outs


class IndexSink:
    """An engine's event sink feeding a real :class:`KvIndexer` (as the router does), recording any moment
    a tier held more blocks than it has slots."""

    def __init__(self, capacity: dict[str, int], worker: str = "w") -> None:
        self.index = KvIndexer()
        self.capacity = capacity
        self.worker = worker
        self.seq = 0
        self.events: list[KvEvent] = []
        self.overflows: list[str] = []
        self.peak: dict[str, int] = {}

    def __call__(self, events: list[KvEvent]) -> None:
        self.events += events
        assert self.index.apply(KvEvents(instance_id=self.worker, seq=self.seq, events=events))
        self.seq += 1
        for tier, cap in self.capacity.items():
            n = self.index.num_blocks(self.worker, tier)
            self.peak[tier] = max(self.peak.get(tier, 0), n)
            if n > cap:
                self.overflows.append(f"{tier}: {n} > {cap}")

    def blocks(self, tier: str) -> set[int]:
        return self.index.blocks(self.worker, tier)


# ------------------------------------------------------------------------------ tier files, read by hand


def data_offset(path: Path) -> int:
    """Where a tier file's slots start (from its header)."""
    with path.open("rb") as f:
        return int(kvbm._HEADER.unpack(f.read(kvbm._HEADER.size))[7])


def tier_slots(path: Path) -> dict[int, int]:
    """block hash -> slot, for the valid entries of a tier file's index."""
    raw = path.read_bytes()
    slots = kvbm._HEADER.unpack_from(raw)[5]
    out = {}
    for s in range(slots):
        h, _, _, state = struct.unpack_from("<QQII", raw, kvbm.HEADER_BYTES + s * kvbm.ENTRY_BYTES)
        if state == kvbm.VALID:
            out[h] = s
    return out


def flip_byte(path: Path, off: int) -> None:
    with path.open("r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
