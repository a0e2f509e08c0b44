"""The NATS request plane against a real nats-server: streams, cancellation, typed errors, dead workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncGenerator

import pytest

from dynamo_rt import errors
from dynamo_rt.protocol import Data, Final
from dynamo_rt.transport import BATCH_FRAMES_MAX, RequestContext, Transport
from tests.conftest import arun


async def _pair(url: str) -> tuple[Transport, Transport]:
    a, b = Transport(url), Transport(url)
    await a.connect()
    await b.connect()
    return a, b


def test_long_stream_complete_and_in_order(nats_server: object) -> None:
    n = 10_000

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        for i in range(n):
            yield Data(seq=0, token_ids=[i])
        yield Final(seq=0, finish_reason="length", completion_tokens=n)

    async def main() -> None:
        server, client = await _pair(nats_server.url)  # type: ignore[attr-defined]
        try:
            await server.serve("t.stream.gen.1", handler)
            stream = await client.call("t.stream.gen.1", "r1", b"", timeout=60)
            got: list[int] = []
            final = None
            async for frame in stream:
                if isinstance(frame, Data):
                    got.extend(frame.token_ids)
                else:
                    final = frame
            assert got == list(range(n))
            assert final is not None and final.completion_tokens == n and final.finish_reason == "length"
            # Every message went from the parser straight to its stream, none through nats-py's queue and task
            # (the handler never waits, so the worker sent its frames in batches of BATCH_FRAMES_MAX).
            assert client.mux_frames_queued == 0
            assert client.mux_batched_frames == n + 1
            assert client.mux_frames_direct == -(-(n + 1) // BATCH_FRAMES_MAX)
        finally:
            await client.close()
            await server.close()

    arun(main(), 60)


def test_cancel_reaches_handler(nats_server: object) -> None:
    async def main() -> None:
        cancelled = asyncio.Event()
        started = asyncio.Event()

        async def handler(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
            started.set()
            try:
                i = 0
                while True:
                    yield Data(seq=0, token_ids=[i])
                    i += 1
                    await asyncio.sleep(0.01)
            except (asyncio.CancelledError, GeneratorExit):
                cancelled.set()
                raise

        server, client = await _pair(nats_server.url)  # type: ignore[attr-defined]
        try:
            ep = await server.serve("t.cancel.gen.1", handler)
            stream = await client.call("t.cancel.gen.1", "r-cancel", b"")
            first = await stream.__anext__()
            assert isinstance(first, Data) and first.token_ids == [0]
            await stream.cancel()
            await asyncio.wait_for(cancelled.wait(), 5)
            assert started.is_set()
            for _ in range(100):
                if not ep.active:
                    break
                await asyncio.sleep(0.01)
            assert ep.active == {}
        finally:
            await client.close()
            await server.close()

    arun(main(), 30)


def test_a_request_cancelled_before_its_handler_ran_is_handed_to_on_dropped(nats_server: object) -> None:
    """A request and its cancel that reach the worker together: the handler task is cancelled before its first
    step, so the handler's clean-up never runs; on_dropped gets the payload (a worker frees the prefill pin
    it names there) and the request leaves the books."""

    async def main() -> None:
        from nats.aio.msg import Msg

        from dynamo_rt.protocol import CancelRequest, RequestEnvelope, encode

        ran: list[bytes] = []
        dropped: list[bytes] = []

        async def handler(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
            ran.append(payload)
            yield Final(seq=0, finish_reason="stop")

        server = Transport(nats_server.url)  # type: ignore[attr-defined]
        await server.connect()
        try:
            ep = await server.serve("t.dropped.gen.1", handler, on_dropped=dropped.append)
            env = RequestEnvelope(request_id="r-early", reply_to="_INBOX.nobody", deadline=time.time() + 30,
                                  payload=b"holds-a-pin")
            # As the NATS client delivers them when both are in one read: no event-loop turn in between.
            await ep._on_request(Msg(server.nc, subject=ep.subject, data=encode(env)))
            await ep._on_cancel(Msg(server.nc, subject=ep.subject + ".cancel",
                                    data=encode(CancelRequest(request_id="r-early"))))
            assert dropped == [b"holds-a-pin"] and ep.active == {} and ep.dropped_unstarted == 1
            await asyncio.sleep(0.05)
            assert ran == []  # the handler never ran: only on_dropped could free what the request holds
            # A request whose handler did start is cancelled the normal way (its own finally blocks).
            env.request_id = "r-late"
            await ep._on_request(Msg(server.nc, subject=ep.subject, data=encode(env)))
            await asyncio.sleep(0.05)
            await ep._on_cancel(Msg(server.nc, subject=ep.subject + ".cancel",
                                    data=encode(CancelRequest(request_id="r-late"))))
            assert dropped == [b"holds-a-pin"] and ran == [b"holds-a-pin"]
        finally:
            await server.close()

    arun(main(), 30)


def test_handler_errors_arrive_typed(nats_server: object) -> None:
    async def bad_input(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        yield Data(seq=0, token_ids=[1])
        raise errors.InvalidRequest("prompt too long: 10 > 5")

    async def crash(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        raise ValueError("boom")
        yield Data(seq=0, token_ids=[])  # pragma: no cover

    async def main() -> None:
        server, client = await _pair(nats_server.url)  # type: ignore[attr-defined]
        try:
            await server.serve("t.err.bad.1", bad_input)
            await server.serve("t.err.crash.1", crash)
            stream = await client.call("t.err.bad.1", "r2", b"")
            assert (await stream.__anext__()).token_ids == [1]  # type: ignore[union-attr]
            with pytest.raises(errors.InvalidRequest, match="prompt too long: 10 > 5") as ei:
                await stream.__anext__()
            assert ei.value.status == 400
            stream = await client.call("t.err.crash.1", "r3", b"")
            with pytest.raises(errors.RemoteError, match="ValueError: boom") as ei2:
                await stream.__anext__()
            assert ei2.value.status == 500
        finally:
            await client.close()
            await server.close()

    arun(main(), 30)


def test_a_request_id_already_in_flight_is_refused_and_the_first_stream_completes(nats_server: object) -> None:
    """Two callers reusing one id (several frontends resyncing one worker once did) must not share its book
    entry: the second gets a typed 400, the first streams to its end, and the id is free again after."""
    release = asyncio.Event()

    async def slow(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        yield Data(seq=0, token_ids=[7])
        await release.wait()
        yield Final(seq=0, finish_reason="stop")

    async def main() -> None:
        server, client = await _pair(nats_server.url)  # type: ignore[attr-defined]
        try:
            await server.serve("t.dup.1", slow)
            first = await client.call("t.dup.1", "same-id", b"")
            assert (await first.__anext__()).token_ids == [7]  # type: ignore[union-attr]
            second = await client.call("t.dup.1", "same-id", b"")
            with pytest.raises(errors.InvalidRequest, match="already in flight") as ei:
                await second.__anext__()
            assert ei.value.status == 400
            release.set()
            assert [f.finish_reason async for f in first] == ["stop"]  # type: ignore[union-attr]
            release.clear()
            third = await client.call("t.dup.1", "same-id", b"")  # the first's end freed the id
            assert (await third.__anext__()).token_ids == [7]  # type: ignore[union-attr]
            release.set()
            assert [f.finish_reason async for f in third] == ["stop"]  # type: ignore[union-attr]
        finally:
            await client.close()
            await server.close()

    arun(main(), 30)


def test_no_worker_fails_fast(nats_server: object) -> None:
    async def main() -> None:
        client = Transport(nats_server.url)  # type: ignore[attr-defined]
        await client.connect()
        try:
            t0 = time.monotonic()
            stream = await client.call("t.nobody.gen.1", "r4", b"")  # published, not acknowledged
            with pytest.raises(errors.Unavailable, match="no worker is serving"):
                await stream.__anext__()
            assert time.monotonic() - t0 < 2.0  # no-responders answer, not the ack timeout
            assert stream.undelivered and stream.done and not stream.answered
        finally:
            await client.close()

    arun(main(), 30)


def test_deadline_on_worker(nats_server: object) -> None:
    async def slow(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        await asyncio.sleep(30)
        yield Final(seq=0)

    async def main() -> None:
        server, client = await _pair(nats_server.url)  # type: ignore[attr-defined]
        try:
            await server.serve("t.slow.gen.1", slow)
            stream = await client.call("t.slow.gen.1", "r5", b"", timeout=1.0)
            with pytest.raises(errors.DeadlineExceeded):
                await stream.__anext__()
        finally:
            await client.close()
            await server.close()

    arun(main(), 30)


WORKER = textwrap.dedent("""
    import asyncio, sys
    from dynamo_rt.protocol import Data
    from dynamo_rt.transport import Transport

    async def handler(payload, ctx):
        i = 0
        while True:
            yield Data(seq=0, token_ids=[i])
            i += 1
            await asyncio.sleep(0.02)

    async def main():
        t = Transport(sys.argv[1])
        await t.connect()
        await t.serve("t.kill.gen.1", handler)
        print("serving", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def test_worker_killed_mid_stream_ends_with_error(nats_server: object) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, nats_server.url],  # type: ignore[attr-defined]
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "serving"

        async def main() -> float:
            client = Transport(nats_server.url)  # type: ignore[attr-defined]
            await client.connect()
            try:
                stream = await client.call("t.kill.gen.1", "r6", b"", timeout=60, idle_timeout=2.0)
                n = 0
                async for frame in stream:
                    n += 1
                    if n == 5:
                        os.kill(proc.pid, signal.SIGKILL)
                        t_kill = time.monotonic()
                    if n > 5 and not isinstance(frame, Data):
                        break
                raise AssertionError("stream ended without an error")
            except errors.Unavailable as exc:
                assert "stopped responding" in str(exc)
                return time.monotonic() - t_kill
            finally:
                await client.close()

        took = arun(main(), 30)
        assert took < 10  # the idle timeout (2 s) plus slack, far inside the request deadline
    finally:
        proc.kill()
        proc.wait()


def test_nats_restart_clear_error_then_recovers(fresh_nats: object) -> None:
    async def handler(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        yield Data(seq=0, token_ids=[7])
        yield Final(seq=0, finish_reason="stop")

    async def main() -> None:
        server, client = await _pair(fresh_nats.url)  # type: ignore[attr-defined]
        try:
            await server.serve("t.restart.gen.1", handler)
            s = await client.call("t.restart.gen.1", "a", b"")
            assert [f.token_ids async for f in s if isinstance(f, Data)] == [[7]]
            await asyncio.to_thread(fresh_nats.stop)  # type: ignore[attr-defined]
            for _ in range(50):
                if not client.connected:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(errors.Unavailable):
                await client.call("t.restart.gen.1", "b", b"", ack_timeout=1.0)
            await asyncio.to_thread(fresh_nats.start)  # type: ignore[attr-defined]
            deadline = time.monotonic() + 15
            while True:
                try:
                    s = await client.call("t.restart.gen.1", "c", b"", ack_timeout=1.0)
                    assert [f.token_ids async for f in s if isinstance(f, Data)] == [[7]]
                    break
                except errors.Unavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await client.close()
            await server.close()

    arun(main(), 60)


def test_object_store_roundtrip(nats_server: object) -> None:
    async def main() -> None:
        t = Transport(nats_server.url)  # type: ignore[attr-defined]
        await t.connect()
        try:
            blob = bytes(range(256)) * 4096  # 1 MiB, several chunks
            await t.put_object("t-objs", "tok.json", blob)
            assert await t.get_object("t-objs", "tok.json") == blob
            with pytest.raises(errors.NotFound):
                await t.get_object("t-objs", "missing")
        finally:
            await t.close()

    arun(main(), 30)


def test_frames_still_arrive_through_nats_py_when_direct_delivery_is_off(nats_server: object,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The subscription callback is the fallback when nats-py has no parser hook to wrap."""
    monkeypatch.setattr(Transport, "_direct_mux_delivery", lambda self, sub: None)

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        for i in range(50):
            yield Data(seq=0, token_ids=[i])
        yield Final(seq=0, finish_reason="length", completion_tokens=50)

    async def main() -> None:
        server, client = await _pair(nats_server.url)  # type: ignore[attr-defined]
        try:
            await server.serve("t.stream.queued.1", handler)
            stream = await client.call("t.stream.queued.1", "r1", b"", timeout=30)
            got = [t async for frame in stream if isinstance(frame, Data) for t in frame.token_ids]
            assert got == list(range(50))
            # (the handler never waits: its 51 frames went as one batch)
            assert client.mux_frames_queued == 1 and client.mux_batched_frames == 51
            assert client.mux_frames_direct == 0
        finally:
            await client.close()
            await server.close()

    arun(main(), 30)


def test_frames_of_requests_stepped_together_travel_in_batches(nats_server: object) -> None:
    """Requests whose handlers wake in one event-loop turn (as one engine step wakes every running request):
    their frames to one caller leave as FrameBatch messages, every stream still complete and in order. A
    caller that asks for no batches (``DYN_NATS_BATCH_FRAMES=0``, or one that predates them) gets a message
    per frame from the same worker."""
    n_req, n_tok = 8, 20
    waiters: list[asyncio.Future[None]] = []

    async def tick() -> None:
        f = asyncio.get_running_loop().create_future()
        waiters.append(f)
        await f

    async def engine() -> None:
        while True:
            await asyncio.sleep(0.005)
            ready, waiters[:] = list(waiters), []
            for f in ready:
                f.set_result(None)

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        for i in range(n_tok):
            await tick()
            yield Data(seq=0, token_ids=[i])
        yield Final(seq=0, finish_reason="length", completion_tokens=n_tok)

    async def run_all(client: Transport, tag: str) -> None:
        async def one(k: int) -> None:
            stream = await client.call("t.batch.gen.1", f"{tag}{k}", b"", timeout=30)
            got, final = [], None
            async for frame in stream:
                if isinstance(frame, Data):
                    got.extend(frame.token_ids)
                else:
                    final = frame
            assert got == list(range(n_tok)) and final is not None and final.completion_tokens == n_tok

        await asyncio.gather(*(one(k) for k in range(n_req)))

    async def main() -> None:
        server, client = await _pair(nats_server.url)  # type: ignore[attr-defined]
        old = Transport(nats_server.url)  # type: ignore[attr-defined]
        old.batch_frames = False
        await old.connect()
        ticker = asyncio.ensure_future(engine())
        try:
            ep = await server.serve("t.batch.gen.1", handler)
            await run_all(client, "b")
            assert ep.batches_sent > 0 and client.mux_batched_frames == ep.frames_batched
            assert client.mux_batched_frames >= n_req * n_tok // 2  # most frames shared a message
            sent = ep.batches_sent
            await run_all(old, "o")
            assert old.mux_batched_frames == 0 and ep.batches_sent == sent
            assert old.mux_frames_direct == n_req * (n_tok + 1)  # one message per frame
        finally:
            ticker.cancel()
            await old.close()
            await client.close()
            await server.close()

    arun(main(), 60)
