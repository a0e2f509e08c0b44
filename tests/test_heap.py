"""dynamo_rt.heap: the start-up heap leaves the cyclic collector's scans."""

from __future__ import annotations

import gc
import weakref

from dynamo_rt.heap import freeze_startup_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freeze_collects_garbage_then_freezes_the_rest() -> None:
    gc.unfreeze()
    gc.disable()  # no automatic collection between the steps below
    try:
        garbage = _Cycle()
        dead = weakref.ref(garbage)
        del garbage  # unreachable but cyclic: only the collector frees it
        assert dead() is not None
        kept = _Cycle()
        n = freeze_startup_heap()
        assert dead() is None  # collected first, not frozen
        assert n == gc.get_freeze_count() > 0
        # Frozen objects are out of every generation the collector scans.
        assert all(o is not kept for gen in range(3) for o in gc.get_objects(gen))
        gc.unfreeze()
        assert any(o is kept for o in gc.get_objects(2))
    finally:
        gc.unfreeze()
        gc.enable()
