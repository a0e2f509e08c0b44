"""KV tiers of the reference engine, in process: greedy output with a small primary pool and blocks moving
through host and disk equals the output of an engine without tiers; every tier's accounting returns to its
baseline and never exceeds its size; the router's index, fed the engine's events, matches what each tier
holds; cancellations during onboarding free everything."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from dynamo_rt.errors import Unavailable
from dynamo_rt.kvhash import block_hashes
from tests.conftest import arun
from tests.kvbm.conftest import IndexSink, chat, data_offset, flip_byte, generate, prompt, req, tier_slots, until
from workers.reference.engine import ReferenceEngine
from workers.reference.kvbm import DISK_FILE, KvTiers, OnboardJob, file_size

POOL = 40  # primary blocks: 4 conversations of up to ~15 blocks each do not fit, so blocks move
HOST = 24
DISK = 400


def _accounting_at_baseline(eng: ReferenceEngine) -> None:
    st = eng.block_stats()
    assert st["used"] == 0 and st["pins"] == 0 and st["onboarding"] == 0, st
    assert st["offload_queue"] == 0, st
    for tier in ("host", "disk"):
        if f"{tier}_slots" in st:
            assert st[f"{tier}_pinned"] == 0 and st[f"{tier}_busy"] == 0, st
            assert st[f"{tier}_cached"] + st[f"{tier}_free"] == st[f"{tier}_slots"], st
    assert st.get("staging_free") == st.get("staging_total"), st
    assert st["free"] + st["evictable"] == eng.num_blocks
    assert eng.load().kv_blocks_used == 0 and eng.load().active_requests == 0


def _index_matches_engine(eng: ReferenceEngine, sink: IndexSink) -> None:
    assert sink.blocks("primary") == set(eng.cached_block_hashes())
    for tier, hashes in eng.cached_block_hashes_by_tier().items():
        assert sink.blocks(tier) == set(hashes), tier


@pytest.mark.parametrize("sync_bytes", [8 * 2**20, 0], ids=["host-sync", "all-async"])
def test_output_equals_no_tiers_while_blocks_move_between_tiers(sync_bytes: int, tiny: Path, tmp_path: Path) -> None:
    """``host-sync``: small host runs are copied in by the step thread (the default); ``all-async``: every
    onboard goes through the copy thread and the ONBOARDING state."""
    async def main() -> None:
        ref = ReferenceEngine(tiny, num_blocks=512)
        eng = ReferenceEngine(tiny, num_blocks=POOL, host_tier_path=str(tmp_path / "host.kv"),
                              host_tier_blocks=HOST, disk_tier_path=str(tmp_path / "disk"),
                              disk_tier_blocks=DISK, onboard_sync_bytes=sync_bytes)
        sink = IndexSink({"primary": POOL, "host": HOST, "disk": DISK})
        await ref.start()
        await eng.start()
        eng.set_kv_event_sink(sink)
        try:
            want = await chat(ref, 4, 5)
            got = await chat(eng, 4, 5)
            assert [t for t, _ in got] == [t for t, _ in want]
            # Later turns start from the earlier turns' KV, wherever it was.
            assert [c for _, c in got[:4]] == [0, 0, 0, 0]
            assert all(c >= 64 for _, c in got[4:]), [c for _, c in got]
            await until(eng.tiers_idle, "tier copies to finish")
            st = eng.block_stats()
            assert st["onboarded_host"] > 0 and st["onboarded_disk"] > 0 and st["spilled"] > 0, st
            assert st["onboard_failures"] == 0 and st["checksum_failures"] == 0
            # A second pass over the same chats: every block is somewhere, output still the same.
            again = await chat(eng, 4, 5, tag="again")
            assert [t for t, _ in again] == [t for t, _ in want]
            assert all(c > 0 for _, c in again)
            await until(eng.tiers_idle, "tier copies to finish")
            await asyncio.sleep(0.05)  # the last events reach the sink through the loop
            _accounting_at_baseline(eng)
            _index_matches_engine(eng, sink)
            assert sink.overflows == []
            assert sink.peak["host"] == HOST  # the tiers filled up, and no further
            assert 0 < sink.peak["disk"] <= DISK
            assert (tmp_path / "host.kv").stat().st_size == file_size(HOST, eng.pool.block_bytes)  # type: ignore[union-attr]
            assert (tmp_path / "disk" / DISK_FILE).stat().st_size == file_size(DISK, eng.pool.block_bytes)  # type: ignore[union-attr]
        finally:
            await eng.stop()
            await ref.stop()

    arun(main(), 240)


def test_disk_tier_alone_and_a_corrupt_disk_block_is_recomputed(tiny: Path, tmp_path: Path) -> None:
    """No host tier: offloads go to disk through the staging buffers. A disk block damaged behind the
    engine's back fails its checksum when read: dropped (with a removed event), the prompt recomputed."""
    async def main() -> None:
        ref = ReferenceEngine(tiny, num_blocks=256)
        eng = ReferenceEngine(tiny, num_blocks=8, disk_tier_path=str(tmp_path), disk_tier_blocks=64)
        sink = IndexSink({"primary": 8, "disk": 64})
        await ref.start()
        await eng.start()
        eng.set_kv_event_sink(sink)
        try:
            a, b = prompt(100, 1), prompt(100, 2)
            want_a = (await generate(ref, "ra", a))[0]
            assert await generate(eng, "a1", a) == (want_a, 0)
            await generate(eng, "b1", b)  # evicts a's blocks from the 8-block primary pool
            await until(eng.tiers_idle, "disk writes")
            assert await generate(eng, "a2", a) == (want_a, 96)  # the 6 full blocks, most from disk
            assert eng.block_stats()["onboarded_disk"] >= 5
            await generate(eng, "b2", b)
            await until(eng.tiers_idle, "disk writes")
            # Damage the data of one of a's disk blocks.
            hashes = block_hashes(a, 16)
            victim = hashes[2]
            path = tmp_path / DISK_FILE
            slot = tier_slots(path)[victim]
            flip_byte(path, data_offset(path) + slot * eng.pool.block_bytes + 123)  # type: ignore[union-attr]
            in_primary = set(eng.cached_block_hashes())
            primary_hit = next(i for i, h in enumerate(hashes) if h not in in_primary)
            assert primary_hit <= 2
            # Only the primary hit is used: the onboard failed and the rest is recomputed.
            assert await generate(eng, "a3", a) == (want_a, 16 * primary_hit)
            st = eng.block_stats()
            assert st["checksum_failures"] == 1 and st["onboard_failures"] == 1, st
            await until(eng.tiers_idle, "disk writes")
            await asyncio.sleep(0.05)
            assert victim in {h for e in sink.events if e.kind == "removed" and e.tier == "disk"
                              for h in e.block_hashes}
            _accounting_at_baseline(eng)
            _index_matches_engine(eng, sink)
            assert sink.overflows == []
        finally:
            await eng.stop()
            await ref.stop()

    arun(main(), 120)


@pytest.fixture
def copy_gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Holds every host onboard at the copy thread until set, so a test can act while requests sit in
    ONBOARDING (the copy itself is unchanged, only delayed)."""
    gate = threading.Event()
    run = KvTiers._run_onboard

    def gated(self: KvTiers, job: OnboardJob) -> None:
        gate.wait(30)
        run(self, job)

    monkeypatch.setattr(KvTiers, "_run_onboard", gated)
    return gate


async def _fill_tiers(eng: ReferenceEngine, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Serve ``n`` prompts of 7 full blocks; (prompts, outputs). Most leave primary for the host tier."""
    prompts = [prompt(120, seed + i) for i in range(n)]
    outs = [(await generate(eng, f"w{seed}-{i}", p))[0] for i, p in enumerate(prompts)]
    await until(eng.tiers_idle, "offloads")
    return prompts, outs


def test_cancelling_during_onboard_frees_every_tier(tiny: Path, tmp_path: Path, copy_gate: threading.Event) -> None:
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=48, host_tier_path=str(tmp_path / "host.kv"), host_tier_blocks=96,
                              onboard_sync_bytes=0)
        await eng.start()
        try:
            prompts, outs = await _fill_tiers(eng, 12, 50)  # 84 blocks: the first 4 prompts left primary

            async def consume(i: int) -> None:
                async for _ in eng.generate(req(f"c{i}", prompts[i], 50)):
                    pass

            tasks = [asyncio.create_task(consume(i)) for i in range(4)]  # 4 x 7 blocks: all fit at once
            await until(lambda: eng.block_stats()["onboarding"] == 4, "requests waiting for their onboard")
            assert eng.block_stats()["host_pinned"] == 4 * 7
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            assert eng.block_stats()["onboarding"] == 4  # cancelled, but the copies into their blocks run
            copy_gate.set()
            await until(lambda: eng.tiers_idle() and eng.block_stats()["onboarding"] == 0, "the copies")
            _accounting_at_baseline(eng)
            # Still serving, from the tiers.
            assert await generate(eng, "after", prompts[0]) == (outs[0], 112)
        finally:
            copy_gate.set()
            await eng.stop()

    arun(main(), 120)


def test_stop_with_onboards_pending_fails_them_cleanly(tiny: Path, tmp_path: Path, copy_gate: threading.Event) -> None:
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=48, host_tier_path=str(tmp_path / "host.kv"), host_tier_blocks=96,
                              onboard_sync_bytes=0)
        await eng.start()
        prompts, _ = await _fill_tiers(eng, 12, 70)
        gens = [eng.generate(req(f"s{i}", p, 400)) for i, p in enumerate(prompts[:4])]
        firsts = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await until(lambda: eng.block_stats()["onboarding"] == 4, "requests waiting for their onboard")
        stopping = asyncio.ensure_future(eng.stop())
        await asyncio.sleep(0.2)
        copy_gate.set()  # the copy in progress finishes; the queued ones are failed by the stop
        await stopping
        results = await asyncio.gather(*firsts, return_exceptions=True)
        for g in gens:
            await g.aclose()
        assert all(isinstance(r, Unavailable) and "engine stopped" in str(r) for r in results), results

    arun(main(), 120)
