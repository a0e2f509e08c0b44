"""The mocker's "model": output tokens and logprobs as a pure function of ``(seed, prompt, position)``.

Place: :mod:`workers.mocker.scheduler` asks :class:`OutputModel` for the token each simulated step
produces. Being a pure function, two mockers (or a prefill mocker and a decode mocker) produce the same
tokens for the same request, so disaggregated and aggregated serving can be compared token for token.
Special ids (BOS, EOS, the ones the caller names) are never produced, except EOS where ``eos_probability``
draws it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence

from dynamo_rt.protocol import StopConditions, TokenLogprob

_MASK64 = (1 << 64) - 1


class OutputModel:
    def __init__(self, *, vocab_size: int, eos_ids: Sequence[int], eos_probability: float,
                 special_token_ids: Iterable[int], bos_token_id: int | None, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        self.eos_probability = eos_probability
        self._eos_first = eos_ids[0] if eos_ids else -1
        specials = set(special_token_ids) | set(eos_ids)
        if bos_token_id is not None:
            specials.add(bos_token_id)
        self._specials = frozenset(s for s in specials if 0 <= s < vocab_size)
        if len(self._specials) >= vocab_size:
            raise ValueError("vocab_size leaves no ordinary token ids")

    def digest(self, prompt: Sequence[int]) -> int:
        """The seed of one request's outputs."""
        h = hashlib.blake2b(self.seed.to_bytes(8, "little", signed=True), digest_size=8)
        h.update(array("I", prompt).tobytes())
        return int.from_bytes(h.digest(), "little")

    def token_at(self, digest: int, pos: int, stop: StopConditions, offset: int = 0) -> int:
        """The output token at generated position ``offset + pos``: ``offset`` tokens came out before this
        attempt (a migrated request) and ``stop`` counts from there, as the frontend sends it."""
        x = _mix(digest ^ ((offset + pos + 1) * 0x9E3779B97F4A7C15 & _MASK64))
        if self.eos_probability > 0 and pos + 1 >= stop.min_tokens and not stop.ignore_eos:
            if (x >> 11) / float(1 << 53) < self.eos_probability:
                return self._eos_first
            x = _mix(x)
        tok = x % self.vocab_size
        while tok in self._specials:
            tok = (tok + 1) % self.vocab_size
        return tok

    def logprob(self, digest: int, pos: int, tok: int, k: int) -> TokenLogprob:
        """A made-up but stable logprob of ``tok`` and ``k`` alternatives (``tok`` first)."""
        x = _mix(digest ^ pos ^ 0x5851F42D4C957F2D)
        lp = -((x % 1000) + 1) / 1000.0
        top: list[tuple[int, float]] = [(tok, lp)]
        for i in range(1, k):
            top.append(((tok + i) % self.vocab_size, lp - i))
        return TokenLogprob(tok, lp, top if k > 0 else [])


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit permutation."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)
