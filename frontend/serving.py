"""Chat and text completions: preprocess -> route -> call the worker -> detokenize -> respond.

The per-token path is kept lean: SSE chunks are built from per-request byte templates around one
``orjson.dumps`` of the text delta, several ready frames are coalesced into one chunk when the client is
behind, and no pydantic object is created per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson

from dynamo_rt import errors, faults
from dynamo_rt.protocol import (
    Data,
    Final,
    GenerateRequest,
    KvTransferParams,
    SamplingParams,
    StopConditions,
    TokenLogprob,
    encode,
)
from dynamo_rt.stream import ResponseStream
from dynamo_rt.transport import Transport
from frontend.chat_output import OutputPlan
from frontend.metrics import FrontendMetrics, observe_many
from frontend.models import ModelManager, ServedModel
from frontend.pins import call_stoppable, release_pin, stop_prefill
from frontend.sse import ChunkTemplates, js

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"

# Test-only fault hook: with this set to N in the frontend's environment, a choice raises RuntimeError once N
# tokens of it have arrived, standing in for a frontend bug in the middle of a stream
# (tests/frontend/test_stream_errors.py). Read once per Dispatcher; nothing sets it outside tests.
TEST_FAULT_ENV = "DYN_TEST_FAULT_RAISE_AFTER_TOKENS"


def _test_fault_after_tokens() -> int | None:
    raw = os.environ.get(TEST_FAULT_ENV, "")
    return int(raw) if raw else None


@dataclass
class Prepared:
    """A validated request ready to run: token ids, sampling and stop conditions, response shape."""

    kind: str  # "chat" | "completion"
    model: ServedModel
    # One per prompt (completions accept a batch); an array("i") from Frontend.prepare (no ints for the GC to walk).
    prompts: list[Sequence[int]]
    sampling: SamplingParams
    stop: StopConditions
    stop_strings: list[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    pinned: str | None
    request_id: str
    created: int
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)
    include_stop_str: bool = False
    skip_special_tokens: bool = True
    deadline: float = float("inf")  # time.time() by which the whole request (queue, migrations) must end
    cache_salt: str = ""  # tenant salt (frontend/tenants.py): seeds every block hash of this request
    output: OutputPlan | None = None  # tool-call / reasoning parsing of chat output (frontend/chat_output.py)
    arrived: float = 0.0  # time.perf_counter() when the request arrived (TTFT and dispatch time count from it)
    # The seed of a request that names none: assigned here so every attempt of a choice draws the same stream.
    assigned_seed: int = field(default_factory=lambda: secrets.randbits(63))

    def remaining(self) -> float:
        """Seconds left before the deadline; DeadlineExceeded once it has passed."""
        left = self.deadline - time.time()
        if left <= 0:
            raise errors.DeadlineExceeded("request deadline exceeded")
        return left


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Dispatcher:
    """Runs one prepared choice against the workers: route, (maybe) prefill remotely, call, stream frames.

    Disaggregation: with prefill workers up, the prompt is prefilled on a prefill worker and the decode
    worker pulls its KV blocks -- unless the part of the prompt not already cached on the chosen decode
    worker is shorter than ``disagg_threshold`` tokens (prefilling it locally is cheaper than a hand-off).
    If the prefill worker fails, the decode worker prefills locally: the request still completes.
    """

    def __init__(self, manager: ModelManager, transport: Transport, metrics: FrontendMetrics, *,
                 request_timeout: float = 600.0, disagg_threshold: int = 64, migration_limit: int = 3) -> None:
        self.manager = manager
        self.transport = transport
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.disagg_threshold = disagg_threshold
        self.migration_limit = migration_limit
        self.test_fault_after_tokens = _test_fault_after_tokens()

    async def open(self, p: Prepared, prompt: Sequence[int], sub_id: str, index: int, *, generated: int = 0,
                   exclude: set[str] | None = None
                   ) -> tuple[ResponseStream, Callable[[], None], str, Callable[[], None]]:
        """Start choice ``index``; returns its stream, a callback to run when it ends (router bookkeeping),
        the worker's id and a callback to run at its first token (the router stops counting its prefill).
        ``generated`` tokens were produced before (a migration): they are the tail of ``prompt``, sent as
        ``output_offset``, and count against max_tokens / min_tokens; ``exclude`` lists workers that failed
        this request."""
        sm = p.model
        sampling = p.sampling
        if sampling.temperature > 0 and (sampling.seed is not None or replays(sm)):
            seed = choice_seed(p.assigned_seed if sampling.seed is None else sampling.seed, index)
            if seed != sampling.seed:
                sampling = SamplingParams(**{**_struct_dict(sampling), "seed": seed})
        stop = p.stop
        if generated:
            stop = StopConditions(max_tokens=stop.max_tokens - generated,
                                  min_tokens=max(0, stop.min_tokens - generated),
                                  stop_token_ids=stop.stop_token_ids, ignore_eos=stop.ignore_eos)
        # An array("i") prompt is written as the list it holds (protocol's encoder), without a list made here.
        req = GenerateRequest(request_id=sub_id, token_ids=cast(list[int], prompt), sampling=sampling, stop=stop,
                              model=sm.name, cache_salt=p.cache_salt, output_offset=generated)
        pool = "agg" if sm.pool("agg") else "decode"
        workers = [w for w in sm.pool(pool) if not exclude or w not in exclude]
        if not workers and exclude:
            # Every worker failed this request once: a stall (a busy host, a lost frame) rather than a death,
            # or they would have left discovery. Retrying them beats a 503; --migration-limit bounds it.
            workers = list(sm.pool(pool))
        if not workers:
            raise errors.Unavailable(f"model {sm.name!r} has no ready worker")
        t0 = time.perf_counter()
        hashes = sm.hashes(prompt, p.cache_salt) if sm.routers[pool].mode == "kv" else None
        router = sm.routers[pool]
        pinned = p.pinned if not exclude or p.pinned not in exclude else None  # a failed pin is not kept
        decision = router.select(workers, prompt, sm.loads, pinned, block_hashes=hashes)
        self.metrics.router_overhead.observe(time.perf_counter() - t0)

        stream: ResponseStream | None = None

        def done() -> None:
            router.on_request_finished(decision.worker_id, decision.request_blocks, decision.key)
            if stream is not None and stream.undelivered and req.kv_transfer is not None:
                # The decode worker was gone before the request reached it: nobody will take the pin over.
                release_pin(self.transport, self.manager.view.namespace, req.kv_transfer)

        def first() -> None:
            router.on_first_token(decision.worker_id, decision.key)

        # The first attempt's first publication (to the prefill worker when disaggregated) ends the frontend's
        # part of the request's TTFT before a worker has it.
        sent: Callable[[], None] | None = None
        if not generated and index == 0 and p.arrived:
            hist = self.metrics.model(sm.name).dispatch

            def sent() -> None:
                hist.observe(time.perf_counter() - p.arrived)

        try:
            if faults.enabled:
                await faults.hit("frontend.routed", sub_id)
            if pool == "decode" and sm.pool("prefill"):
                uncached = len(prompt) - decision.overlap_blocks * sm.card.kv_block_size
                if uncached >= self.disagg_threshold:
                    req.kv_transfer = await self._remote_prefill(sm, req, hashes, p.remaining(), sent)
                    sent = None
            rec = sm.instances.get(decision.worker_id)
            if rec is None:
                raise errors.Unavailable(f"worker {decision.worker_id} left")
            stream = await call_stoppable(self.transport, self.manager.view.namespace, rec.subject, sub_id,
                                          encode(req), min(self.request_timeout, p.remaining()))
            if sent is not None:
                sent()
        except BaseException as exc:
            done()
            if req.kv_transfer is not None:  # the prefill worker's pin was never handed to a decode worker
                release_pin(self.transport, self.manager.view.namespace, req.kv_transfer)
            if exclude is not None and isinstance(exc, errors.DynamoError):
                # The worker failed before a stream existed (gone, no responder): the caller never learns its
                # id, so mark it here, or a pinned request would retry the dead worker until its lease ends.
                exclude.add(decision.worker_id)
            raise
        return stream, done, decision.worker_id, first

    async def _remote_prefill(self, sm: ServedModel, req: GenerateRequest, hashes: list[int] | None, timeout: float,
                              sent: Callable[[], None] | None = None) -> KvTransferParams | None:
        prefill_workers = sm.pool("prefill")
        router = sm.routers["prefill"]
        d = router.select(prefill_workers, req.token_ids, sm.loads, block_hashes=hashes)
        rec = sm.instances.get(d.worker_id)
        # The real stop conditions: the prefill worker produces one token either way, and skips the hand-off
        # when that token already ends the request.
        preq = GenerateRequest(request_id=req.request_id + "-p", token_ids=req.token_ids, sampling=req.sampling,
                               stop=req.stop, model=req.model, prefill_only=True, cache_salt=req.cache_salt,
                               output_offset=req.output_offset)
        stream: ResponseStream | None = None
        try:
            if rec is None:
                raise errors.Unavailable(f"prefill worker {d.worker_id} left")
            stream = await call_stoppable(self.transport, self.manager.view.namespace, rec.subject, preq.request_id,
                                        encode(preq), timeout)
            if sent is not None:
                sent()
            if faults.enabled:
                await faults.hit("frontend.remote_prefill", preq.request_id)
            async for frame in stream:
                if isinstance(frame, Final):
                    if frame.kv_transfer is None:
                        raise errors.Unavailable("prefill worker returned no KV transfer parameters")
                    return frame.kv_transfer
            raise errors.Unavailable("prefill stream ended without a final frame")
        except errors.DynamoError as exc:
            # The decode worker prefills locally; the request still completes.
            log.warning("remote prefill on %s failed (%s); prefilling on the decode worker", d.worker_id, exc)
            self.metrics.prefill_fallbacks.labels(sm.name).inc()
            return None
        finally:
            router.on_request_finished(d.worker_id, d.request_blocks, d.key)
            if stream is not None:  # a cancelled wait stops the prefill and frees what it pinned
                stop_prefill(stream, self.transport, self.manager.view.namespace)


# Engines that resume a request at ``output_offset`` exactly: counter-based random stream, penalties over the
# offset tail (the reference engine; the mocker's outputs are a function of the position). The others
# (vLLM, SGLang, TRT-LLM) restart their sampler state on the new worker.
REPLAY_ENGINES = frozenset({"reference", "mocker"})


def replays(sm: ServedModel) -> bool:
    """Every worker of ``sm`` replays a migrated request exactly (then any request may migrate, and an
    unseeded sampled one gets a seed so that it replays too)."""
    return bool(sm.instances) and all(r.engine in REPLAY_ENGINES for r in sm.instances.values())


def _not_replayable(p: Prepared) -> str:
    """On an engine that does not replay: why migrating ``p`` would change its output ("" when it would not:
    greedy, or unseeded sampling, which continues as a valid sample)."""
    s = p.sampling
    if s.seed is not None and s.temperature > 0:
        return "it samples with a seed and this engine cannot resume its random stream elsewhere"
    if s.presence_penalty or s.frequency_penalty:
        return "presence/frequency penalties count output tokens only, and this engine would count them as prompt"
    return ""


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` (n > 1): the request's own for choice 0, a splitmix64 mix of
    ``(seed, index)`` for the others, so no choice shares a stream with another request's (``seed + index``
    would: choice 1 of seed 7 is choice 0 of seed 8)."""
    if index == 0:
        return seed
    x = (seed + 0x9E3779B97F4A7C15 * index) & _MASK64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return (x ^ (x >> 31)) >> 1  # 63 bits: a non-negative int64 on the wire


_MASK64 = (1 << 64) - 1


def _struct_dict(s: Any) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


def new_request_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


# ---------------------------------------------------------------------------------------------- SSE


def error_event(exc: errors.DynamoError) -> bytes:
    return b"data: " + orjson.dumps({"error": error_body(exc)["error"]}) + b"\n\n"


def error_body(exc: errors.DynamoError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": errors.error_type(exc.status), "param": exc.param,
                      "code": str(exc.code)}}


def usage_dict(results: list[ChoiceResult], prompt_tokens: int) -> dict[str, Any]:
    completion = sum(r.completion_tokens for r in results)
    cached = max((r.cached_tokens for r in results), default=0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _piece(pre: Any, token_id: int) -> str:
    text: str = pre.decode([token_id], skip_special_tokens=False)
    return text


def logprobs_json(p: Prepared, pre: Any, lps: list[TokenLogprob]) -> Any:
    if p.kind == "chat":
        content = []
        for lp in lps:
            tok = _piece(pre, lp.token_id)
            content.append({
                "token": tok, "logprob": lp.logprob, "bytes": list(tok.encode("utf-8", "replace")),
                "top_logprobs": [{"token": _piece(pre, t), "logprob": v,
                                  "bytes": list(_piece(pre, t).encode("utf-8", "replace"))}
                                 for t, v in lp.top],
            })
        return {"content": content}
    return {
        "tokens": [_piece(pre, lp.token_id) for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_piece(pre, t): v for t, v in lp.top} for lp in lps],
        "text_offset": [],
    }


Sink = asyncio.Queue[tuple[int, str, list[TokenLogprob] | None]]


class Writer(Protocol):
    """Writes a chunk of the response body now, from plain (non-async) code."""

    def write(self, body: bytes) -> None: ...

    def write3(self, a: bytes, b: bytes, c: bytes) -> None: ...  # write(a + b + c), maybe framed in one step


def _final_reason(frame: Final) -> str:
    reason = frame.finish_reason or "length"
    return reason if reason in ("stop", "length") else "stop"


async def run_choice(engine: Dispatcher, p: Prepared, prompt: Sequence[int], index: int,
                     sink: Sink | None) -> ChoiceResult:
    """Run one choice to the end. With ``sink``, text deltas are pushed as they come (streaming)."""
    res = ChoiceResult(index=index, prompt_tokens=len(prompt))
    async for text, lps in choice_events(engine, p, prompt, res):
        if sink is not None:
            sink.put_nowait((index, text, lps))
    return res


def _choice_done(q: asyncio.Queue[int], index: int, _task: asyncio.Future[Any]) -> None:
    q.put_nowait(index)  # the choice's task ended: the stream loop picks its index up

Emit = Callable[[str, "list[TokenLogprob] | None"], None]


async def choice_events(engine: Dispatcher, p: Prepared, prompt: Sequence[int], res: ChoiceResult,
                        emit: Emit | None = None) -> AsyncIterator[tuple[str, list[TokenLogprob] | None]]:
    """Text deltas of one choice as they come; ``res`` holds the totals when the iterator ends.

    With ``emit`` (a plain function that writes a delta out at once), the deltas go to it instead and the
    iterator yields nothing: the data frames are then taken straight from the NATS parser's call
    (:meth:`ResponseStream.set_consumer`), detokenized and emitted there, so a token never wakes this task.
    This task still opens the stream, migrates, and handles the final frame and errors."""
    from frontend.detok import OutputProcessor

    sm = p.model
    index = res.index
    proc = OutputProcessor(sm.pre, p.stop_strings, p.stop.stop_token_ids, ignore_eos=p.stop.ignore_eos,
                           min_tokens=p.stop.min_tokens, max_tokens=p.stop.max_tokens, prompt_ids=prompt,
                           skip_special_tokens=p.skip_special_tokens,
                           include_stop_str_in_output=p.include_stop_str)
    want_lp = p.logprobs is not None
    keep_text = not p.stream  # a streamed choice's text goes out chunk by chunk; only complete() reads it whole
    fault = engine.test_fault_after_tokens
    m = engine.metrics
    mm = m.model(sm.name)
    gaps: list[float] = []  # inter-token latencies, handed to the histogram in batches (observe_many)
    last = time.perf_counter()
    t_start = p.arrived or last
    attempt = 0
    excluded: set[str] = set()
    stream: ResponseStream | None = None
    first: Callable[[], None] | None = None
    stopped = False  # a stop string ended the choice

    def on_tokens(ids: list[int], lps: list[TokenLogprob] | None) -> tuple[str, list[TokenLogprob] | None]:
        """One step of the choice: the text delta (and logprobs) of ``ids``; sets ``stopped``."""
        nonlocal first, last, stopped
        if first is not None:
            first()
            first = None
        now = time.perf_counter()
        if not res.token_ids:
            mm.ttft.observe(now - t_start)
        else:
            gaps.append((now - last) / len(ids))
            if len(gaps) >= 64:
                observe_many(mm.itl, gaps)
                gaps.clear()
        last = now
        if p.stop_strings and len(ids) > 1:
            delta, reason, ids, lps = _process_each(proc, ids, lps)
        else:
            delta, reason = proc.process(ids)
        res.token_ids.extend(ids)
        if fault is not None and len(res.token_ids) >= fault:
            raise RuntimeError(f"test fault ({TEST_FAULT_ENV}) after {len(res.token_ids)} tokens")
        if lps and want_lp:
            res.logprobs.extend(lps)
        else:
            lps = None
        if delta and keep_text:
            res.text += delta
        if reason is not None and isinstance(proc.stop_reason, str):
            # A stop string matched: the worker keeps generating unless told to stop.
            res.finish_reason = reason
            res.completion_tokens = proc.num_tokens
            stopped = True
        return delta, lps

    def consume(frame: Data) -> None:  # called by the NATS parser (emit mode)
        delta, lps = on_tokens(frame.token_ids, frame.logprobs)
        if delta or lps:
            emit(delta, lps)  # type: ignore[misc]
        if stopped and stream is not None:
            stream.interrupt()

    sm.inflight += 1
    try:
        while True:
            base = len(res.token_ids)  # tokens produced by earlier attempts (migration)
            sub_id = f"{p.request_id}-{index}" + (f"-m{attempt}" if attempt else "")
            worker = ""
            stream = None
            done: Callable[[], None] | None = None
            first = None
            try:
                stream, done, worker, first = await engine.open(p, [*prompt, *res.token_ids] if base else prompt,
                                                                sub_id, index, generated=base, exclude=excluded)
                if emit is not None:
                    stream.set_consumer(consume)
                async for frame in stream:
                    final: Final | None = None
                    ids: list[int] = []
                    lps: list[TokenLogprob] | None = None
                    if isinstance(frame, Final):
                        final = frame
                    else:
                        ids = frame.token_ids
                        lps = frame.logprobs
                        # The client is behind when frames pile up: send them as one chunk.
                        while stream.pending_frames():
                            nxt = await stream.__anext__()
                            if isinstance(nxt, Final):
                                final = nxt
                                break
                            ids = ids + nxt.token_ids
                            if nxt.logprobs:
                                lps = (lps or []) + nxt.logprobs
                    if ids:
                        delta, lps = on_tokens(ids, lps)
                        if delta or lps:
                            if emit is not None:
                                emit(delta, lps)
                            else:
                                yield delta, lps
                        if stopped:
                            break
                    if final is not None:
                        res.completion_tokens = base + (final.completion_tokens or len(res.token_ids) - base)
                        if attempt == 0:
                            res.cached_tokens = final.cached_tokens
                        res.finish_reason = _final_reason(final)
                        tail = proc.finish(res.finish_reason)
                        if tail:
                            if keep_text:
                                res.text += tail
                            if emit is not None:
                                emit(tail, None)
                            else:
                                yield tail, None
                        break
                else:
                    if not stopped:  # (the consumer interrupts the iteration at a stop string)
                        raise errors.Unavailable("worker stream ended without a final frame")
                break
            except errors.DynamoError as exc:
                if not _migratable(exc) or attempt >= engine.migration_limit:
                    raise
                why = "" if replays(sm) else _not_replayable(p)
                if why:
                    raise errors.Unavailable(f"{exc.message}; the request cannot be moved to another worker "
                                             f"because {why}") from None
                attempt += 1
                if worker:
                    excluded.add(worker)
                m.migrations.labels(sm.name).inc()
                if faults.enabled:
                    await faults.hit("frontend.migrating", sub_id)
                log.warning("request %s: worker %s failed after %d tokens (%s); migrating (attempt %d/%d)",
                            sub_id, worker or "?", len(res.token_ids), exc.message, attempt, engine.migration_limit)
            finally:
                if done is not None:
                    done()
                if stream is not None:
                    await stream.cancel()
    finally:
        sm.inflight -= 1
        observe_many(mm.itl, gaps)
    mm.output_tokens.inc(res.completion_tokens)


def _process_each(proc: Any, ids: list[int], lps: list[TokenLogprob] | None
                  ) -> tuple[str, str | None, list[int], list[TokenLogprob] | None]:
    """``proc.process`` one id at a time, so a stop string ends the choice at the token that completes it
    whatever the frame coalescing (else the tokens, logprobs and usage after it depend on how many frames
    were pending, and a migrated or a busy stream would differ from a quiet one)."""
    text = ""
    for k, t in enumerate(ids):
        delta, reason = proc.process([t])
        text += delta
        if reason is not None:
            return text, reason, ids[:k + 1], lps[:k + 1] if lps else lps
    return text, None, ids, lps


def _migratable(exc: errors.DynamoError) -> bool:
    """Worker-side failures (gone, crashed, transport lost) are retried elsewhere; bad input and deadlines
    are not."""
    return exc.code in (errors.ErrorCode.UNAVAILABLE, errors.ErrorCode.INTERNAL)


async def stream_response(engine: Dispatcher, p: Prepared, direct: Writer | None = None) -> AsyncIterator[bytes]:
    """The SSE body of a streaming request: it ends with a finish_reason or an error event, then [DONE].

    With ``direct`` (a writer the caller provides once the response has started, see
    :class:`frontend.app.DirectWriter`), a single plain choice's text chunks are written through it from the
    NATS frame callback instead of being yielded; what is yielded (role, finish, usage, [DONE], errors) goes
    out after them."""
    t = ChunkTemplates(p)
    pre = p.model.pre
    tasks: list[asyncio.Task[ChoiceResult]] = []
    try:
        if len(p.prompts) * p.n == 1:  # the common case: no fan-in machinery on the token path
            res = ChoiceResult(index=0, prompt_tokens=len(p.prompts[0]))
            if p.kind == "chat":
                yield t.content(0, "", role=True)
            post = p.output.new() if p.output is not None else None  # tool calls / reasoning
            if post is not None:
                async for chunk in post.stream(t, 0, choice_events(engine, p, p.prompts[0], res),
                                               lambda lps: orjson.dumps(logprobs_json(p, pre, lps))):
                    yield chunk
            elif direct is not None:
                write, write3 = direct.write, direct.write3
                before, after = t.text_parts(0)

                def emit(text: str, lps: list[TokenLogprob] | None) -> None:
                    if lps:
                        write(t.content(0, text, orjson.dumps(logprobs_json(p, pre, lps))))
                    else:
                        write3(before, js(text), after)

                async for _ in choice_events(engine, p, p.prompts[0], res, emit):
                    pass  # (nothing is yielded in emit mode)
            else:
                async for text, lps in choice_events(engine, p, p.prompts[0], res):
                    yield t.content(0, text, orjson.dumps(logprobs_json(p, pre, lps)) if lps else None)
            # finish + usage + [DONE] leave in one write (the response sender sees the DONE suffix).
            tail = t.finish(0, res.finish_reason or "stop") if post is None else \
                post.finish_chunk(t, 0, res.finish_reason)
            if p.include_usage:
                tail += t.usage(usage_dict([res], len(p.prompts[0])))
            yield tail + DONE
            return
        queue: Sink = asyncio.Queue()  # several choices: their deltas and ends fan in here
        done_q: asyncio.Queue[int] = asyncio.Queue()
        for prompt in p.prompts:
            for _ in range(p.n):
                i = len(tasks)
                tk = asyncio.ensure_future(run_choice(engine, p, prompt, i, queue))
                tk.add_done_callback(functools.partial(_choice_done, done_q, i))
                tasks.append(tk)
        if p.kind == "chat":
            for i in range(len(tasks)):
                yield t.content(i, "", role=True)
        posts = [p.output.new() for _ in tasks] if p.output is not None else None  # tool calls / reasoning
        results: list[ChoiceResult] = []
        getter = asyncio.ensure_future(queue.get())
        finisher = asyncio.ensure_future(done_q.get())
        try:
            while len(results) < len(tasks):
                await asyncio.wait((getter, finisher), return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    i, text, lps = getter.result()
                    getter = asyncio.ensure_future(queue.get())
                    lp = orjson.dumps(logprobs_json(p, pre, lps)) if lps else None
                    yield t.content(i, text, lp) if posts is None else posts[i].chunk(t, i, text, lp)
                    continue
                i = finisher.result()
                finisher = asyncio.ensure_future(done_q.get())
                while not queue.empty():  # deltas of this choice queued before it ended go first
                    j, text, lps = queue.get_nowait()
                    lp = orjson.dumps(logprobs_json(p, pre, lps)) if lps else None
                    yield t.content(j, text, lp) if posts is None else posts[j].chunk(t, j, text, lp)
                r = tasks[i].result()  # raises the choice's error
                results.append(r)
                if posts is None:
                    yield t.finish(i, r.finish_reason or "stop")
                else:
                    yield posts[i].flush(t, i) + posts[i].finish_chunk(t, i, r.finish_reason)
        finally:
            getter.cancel()
            finisher.cancel()
        if p.include_usage:
            yield t.usage(usage_dict(results, sum(len(pr) for pr in p.prompts))) + DONE
        else:
            yield DONE
    except errors.DynamoError as exc:
        yield error_event(exc) + DONE
    except Exception as exc:  # a bug after the headers went out: the client still gets an error, then [DONE]
        log.exception("request %s: stream failed", p.request_id)
        yield error_event(errors.internal(exc)) + DONE
    finally:
        for tk in tasks:
            if not tk.done():
                tk.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def complete(engine: Dispatcher, p: Prepared) -> dict[str, Any]:
    tasks = []
    idx = 0
    for prompt in p.prompts:
        for _ in range(p.n):
            tasks.append(asyncio.ensure_future(run_choice(engine, p, prompt, idx, None)))
            idx += 1
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for tk in tasks:
            if not tk.done():
                tk.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
    pre = p.model.pre
    choices: list[dict[str, Any]] = []
    for r in results:
        lp = logprobs_json(p, pre, r.logprobs) if p.logprobs is not None and r.logprobs else None
        if p.kind == "chat":
            msg, reason = ({"role": "assistant", "content": r.text}, r.finish_reason) if p.output is None \
                else p.output.message(r.text, r.finish_reason)  # tool calls / reasoning
            choices.append({"index": r.index, "message": msg, "logprobs": lp, "finish_reason": reason})
        else:
            text = (p.prompt_texts[r.index // p.n] + r.text) if p.echo and p.prompt_texts else r.text
            choices.append({"index": r.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
    prompt_tokens = sum(len(pr) for pr in p.prompts)
    return {
        "id": p.request_id,
        "object": "chat.completion" if p.kind == "chat" else "text_completion",
        "created": p.created,
        "model": p.model.name,
        "choices": choices,
        "usage": usage_dict(results, prompt_tokens),
    }
