"""The reference engine's paged KV cache: one block-major tensor pool.

Place: owned by ``workers.reference.engine`` (all calls happen under the engine's lock); the model
(``workers.reference.model``) reads and writes the pool through flat row indices; a KV hand-off (NIXL, or
the in-process copy the tests use) moves whole blocks, each of which is ONE contiguous region of
``block_bytes`` bytes holding K and V of all layers for ``block_size`` positions:

    pool[num_blocks, num_layers, block_size, 2 (K, V), num_kv_heads, head_dim]

so a run of consecutive block ids is one descriptor. (K and V of one token are adjacent so a layer writes
and gathers both with one index op. K is stored in the model's RoPE pair order, see
``workers.reference.model._interleave_rows``: only our own engines read this pool.)

Which block ids are free, referenced, cached or pinned, and the KV events that follow, is the job of
:class:`workers.common.blocks.BlockManager` (the one the mocker uses too); this module is only the tensor.
"""

from __future__ import annotations

from typing import Any

import torch


class KvPool:
    """The KV tensor plus what a transfer agent needs to register it."""

    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: padded attention positions gather from the pool and are multiplied by a zero
        # weight; uninitialised memory may hold NaN bit patterns (0 * NaN = NaN).
        self.tensor = torch.zeros((num_blocks, num_layers, block_size, 2, num_kv_heads, head_dim),
                                  dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = self.tensor[0].numel() * self.tensor.element_size()
        self.device = self.tensor.device

    def data_ptr(self) -> int:
        return int(self.tensor.data_ptr())

    def block_addr(self, block_id: int) -> int:
        """Address of one block (all layers, K and V): what a transfer descriptor points at."""
        return self.data_ptr() + block_id * self.block_bytes

    def descriptor(self) -> dict[str, Any]:
        """The pool as :class:`dynamo_rt.protocol.NixlRecord` describes it (minus the agent fields)."""
        return {"memory": "VRAM" if self.device.type == "cuda" else "DRAM",
                "device_id": self.device.index or 0, "base_addr": self.data_ptr(),
                "block_bytes": self.block_bytes, "num_blocks": self.num_blocks, "layout": "block-major"}

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
