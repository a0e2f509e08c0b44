"""The host tier outlives its engine: a new engine on the same shared-memory file serves the old one's
prefixes (and announces them as host-tier events); a file written for another model, damaged, resized or
locked by a live engine is never trusted. In process (engine stop / start); the real-process restart through
a frontend is ``test_restart.py``."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from dynamo_rt.kvhash import block_hashes
from tests.conftest import arun
from tests.kvbm.conftest import IndexSink, data_offset, flip_byte, generate, prompt, tier_slots, until
from workers.reference import kvbm
from workers.reference.engine import ReferenceEngine

PROMPTS = [prompt(100, 300 + i) for i in range(4)]  # 6 full blocks each
SLOTS = 64


def _engine(model: Path, shm: Path, **kw: object) -> ReferenceEngine:
    return ReferenceEngine(model, num_blocks=32, host_tier_path=str(shm), host_tier_blocks=SLOTS, **kw)  # type: ignore[arg-type]


async def _serve(model: Path, shm: Path) -> tuple[list[list[int]], list[int]]:
    """Start an engine on ``shm``, run PROMPTS, stop it; (outputs, cached_tokens)."""
    eng = _engine(model, shm)
    await eng.start()
    try:
        res = [await generate(eng, f"p{i}", p) for i, p in enumerate(PROMPTS)]
    finally:
        await eng.stop()
    return [r[0] for r in res], [r[1] for r in res]


def _all_hashes() -> set[int]:
    return {h for p in PROMPTS for h in block_hashes(p, 16)}


def test_a_new_engine_serves_the_old_ones_prefixes(tiny: Path, tmp_path: Path) -> None:
    shm = tmp_path / "host.kv"

    async def main() -> None:
        outs, cached = await _serve(tiny, shm)
        assert cached == [0, 0, 0, 0]
        assert set(tier_slots(shm)) == _all_hashes()  # stop() let every queued offload land
        eng = _engine(tiny, shm)
        await eng.start()
        sink = IndexSink({"host": SLOTS})
        try:
            assert eng.block_stats()["host_cached"] == 24
            eng.set_kv_event_sink(sink)  # the restarted worker tells the router what it holds
            assert [(e.kind, e.tier) for e in sink.events] == [("stored", "host")]
            assert sink.blocks("host") == _all_hashes()
            assert set(eng.cached_block_hashes_by_tier()["host"]) == _all_hashes()
            assert eng.cached_block_hashes() == []
            again = [await generate(eng, f"q{i}", p) for i, p in enumerate(PROMPTS)]
            assert [a[0] for a in again] == outs
            assert [a[1] for a in again] == [96] * 4  # every full block from the host tier
            assert eng.block_stats()["onboarded_host"] == 24
        finally:
            await eng.stop()

    arun(main(), 120)


def test_a_file_of_another_model_is_discarded(tiny: Path, tiny_seed1: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    shm = tmp_path / "host.kv"
    assert (tiny / "config.json").read_bytes() == (tiny_seed1 / "config.json").read_bytes()

    async def main() -> None:
        outs0, _ = await _serve(tiny, shm)
        with caplog.at_level(logging.WARNING, logger="workers.reference.kvbm"):
            outs1, cached1 = await _serve(tiny_seed1, shm)
        assert cached1 == [0, 0, 0, 0]
        assert outs1 != outs0  # other weights, other KV: serving the old blocks would have been wrong
        assert "discarding its contents: written for another model or KV layout (fingerprint mismatch)" \
            in caplog.text
        # The file now belongs to the seed-1 model: back on the seed-0 model it is discarded again.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="workers.reference.kvbm"):
            _, cached0 = await _serve(tiny, shm)
        assert cached0 == [0, 0, 0, 0]
        assert "fingerprint mismatch" in caplog.text
        # Another dtype is another KV layout.
        caplog.clear()
        eng = _engine(tiny, shm, dtype="bfloat16")
        with caplog.at_level(logging.WARNING, logger="workers.reference.kvbm"):
            await eng.start()
        try:
            assert eng.block_stats()["host_cached"] == 0
            assert "fingerprint mismatch" in caplog.text or "size" in caplog.text
        finally:
            await eng.stop()

    arun(main(), 120)


@pytest.mark.parametrize("damage", ["slot-data", "header", "index-duplicate", "truncated", "resized"])
def test_a_damaged_file_is_discarded(damage: str, tiny: Path, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    shm = tmp_path / "host.kv"
    expect = {"slot-data": "fails its checksum", "header": "header checksum mismatch",
              "index-duplicate": "appears in two slots", "truncated": "its size", "resized": "its size"}[damage]

    async def main() -> None:
        outs, _ = await _serve(tiny, shm)
        slots = tier_slots(shm)
        block_bytes = (shm.stat().st_size - data_offset(shm)) // SLOTS
        if damage == "slot-data":
            flip_byte(shm, data_offset(shm) + slots[block_hashes(PROMPTS[2], 16)[3]] * block_bytes + 7)
        elif damage == "header":
            flip_byte(shm, 60)  # inside the fingerprint
        elif damage == "index-duplicate":
            # A valid entry copied over a free one: two slots claim one block.
            raw = bytearray(shm.read_bytes())
            src = kvbm.HEADER_BYTES + min(slots.values()) * kvbm.ENTRY_BYTES
            free = next(s for s in range(SLOTS) if s not in slots.values())
            dst = kvbm.HEADER_BYTES + free * kvbm.ENTRY_BYTES
            raw[dst:dst + kvbm.ENTRY_BYTES] = raw[src:src + kvbm.ENTRY_BYTES]
            shm.write_bytes(bytes(raw))
        elif damage == "truncated":
            with shm.open("r+b") as f:
                f.truncate(shm.stat().st_size // 2)
        eng = ReferenceEngine(tiny, num_blocks=32, host_tier_path=str(shm),
                              host_tier_blocks=SLOTS * 2 if damage == "resized" else SLOTS)
        with caplog.at_level(logging.WARNING, logger="workers.reference.kvbm"):
            await eng.start()
        try:
            assert expect in caplog.text
            assert eng.block_stats()["host_cached"] == 0
            got = [await generate(eng, f"q{i}", p) for i, p in enumerate(PROMPTS)]
            assert got == [(o, 0) for o in outs]  # nothing from the old file was used
            await until(eng.tiers_idle, "offloads")
            assert len(tier_slots(shm)) == 24  # re-initialised and in use again
        finally:
            await eng.stop()

    arun(main(), 120)


def test_a_torn_entry_is_ignored_not_a_reason_to_discard(tiny: Path, tmp_path: Path) -> None:
    """A kill in the middle of an index write leaves an entry whose own crc fails: that slot is free, the
    rest of the file is served."""
    shm = tmp_path / "host.kv"

    async def main() -> None:
        outs, _ = await _serve(tiny, shm)
        slots = tier_slots(shm)
        torn = block_hashes(PROMPTS[1], 16)[5]  # the last full block of prompt 1
        flip_byte(shm, kvbm.HEADER_BYTES + slots[torn] * kvbm.ENTRY_BYTES + 9)  # inside its stamp
        eng = _engine(tiny, shm)
        await eng.start()
        try:
            assert eng.block_stats()["host_cached"] == 23
            got = [await generate(eng, f"q{i}", p) for i, p in enumerate(PROMPTS)]
            assert [g[0] for g in got] == outs
            assert [g[1] for g in got] == [96, 80, 96, 96]
        finally:
            await eng.stop()

    arun(main(), 120)


def test_a_file_held_by_a_live_engine_is_not_shared(tiny: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    shm = tmp_path / "host.kv"

    async def main() -> None:
        first = _engine(tiny, shm)
        await first.start()
        second = _engine(tiny, shm)
        try:
            with caplog.at_level(logging.ERROR, logger="workers.reference.kvbm"):
                await second.start()
            assert "KV host tier disabled" in caplog.text and "in use by another process" in caplog.text
            assert "host_slots" not in second.block_stats()
            assert (await generate(second, "s", PROMPTS[0]))[1] == 0  # serves, without a host tier
        finally:
            await second.stop()
            await first.stop()

    arun(main(), 60)


def test_tier_sizes_from_bytes() -> None:
    bb = 65536
    for total in (0, 4096, 10 * bb, 2**30, 2**30 + 12345):
        n = kvbm.slots_for_bytes(total, bb)
        assert n == 0 or kvbm.file_size(n, bb) <= total
        assert kvbm.file_size(n + 1, bb) > total
    header = struct.Struct("<8sII32sQQQQ")
    assert header.size == kvbm._HEADER.size  # the layout the tests read by hand
