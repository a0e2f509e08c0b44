"""The mocker's clock: what one simulated scheduler step costs, and what each finished request took.

Place: :class:`TimingModel` prices the steps :mod:`workers.mocker.scheduler` plans (the engine sleeps that
long, divided by its speedup); the planner's profiler and ``bench/kv_routing.py`` read the same model to
predict TTFT and ITL. :class:`RequestStats` is the per-request record the scheduler fills in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class TimingModel:
    """Simulated cost of one scheduler step, in milliseconds of the modelled hardware.

    Defaults resemble an 8B dense model (bf16) on one H100: a forward pass has a ~10 ms floor (reading
    16 GB of weights), each running sequence adds ~0.1 ms of attention / sampling, and prefill costs
    ~0.07 ms per uncached token (~2 * 8e9 FLOP per token at ~250 TFLOP/s achieved) plus ~2 ms of extra
    launch overhead. A KV block of 16 tokens (~2 MiB for Llama-3-8B) moves over RDMA in ~0.08 ms.
    """

    prefill_ms_per_token: float = 0.07
    prefill_base_ms: float = 2.0
    decode_ms_base: float = 10.0
    decode_ms_per_seq: float = 0.1
    transfer_ms_per_block: float = 0.08

    def step_ms(self, num_seqs: int, prefill_tokens: int) -> float:
        """One forward pass over ``num_seqs`` sequences, ``prefill_tokens`` of them being prompt tokens."""
        ms = self.decode_ms_base + self.decode_ms_per_seq * num_seqs
        if prefill_tokens:
            ms += self.prefill_base_ms + self.prefill_ms_per_token * prefill_tokens
        return ms

    def prefill_ms(self, uncached_tokens: int) -> float:
        """A lone prefill of ``uncached_tokens`` (what TTFT is on an idle engine)."""
        return self.step_ms(1, uncached_tokens)

    def transfer_ms(self, blocks: int) -> float:
        return self.transfer_ms_per_block * blocks


@dataclass(slots=True)
class RequestStats:
    """Simulated timings of one finished request (milliseconds on the modelled hardware)."""

    prompt_tokens: int
    cached_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens computed here (uncached, not transferred), preemptions included
    transferred_blocks: int = 0
    queue_ms: float = 0.0  # arrival -> first scheduled
    prefill_ms: float = 0.0  # sum of the steps the request's prefill took part in
    transfer_ms: float = 0.0
    ttft_ms: float = 0.0  # arrival -> first token (transfer included)
    total_ms: float = 0.0
    completion_tokens: int = 0
    preemptions: int = 0
    finish_reason: str | None = None
