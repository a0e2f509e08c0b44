"""The pure parts of bench/frontend_overhead.py and bench/kv_routing.py: events-per-token accounting, the
load generator's event counts, run-order rotation, the headline variant, workload presets, CPU pinning."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import frontend_overhead as fo  # noqa: E402
import kv_routing as kv  # noqa: E402


def test_tokens_per_event() -> None:
    assert fo.tokens_per_event(32, 32) == 1.0
    assert fo.tokens_per_event(32, 8) == 4.0
    assert math.isnan(fo.tokens_per_event(32, 0))


def test_one_event_per_token_against_the_one_at_a_time_reference() -> None:
    assert fo.one_event_per_token(27.9, 27.9)
    assert fo.one_event_per_token(27.1, 27.9)  # 2.9% below: within the 3% tolerance
    assert not fo.one_event_per_token(27.0, 27.9)  # 3.2% below: some tokens were coalesced
    assert not fo.one_event_per_token(3.1, 27.9)  # full-speed coalescing
    assert not fo.one_event_per_token(5.0, 0.0)  # no reference, no claim
    assert fo.one_event_per_token(20.0, 27.9, tolerance=0.3)


def test_load_generator_counts_events_and_text_events() -> None:
    def chunk(delta: str, finish: str = "null") -> bytes:
        head = b'data: {"choices":[{"index":0,"delta":' + delta.encode()
        return head + b',"finish_reason":' + finish.encode() + b"}]}"

    body = b"\n\n".join([
        chunk('{"role":"assistant","content":""}'),
        chunk('{"content":"Hel"}'),
        chunk('{"content":"lo there"}'),
        chunk("{}", '"length"'),
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}',
        b"data: [DONE]",
    ]) + b"\n\n"  # fmt: skip
    rec = {"status": 200, "done": False, "error": None, "events": 0, "text_events": 0, "prompt_tokens": 0,
           "completion_tokens": 0, "cached_tokens": 0, "finish_reason": None, "ttft_ms": 5.0,
           "latency_ms": 9.0}  # fmt: skip
    _common._parse_body(body, rec)
    assert (rec["events"], rec["text_events"], rec["done"]) == (5, 2, True)
    assert (rec["completion_tokens"], rec["finish_reason"]) == (3, "length")
    rec2 = dict(rec, text_events=4, events=7)
    bad = dict(rec, status=500, done=False)
    summary = _common.LoadResult([rec, rec2, bad], wall_s=1.0, client_cpu_s=0.0).summary(3)
    assert (summary["ok"], summary["errors"]) == (2, 1)
    assert summary["events_per_req"] == 6.0 and summary["text_events_per_req"] == 3.0


def test_frontend_rotation() -> None:
    names = ["ours", "Dynamo"]
    assert [fo.rotation(names, r) for r in range(3)] == [["ours", "Dynamo"], ["Dynamo", "ours"], ["ours", "Dynamo"]]
    assert fo.rotation([], 5) == []


def test_kv_run_order_rotates_each_round() -> None:
    runs: list[kv.Run] = [("ours", "round-robin", kv.RR, None), ("ours", "kv", kv.KV, None),
                          ("dynamo", "kv", "Dynamo 1.6.1 kv w=4", 4.0)]  # fmt: skip
    orders = [[name for _, _, name, _ in kv.rotation(runs, r)] for r in range(4)]
    assert orders == [
        [kv.RR, kv.KV, "Dynamo 1.6.1 kv w=4"],
        [kv.KV, "Dynamo 1.6.1 kv w=4", kv.RR],
        ["Dynamo 1.6.1 kv w=4", kv.RR, kv.KV],
        [kv.RR, kv.KV, "Dynamo 1.6.1 kv w=4"],
    ]
    firsts = {kv.rotation(runs, r)[0][2] for r in range(3)}
    assert firsts == {kv.RR, kv.KV, "Dynamo 1.6.1 kv w=4"}


def test_kv_headline_is_full_stack_open_loop_long_when_run() -> None:
    variants = [(w, p, s) for w in ("chat", "long") for p in ("open-loop", "closed-loop")
                for s in ("in-process", "full")]  # fmt: skip
    assert variants[kv.headline_index(variants)] == ("long", "open-loop", "full")
    assert kv.headline_index([("chat", "closed-loop", "full"), ("chat", "open-loop", "in-process")]) == 0
    assert kv.headline_index([("long", "closed-loop", "in-process"), ("chat", "open-loop", "in-process")]) == 1
    assert kv.headline_index([("chat", "closed-loop", "full"), ("long", "closed-loop", "full")]) == 1


def test_kv_workload_presets_fill_only_unset_flags() -> None:
    args = argparse.Namespace(workload="all", turns=None, turn_tokens=None, context_length=None)
    chat, long = kv.workload_args(args, "chat"), kv.workload_args(args, "long")
    assert (chat.workload, chat.turns, chat.turn_tokens, chat.context_length) == ("chat", 6, [100, 300], 0)
    assert (long.workload, long.turns, long.turn_tokens, long.context_length) == ("long", 12, [200, 500], 16384)
    assert args.turns is None  # the caller's namespace is untouched
    quick = kv.workload_args(argparse.Namespace(workload="all", turns=3, turn_tokens=None, context_length=None), "long")
    assert (quick.turns, quick.turn_tokens) == (3, [200, 500])


def test_pin_sets_affinity_of_every_thread_and_child() -> None:
    cpu = max(os.sched_getaffinity(0))
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(100):  # until the child exists
            kids = _common.descendants(parent.pid)
            if kids:
                break
            time.sleep(0.05)
        assert len(kids) == 1
        n = fo.pin(parent.pid, {cpu})
        assert n >= 2
        for pid in (parent.pid, kids[0]):
            for tid in os.listdir(f"/proc/{pid}/task"):
                assert os.sched_getaffinity(int(tid)) == {cpu}
    finally:
        for pid in _common.descendants(parent.pid):
            os.kill(pid, 9)
        parent.kill()
        parent.wait()
