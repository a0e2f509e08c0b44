"""Block hashes shared by every engine, the mocker and the KV router.

A block's hash is a 64-bit digest of its token ids chained with its parent's hash, so equal prefixes give
equal hashes on every worker and in the router. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    h = hashlib.blake2b(parent.to_bytes(8, "little", signed=False), digest_size=8)
    h.update(array("I", tokens).tobytes())
    return int.from_bytes(h.digest(), "little", signed=False) & 0x7FFF_FFFF_FFFF_FFFF


def block_hashes(tokens: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of ``tokens``, chained from ``parent``."""
    buf = array("I", tokens).tobytes()  # one conversion, then byte slices per block
    step = 4 * block_size
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        h = hashlib.blake2b(parent.to_bytes(8, "little", signed=False), digest_size=8)
        h.update(buf[i * step : (i + 1) * step])
        parent = int.from_bytes(h.digest(), "little", signed=False) & 0x7FFF_FFFF_FFFF_FFFF
        out.append(parent)
    return out
