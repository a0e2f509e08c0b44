"""Round-trip time of one request over the NATS request plane (real nats-server, two connections).

Baseline in the same run: a bare NATS request/reply (what any NATS RPC costs). Prints a table and a last
JSON line ``{"bench": "transport_rtt", "ours": p50 ms, "baseline": bare p50 ms, "ratio": ..., "unit": "ms"}``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import plot_bars, report
from dynamo_rt.local.services import NatsServer
from dynamo_rt.protocol import Data, Final
from dynamo_rt.transport import RequestContext, Transport

N = 2000


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(url: str) -> None:
    server, client = Transport(url), Transport(url)
    await server.connect()
    await client.connect()

    async def one(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        yield Data(seq=0, token_ids=[1])
        yield Final(seq=0, finish_reason="stop", completion_tokens=1)

    async def stream32(payload: bytes, ctx: RequestContext) -> AsyncGenerator[Data | Final, None]:
        for i in range(32):
            yield Data(seq=0, token_ids=[i])
        yield Final(seq=0, finish_reason="length", completion_tokens=32)

    await server.serve("bench.one", one)
    await server.serve("bench.s32", stream32)

    async def bare_handler(msg: object) -> None:
        await msg.respond(b"x")  # type: ignore[attr-defined]

    await server.nc.subscribe("bench.bare", cb=bare_handler)
    await server.nc.flush()

    async def time_ours(subject: str) -> list[float]:
        out = []
        for i in range(N):
            t0 = time.perf_counter()
            s = await client.call(subject, f"r{i}", b"")
            async for _ in s:
                pass
            out.append((time.perf_counter() - t0) * 1000)
        return out

    async def time_bare() -> list[float]:
        out = []
        for _ in range(N):
            t0 = time.perf_counter()
            await client.nc.request("bench.bare", b"", timeout=5)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    await time_ours("bench.one")  # warm-up
    bare = await time_bare()
    ours = await time_ours("bench.one")
    s32 = await time_ours("bench.s32")
    print(f"{'path':<34}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, xs in (("bare NATS request/reply", bare), ("ours: 1-token request", ours),
                     ("ours: 32-token stream", s32)):
        print(f"{name:<34}{pct(xs, 0.5):>10.3f}{pct(xs, 0.99):>10.3f}{statistics.mean(xs):>10.3f}")
    await client.close()
    await server.close()
    p50, base = pct(ours, 0.5), pct(bare, 0.5)
    plot_bars("transport_rtt", "NATS request plane round trip", {
        "p50": {"bare NATS": base, "ours 1 token": p50, "ours 32-token stream": pct(s32, 0.5)},
        "p99": {"bare NATS": pct(bare, 0.99), "ours 1 token": pct(ours, 0.99), "ours 32-token stream": pct(s32, 0.99)},
    }, "ms")
    report({"bench": "transport_rtt", "ours": round(p50, 4), "baseline": round(base, 4),
            "ratio": round(p50 / base, 3), "unit": "ms"})


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d, NatsServer(Path(d)) as nats:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(main(nats.url))
