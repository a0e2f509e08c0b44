"""Requests of the reference engine: a :class:`~dynamo_rt.protocol.GenerateRequest` checked and turned into a
:class:`Request` (the scheduler's sequence plus its sampling state and output queue), and the model's EOS ids.

Place: :meth:`workers.reference.engine.ReferenceEngine.generate` calls :func:`new_request` on the event
loop, so bad input raises there, before anything is queued; the step thread reads :func:`sample_specs`
for the rows that sample.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynamo_rt.errors import ErrorCode, InvalidRequest
from dynamo_rt.protocol import GenerateRequest, KvTransferParams, TokenLogprob
from workers.common.engine import EngineOutput, ModelInfo
from workers.reference.guided import KINDS, GrammarCache, bias_tensors
from workers.reference.model import ModelConfig
from workers.reference.sampler import SampleSpec
from workers.reference.scheduler import Seq

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20


@dataclass(eq=False, slots=True, kw_only=True)
class Request(Seq):
    sampling: SampleSpec
    queue: asyncio.Queue[EngineOutput | BaseException] = field(default_factory=asyncio.Queue)
    load_future: asyncio.Future[list[int]] | None = None  # the local blocks of a KV load, once allocated


def new_request(req: GenerateRequest, info: ModelInfo, *, vocab_size: int, num_blocks: int,
                device: torch.device, can_load: bool) -> Request:
    """Validate ``req`` (raise :class:`InvalidRequest` naming the parameter) and build its sequence.
    ``can_load``: a KV loader is set, so a decode request's prompt KV may come from its prefill worker."""
    prompt = list(req.token_ids)
    ctx = info.context_length
    if not prompt:
        raise InvalidRequest("the prompt is empty", param="token_ids")
    bad = next((t for t in prompt if t < 0 or t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is out of the vocabulary (0..{vocab_size - 1})", param="token_ids")
    if len(prompt) >= ctx:
        raise InvalidRequest(f"the prompt has {len(prompt)} tokens; this model's context is {ctx} "
                             f"(prompt + output), so at most {ctx - 1} prompt tokens fit",
                             code=ErrorCode.CONTEXT_LENGTH, param="token_ids")
    sp, st = req.sampling, req.stop
    if st.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {st.max_tokens}", param="max_tokens")
    if st.min_tokens < 0:
        raise InvalidRequest(f"min_tokens must be >= 0, got {st.min_tokens}", param="min_tokens")
    if sp.temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {sp.temperature}", param="temperature")
    if not 0.0 < sp.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {sp.top_p}", param="top_p")
    if sp.top_k < -1:
        raise InvalidRequest(f"top_k must be -1, 0 or positive, got {sp.top_k}", param="top_k")
    if not 0.0 <= sp.min_p <= 1.0:
        raise InvalidRequest(f"min_p must be in [0, 1], got {sp.min_p}", param="min_p")
    if sp.repetition_penalty <= 0:
        raise InvalidRequest(f"repetition_penalty must be > 0, got {sp.repetition_penalty}",
                             param="repetition_penalty")
    if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in 0..{MAX_LOGPROBS}, got {sp.logprobs}", param="logprobs")
    bs = info.block_size
    max_tokens = 1 if req.prefill_only else min(st.max_tokens, ctx - len(prompt))
    # KV is never needed for the last token, so a request holds at most prompt + max_tokens - 1 slots.
    need = math.ceil((len(prompt) + max_tokens - 1) / bs)
    if need > num_blocks:
        raise InvalidRequest(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks of "
            f"{bs} tokens; this worker's KV cache has {num_blocks}", param="max_tokens")
    stop = {t for t in st.stop_token_ids if 0 <= t < vocab_size}
    if not st.ignore_eos:
        stop.update(t for t in info.eos_token_ids if 0 <= t < vocab_size)
    if not 0 <= req.output_offset < len(prompt):
        raise InvalidRequest(f"output_offset must be in 0..{len(prompt) - 1}, got {req.output_offset}",
                             param="output_offset")
    # Unseeded requests sample from a fresh stream; the frontend gives every request a seed so that a
    # migrated one replays exactly.
    seed = sp.seed if sp.seed is not None else secrets.randbits(63)
    spec = SampleSpec(
        temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0), min_p=sp.min_p,
        seed=seed & 0xFFFF_FFFF_FFFF_FFFF, position=req.output_offset,
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty, logprobs=sp.logprobs,
        # The output_offset tail is earlier output: presence / frequency penalties count it as such.
        prompt_len=len(prompt) - req.output_offset,
    )
    seq = Request(req=req, tokens=prompt, prompt_len=len(prompt), max_tokens=max_tokens,
                  stop_ids=frozenset(stop), sampling=spec)
    spec.tokens = seq.tokens
    spec.bias = bias_tensors(sp.logit_bias, vocab_size, device)
    if sp.guided is not None and sp.guided.kind not in KINDS:
        raise InvalidRequest(f"unknown guided decoding kind {sp.guided.kind!r}", param="guided")
    kt = req.kv_transfer
    if kt is not None and kt.first_token >= 0 and not req.prefill_only:
        if kt.first_token >= vocab_size:
            raise InvalidRequest(f"kv_transfer.first_token {kt.first_token} is out of the vocabulary",
                                 param="kv_transfer")
        seq.wants_load = (can_load and kt.num_tokens == len(prompt)
                          and len(kt.block_ids) == math.ceil(len(prompt) / bs))
        if can_load and not seq.wants_load:
            log.warning("request %s: kv_transfer does not match the prompt (%d tokens, %d blocks for %d "
                        "prompt tokens): prefilling locally", req.request_id, kt.num_tokens,
                        len(kt.block_ids), len(prompt))
    return seq


async def attach_guide(seq: Request, grammars: GrammarCache) -> None:
    """Compile ``seq``'s output constraint (off the event loop: the first one imports xgrammar and builds the
    token table) and give it its matcher; on a migration, advanced over the output already sent."""
    g = seq.req.sampling.guided
    if g is None:
        return
    guide = await asyncio.to_thread(grammars.guide, g)
    off = seq.req.output_offset
    if 0 < off <= seq.prompt_len:
        # The output sent so far is the end of the prompt: the grammar resumes after it.
        guide.replay(seq.tokens[seq.prompt_len - off:seq.prompt_len])
    seq.sampling.guide = guide


def sample_specs(samplers: list[Request]) -> list[SampleSpec]:
    """This step's sampling of each row; stop tokens are suppressed until ``min_tokens`` are out. The
    random stream's position counts the ``output_offset`` tokens produced before a migration."""
    specs = []
    for seq in samplers:
        sp = seq.sampling
        if seq.num_output < seq.req.stop.min_tokens and seq.stop_ids:
            sp.suppress = tuple(seq.stop_ids)
        elif sp.suppress:
            sp.suppress = ()
        sp.position = seq.req.output_offset + seq.num_output
        specs.append(sp)
    return specs


def first_logprob(kt: KvTransferParams) -> TokenLogprob | None:
    """The first token's logprob a prefill worker sent along (``opaque["first_logprob"]``), if any."""
    raw = kt.opaque.get("first_logprob") if kt.opaque else None
    if not raw:
        return None
    try:
        return TokenLogprob(int(raw[0]), float(raw[1]), [(int(a), float(b)) for a, b in raw[2]])
    except (TypeError, ValueError, IndexError):
        return None


def eos_ids(model_dir: Path, cfg: ModelConfig) -> list[int]:
    """generation_config.json's eos (an int or a list) wins; then config.json; then tokenizer_config's
    eos_token looked up in tokenizer.json."""
    try:
        gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
        eos = gen.get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else [int(x) for x in eos]
    except (OSError, ValueError):
        pass
    if cfg.eos_token_ids:
        return list(cfg.eos_token_ids)
    try:
        tc = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok = tc.get("eos_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        for at in tj.get("added_tokens", []):
            if at.get("content") == tok:
                return [int(at["id"])]
        vocab = tj.get("model", {}).get("vocab", {})
        if isinstance(vocab, dict) and tok in vocab:
            return [int(vocab[tok])]
    except (OSError, ValueError, AttributeError):
        pass
    return []
