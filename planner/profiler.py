"""``dynamo-rt profile``: measure one engine replica for the planner and write its profile (JSON).

Two sweeps through the OpenAI API of a frontend, each with fresh random prompts (so no prefix-cache hits):

- prefill: TTFT of a lone request versus input length (``--isl``), the median of ``--repeats`` requests;
- decode: inter-token latency versus the number of sequences decoding at once (``--concurrency``): that
  many streaming requests of ``--decode-isl`` prompt and ``--decode-osl`` output tokens start together; each
  one's ITL is (last chunk - first chunk) / (tokens - 1), and the median is kept.

Against a running stack (``--url``), or a stack of its own (default): embedded etcd + NATS, one worker per
pool (``--mode disagg``: a prefill and a decode worker, so TTFT includes the KV hand-off; ``agg``: one
aggregated worker) and a frontend, all stopped at the end. Times are written in seconds of the profiled
engine: with ``--speedup S`` (the mocker's), measured times are multiplied by S, and the planner divides by
its ``--engine-speedup``. The output is what :meth:`planner.core.Profile.load` reads; for the
mocker it also carries the timing model's own figures (``analytic``) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from dynamo_rt.config import Parser, flag
from dynamo_rt.errors import DynamoError, Unavailable
from planner.profile import PROFILE_FORMAT, Profile
from workers import registry as engine_registry

log = logging.getLogger("planner.profiler")


def _ints(s: str) -> list[int]:
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {s!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {s!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--url", env="DYN_PROFILE_URL", default=None,
         help="profile the stack behind this frontend (default: start a stack of its own)")
    flag(p, "--model", env="DYN_PROFILE_MODEL", default=None, help="served model name (default: the first)")
    flag(p, "--engine", env="DYN_PROFILE_ENGINE", default="mocker", choices=engine_registry.names(runs_on_cpu=True),
         help="engine of the workers it starts")
    flag(p, "--worker-model", env="DYN_PROFILE_WORKER_MODEL", default="tiny", help="model of the workers it starts")
    flag(p, "--mode", env="DYN_PROFILE_MODE", default="disagg", choices=["disagg", "agg"],
         help="disagg: one prefill + one decode worker; agg: one aggregated worker")
    flag(p, "--worker-args", env="DYN_PROFILE_WORKER_ARGS", default="",
         help="extra flags for the workers it starts, one shell-quoted string")
    flag(p, "--speedup", env="DYN_PROFILE_SPEEDUP", type=float, default=1.0,
         help="the engine runs this many times faster than the one being profiled (mocker --speedup; "
              "passed to mocker workers it starts)")
    flag(p, "--isl", env="DYN_PROFILE_ISL", type=_ints, default=_ints("128,256,512,1024,2048,3072"),
         help="prompt lengths of the prefill sweep")
    flag(p, "--concurrency", env="DYN_PROFILE_CONCURRENCY", type=_ints,
         default=_ints("1,2,4,8,16,32,64,96,128"), help="sequences of the decode sweep")
    flag(p, "--decode-isl", env="DYN_PROFILE_DECODE_ISL", type=int, default=32,
         help="prompt tokens of each decode-sweep request (short: prefilled on the decode worker in one step, "
              "so every sequence starts decoding together)")
    flag(p, "--decode-osl", env="DYN_PROFILE_DECODE_OSL", type=int, default=64,
         help="output tokens of each decode-sweep request")
    flag(p, "--repeats", env="DYN_PROFILE_REPEATS", type=int, default=3, help="requests per prefill point")
    flag(p, "--max-concurrency", env="DYN_PROFILE_MAX_CONCURRENCY", type=int, default=None,
         help="the engine's running-sequence limit, recorded for the planner (default: the mocker's, if known)")
    flag(p, "--token-range", env="DYN_PROFILE_TOKEN_RANGE", default="100:1000",
         help="random prompt token ids are drawn from [lo, hi)")
    flag(p, "--seed", env="DYN_PROFILE_SEED", type=int, default=0, help="prompt seed")
    flag(p, "--ready-timeout", env="DYN_PROFILE_READY_TIMEOUT", type=float, default=120.0,
         help="seconds to wait for its own stack")
    flag(p, "--out", env="DYN_PROFILE_OUT", default="profile.json", help="where the profile JSON goes")
    flag(p, "--log-level", env="DYN_LOG", default="info", help="log level")


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="dynamo-rt profile", description="profile an engine for the planner", env=env)
    add_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------------------
# Measurement


class Prober:
    """Times requests against one frontend."""

    def __init__(self, url: str, model: str, token_range: tuple[int, int], seed: int, speedup: float) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.lo, self.hi = token_range
        self.rng = random.Random(seed)
        self.speedup = speedup
        self.http = self._client()

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(600.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024))

    async def close(self) -> None:
        await self.http.aclose()

    async def fresh_connections(self) -> None:
        """A new connection pool: a reused httpx pool starts a burst of streams in waves, not together."""
        await self.http.aclose()
        self.http = self._client()

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(self.lo, self.hi) for _ in range(n)]

    async def stream(self, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int]:
        """(start, chunk arrival times, completion tokens) of one streaming completion."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        t0 = time.perf_counter()
        times: list[float] = []
        tokens = 0
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise Unavailable(f"profile request failed: {r.status_code} {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise Unavailable(f"profile request failed: {data['error']}")
                    if data.get("usage"):
                        tokens = int(data["usage"]["completion_tokens"])
                    if data.get("choices"):
                        times.append(time.perf_counter())
        except httpx.HTTPError as exc:
            raise Unavailable(f"profile request failed: {exc!r}") from None
        return t0, times, tokens

    async def ttft(self, isl: int) -> float:
        t0, times, _ = await self.stream(self.prompt(isl), 1)
        if not times:
            raise Unavailable("a prefill request returned no chunk")
        return (times[0] - t0) * self.speedup

    async def itl(self, concurrency: int, isl: int, osl: int) -> tuple[float, float]:
        """(sequences decoding at once, ITL): the medians over the requests.

        The requests are sent together but a client cannot start hundreds of streams at the same instant,
        so the concurrency is measured too: the mean number of requests decoding during each one's life.
        """
        prompts = [self.prompt(isl) for _ in range(concurrency)]
        await self.fresh_connections()
        res = await asyncio.gather(*(self.stream(p, osl) for p in prompts))
        spans = [(times[0], times[-1], tokens) for _, times, tokens in res if len(times) >= 2 and tokens > 1]
        if not spans:
            raise Unavailable("decode requests returned too few chunks to time")
        itls, concs = [], []
        for a, b, tokens in spans:
            if b <= a:
                continue
            itls.append((b - a) / (tokens - 1))
            concs.append(sum(max(0.0, min(b, d) - max(a, c)) for c, d, _ in spans) / (b - a))
        return statistics.median(concs), statistics.median(itls) * self.speedup


async def measure(args: argparse.Namespace, url: str, model: str, context_length: int | None
                  ) -> dict[str, Any]:
    lo, _, hi = args.token_range.partition(":")
    prober = Prober(url, model, (int(lo), int(hi)), args.seed, args.speedup)
    limit = (context_length or 1 << 30) - 2
    try:
        await prober.ttft(min(args.isl))  # warm-up: first-request costs are not the engine's
        isls, ttfts = [], []
        for isl in args.isl:
            if isl > limit:
                log.warning("skipping ISL %d: over the model's context of %s", isl, context_length)
                continue
            vals = [await prober.ttft(isl) for _ in range(args.repeats)]
            isls.append(isl)
            ttfts.append(statistics.median(vals))
            log.info("prefill isl %5d: ttft %.2f ms (%s)", isl, ttfts[-1] * 1e3,
                     ", ".join(f"{v * 1e3:.1f}" for v in vals))
        points: dict[float, float] = {}
        for c in args.concurrency:
            eff, v = await prober.itl(c, args.decode_isl, args.decode_osl)
            points[round(eff, 2)] = v
            log.info("decode concurrency %4d (measured %.1f): itl %.2f ms, %.0f tok/s", c, eff, v * 1e3, eff / v)
        conc = sorted(points)
        itls = [points[c] for c in conc]
    finally:
        await prober.close()
    return {"prefill": {"isl": isls, "ttft_s": ttfts, "repeats": args.repeats},
            "decode": [{"context_length": args.decode_isl + args.decode_osl / 2, "concurrency": conc,
                        "itl_s": itls, "throughput_tok_s": [c / v for c, v in zip(conc, itls, strict=True)],
                        "isl": args.decode_isl, "osl": args.decode_osl}]}


def mocker_analytic(worker_args: Sequence[str], isls: Sequence[float], conc: Sequence[float]) -> dict[str, Any]:
    """The mocker timing model's own TTFT and ITL at the sweep's points (seconds at speedup 1)."""
    from workers.main import parse_args
    from workers.mocker.flags import timing_model

    a = parse_args(["--engine", "mocker", *worker_args], env={})
    tm = timing_model(a)
    return {"timing": {"prefill_ms_per_token": tm.prefill_ms_per_token, "prefill_base_ms": tm.prefill_base_ms,
                       "decode_ms_base": tm.decode_ms_base, "decode_ms_per_seq": tm.decode_ms_per_seq,
                       "transfer_ms_per_block": tm.transfer_ms_per_block, "max_num_seqs": a.max_num_seqs},
            "prefill_ttft_s": [tm.prefill_ms(int(i)) / 1e3 for i in isls],
            "decode_concurrency": list(conc),
            "decode_itl_s": [tm.step_ms(min(c, a.max_num_seqs), 0) / 1e3 for c in conc]}


# ---------------------------------------------------------------------------------------------------------
# A stack of its own


def _get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        r = httpx.get(url, timeout=timeout)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError):
        return 0, None


@contextlib.contextmanager
def own_stack(args: argparse.Namespace, worker_args: list[str]) -> Iterator[str]:
    """etcd + NATS + workers + frontend in a temporary folder; yields the frontend URL."""
    from dynamo_rt.local import commands
    from dynamo_rt.local.harness import Stack, health_instances
    from dynamo_rt.local.services import LocalServices, free_port
    from planner.connectors import LocalWorkerSpec

    state = Path(tempfile.mkdtemp(prefix="dyn-profile-"))
    with LocalServices(state) as svc, Stack(stop_timeout=15) as stack:
        env = dict(os.environ, DYN_ETCD_ENDPOINTS=svc.etcd.client_url, DYN_NATS_ENDPOINTS=svc.nats.url,
                   DYN_NAMESPACE="profile", DYN_METRICS_PORT="-1", PYTHONUNBUFFERED="1")
        spec = LocalWorkerSpec(engine=args.engine, model=args.worker_model, served_model_name=args.model,
                               extra_args=worker_args, graceful_timeout=5, env=env)
        pools = ["prefill", "decode"] if args.mode == "disagg" else ["agg"]
        port = free_port()
        for pool in pools:
            stack.start(f"{pool}-worker", spec.command(pool), env=env, log=state / f"{pool}-worker.log")
        stack.start("frontend", commands.frontend(port), env=env, log=state / "frontend.log")
        url = f"http://127.0.0.1:{port}"
        stack.wait_http(url + "/health", lambda status, body: health_instances(status, body) >= len(pools),
                        args.ready_timeout)
        log.info("profiling stack ready: %s (%s, %s)", url, args.engine, args.mode)
        yield url
    shutil.rmtree(state, ignore_errors=True)


def _model_of(url: str, want: str | None) -> tuple[str, int | None]:
    status, body = _get(url.rstrip("/") + "/v1/models")
    if status != 200 or not body or not body.get("data"):
        raise Unavailable(f"{url} serves no model")
    for m in body["data"]:
        if want is None or m["id"] == want:
            return str(m["id"]), m.get("max_model_len")
    raise Unavailable(f"{url} does not serve {want!r}")


def profile(args: argparse.Namespace) -> dict[str, Any]:
    worker_args = shlex.split(args.worker_args or "")
    own = args.url is None
    if own and args.engine == "mocker" and "--speedup" not in worker_args:
        worker_args += ["--speedup", f"{args.speedup:g}"]
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(own_stack(args, worker_args))
        model, ctx = _model_of(url, args.model)
        t0 = time.monotonic()
        out = asyncio.run(measure(args, url, model, ctx))
        took = time.monotonic() - t0
    max_conc = args.max_concurrency
    meta: dict[str, Any] = {
        "format": PROFILE_FORMAT, "engine": args.engine if own else "unknown", "model": model,
        "mode": args.mode if own else "external", "speedup": args.speedup,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "dynamo-rt profile " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "worker_args": worker_args if own else None, "seconds_measuring": round(took, 1),
        "note": "times are seconds of the profiled engine (measured wall time x speedup)",
    }
    if own and args.engine == "mocker":
        analytic = mocker_analytic(worker_args, out["prefill"]["isl"], out["decode"][0]["concurrency"])
        meta["analytic"] = analytic
        max_conc = max_conc or analytic["timing"]["max_num_seqs"]
    doc = {**meta, **out}
    if max_conc:
        doc["max_concurrency"] = max_conc
    # Round-trip through the planner's reader: what is written is what the planner accepts.
    Profile.from_dict(doc)
    return doc


def run(args: argparse.Namespace) -> int:
    from dynamo_rt.logs import setup_logging

    setup_logging(args.log_level, "text", role="profile")
    try:
        doc = profile(args)
    except DynamoError as exc:
        log.error("profile: %s", exc)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    log.info("profile written to %s", out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
