"""CPU of the frontend's token path alone, in process: no HTTP, no NATS, no sockets (a helper of
``frontend_overhead.py``'s per-hop accounting, not a bench of its own).

One streamed chat request = ``OpenAIResponse`` -> ``stream_response`` -> ``choice_events`` ->
``ResponseStream`` -> detokenizer -> SSE templates -> the ASGI ``send``, with the worker's frames pushed into
the response stream one at a time, each when the reader waits for it (one event-loop wake-up per token, as
over NATS); then the same with a direct writer, the frames going to the consumer from the "NATS parser's" call
(the frontend's path since issue #22). Prints the process CPU per request (32 tokens), min and median of 5
repeats.
Run: ``PYTHONPATH=. .venv/bin/python bench/_token_path.py [REQUESTS]``; point ``PYTHONPATH`` at another
source tree (``bench/out/ab/<sha>`` from ``--ab-ref``) to compare commits.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: another tree can be measured

from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import Data, Final, SamplingParams, StopConditions, encode
from dynamo_rt.stream import ResponseStream
from frontend import serving
from frontend.app import OpenAIResponse
from frontend.metrics import FrontendMetrics
from frontend.models import ServedModel
from frontend.preprocess import Preprocessor

TOKENS = 32


class _Frames:
    """The worker's frames of one request: random token ids, then a Final."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.ids = [rng.randrange(100, 2000) for _ in range(TOKENS)]
        self.next = 0

    def push_next(self, stream: ResponseStream) -> None:
        i = self.next
        if i < TOKENS:
            stream._push(encode(Data(seq=i, token_ids=[self.ids[i]])))
        elif i == TOKENS:
            stream._push(encode(Final(seq=i, finish_reason="length", completion_tokens=TOKENS)))
        self.next = i + 1


class _Stream(ResponseStream):
    frames: _Frames

    async def _get(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._consumer is not None:  # direct: every frame comes from "the NATS parser", no reader wake-up
            loop.call_soon(self._push_all)
        else:
            loop.call_soon(self.frames.push_next, self)  # the next token arrives while we wait
        return await super()._get()

    def _push_all(self) -> None:
        while self.frames.next <= TOKENS:
            self.frames.push_next(self)


class _Writer:
    """The direct writer's interface, keeping the chunks (no socket)."""

    busy = False

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def write(self, body: bytes) -> None:
        self.chunks.append(body)

    def write3(self, a: bytes, b: bytes, c: bytes) -> None:
        self.chunks.append(b"%x\r\n%b%b%b\r\n" % (len(a) + len(b) + len(c), a, b, c))

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class _NoTransport:
    _streams: dict[str, ResponseStream] = {}


class _Dispatcher(serving.Dispatcher):
    """A dispatcher whose worker is :class:`_Frames` (routing and NATS are not part of this measurement)."""

    async def open(self, p: serving.Prepared, prompt: list[int], sub_id: str, seed_offset: int, *,
                   generated: int = 0, exclude: set[str] | None = None,
                   ) -> tuple[ResponseStream, Callable[[], None], str, Callable[[], None]]:  # fmt: skip
        st = _Stream(_NoTransport(), "bench", sub_id, time.time() + 60, 5.0)  # type: ignore[arg-type]
        st.frames = _Frames(len(sub_id))
        return st, lambda: None, "worker", lambda: None


async def _one(engine: serving.Dispatcher, sm: ServedModel, k: int, direct: bool) -> int:
    p = serving.Prepared(kind="chat", model=sm, prompts=[[1, 2, 3, 4, 5]], sampling=SamplingParams(),
                         stop=StopConditions(max_tokens=TOKENS, ignore_eos=True), stop_strings=[], n=1, stream=True,
                         include_usage=True, logprobs=None, pinned=None, request_id=f"chatcmpl-{k:024x}", created=1)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    chunks: list[bytes] = []

    async def receive() -> Any:
        await never

    async def send(msg: Any) -> None:
        if msg["type"] == "http.response.body":
            chunks.append(msg["body"])

    writer = _Writer(chunks) if direct else None
    resp = OpenAIResponse(stream=lambda _: serving.stream_response(engine, p, writer))  # type: ignore[arg-type]
    await resp({"type": "http"}, receive, send)  # type: ignore[arg-type]
    if not chunks[-1].endswith(serving.DONE):
        raise RuntimeError(f"stream did not end with [DONE]: {chunks[-1][:200]!r}")
    return len(chunks)


async def main(n: int) -> None:
    pre = Preprocessor.from_dir(ensure_tiny_model())
    sm = ServedModel(name="tiny", card=None, pre=pre, created=0)  # type: ignore[arg-type]
    engine = _Dispatcher(None, None, FrontendMetrics(), migration_limit=0)  # type: ignore[arg-type]
    for direct in (False, True):
        await _one(engine, sm, 0, direct)
        per_req = []
        for _ in range(5):
            t0 = time.process_time()
            for k in range(n):
                events = await _one(engine, sm, k, direct)
            per_req.append((time.process_time() - t0) / n * 1e6)
        print(f"token path ({'direct, from the frame callback' if direct else 'task wake-up per token'}): "
              f"{min(per_req):.0f} us CPU per request (median {statistics.median(per_req):.0f}), "
              f"{TOKENS} tokens, {events} SSE chunks", flush=True)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
