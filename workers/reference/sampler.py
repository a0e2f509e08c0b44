"""Token sampling for the reference engine: one call per step over every row that samples.

Place: called on the engine's step thread right after :meth:`DecoderModel.forward`. Order of logit
processing (as in ``transformers``' generate): stop-token suppression (``min_tokens``), repetition /
presence / frequency penalties, then greedy argmax (``temperature == 0``) or temperature, top-k, top-p,
min-p and a draw. The draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` of exactly ``vocab`` values per row per
step from the request's own ``torch.Generator`` when it has a seed, so a seeded request samples the same
tokens whatever else is in the batch, and a decode worker can skip the prefill worker's draw
(:func:`skip_draw`) to continue the same random stream.

Logprobs are those of the raw model distribution (``log_softmax`` of the logits before any processing).
``logit_bias`` and a structured-output grammar's mask (:mod:`workers.reference.guided`) come first of all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynamo_rt.protocol import TokenLogprob
from workers.reference.guided import Guide, constrain


@dataclass(slots=True)
class SampleSpec:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    generator: torch.Generator | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    tokens: Sequence[int] = ()  # prompt + output so far (penalties)
    prompt_len: int = 0
    suppress: Sequence[int] = ()  # token ids that may not be produced this step (min_tokens)
    logprobs: int | None = None
    guide: Guide | None = None  # structured outputs: the request's grammar state (workers.reference.guided)
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (token ids, values)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def skip_draw(generator: torch.Generator, vocab: int, device: torch.device) -> None:
    """Advance ``generator`` by exactly one sampling step's worth of random numbers."""
    torch.empty(vocab, device=device).exponential_(generator=generator)


def sample(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> tuple[list[int], list[TokenLogprob | None]]:
    """``logits``: fp32 ``[len(specs), vocab]``. Returns the chosen token per row and its logprobs
    (None for rows that did not ask)."""
    n, vocab = logits.shape
    want_lp = any(s.logprobs is not None for s in specs)
    raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
    logits = constrain(logits, specs)  # logit_bias and grammar masks, in place (rows without them untouched)
    if all(s.greedy and not s.penalized and not s.suppress for s in specs):
        chosen = logits.argmax(dim=-1)
    else:
        proc = logits.clone()
        dev = logits.device
        for i, s in enumerate(specs):
            if s.suppress:
                proc[i, torch.tensor(list(s.suppress), dtype=torch.long, device=dev)] = float("-inf")
            if s.penalized:
                _penalize(proc[i], s, dev)
        chosen = proc.argmax(dim=-1)
        rows = [i for i, s in enumerate(specs) if not s.greedy]
        if rows:
            chosen[torch.tensor(rows, device=dev)] = _draw(proc[rows], [specs[i] for i in rows])
    tokens: list[int] = chosen.tolist()
    lps: list[TokenLogprob | None] = [None] * n
    if raw_lp is not None:
        kmax = max((s.logprobs or 0) for s in specs)
        chosen_lp = raw_lp.gather(1, chosen[:, None])[:, 0].tolist()
        top_v: list[list[float]] = []
        top_i: list[list[int]] = []
        if kmax > 0:
            tv, ti = raw_lp.topk(min(kmax, vocab), dim=-1)
            top_v, top_i = tv.tolist(), ti.tolist()
        for i, s in enumerate(specs):
            if s.logprobs is None:
                continue
            k = min(s.logprobs, vocab)
            top = [(top_i[i][j], top_v[i][j]) for j in range(k)] if k > 0 else []
            lps[i] = TokenLogprob(tokens[i], chosen_lp[i], top)
    return tokens, lps


def _penalize(row: torch.Tensor, s: SampleSpec, dev: torch.device) -> None:
    vocab = row.shape[0]
    if s.repetition_penalty != 1.0 and s.tokens:
        # Over prompt + output, as transformers' RepetitionPenaltyLogitsProcessor does over input_ids.
        ids = torch.tensor(sorted(set(s.tokens)), dtype=torch.long, device=dev)
        vals = row[ids]
        row[ids] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if (s.presence_penalty != 0.0 or s.frequency_penalty != 0.0) and len(s.tokens) > s.prompt_len:
        # Over generated tokens only (OpenAI semantics).
        out = torch.tensor(list(s.tokens[s.prompt_len:]), dtype=torch.long, device=dev)
        counts = torch.bincount(out, minlength=vocab).to(row.dtype)
        row -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(row.dtype)


def _draw(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> torch.Tensor:
    vocab = logits.shape[1]
    dev = logits.device
    temps = torch.tensor([s.temperature for s in specs], dtype=logits.dtype, device=dev)
    x = logits / temps[:, None]
    x, idx = x.sort(dim=-1, descending=True)
    if any(s.top_k > 0 for s in specs):
        ks = torch.tensor([s.top_k if s.top_k > 0 else vocab for s in specs], device=dev)
        x.masked_fill_(torch.arange(vocab, device=dev)[None, :] >= ks[:, None], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(s.top_p < 1.0 for s in specs):
        tp = torch.tensor([s.top_p for s in specs], dtype=probs.dtype, device=dev)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        x.masked_fill_((probs.cumsum(dim=-1) - probs) >= tp[:, None], float("-inf"))
        probs = torch.softmax(x, dim=-1)
    if any(s.min_p > 0.0 for s in specs):
        mp = torch.tensor([s.min_p for s in specs], dtype=probs.dtype, device=dev)
        x.masked_fill_(probs < mp[:, None] * probs[:, :1], float("-inf"))
        probs = torch.softmax(x, dim=-1)
    q = torch.empty_like(probs).exponential_()
    for i, s in enumerate(specs):
        if s.generator is not None:
            q[i] = torch.empty(vocab, device=dev).exponential_(generator=s.generator)
    choice = (probs / q.clamp_min_(1e-30)).argmax(dim=-1)
    return idx.gather(1, choice[:, None])[:, 0]
