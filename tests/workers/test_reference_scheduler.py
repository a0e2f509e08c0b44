"""The reference engine's scheduler (workers/reference/scheduler.py) on synthetic requests: no model, no
tensors. Each test drives ``schedule`` -> ``advance`` the way the step thread does, appending a made-up
token whenever a sequence's rows are all computed, and checks the exact decisions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dynamo_rt.protocol import GenerateRequest
from workers.common.blocks import BlockManager
from workers.reference.scheduler import Scheduler, Seq, SeqState

ROOT = Path(__file__).resolve().parents[2]
CTX = 256
TOKEN = 7  # what every "sampled" token is


def seq(rid: str, prompt: list[int], max_tokens: int = 8, wants_load: bool = False) -> Seq:
    return Seq(req=GenerateRequest(request_id=rid, token_ids=prompt), tokens=list(prompt), prompt_len=len(prompt),
               max_tokens=max_tokens, wants_load=wants_load)


def sched(num_blocks: int = 64, *, block_size: int = 4, budget: int = 64, max_seqs: int = 8,
          pin_timeout: float = 60.0) -> Scheduler[Seq]:
    return Scheduler(BlockManager(num_blocks), block_size=block_size, max_batch_tokens=budget,
                     max_num_seqs=max_seqs, context_length=CTX, pin_timeout=pin_timeout)


def step(s: Scheduler[Seq]) -> list[tuple[str, int]]:
    """One step as the engine runs it; returns ``[(request_id, tokens computed)]`` in scheduling order."""
    chosen = s.schedule().chosen
    for q, n in chosen:
        assert s.advance(q, n)
        if q.num_computed == len(q.tokens):
            q.tokens.append(TOKEN)
            if q.finish_reason(TOKEN, CTX) is not None:
                s.finish_running(q)
    return [(q.req.request_id, n) for q, n in chosen]


def test_the_scheduler_imports_no_torch() -> None:
    code = ("import sys; import workers.reference.scheduler; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_chunked_prefill_then_decode_until_max_tokens() -> None:
    s = sched(block_size=4, budget=8)
    a = seq("a", list(range(100, 120)), max_tokens=3)  # 20 prompt tokens
    s.add(a)
    assert [step(s) for _ in range(5)] == [[("a", 8)], [("a", 8)], [("a", 4)], [("a", 1)], [("a", 1)]]
    assert a.state is SeqState.FINISHED and a.num_output == 3 and a.blocks == []
    assert step(s) == []
    # 22 computed tokens: 5 full blocks stay cached (unreferenced) for later prefix hits.
    assert s.bm.num_used == 0 and len(s.bm.cache) == 5


def test_decode_rows_come_first_and_prefill_gets_the_rest_of_the_budget() -> None:
    s = sched(block_size=4, budget=8)
    a = seq("a", [1, 2, 3], max_tokens=10)
    s.add(a)
    assert step(s) == [("a", 3)]
    s.add(seq("b", list(range(200, 210))))  # 10 tokens: 7 fit beside a's decode row
    assert step(s) == [("a", 1), ("b", 7)]
    assert step(s) == [("a", 1), ("b", 3)]
    assert step(s) == [("a", 1), ("b", 1)]


def test_max_num_seqs_holds_the_rest_in_order() -> None:
    s = sched(max_seqs=2)
    for rid in "abc":
        s.add(seq(rid, [ord(rid)] * 5, max_tokens=1))
    assert step(s) == [("a", 5), ("b", 5)]  # both finish: one token each
    assert step(s) == [("c", 5)]
    assert s.num_active == 0 and not s.waiting


def test_prefix_cache_hit_skips_full_blocks_but_never_the_last_token() -> None:
    s = sched(block_size=4)
    prompt = list(range(300, 312))  # 3 full blocks
    s.add(seq("a", prompt, max_tokens=1))
    assert step(s) == [("a", 12)]
    b = seq("b", [*prompt, 50, 51], max_tokens=1)
    s.add(b)
    assert step(s) == [("b", 2)]
    assert b.cached_tokens == 12
    c = seq("c", list(prompt), max_tokens=1)  # all 12 cached, but the last token's logits are needed
    s.add(c)
    assert step(s) == [("c", 4)]
    assert c.cached_tokens == 8


def test_out_of_blocks_preempts_the_newest_which_recomputes_later() -> None:
    s = sched(num_blocks=4, block_size=4)
    a = seq("a", [1, 2, 3, 4], max_tokens=8)
    b = seq("b", [5, 6, 7, 8], max_tokens=8)
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 4), ("b", 4)]
    for _ in range(4):
        assert step(s) == [("a", 1), ("b", 1)]  # 8 computed each: 2 blocks each, the pool is full
    # a needs a third block: b (newest) is preempted; its freed blocks are cached, one is evicted for a,
    # and b cannot come back yet (it needs 2 more blocks beside its one remaining cached block).
    assert step(s) == [("a", 1)]
    assert s.preemptions == 1
    assert b.state is SeqState.WAITING and list(s.waiting) == [b]
    assert b.blocks == [] and b.num_computed == 0 and len(b.tokens) == 9
    assert len(a.blocks) == 3 and s.bm.num_available == 1
    for _ in range(50):
        if a.state is SeqState.FINISHED and b.state is SeqState.FINISHED:
            break
        step(s)
    assert a.num_output == 8 and b.num_output == 8
    assert s.preemptions == 1 and s.bm.num_used == 0


def test_admission_waits_for_blocks_instead_of_preempting() -> None:
    s = sched(num_blocks=3, block_size=4)
    a = seq("a", list(range(10)), max_tokens=2)  # 3 blocks
    b = seq("b", list(range(50, 54)), max_tokens=1)
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 10)]
    assert list(s.waiting) == [b] and s.preemptions == 0
    assert step(s) == [("a", 1)]  # a finishes, its blocks come back
    assert step(s) == [("b", 4)]


def test_pins_hold_the_prompt_blocks_until_released_or_expired() -> None:
    s = sched(block_size=4)
    a = seq("a", list(range(6)), max_tokens=1)
    s.add(a)
    assert s.schedule().chosen == [(a, 6)]
    assert s.advance(a, 6)
    a.tokens.append(TOKEN)
    pin_id, blocks = s.pin_prompt(a)
    assert len(blocks) == 2 and s.bm.num_used == 2
    assert a.state is SeqState.FINISHED and a.blocks == [] and not s.running
    assert s.release_pin(pin_id) and s.bm.num_used == 0
    assert not s.release_pin(pin_id)

    s.pin_timeout = 0.0
    b = seq("b", list(range(50, 56)), max_tokens=1)
    s.add(b)
    s.schedule()
    s.advance(b, 6)
    s.pin_prompt(b)
    assert s.bm.num_used == 2 and s.next_pin_deadline() is not None
    s.expire_pins(time.monotonic())
    assert s.bm.pins == {} and s.bm.num_used == 0


def test_a_kv_load_gets_blocks_then_runs_from_its_first_token_or_prefills_locally() -> None:
    s = sched(block_size=4)
    a = seq("a", list(range(6)), wants_load=True)
    a.tokens.append(TOKEN)  # the first token came with the request
    s.add(a)
    st = s.schedule()
    assert st.chosen == [] and st.loads == [a]
    assert a.state is SeqState.LOADING and len(a.blocks) == 2 and a in s.loading
    assert s.loaded(a, True)
    assert a.state is SeqState.RUNNING and a.num_computed == 6 and len(s.bm.cache) == 1
    assert step(s) == [("a", 1)]

    b = seq("b", list(range(50, 56)), wants_load=True)
    b.tokens.append(TOKEN)
    s.add(b)
    assert s.schedule().loads == [b]
    assert s.loaded(b, False)  # the transfer failed: compute the prompt (and the first token's KV) here
    assert b.state is SeqState.WAITING and b.blocks == [] and not b.wants_load
    assert step(s) == [("a", 1), ("b", 7)]
    assert not s.loaded(b, True)  # no longer loading


def test_cancel_frees_now_or_after_the_step_using_the_blocks() -> None:
    s = sched(block_size=4)
    a = seq("a", list(range(8)))
    s.add(a)
    chosen = s.schedule().chosen
    assert not s.cancel(a)  # in flight: freed by advance
    assert a.cancelled and s.bm.num_used == 2
    assert not s.advance(*chosen[0])
    assert a.state is SeqState.FINISHED and s.bm.num_used == 0 and not s.running
    b = seq("b", [1, 2])
    s.add(b)
    assert s.cancel(b) and not s.waiting and b.state is SeqState.FINISHED
    assert not s.cancel(b)
