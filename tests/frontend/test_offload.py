"""frontend/offload.py (long request preparation on a few niced threads) and the array-held prompt ids it
hands to the request plane."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from array import array

import pytest

from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions, decode_generate, encode
from frontend.offload import Offload, default_threads
from tests.conftest import arun


def _me() -> tuple[int, int]:
    tid = threading.get_native_id()
    time.sleep(0.05)  # long enough that concurrent jobs overlap and must spread over the pool
    return tid, os.getpriority(os.PRIO_PROCESS, tid)


def test_offload_runs_on_its_own_niced_threads_and_leaves_the_loop_thread_alone() -> None:
    """Jobs run on at most ``threads`` threads, each niced by ``nice`` more than the loop's thread, which
    keeps its own priority (Linux keeps a nice value per thread)."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    off = Offload(threads=2, nice=5)

    async def main() -> list[tuple[int, int]]:
        out = await asyncio.gather(*(off.run(_me) for _ in range(6)))
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
        return out

    try:
        got = arun(main())
    finally:
        off.close()
    tids = {tid for tid, _ in got}
    assert 1 <= len(tids) <= 2 and threading.get_native_id() not in tids
    assert {prio for _, prio in got} == {min(19, base + 5)}
    assert sorted(off.niced) == sorted(tids)


def test_offload_without_nice_and_the_default_size() -> None:
    off = Offload(threads=0, nice=0)
    try:
        assert off.threads == default_threads() == max(1, min(4, len(os.sched_getaffinity(0)) - 1))
        tid, prio = arun(off.run(_me))
        assert tid != threading.get_native_id()
        assert prio == os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) and off.niced == []
    finally:
        off.close()


def test_a_job_error_reaches_the_caller() -> None:
    off = Offload(threads=1)

    def boom() -> None:
        raise ValueError("bad prompt")

    try:
        with pytest.raises(ValueError, match="bad prompt"):
            arun(off.run(boom))
    finally:
        off.close()


def test_array_prompt_ids_go_on_the_wire_exactly_as_a_list() -> None:
    """The frontend keeps prompt ids in an ``array("i")``; the request a worker decodes is byte for byte the one
    a list would have made, and decodes to the same list."""
    ids = [0, 1, 127, 128, 255, 256, 65535, 65536, 151_000, 2**31 - 1] * 400
    kw = {"request_id": "r-1", "sampling": SamplingParams(temperature=0.5, seed=3),
          "stop": StopConditions(max_tokens=7), "model": "tiny", "cache_salt": "s"}
    as_list = encode(GenerateRequest(token_ids=ids, **kw))  # type: ignore[arg-type]
    as_array = encode(GenerateRequest(token_ids=array("i", ids), **kw))  # type: ignore[arg-type]
    assert as_array == as_list
    assert decode_generate(as_array).token_ids == ids
    with pytest.raises(NotImplementedError):  # anything else unknown is still refused, not written somehow
        encode({"x": object()})


def test_parallel_map_keeps_order_runs_side_by_side_on_niced_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """parallel_map: the results in the items' order, the first item in the caller's thread, the others on
    the tokenizer threads, niced (--prepare-nice), or in the caller when no thread has started them yet; an
    error in any item reaches the caller."""
    from frontend import offload

    monkeypatch.setattr(offload, "tokenizer_threads", lambda: 2)
    monkeypatch.setattr(offload, "_tok_pool", None)
    offload.set_tokenizer_nice(3)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    try:
        got = offload.parallel_map(lambda i: (i, *_me()), list(range(5)))
        assert [i for i, _, _ in got] == list(range(5))
        me = threading.get_native_id()
        assert got[0][1] == me and got[0][2] == base
        pool = {(tid, prio) for _, tid, prio in got[1:] if tid != me}
        assert 1 <= len(pool) <= 2  # items 1 and 2 start on the two threads while the caller runs item 0
        assert {prio for _, prio in pool} == {min(19, base + 3)}
        assert all(prio == base for _, tid, prio in got if tid == me)

        def boom(i: int) -> int:
            if i == 3:
                raise ValueError("chunk 3")
            return i

        with pytest.raises(ValueError, match="chunk 3"):
            offload.parallel_map(boom, list(range(5)))
        assert offload.parallel_map(lambda i: i * 2, [4]) == [8]
    finally:
        offload.set_tokenizer_nice(offload.DEFAULT_NICE)
        if offload._tok_pool is not None:
            offload._tok_pool.shutdown(wait=True)


def test_usable_cpus_is_the_affinity_bounded_by_the_cgroup_quota(tmp_path: object) -> None:
    """A container limited to 1.5 CPUs (cgroup v2 cpu.max "150000 100000") sizes its pools for 2, not for the
    host's CPUs; "max" (no quota), a missing or unreadable file leave the affinity mask's count."""
    from pathlib import Path

    from dynamo_rt.cpus import usable_cpus

    mask = len(os.sched_getaffinity(0))
    f = Path(str(tmp_path)) / "cpu.max"
    f.write_text("150000 100000\n")
    assert usable_cpus(f) == min(mask, 2)
    f.write_text("50000 100000\n")
    assert usable_cpus(f) == 1
    f.write_text("max 100000\n")
    assert usable_cpus(f) == mask
    f.write_text("garbage\n")
    assert usable_cpus(f) == mask
    assert usable_cpus(Path(str(tmp_path)) / "absent") == mask
