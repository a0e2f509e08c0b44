"""Reference engine surface: the Engine protocol, ModelInfo from the model folder, input validation
(typed errors with clear messages), the worker flags and their environment twins."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dynamo_rt.config import Parser
from dynamo_rt.errors import DynamoError, ErrorCode, InvalidRequest, Unavailable
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import GenerateRequest, SamplingParams, StopConditions
from tests.conftest import arun
from workers.common.engine import Engine
from workers.reference.engine import ReferenceEngine
from workers.reference.flags import add_flags, build_engine


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_tiny_model()


def test_model_info_and_protocol(tiny: Path, tmp_path: Path) -> None:
    eng = ReferenceEngine(tiny, served_model_name="tiny-chat")
    assert isinstance(eng, Engine)
    assert eng.info.name == "tiny-chat"
    assert eng.info.path == str(tiny)
    assert eng.info.context_length == 4096
    assert eng.info.block_size == 16
    assert eng.info.eos_token_ids == [2, 0]  # generation_config.json's list wins over config.json's int
    assert eng.info.bos_token_id == 0
    # Without generation_config.json: config.json's eos; without that either: tokenizer_config's token.
    other = tmp_path / "m"
    shutil.copytree(tiny, other)
    (other / "generation_config.json").unlink()
    assert ReferenceEngine(other).info.eos_token_ids == [2]
    cfg = json.loads((other / "config.json").read_text())
    del cfg["eos_token_id"]
    (other / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((other / "tokenizer_config.json").read_text())
    tok = tok_cfg["eos_token"]
    tok = tok["content"] if isinstance(tok, dict) else tok
    ids = {t["content"]: t["id"] for t in json.loads((other / "tokenizer.json").read_text())["added_tokens"]}
    assert ReferenceEngine(other).info.eos_token_ids == [ids[tok]]
    assert ReferenceEngine(other).info.name == "m"


def _req(prompt: list[int], max_tokens: int = 4, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(request_id="x", token_ids=prompt, sampling=SamplingParams(**sampling),
                           stop=StopConditions(max_tokens=max_tokens))


def test_bad_requests_raise_invalid_request(tiny: Path) -> None:
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=20)
        with pytest.raises(Unavailable, match="not started"):
            eng.generate(_req([1, 2, 3]))
        await eng.start()
        try:
            cases: list[tuple[GenerateRequest, str, str]] = [
                (_req([]), "token_ids", "the prompt is empty"),
                (_req([5, 2048, 7]), "token_ids", "token id 2048 is out of the vocabulary (0..2047)"),
                (_req([5, -1]), "token_ids", "token id -1 is out of the vocabulary (0..2047)"),
                (_req([5] * 4096), "token_ids",
                 "the prompt has 4096 tokens; this model's context is 4096 (prompt + output), "
                 "so at most 4095 prompt tokens fit"),
                (_req([5] * 100, 300), "max_tokens",
                 "prompt (100 tokens) + max_tokens (300) needs 25 KV blocks of 16 tokens; "
                 "this worker's KV cache has 20"),
                (_req([5], 0), "max_tokens", "max_tokens must be >= 1, got 0"),
                (_req([5], temperature=-1.0), "temperature", "temperature must be >= 0, got -1.0"),
                (_req([5], top_p=0.0), "top_p", "top_p must be in (0, 1], got 0.0"),
                (_req([5], top_k=-2), "top_k", "top_k must be -1, 0 or positive, got -2"),
                (_req([5], min_p=1.5), "min_p", "min_p must be in [0, 1], got 1.5"),
                (_req([5], logprobs=21), "logprobs", "logprobs must be in 0..20, got 21"),
                (_req([5], repetition_penalty=0.0), "repetition_penalty",
                 "repetition_penalty must be > 0, got 0.0"),
            ]
            for req, param, msg in cases:
                with pytest.raises(InvalidRequest) as ei:
                    eng.generate(req)
                assert ei.value.message == msg
                assert ei.value.param == param
                assert ei.value.status == 400
            with pytest.raises(InvalidRequest) as ei:
                eng.generate(_req([5] * 4096))
            assert ei.value.code == ErrorCode.CONTEXT_LENGTH
            # Fits exactly: 100 + 221 - 1 = 320 KV slots = 20 blocks.
            toks = [t async for o in eng.generate(_req([5] * 100, 221)) for t in o.token_ids]
            assert len(toks) == 221
            assert eng.load().kv_blocks_used == 0
        finally:
            await eng.stop()

    arun(main())


def test_generate_after_stop_is_unavailable_and_waiters_are_failed(tiny: Path) -> None:
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=20)
        await eng.start()
        gen = eng.generate(_req([5, 6, 7], 300))
        await gen.__anext__()
        await eng.stop()
        with pytest.raises(Unavailable):
            async for _ in gen:
                pass
        with pytest.raises(Unavailable):
            eng.generate(_req([5]))

    arun(main())


def test_flags_with_env_twins_build_the_engine(tiny: Path) -> None:
    p = Parser(prog="t", env={"DYN_MAX_NUM_SEQS": "7", "DYN_PIN_TIMEOUT": "5.5", "DYN_REF_DTYPE": "bfloat16"})
    p.add_argument("--model")
    add_flags(p)
    args = p.parse_args(["--model", str(tiny), "--kv-cache-blocks", "33", "--max-batch-tokens", "100",
                         "--threads", "1"])
    eng = build_engine(args)
    assert (eng.max_num_seqs, eng.pin_timeout, eng.max_batch_tokens, eng.threads) == (7, 5.5, 100, 1)
    assert str(eng.dtype) == "torch.bfloat16" and eng.device.type == "cpu" and eng.block_size == 16
    args = p.parse_args(["--model", str(tiny), "--num-gpu-blocks", "9", "--dtype", "float32"])
    eng = build_engine(args)

    async def main() -> int:
        await eng.start()
        try:
            return eng.load().kv_blocks_total
        finally:
            await eng.stop()

    assert arun(main()) == 9
    assert p.env_twins["--kv-cache-blocks"] == "DYN_KV_CACHE_BLOCKS"


def test_event_loop_stays_responsive_during_long_prefill(tiny: Path) -> None:
    """Compute runs on the step thread: loop ticks keep happening while a long prompt is prefilled."""
    async def main() -> None:
        eng = ReferenceEngine(tiny, num_blocks=300, max_batch_tokens=4096)
        await eng.start()
        try:
            ticks = 0
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            t = asyncio.create_task(ticker())
            toks = [x async for o in eng.generate(_req([10 + i % 2000 for i in range(3990)], 2)) for x in o.token_ids]
            done.set()
            await t
            assert len(toks) == 2
            assert ticks > 10
        finally:
            await eng.stop()

    arun(main())


@pytest.mark.parametrize(("patch", "msg"), [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported by the reference engine"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope type 'longrope' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_checkpoints_fail_at_construction(tiny: Path, tmp_path: Path, patch: dict[str, Any],
                                                      msg: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(patch)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DynamoError, match=msg):
        ReferenceEngine(d)
