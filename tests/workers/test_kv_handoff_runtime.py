"""The worker runtime's NIXL hand-off counted request by request, in one process: a prefill and a decode
:class:`~workers.common.runtime.WorkerRuntime` over two reference engines, real NIXL (two agents, CMA), real
etcd and NATS. Each decode request that carries KV transfer parameters ends as exactly one pull or one
fallback, and every pin as one release: a clean hand-off, parameters that do not match the prompt (never
pulled: a fallback the runtime counts), a first token that ends the request (neither), a block corrupted by
the fault hook (caught by its checksum: a failed pull and a fallback, the answer still exact)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from dynamo_rt.discovery import Registry
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import (
    Data,
    Final,
    GenerateRequest,
    KvTransferParams,
    Mode,
    SamplingParams,
    StopConditions,
    encode,
)
from dynamo_rt.transport import NatsOptions, Transport
from tests.conftest import arun, until
from workers.common.kv_handoff import CHECKSUM_KEY
from workers.common.runtime import WorkerMetrics, WorkerRuntime
from workers.reference.engine import ReferenceEngine

MODEL = "dynamo-tiny"


def _prompt(n: int, salt: int) -> list[int]:
    return [11 + (i * 37 + salt * 13) % 1900 for i in range(n)]


def _value(m: WorkerMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, {"model": MODEL, **labels}) or 0.0


def _counts(m: WorkerMetrics) -> dict[str, float]:
    out = {k: _value(m, f"dynamo_worker_kv_{k}_total") for k in
           ("pulls", "pulled_bytes", "local_prefill_fallbacks", "pins_released", "pins_expired")}
    out["pull_failures"] = sum(_value(m, "dynamo_worker_kv_pull_failures_total", reason=r)
                               for r in ("read", "peer_gone", "checksum"))
    return out


def test_every_decode_request_ends_as_one_pull_or_one_fallback(etcd_server: Any, nats_server: Any, ns: str) -> None:
    tiny = ensure_tiny_model()

    async def main() -> None:
        transport = Transport(NatsOptions(servers=nats_server.url))
        await transport.connect()
        runtimes: list[WorkerRuntime] = []
        try:
            for mode in (Mode.PREFILL, Mode.DECODE, Mode.AGG):
                eng = ReferenceEngine(tiny, served_model_name=MODEL, num_blocks=64)
                reg = Registry(etcd_server.client_url, ns)
                await reg.start()
                await eng.start()
                rt = WorkerRuntime(eng, engine_name="reference", mode=mode, registry=reg, transport=transport,
                                   metrics=WorkerMetrics(), kv_verify_checksum=True)
                await rt.start()
                runtimes.append(rt)
            pre, dec, agg = runtimes
            assert pre.kv is not None and dec.kv is not None and agg.kv is None

            async def call(rt: WorkerRuntime, req: GenerateRequest) -> tuple[list[int], Final]:
                toks: list[int] = []
                async for f in await transport.call(rt.subject, req.request_id, encode(req), timeout=30):
                    if isinstance(f, Data):
                        toks.extend(f.token_ids)
                    else:
                        assert isinstance(f, Final)
                        return toks, f
                raise AssertionError("no final frame")

            def req(rid: str, prompt: list[int], max_tokens: int = 8, **kw: Any) -> GenerateRequest:
                return GenerateRequest(request_id=rid, token_ids=prompt, model=MODEL,
                                       sampling=SamplingParams(temperature=0),
                                       stop=StopConditions(max_tokens=max_tokens, ignore_eos=True), **kw)

            async def prefill(r: GenerateRequest) -> KvTransferParams:
                _, fin = await call(pre, msgspec.structs.replace(r, request_id=r.request_id + "-p",
                                                                 prefill_only=True))
                assert fin.kv_transfer is not None
                return fin.kv_transfer

            async def released(n: int) -> None:
                await until(lambda: _value(pre.metrics, "dynamo_worker_kv_pins_released_total") == n,
                            f"{n} pins released")

            assert pre.kv.pool is not None
            block_bytes = pre.kv.pool.block_bytes

            # 1. A clean hand-off: one pull of the prompt's 3 blocks, checksums sent and matched.
            r1 = req("r1", _prompt(40, 1))
            kt = await prefill(r1)
            assert len(kt.opaque[CHECKSUM_KEY]) == len(kt.block_ids) == 3
            got, _ = await call(dec, msgspec.structs.replace(r1, kv_transfer=kt))
            assert got == (await call(agg, r1))[0] and len(got) == 8
            await released(1)
            c = _counts(dec.metrics)
            assert (c["pulls"], c["pulled_bytes"], c["pull_failures"], c["local_prefill_fallbacks"]) == \
                (1, 3 * block_bytes, 0, 0), c
            assert _value(dec.metrics, "dynamo_worker_kv_pull_seconds_count") == 1

            # 2. Parameters that do not match the prompt: the engine prefills without calling the loader; the
            # runtime counts the fallback and releases the pin itself.
            r2 = req("r2", _prompt(40, 2))
            kt = await prefill(r2)
            got, _ = await call(dec, msgspec.structs.replace(r2, kv_transfer=msgspec.structs.replace(kt, num_tokens=5)))
            assert got == (await call(agg, r2))[0]
            await released(2)
            await until(lambda: _counts(dec.metrics)["local_prefill_fallbacks"] == 1, "the fallback counted")
            c = _counts(dec.metrics)
            assert (c["pulls"], c["pull_failures"]) == (1, 0), c

            # 3. The first token ends the request: nothing to pull, nothing to fall back from.
            r3 = req("r3", _prompt(40, 3), max_tokens=1)
            kt = await prefill(msgspec.structs.replace(r3, stop=StopConditions(max_tokens=8, ignore_eos=True)))
            got, fin = await call(dec, msgspec.structs.replace(r3, kv_transfer=kt))
            assert len(got) == 1 and fin.finish_reason == "length"
            await released(3)

            # 4. The fault hook corrupts the pulled block: the checksum catches it, the prompt is recomputed.
            dec.kv.fault_corrupt_pulls = 1
            r4 = req("r4", _prompt(40, 4))
            kt = await prefill(r4)
            got, _ = await call(dec, msgspec.structs.replace(r4, kv_transfer=kt))
            assert got == (await call(agg, r4))[0]
            await released(4)
            c = _counts(dec.metrics)
            assert (c["pulls"], c["pull_failures"], c["local_prefill_fallbacks"]) == (1, 1, 2), c
            assert _value(dec.metrics, "dynamo_worker_kv_pull_failures_total", reason="checksum") == 1
            assert dec.kv.fault_corrupt_pulls == 0 and dec.kv._outcomes == {}  # every outcome taken
            assert _counts(pre.metrics)["pins_expired"] == 0
            assert _counts(agg.metrics) == dict.fromkeys(c, 0.0)
        finally:
            for rt in runtimes:
                await rt.stop(grace=1)
            await asyncio.wait_for(transport.close(), 10)

    arun(main(), 180)
