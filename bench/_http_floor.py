"""The HTTP/SSE floor of a Python frontend on this machine (a helper of ``frontend_overhead.py``'s accounting,
not a bench of its own): CPU per request of a bare ASGI app under uvicorn (httptools, uvloop), no NATS, no
tokenizer, streaming the same SSE chunks as our frontend (role, N text events 18 ms apart, finish + usage +
[DONE]) to the same load generator (64 clients, ``Connection: close``).

Three servers: ``task`` (uvicorn; the response's task sleeps between events and awaits ``send``, the shape
of a frontend whose task wakes per token), ``direct`` (uvicorn; a timer callback writes each event through
:class:`frontend.sse.DirectWriter`) and ``raw`` (no ASGI: an ``asyncio.Protocol`` with httptools writes the
chunk framing straight to the transport, the floor that frontend/http1.py, our builtin server, aims at).
Each runs at N = 2 and N = 64; the difference gives the CPU per SSE event and the intercept the CPU per
request (accept, parse, 3 writes, close).
Run: ``PYTHONPATH=. [FLOOR_MODES=raw,direct] .venv/bin/python bench/_http_floor.py [REQUESTS]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

HEAD = (b'data: {"id":"chatcmpl-0123456789abcdef01234567","object":"chat.completion.chunk","created":1765000000,'
        b'"model":"tiny","choices":[{"index":0,"delta":{"content":')
TAIL = b'},"logprobs":null,"finish_reason":null}]}\n\n'
ITL = 0.018


def serve(port: int, n: int, mode: str) -> None:
    import orjson
    import uvicorn
    import uvloop

    from frontend import sse

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": HEAD + b'""' + TAIL, "more_body": True})
        if mode == "task":
            for i in range(n):
                await asyncio.sleep(ITL)
                await send({"type": "http.response.body", "body": HEAD + orjson.dumps(f"tok{i} ") + TAIL,
                            "more_body": True})
        else:
            w = sse.writer_for(send)
            assert w is not None
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            i = 0

            def tick() -> None:
                nonlocal i
                w.write(HEAD + orjson.dumps(f"tok{i} ") + TAIL)
                i += 1
                if i < n:
                    loop.call_later(ITL, tick)
                else:
                    done.set_result(None)

            loop.call_later(ITL, tick)
            await done
        usage = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[],'
                 b'"usage":{"prompt_tokens":36,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 36))
        final = HEAD + b'""},"logprobs":null,"finish_reason":"length"}]}\n\n' + usage + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": final, "more_body": False})

    if mode == "raw":
        uvloop.install()
        asyncio.run(_raw_server(port, n))
        return
    uvloop.install()
    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", log_level="warning", access_log=False)


async def _raw_server(port: int, n: int) -> None:
    """asyncio.Protocol + httptools, chunked framing written straight to the transport (no ASGI)."""
    import httptools
    import orjson

    loop = asyncio.get_running_loop()
    usage = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[],'
             b'"usage":{"prompt_tokens":36,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 36))
    final = HEAD + b'""},"logprobs":null,"finish_reason":"length"}]}\n\n' + usage + b"data: [DONE]\n\n"

    def chunk(b: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(b), b)

    class P(asyncio.Protocol):
        def connection_made(self, t: Any) -> None:
            self.t = t
            self.p = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.p.feed_data(data)

        def on_message_complete(self) -> None:
            t = self.t
            t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    + chunk(HEAD + b'""' + TAIL))
            i = 0

            def tick() -> None:
                nonlocal i
                t.write(chunk(HEAD + orjson.dumps(f"tok{i} ") + TAIL))
                i += 1
                if i < n:
                    loop.call_later(ITL, tick)
                else:
                    t.write(chunk(final) + b"0\r\n\r\n")
                    t.close()

            loop.call_later(ITL, tick)

    srv = await loop.create_server(P, "127.0.0.1", port, backlog=2048)
    await srv.serve_forever()


def main() -> None:
    from _common import cpu_seconds, run_load

    from dynamo_rt.local.services import free_port

    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 800
    res: dict[tuple[str, int], float] = {}
    for mode in (os.environ.get("FLOOR_MODES") or "task,direct,raw").split(","):
        for n in (2, 64):
            port = free_port()
            p = subprocess.Popen([sys.executable, __file__, "serve", str(port), str(n), mode],
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            try:
                time.sleep(1.5)
                body = json.dumps({"model": "tiny", "stream": True, "max_tokens": n,
                                   "messages": [{"role": "user", "content": "hi"}]}).encode()
                run_load(f"http://127.0.0.1:{port}", [[body]] * 200, 64)  # warm-up
                c0 = cpu_seconds(p.pid)
                run_load(f"http://127.0.0.1:{port}", [[body]] * requests, 64)
                res[mode, n] = (cpu_seconds(p.pid) - c0) / requests * 1000
            finally:
                p.terminate()
                p.wait()
            print(f"{mode:6s} N={n:2d}: {res[mode, n]:.3f} ms/req", flush=True)
        per_event = (res[mode, 64] - res[mode, 2]) / 62
        intercept = res[mode, 2] - 2 * per_event  # the N=2 run's 4 writes: role, 2 text, finish+usage+[DONE]
        print(f"{mode:6s} per SSE event {per_event * 1000:.1f} us, per request without its text events "
              f"{intercept:.3f} ms", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        main()
