"""The reference engine's step thread: schedule -> build the batch -> forward -> sample -> post-process, and
the hand-back of outputs to the event loop.

Place: :class:`~workers.reference.engine.ReferenceEngine` starts one :class:`StepThread` per run and shares
its lock and wake event with it. Each pass: under the lock, the scheduler chooses the work and
:class:`~workers.reference.batch.BatchBuilder` builds its tensors; without the lock, the forward and
:func:`~workers.reference.sampler.sample` run; under the lock again, each sampled token is appended and
turned into an :class:`~workers.common.engine.EngineOutput`, which ``call_soon_threadsafe`` puts on the
request's queue. A failed step fails the requests in it (a failed schedule: every running one) with a
``DynamoError`` instead of hanging them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from dynamo_rt.errors import DynamoError
from dynamo_rt.protocol import FinishReason, KvTransferParams, TokenLogprob
from workers.common.engine import EngineOutput
from workers.reference.batch import BatchBuilder, Plan
from workers.reference.requests import Request, sample_specs
from workers.reference.sampler import sample
from workers.reference.scheduler import Scheduler
from workers.reference.testfaults import KillSwitch

log = logging.getLogger(__name__)

Outputs = list[tuple[Request, EngineOutput | BaseException]]


class StepThread:
    """One engine run's step thread. ``flush_events`` hands the block manager's pending KV events to the
    loop (called with ``lock`` held)."""

    def __init__(self, sched: Scheduler[Request], batch: BatchBuilder, pool: torch.Tensor, *, lock: threading.Lock,
                 wake: threading.Event, loop: asyncio.AbstractEventLoop, flush_events: Callable[[], None],
                 context_length: int, torch_threads: int | None, name: str,
                 kill_switch: KillSwitch | None = None) -> None:
        self.sched = sched
        self.batch = batch
        self.pool = pool
        self.lock = lock
        self.wake = wake
        self.loop = loop
        self.flush_events = flush_events
        self.context_length = context_length
        self.torch_threads = torch_threads
        self.steps = 0  # forwards run (tests / bench)
        self.kill_switch = kill_switch
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Blocks until the thread is out (after the step it is computing)."""
        self._stopping = True
        self.wake.set()
        self._thread.join()

    def _run(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # OpenMP's thread count is per calling thread
        sched, batch = self.sched, self.batch
        with torch.inference_mode():
            while not self._stopping:
                self.wake.clear()
                try:
                    with self.lock:
                        sched.expire_pins(time.monotonic())
                        step = sched.schedule()
                        for seq in step.loads:
                            self._resolve_load(seq)
                        plan = batch.build(step.chosen) if step.chosen else None
                        self.flush_events()
                except Exception as e:  # a bug: fail what is running rather than hang it
                    log.exception("reference engine scheduling failed")
                    self._fail_all(e)
                    continue
                if plan is None:
                    self.wake.wait(self._idle_timeout())
                    continue
                try:
                    logits = batch.forward(plan.batch, self.pool)
                    tokens, lps = sample(logits, sample_specs(plan.samplers))
                except Exception as e:
                    log.exception("reference engine step failed")
                    self._fail_step(plan, e)
                    continue
                self.steps += 1
                with self.lock:
                    out = self._postprocess_locked(plan, tokens, lps)
                    self.flush_events()
                self._deliver(out)
                if self.kill_switch is not None:
                    self.kill_switch.tokens(len(out))

    def _resolve_load(self, seq: Request) -> None:
        """``seq``'s local blocks are allocated: its KV load on the loop may start the transfer."""
        if seq.load_future is not None:
            self.loop.call_soon_threadsafe(_set_result, seq.load_future, list(seq.blocks))

    def _idle_timeout(self) -> float:
        with self.lock:
            nxt = self.sched.next_pin_deadline()
        return 1.0 if nxt is None else max(0.0, min(1.0, nxt - time.monotonic()))

    def _postprocess_locked(self, plan: Plan[Request], tokens: list[int], lps: list[TokenLogprob | None]
                            ) -> Outputs:
        sched = self.sched
        out: Outputs = []
        sampled = {id(s): i for i, s in enumerate(plan.samplers)}
        for seq, n in plan.seqs:
            if not sched.advance(seq, n):
                continue
            i = sampled.get(id(seq))
            if i is None:
                continue
            tok = tokens[i]
            seq.tokens.append(tok)
            reason = seq.finish_reason(tok, self.context_length)
            if seq.sampling.guide is not None and seq.sampling.guide.step(tok) and reason is None:
                reason = FinishReason.STOP.value  # the document is complete (and ignore_eos kept EOS going)
            lp = lps[i]
            o = EngineOutput(token_ids=[tok], logprobs=[lp] if lp is not None else None, finish_reason=reason)
            if not seq.sent_first:
                o.prompt_tokens = seq.prompt_len
                o.cached_tokens = seq.cached_tokens
                seq.sent_first = True
            if seq.req.prefill_only:
                self._finish_prefill_only_locked(seq, o, lp)
            elif reason is not None:
                sched.finish_running(seq)
            out.append((seq, o))
        return out

    def _finish_prefill_only_locked(self, seq: Request, o: EngineOutput, lp: TokenLogprob | None) -> None:
        """The first token is out: pin the prompt's blocks for a decode worker, unless it is already over."""
        complete = o.finish_reason == FinishReason.STOP.value or seq.req.stop.max_tokens <= 1 \
            or len(seq.tokens) >= self.context_length
        if complete:
            o.finish_reason = o.finish_reason or FinishReason.LENGTH.value
            self.sched.finish_running(seq)
            return
        # Like a max_tokens=1 request: the runtime forwards kv_transfer with the final frame.
        o.finish_reason = FinishReason.LENGTH.value
        pin_id, blocks = self.sched.pin_prompt(seq)
        opaque: dict[str, Any] = {}
        if lp is not None:
            opaque["first_logprob"] = [lp.token_id, lp.logprob, [list(t) for t in lp.top]]
        o.kv_transfer = KvTransferParams(block_ids=blocks, num_tokens=seq.prompt_len,
                                         first_token=seq.tokens[-1], pin_id=pin_id, opaque=opaque)

    def _fail_all(self, exc: Exception) -> None:
        self._fail(None, exc)

    def _fail_step(self, plan: Plan[Request], exc: Exception) -> None:
        self._fail([seq for seq, _ in plan.seqs], exc)

    def _fail(self, seqs: list[Request] | None, exc: Exception) -> None:
        """End ``seqs`` (None: every running sequence) with an error."""
        err = DynamoError(f"engine step failed: {type(exc).__name__}: {exc}")
        with self.lock:
            if seqs is None:
                seqs = list(self.sched.running)
            self.sched.abort(seqs)
            self.flush_events()
        self._deliver([(s, err) for s in seqs if not s.cancelled])

    def _deliver(self, items: Outputs) -> None:
        if not items:
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: Outputs) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


def _set_result(fut: asyncio.Future[list[int]], value: list[int]) -> None:
    if not fut.done():
        fut.set_result(value)
