"""Reference engine KV block accounting: blocks return to baseline after finish and cancellation, a tiny
pool (eviction + preemption) keeps outputs exact, KV events carry the router's block hashes, and the mocker
emits the same KV events (both use workers.common.blocks)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from dynamo_rt import kvhash
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, KvEvent, SamplingParams, StopConditions
from tests.conftest import arun, until
from workers.common.engine import ModelInfo
from workers.mocker import MockerEngine
from workers.reference.engine import ReferenceEngine


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2048, (n,), generator=g).tolist()


def _req(rid: str, prompt: list[int], max_tokens: int) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=prompt, sampling=SamplingParams(temperature=0.0),
                           stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))


async def _tokens(eng: ReferenceEngine, req: GenerateRequest) -> list[int]:
    return [t async for o in eng.generate(req) for t in o.token_ids]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_tiny_model()


def test_blocks_return_to_baseline_after_finish_and_cancel(tiny: Path) -> None:
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=64)
        await eng.start()
        try:
            assert eng.load().kv_blocks_used == 0 and eng.load().kv_blocks_total == 64
            await asyncio.gather(*(_tokens(eng, _req(str(i), _prompt(20 + 7 * i, i), 10)) for i in range(4)))
            assert eng.load().kv_blocks_used == 0
            assert eng.load().active_requests == 0

            # Cancel by closing the stream mid-way.
            gen = eng.generate(_req("c1", _prompt(40, 10), 200))
            got = [await gen.__anext__() for _ in range(3)]
            assert len(got) == 3
            assert eng.load().kv_blocks_used > 0
            await gen.aclose()
            await until(lambda: eng.load().kv_blocks_used == 0, "blocks of an aclosed stream", 10.0)

            # Cancel by cancelling the task that iterates (often while its step is in flight).
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in eng.generate(_req("c2", _prompt(33, 11), 500)):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: eng.load().kv_blocks_used == 0 and eng.load().active_requests == 0,
                         "blocks of a cancelled task", 10.0)
            # The engine still serves.
            assert len(await _tokens(eng, _req("after", _prompt(5, 12), 4))) == 4
            assert eng.load().kv_blocks_used == 0
        finally:
            await eng.stop()

    arun(main())


def test_tiny_pool_preempts_and_evicts_without_changing_outputs(tiny: Path) -> None:
    prompts = [_prompt(30 + 5 * i, 100 + i) for i in range(5)]

    async def outputs(num_blocks: int) -> tuple[list[list[int]], int]:
        eng = ReferenceEngine(tiny, num_blocks=num_blocks, max_batch_tokens=64)
        await eng.start()
        try:
            res = await asyncio.gather(*(_tokens(eng, _req(str(i), p, 40)) for i, p in enumerate(prompts)))
            assert eng.load().kv_blocks_used == 0
            return res, eng.preemptions
        finally:
            await eng.stop()

    async def main() -> None:
        ref, pre = await outputs(256)
        assert pre == 0
        # Each request needs up to 5 blocks; 5 of them at once need 25: 8 blocks force preemption.
        small, pre = await outputs(8)
        assert pre > 0
        assert small == ref

    arun(main(), timeout=120)


def test_kv_events_and_eviction(tiny: Path) -> None:
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=8)
        events: list[KvEvent] = []
        eng.set_kv_event_sink(events.extend)
        await eng.start()
        try:
            a = _prompt(40, 1)
            await _tokens(eng, _req("a", a, 3))  # computes 42 tokens: 2 full blocks
            await asyncio.sleep(0)
            hashes_a = kvhash.block_hashes(a, 16)
            assert len(hashes_a) == 2
            assert [(e.kind, e.block_hashes, e.parent_hash) for e in events] == [("stored", hashes_a, None)]
            assert sorted(eng.cached_block_hashes()) == sorted(hashes_a)
            assert eng.load().kv_blocks_used == 0  # cached but unreferenced
            events.clear()

            # Generated tokens fill blocks too: they are cached under the hash of prompt + output.
            b = _prompt(20, 2)
            out_b = await _tokens(eng, _req("b", b, 14))  # computes 33 tokens: 2 full blocks
            await asyncio.sleep(0)
            hashes_b = kvhash.block_hashes(b + out_b, 16)
            assert [h for e in events if e.kind == "stored" for h in e.block_hashes] == hashes_b
            assert not [e for e in events if e.kind == "removed"]
            events.clear()

            # A prompt needing all 8 blocks evicts every cached block (LRU) and says so.
            c = _prompt(120, 3)
            out_c = await _tokens(eng, _req("c", c, 8))
            await asyncio.sleep(0)
            removed = [h for e in events if e.kind == "removed" for h in e.block_hashes]
            assert sorted(removed) == sorted(hashes_a + hashes_b)
            stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
            assert stored == kvhash.block_hashes(c + out_c[:-1], 16)
            assert sorted(eng.cached_block_hashes()) == sorted(stored)

            # The evicted prompt is recomputed exactly.
            ref = ReferenceEngine(tiny, num_blocks=64)
            await ref.start()
            try:
                assert await _tokens(eng, _req("a2", a, 3)) == await _tokens(ref, _req("a3", a, 3))
            finally:
                await ref.stop()
        finally:
            await eng.stop()

    arun(main())


def test_waiting_request_is_admitted_when_blocks_free(tiny: Path) -> None:
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=6, max_num_seqs=1)
        await eng.start()
        try:
            gen = eng.generate(_req("long", _prompt(50, 5), 30))
            await gen.__anext__()
            waiting = asyncio.create_task(_tokens(eng, _req("queued", _prompt(10, 6), 5)))
            await until(lambda: eng.load().waiting_requests == 1, "the second request to queue", 10.0)
            assert eng.load().active_requests == 1
            rest = [t async for o in gen for t in o.token_ids]
            assert len(rest) == 29
            assert len(await asyncio.wait_for(waiting, 30)) == 5
            assert eng.load().kv_blocks_used == 0 and eng.load().waiting_requests == 0
        finally:
            await eng.stop()

    arun(main())


def test_random_load_with_cancellations_never_hangs_and_stays_exact(tiny: Path) -> None:
    """20 requests (shared prefixes, greedy and seeded sampling) on a 12-block pool with a 32-token step
    budget, a third of them cancelled mid-stream: every completed one equals its unconstrained run, and the
    pool returns to baseline."""
    rng = torch.Generator().manual_seed(7)
    shared = _prompt(24, 70)
    reqs: list[GenerateRequest] = []
    cancel_after: dict[str, int] = {}
    for i in range(20):
        n = int(torch.randint(1, 50, (1,), generator=rng))
        prompt = (shared[: int(torch.randint(0, 24, (1,), generator=rng))] + _prompt(n, 200 + i))[:60]
        new = int(torch.randint(1, 30, (1,), generator=rng))
        sampling = SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.9, seed=i)
        reqs.append(GenerateRequest(request_id=f"q{i}", token_ids=prompt, sampling=sampling,
                                    stop=StopConditions(max_tokens=new, ignore_eos=True)))
        if i % 3 == 0 and new > 2:
            cancel_after[f"q{i}"] = int(torch.randint(1, new, (1,), generator=rng))

    async def run_all(eng: ReferenceEngine, cancel: bool) -> dict[str, list[int]]:
        async def one(i: int, r: GenerateRequest) -> tuple[str, list[int]]:
            await asyncio.sleep(0.002 * i)  # staggered arrivals
            got: list[int] = []
            gen = eng.generate(r)
            try:
                async for o in gen:
                    got += o.token_ids
                    if cancel and len(got) >= cancel_after.get(r.request_id, 1 << 30):
                        break
            finally:
                await gen.aclose()
            return r.request_id, got

        return dict(await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs))))

    async def main() -> None:
        big = ReferenceEngine(tiny, num_blocks=256)
        small = ReferenceEngine(tiny, num_blocks=12, max_batch_tokens=32)
        await big.start()
        await small.start()
        try:
            ref = await run_all(big, cancel=False)
            got = await run_all(small, cancel=True)
            await until(lambda: small.load().kv_blocks_used == 0 and small.load().active_requests == 0
                         and small.load().waiting_requests == 0, "the small pool to drain", 10.0)
            for rid, toks in got.items():
                k = cancel_after.get(rid)
                assert toks == (ref[rid][:k] if k else ref[rid]), rid
            assert small.preemptions > 0
        finally:
            await big.stop()
            await small.stop()

    arun(main(), timeout=120)


def test_mocker_emits_the_reference_engines_kv_events(tiny: Path) -> None:
    """Both engines drive workers.common.blocks: the same requests, one at a time, on pools of the same
    size give the same KV event sequence (stored runs with their parents, one removed event per allocation,
    cleared at stop). Their tokens differ, so each hash is named by (request, block index) first."""
    base = _prompt(48, 300)
    prompts = [base[: 16 * (i % 4)] + _prompt(10 + 9 * i, 310 + i) for i in range(10)] + [base, base[:33]]
    max_tokens = [3 + (7 * i) % 20 for i in range(len(prompts))]

    async def run(eng: Any) -> list[tuple[str, list[tuple[int, int]], tuple[int, int] | None]]:
        events: list[KvEvent] = []
        eng.set_kv_event_sink(events.extend)
        await eng.start()
        name: dict[int, tuple[int, int]] = {}
        try:
            for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
                out = await _tokens(eng, _req(f"r{i}", p, m))
                for j, h in enumerate(kvhash.block_hashes((p + out)[:-1], 16)):
                    name.setdefault(h, (i, j))
        finally:
            await eng.stop()
        await asyncio.sleep(0.05)  # the reference engine hands its last batch to the loop

        def n(h: int | None) -> tuple[int, int] | None:
            return None if h is None else name[h]

        return [(e.kind, [name[h] for h in e.block_hashes], n(e.parent_hash)) for e in events]

    async def main() -> None:
        ref = await run(ReferenceEngine(tiny, num_blocks=12))
        mock = await run(MockerEngine(ModelInfo(name="m", path="", context_length=4096, block_size=16),
                                      num_blocks=12, speedup=0, vocab_size=2048))
        assert ref == mock
        kinds = {k for k, _, _ in ref}
        assert kinds == {"stored", "removed", "cleared"}, kinds
        assert sum(1 for k, _, _ in ref if k == "removed") >= 3

    arun(main(), timeout=120)
