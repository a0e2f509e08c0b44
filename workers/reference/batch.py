"""Batch building: one scheduler step (``(sequence, tokens)`` pairs) -> the inputs of one forward, and the
forward itself on the path that fits.

Place: between :mod:`workers.reference.scheduler` (which chose the work) and the compute: the engine's
step thread calls :meth:`BatchBuilder.build` under the engine's lock, then :meth:`BatchBuilder.forward`
without it. A step whose every row decodes one token runs on the native decode step
(:class:`~workers.reference.native.NativeDecode`, when the engine built one) from a
:class:`~workers.reference.native.NativeStep`; every other step runs :meth:`DecoderModel.forward` on a
:class:`~workers.reference.model.StepBatch`. The model knows nothing of the native path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic

import torch

from workers.reference.model import DecoderModel, PrefillChunk, StepBatch
from workers.reference.native import NativeDecode, NativeStep
from workers.reference.scheduler import S


@dataclass(slots=True)
class Plan(Generic[S]):
    seqs: list[tuple[S, int]]  # (sequence, tokens computed this step), decode rows first
    batch: StepBatch | NativeStep
    samplers: list[S]  # sequences whose last row's logits are sampled, in logits row order


class BatchBuilder:
    """Per-step index tensors for one model and block size; see :class:`~workers.reference.model.StepBatch`
    for the row layout. Thread-confined to the engine's step thread."""

    def __init__(self, model: DecoderModel, block_size: int, context_length: int,
                 native: NativeDecode | None = None) -> None:
        self.model = model
        self.native = native
        self.block_size = block_size
        cfg = model.cfg
        self.num_layers = cfg.num_layers
        self.num_kv_heads = cfg.num_kv_heads
        self.num_heads = cfg.num_heads
        self.device = dev = model.device
        self.dtype = model.dtype
        # Constant index pieces of every step's gathers, on the device, so building a step's indices is
        # a couple of broadcast ops.
        bs, nl, kv = block_size, cfg.num_layers, cfg.num_kv_heads
        self._arange_bs = torch.arange(bs, device=dev)
        self._layer_rows = (torch.arange(nl, device=dev) * bs)[:, None]  # token row offset of layer l
        # Head row of (layer l, K/V half, head h, slot t) inside a block: ((l*bs + t) * 2 + half) * KV + h,
        # shaped [L, 2, 1(seq), KV, 1(block), bs] to broadcast against a [seq, block] table.
        lt = (torch.arange(nl, device=dev)[:, None] * bs + self._arange_bs[None, :]).view(nl, 1, 1, 1, 1, bs)
        half = torch.arange(2, device=dev).view(1, 2, 1, 1, 1, 1)
        head = torch.arange(kv, device=dev).view(1, 1, 1, kv, 1, 1)
        self._dec_const = (lt * 2 + half) * kv + head
        self._arange_ctx = torch.arange((context_length + bs - 1) // bs * bs, device=dev)

    def forward(self, batch: StepBatch | NativeStep, pool: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[samplers, vocab]``; the step's K and V are written into ``pool``."""
        if isinstance(batch, NativeStep):
            assert self.native is not None
            return self.native.run(batch, pool)
        return self.model.forward(batch, pool)

    def build(self, chosen: list[tuple[S, int]]) -> Plan[S]:
        """The step's flat token batch and every index tensor its forward needs, for all layers at once.
        Per step: a few small host lists, one host-to-device tensor for the token rows, and O(1) tensor
        ops for the decode gathers (no per-sequence or per-layer tensor work). Sorts ``chosen`` in place,
        decode rows first."""
        bs = self.block_size
        per_block = self.num_layers * bs  # token rows per block (see StepBatch)
        dev = self.device
        chosen.sort(key=lambda sn: sn[1] > 1)  # decode rows first (stable)
        ids: list[int] = []
        pos: list[int] = []
        widx: list[int] = []
        sample_rows: list[int] = []
        samplers: list[S] = []
        dec_tables: list[list[int]] = []
        prefill_meta: list[tuple[int, int, int, list[int]]] = []
        for seq, n in chosen:
            row = len(ids)
            start = seq.num_computed
            blocks = seq.blocks
            if n == 1:
                ids.append(seq.tokens[start])
                pos.append(start)
                widx.append(blocks[start // bs] * per_block + start % bs)
                dec_tables.append(blocks[: start // bs + 1])
            else:
                ids.extend(seq.tokens[start:start + n])
                pos.extend(range(start, start + n))
                widx.extend([blocks[p // bs] * per_block + p % bs for p in range(start, start + n)])
                prefill_meta.append((row, n, start, blocks[: (start + n - 1) // bs + 1]))
            if start + n == len(seq.tokens):
                sample_rows.append(row + n - 1)
                samplers.append(seq)
        self.model.ensure_rope(max(pos) + 1)
        if not prefill_meta and self.native is not None:
            # All decode: the native step reads the block tables itself, no index tensors.
            return Plan(seqs=chosen, batch=NativeStep(ids, pos, dec_tables), samplers=samplers)
        n_tok = len(ids)
        rows = torch.tensor([ids, pos, widx], dtype=torch.long, device=dev)
        input_ids, positions, wrow = rows.unbind(0)
        write_idx = (wrow[None, :] + self._layer_rows).unbind(0)
        nd = len(dec_tables)
        dec_gather = dec_bias = None
        T = 0
        if nd:
            kv = self.num_kv_heads
            g = self.num_heads // kv
            nb = max(len(t) for t in dec_tables)
            T = nb * bs
            tbl = torch.tensor([t + [0] * (nb - len(t)) for t in dec_tables], dtype=torch.long, device=dev)
            # [L, 2, seq, KV, block, slot] head rows, one flat index per layer.
            gat = (tbl * (per_block * 2 * kv)).view(1, 1, nd, 1, nb, 1) + self._dec_const
            dec_gather = gat.view(self.num_layers, -1).unbind(0)
            pad = self._arange_ctx[:T] > positions[:nd, None]  # slots past each sequence's new token
            dec_bias = torch.zeros((nd, kv, g, T), dtype=self.dtype, device=dev).masked_fill_(
                pad.view(nd, 1, 1, T), float("-inf")).view(nd * kv, g, T)
        prefills: list[PrefillChunk] = []
        for row, n, start, blocks in prefill_meta:
            gather = None
            if start > 0:
                t = torch.tensor(blocks, dtype=torch.long, device=dev)
                first = ((t * per_block)[:, None] + self._arange_bs).view(-1)[: start + n]
                gather = (first[None, :] + self._layer_rows).unbind(0)
            prefills.append(PrefillChunk(row=row, n=n, start=start, gather=gather))
        every_row = len(sample_rows) == n_tok  # then the rows are 0..n-1 in order (all decode)
        batch = StepBatch(
            input_ids=input_ids,
            positions=positions,
            write_idx=write_idx,
            num_decode=nd,
            decode_gather=dec_gather,
            decode_bias=dec_bias,
            decode_len=T,
            prefills=prefills,
            sample_rows=None if every_row else torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        return Plan(seqs=chosen, batch=batch, samplers=samplers)
