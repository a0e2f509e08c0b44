"""Token sampling for the reference engine: one call per step over every row that samples.

Place: called on the engine's step thread right after :meth:`DecoderModel.forward`. Order of logit
processing (as in ``transformers``' generate): stop-token suppression (``min_tokens``), repetition /
presence / frequency penalties, then greedy argmax (``temperature == 0``) or temperature, top-k, top-p,
min-p and a draw.

The draw is counter-based, so any worker can replay it: one uniform ``u`` per row per step, the
splitmix64 output of the request's ``seed`` at counter ``position`` (output tokens the request produced
before this one, on whatever worker: the prefill worker draws position 0, its decode worker continues at 1,
a request migrated after k tokens resumes at k). The token is the inverse CDF of ``u`` over the filtered
distribution in token-id order (top-k / top-p ties broken by token id), so it depends only on
``(seed, position, logits)``: not on the batch, the worker or what was drawn before.

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
    seed: int = 0  # key of the request's random stream (the frontend derives one per choice)
    position: int = 0  # the stream's counter: output tokens produced before this draw
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


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def stream_uniform(seed: int, position: int) -> float:
    """The draw at ``position`` of ``seed``'s stream: splitmix64's output number ``position + 1``, as a
    double in [0, 1) (53 bits)."""
    x = (seed + _GOLDEN * (position + 1)) & _MASK64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    x ^= x >> 31
    return (x >> 11) * (1.0 / (1 << 53))


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
    # Stable: equal logits keep token-id order, so top-k / top-p keep the same tokens on every worker.
    x, idx = x.sort(dim=-1, descending=True, stable=True)
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
    # The CDF runs in token-id order, not in the sorted order: a float difference of 1e-6 between two
    # workers' logits then only nudges interval boundaries, where in sorted order it could swap two near-equal
    # tokens and hand one's interval to the other (seen in float32: 6 of ~9600 resumed draws changed).
    p_id = torch.zeros_like(probs).scatter_(1, idx, probs)
    cdf = p_id.double().cumsum_(dim=-1)
    u = torch.tensor([stream_uniform(s.seed, s.position) for s in specs], dtype=torch.float64, device=dev)
    choice = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True)
    # u * total can round up to the total itself: that is the last token with any probability.
    last = vocab - 1 - (p_id.flip(-1) > 0).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return torch.minimum(choice, last)[:, 0]
