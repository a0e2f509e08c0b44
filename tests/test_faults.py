"""dynamo_rt/faults.py: the spec grammar, the canary exemption, the file form re-read on change, and what each
action does to the awaiting request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_rt import errors, faults


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    faults.configure(None)


def test_parse_and_bad_entries() -> None:
    assert faults.parse("frontend.routed=pause, frontend.tokenizing=delay:0.5,worker.kv_events=drop") == {
        "frontend.routed": faults.Action("pause"), "frontend.tokenizing": faults.Action("delay", 0.5),
        "worker.kv_events": faults.Action("drop")}
    for bad in ("frontend.nowhere=pause", "frontend.routed=explode", "frontend.routed"):
        with pytest.raises(ValueError, match="DYN_TEST_FAULT_POINTS"):
            faults.parse(bad)


def test_off_by_default_and_actions() -> None:
    faults.configure(None)
    assert faults.enabled is False and faults.action("frontend.routed") is None
    faults.configure("frontend.routed=fail,frontend.migrating=pause,worker.kv_events=drop")
    assert faults.enabled is True

    async def run() -> None:
        with pytest.raises(errors.Unavailable, match=r"test fault at frontend\.routed"):
            await faults.hit("frontend.routed", "cmpl-1")
        await faults.hit("frontend.routed", "canary-1-0")  # the health canary passes every point
        paused = asyncio.ensure_future(faults.hit("frontend.migrating", "cmpl-2"))
        await asyncio.sleep(0.05)
        assert not paused.done()  # waits until cancelled
        paused.cancel()
        with pytest.raises(asyncio.CancelledError):
            await paused

    asyncio.run(run())
    assert faults.dropped("worker.kv_events") and not faults.dropped("frontend.routed")


def test_file_form_is_read_again_when_it_changes(tmp_path: Path) -> None:
    f = tmp_path / "points"
    faults.configure(f"@{f}")
    assert faults.enabled is True and faults.action("worker.decoding") is None  # no file yet: no fault
    f.write_text("worker.decoding=pause\n")
    assert faults.action("worker.decoding") == faults.Action("pause")
    f.write_text("worker.nixl_read=delay:2")
    assert faults.action("worker.decoding") is None
    assert faults.action("worker.nixl_read") == faults.Action("delay", 2.0)
