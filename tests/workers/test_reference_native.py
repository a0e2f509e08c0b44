"""The native decode step (workers/reference/decode.c) against the torch path of the same engine.

Token-for-token equality with transformers is in test_reference_greedy.py (parametrized over both paths);
here: the logprobs of both paths agree to fp32 rounding, the K/V each path writes into the pool agree
byte layout for byte layout (the KV hand-off and the host tier read those blocks), and an engine on a host
without a C compiler runs the torch path.
"""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import pytest
import torch

from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from tests.conftest import arun
from workers.common.engine import EngineOutput
from workers.reference import native as native_mod
from workers.reference.engine import ReferenceEngine

# Prompt lengths around block boundaries (block size 16) and a few blocks long.
LENGTHS = (1, 15, 16, 17, 31, 47, 90)
NEW = 20


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, 2048, (n,), generator=g).tolist() for n in LENGTHS]


async def _run(native: bool, prompts: list[list[int]], threads: int | None = None
               ) -> tuple[list[list[EngineOutput]], torch.Tensor, int]:
    eng = ReferenceEngine(ensure_tiny_model(), num_blocks=96, max_batch_tokens=512, native=native, threads=threads)
    await eng.start()
    try:
        assert eng.model is not None and (eng.native_decode is not None) == native

        async def one(i: int, p: list[int]) -> list[EngineOutput]:
            req = GenerateRequest(request_id=f"r{i}", token_ids=p, sampling=SamplingParams(temperature=0.0, logprobs=5),
                                  stop=StopConditions(max_tokens=NEW, ignore_eos=True))
            return [o async for o in eng.generate(req)]

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        assert eng.pool is not None
        return list(outs), eng.pool.tensor.clone(), eng.steps
    finally:
        await eng.stop()


@pytest.mark.parametrize("threads", [1, 2])
def test_native_and_torch_paths_agree_on_logprobs_and_pool_contents(threads: int) -> None:
    prompts = _prompts()
    # The pools compare only under the same schedule (the same blocks hold the same positions). The step
    # thread may start on the first request before the others are queued, so a busy host can schedule a run
    # differently: take the first pair of runs whose step counts agree (three tries).
    for _ in range(3):
        nat, nat_pool, nat_steps = arun(_run(True, prompts, threads), timeout=120)
        ref, ref_pool, ref_steps = arun(_run(False, prompts, 1), timeout=120)
        if nat_steps == ref_steps:
            break
    assert nat_steps == ref_steps
    for p, a, b in zip(prompts, nat, ref, strict=True):
        ta = [t for o in a for t in o.token_ids]
        tb = [t for o in b for t in o.token_ids]
        assert ta == tb, f"prompt of {len(p)} tokens"
        lpa = [lp for o in a for lp in (o.logprobs or [])]
        lpb = [lp for o in b for lp in (o.logprobs or [])]
        assert len(lpa) == len(lpb) == NEW
        for x, y in zip(lpa, lpb, strict=True):
            assert x.token_id == y.token_id
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.logprob == pytest.approx(y.logprob, abs=2e-4)
            for (_, vx), (_, vy) in zip(x.top, y.top, strict=True):
                assert vx == pytest.approx(vy, abs=2e-4)
    # Every K and V written (prefill by torch in both, decode by C or torch) sits at the same place.
    assert nat_pool.shape == ref_pool.shape
    assert torch.count_nonzero(ref_pool) > 0
    torch.testing.assert_close(nat_pool, ref_pool, rtol=1e-4, atol=1e-4)


def test_no_compiler_means_torch_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host without cc: the library cannot be built, the engine logs it and decodes with torch."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DYN_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native_mod, "_lib", None)
    monkeypatch.setattr(native_mod, "_lib_failed", None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_mod._build()
    assert native_mod.load_library() is None
    assert native_mod._lib_failed is not None and "no C compiler" in native_mod._lib_failed

    async def main() -> list[int]:
        eng = ReferenceEngine(ensure_tiny_model(), num_blocks=16)
        await eng.start()
        try:
            assert eng.model is not None and eng.native_decode is None
            req = GenerateRequest(request_id="x", token_ids=[11, 12, 13], sampling=SamplingParams(temperature=0.0),
                                  stop=StopConditions(max_tokens=4, ignore_eos=True))
            return [t async for o in eng.generate(req) for t in o.token_ids]
        finally:
            await eng.stop()

    assert len(arun(main(), timeout=60)) == 4


def test_library_is_built_once_per_source_and_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYN_NATIVE_CACHE", str(tmp_path))
    first = native_mod._build()
    assert first.parent == tmp_path and first.name.startswith("decode-") and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert native_mod._build() == first and first.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temporary files left


def test_native_switch_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_REF_NATIVE", "0")
    assert ReferenceEngine(ensure_tiny_model()).native is False
    monkeypatch.setenv("DYN_REF_NATIVE", "1")
    assert ReferenceEngine(ensure_tiny_model()).native is True
    monkeypatch.delenv("DYN_REF_NATIVE")
    assert ReferenceEngine(ensure_tiny_model()).native is True
    assert ReferenceEngine(ensure_tiny_model(), native=False).native is False


def test_worker_flag_and_env_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.main import parse_args
    from workers.reference.flags import build_engine

    base = ["--engine", "reference", "--model", str(ensure_tiny_model())]
    monkeypatch.delenv("DYN_REF_NATIVE", raising=False)
    assert build_engine(parse_args(base)).native is True
    assert build_engine(parse_args([*base, "--no-native-decode"])).native is False
    monkeypatch.setenv("DYN_REF_NATIVE", "0")
    assert build_engine(parse_args(base)).native is False
    assert build_engine(parse_args([*base, "--native-decode"])).native is True


def test_threads_change_nothing_but_speed() -> None:
    """Matmuls split by output panels and attention split by rows: every output element is computed by the
    same arithmetic, so 1, 2 and 3 threads give bitwise-equal logits and pool writes."""
    from workers.reference.model import DecoderModel, ModelConfig
    from workers.reference.native import NativeDecode, NativeStep, load_library

    path = ensure_tiny_model()
    cfg = ModelConfig.load(path)
    model = DecoderModel.load(path, cfg, torch.device("cpu"), torch.float32)
    lib = load_library()
    assert lib is not None
    g = torch.Generator().manual_seed(3)
    base = torch.randn((64, cfg.num_layers, 16, 2, cfg.num_kv_heads, cfg.head_dim), generator=g)
    # Rows of different lengths (the row split is uneven), tables into disjoint blocks.
    positions = [0, 15, 16, 40, 63, 5, 30]
    tables = [[r * 4 + i for i in range(p // 16 + 1)] for r, p in enumerate(positions)]
    ids = [int(t) for t in torch.randint(10, cfg.vocab_size, (len(positions),), generator=g)]
    results = []
    for threads in (1, 2, 3):
        nd = NativeDecode(model, 16, lib, threads=threads)
        assert nd.threads == threads
        try:
            pool = base.clone()
            results.append((nd.run(NativeStep(ids, positions, tables), pool), pool))
        finally:
            nd.close()
    for logits, pool in results[1:]:
        assert torch.equal(logits, results[0][0])
        assert torch.equal(pool, results[0][1])
    assert not torch.equal(results[0][1], base)  # the step wrote its K and V


def _avx512_cpu() -> bool:
    flags = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")]
    return bool(flags) and "avx512f" in flags[0].split()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="-mno-avx512f is an x86 flag")
def test_avx2_build_computes_the_same_step_and_says_its_width() -> None:
    """The build an AVX2-only CPU gets (here: -mno-avx512f) runs its own matmul tiles (tile_v8 in decode.c);
    every output element still sums the same products in the same order: the same logits and pool."""
    from workers.reference.model import DecoderModel, ModelConfig
    from workers.reference.native import NativeDecode, NativeStep, kernel_info, load_library, load_variant

    path = ensure_tiny_model()
    cfg = ModelConfig.load(path)
    model = DecoderModel.load(path, cfg, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(4)
    base = torch.randn((64, cfg.num_layers, 16, 2, cfg.num_kv_heads, cfg.head_dim), generator=g)
    positions = [0, 15, 16, 40, 63, 5, 30, 33, 2]
    tables = [[r * 5 + i for i in range(p // 16 + 1)] for r, p in enumerate(positions)]
    ids = [int(t) for t in torch.randint(10, cfg.vocab_size, (len(positions),), generator=g)]
    default, avx2 = load_library(), load_variant(("-mno-avx512f",))
    assert default is not None
    for rows in (9, 6, 1):  # the 8-row tile + 1 row; 4 rows + 2 single rows; one row
        out = []
        for lib in (default, avx2):
            nd = NativeDecode(model, 16, lib, threads=1)
            try:
                pool = base.clone()
                out.append((nd.run(NativeStep(ids[:rows], positions[:rows], tables[:rows]), pool), pool))
            finally:
                nd.close()
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-5)
    assert kernel_info(avx2, ("-mno-avx512f",))["vector_bits"] == 256
    info = kernel_info()
    assert info["vector_bits"] == (512 if _avx512_cpu() else 256)
    assert "-march=native" in str(info["flags"]) and info["march_native"] != "unknown"
