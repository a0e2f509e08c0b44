"""Reference engine disaggregation: prefill-only on one engine, decode on another with the KV copied by a
``kv_loader`` (an in-process copy between the two pools, standing in for NIXL), equal to aggregated
output; pins released on request and by timeout; loader failure and cancellation fall back cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from dynamo_rt import kvhash
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, KvTransferParams, SamplingParams, StopConditions
from tests.conftest import arun
from workers.common.engine import EngineOutput
from workers.reference.engine import KvLoader, ReferenceEngine

LENGTHS = (1, 16, 17, 45)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2048, (n,), generator=g).tolist()


def _req(rid: str, prompt: list[int], max_tokens: int = 12, *, prefill_only: bool = False,
         kv: KvTransferParams | None = None, stop_ids: list[int] | None = None, **sampling: Any
         ) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(request_id=rid, token_ids=prompt, sampling=SamplingParams(**sampling),
                           stop=StopConditions(max_tokens=max_tokens, ignore_eos=True,
                                               stop_token_ids=stop_ids or []),
                           prefill_only=prefill_only, kv_transfer=kv)


async def _outs(eng: ReferenceEngine, req: GenerateRequest) -> list[EngineOutput]:
    return [o async for o in eng.generate(req)]


def _toks(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def copy_loader(src: ReferenceEngine, dst: ReferenceEngine, calls: list[int] | None = None) -> KvLoader:
    """What the NIXL READ does, as a tensor copy: remote block i -> local block i, whole blocks."""
    async def load(params: KvTransferParams, local: list[int]) -> None:
        assert src.pool is not None and dst.pool is not None
        assert len(local) == len(params.block_ids)
        dst.pool.tensor[torch.tensor(local)] = src.pool.tensor[torch.tensor(params.block_ids)]
        if calls is not None:
            calls.append(len(local))
    return load


async def _prefill(eng: ReferenceEngine, req: GenerateRequest) -> EngineOutput:
    outs = await _outs(eng, msgspec.structs.replace(req, prefill_only=True))
    assert len(outs) == 1
    return outs[0]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_tiny_model()


def _engines(tiny: Path, fn: Any, n: int = 3, **kw: Any) -> Any:
    async def main() -> Any:
        engs = [ReferenceEngine(tiny, num_blocks=64, **kw) for _ in range(n)]
        for e in engs:
            await e.start()
        try:
            return await fn(*engs)
        finally:
            for e in engs:
                await e.stop()

    return arun(main(), timeout=120)


def test_prefill_then_decode_equals_aggregated(tiny: Path) -> None:
    async def fn(agg: ReferenceEngine, pre: ReferenceEngine, dec: ReferenceEngine) -> None:
        calls: list[int] = []
        dec.kv_loader = copy_loader(pre, dec, calls)
        cases = [(_prompt(n, n), {}) for n in LENGTHS]
        cases.append((_prompt(30, 7), {"temperature": 1.3, "top_k": 40, "seed": 77}))
        cases.append((_prompt(20, 8), {"logprobs": 3}))
        for i, (prompt, sampling) in enumerate(cases):
            req = _req(f"r{i}", prompt, **sampling)
            ref = await _outs(agg, req)
            first = await _prefill(pre, req)
            kt = first.kv_transfer
            assert kt is not None
            assert first.token_ids == [ref[0].token_ids[0]] == [kt.first_token]
            assert first.finish_reason == "length" and first.prompt_tokens == len(prompt)
            assert kt.num_tokens == len(prompt) and len(kt.block_ids) == -(-len(prompt) // 16)
            assert pre.load().kv_blocks_used == len(kt.block_ids)  # pinned
            got = await _outs(dec, msgspec.structs.replace(req, kv_transfer=kt))
            assert _toks(got) == _toks(ref), f"case {i}"
            assert got[-1].finish_reason == ref[-1].finish_reason == "length"
            if "logprobs" in sampling:
                assert [o.logprobs for o in got] == [o.logprobs for o in ref]
            assert await pre.release_pin(kt.pin_id) is True
            assert await pre.release_pin(kt.pin_id) is False
            assert pre.load().kv_blocks_used == 0 and dec.load().kv_blocks_used == 0
            # The loaded prompt blocks are in the decode worker's prefix cache.
            assert set(kvhash.block_hashes(prompt, 16)) <= set(dec.cached_block_hashes())
        assert calls == [-(-len(p) // 16) for p, _ in cases]
        assert await pre.release_pin("no-such-pin") is False

    _engines(tiny, fn)


def test_pin_times_out(tiny: Path) -> None:
    async def fn(pre: ReferenceEngine) -> None:
        first = await _prefill(pre, _req("p", _prompt(40, 1)))
        assert first.kv_transfer is not None
        assert pre.load().kv_blocks_used == 3
        deadline = asyncio.get_running_loop().time() + 10
        while pre.load().kv_blocks_used and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert pre.load().kv_blocks_used == 0
        assert await pre.release_pin(first.kv_transfer.pin_id) is False

    _engines(tiny, fn, n=1, pin_timeout=0.2)


def test_prefill_only_that_completes_pins_nothing(tiny: Path) -> None:
    async def fn(agg: ReferenceEngine, pre: ReferenceEngine) -> None:
        prompt = _prompt(20, 3)
        first_tok = _toks(await _outs(agg, _req("a", prompt, 1)))[0]
        out = await _prefill(pre, _req("s", prompt, 5, stop_ids=[first_tok]))
        assert out.token_ids == [first_tok] and out.finish_reason == "stop" and out.kv_transfer is None
        out = await _prefill(pre, _req("m", prompt, 1))
        assert out.finish_reason == "length" and out.kv_transfer is None
        assert pre.load().kv_blocks_used == 0

    _engines(tiny, fn, n=2)


def test_loader_failure_or_absence_falls_back_to_local_prefill(tiny: Path) -> None:
    async def fn(agg: ReferenceEngine, pre: ReferenceEngine, dec: ReferenceEngine) -> None:
        prompt = _prompt(37, 4)
        req = _req("f", prompt, 10)
        ref = _toks(await _outs(agg, req))

        tries: list[int] = []

        async def broken(params: KvTransferParams, local: list[int]) -> None:
            tries.append(len(local))
            raise ConnectionError("prefill worker is gone")

        for loader in (broken, None):
            dec.kv_loader = loader
            first = await _prefill(pre, req)
            assert first.kv_transfer is not None
            got = _toks(await _outs(dec, msgspec.structs.replace(req, kv_transfer=first.kv_transfer)))
            assert got == ref
            assert dec.load().kv_blocks_used == 0
            assert await pre.release_pin(first.kv_transfer.pin_id)
        assert tries == [3]  # the broken loader was tried once; without a loader nothing was
        # A transfer that does not match the prompt is not loaded either.
        calls: list[int] = []
        dec.kv_loader = copy_loader(pre, dec, calls)
        first = await _prefill(pre, req)
        assert first.kv_transfer is not None
        bad = msgspec.structs.replace(first.kv_transfer, num_tokens=5)
        assert _toks(await _outs(dec, msgspec.structs.replace(req, kv_transfer=bad))) == ref
        assert calls == []

    _engines(tiny, fn)


def test_cancel_during_kv_load_frees_blocks(tiny: Path) -> None:
    async def fn(pre: ReferenceEngine, dec: ReferenceEngine) -> None:
        entered = asyncio.Event()

        async def hang(params: KvTransferParams, local: list[int]) -> None:
            entered.set()
            await asyncio.Event().wait()

        dec.kv_loader = hang
        req = _req("c", _prompt(50, 9), 10)
        first = await _prefill(pre, req)
        assert first.kv_transfer is not None
        seen: list[EngineOutput] = []

        async def consume() -> None:
            async for o in dec.generate(msgspec.structs.replace(req, kv_transfer=first.kv_transfer)):
                seen.append(o)

        task = asyncio.create_task(consume())
        await asyncio.wait_for(entered.wait(), 10)
        assert dec.load().kv_blocks_used == 4 and dec.load().active_requests == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [o.token_ids for o in seen] == [[first.kv_transfer.first_token]]
        assert dec.load().kv_blocks_used == 0 and dec.load().active_requests == 0
        assert await pre.release_pin(first.kv_transfer.pin_id)

    _engines(tiny, fn, n=2)
