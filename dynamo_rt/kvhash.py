"""Block hashes shared by every engine, the mocker and the KV router.

A block's hash is a 64-bit digest of its token ids chained with its parent's hash, so equal prefixes give
equal hashes on every worker and in the router. Only full blocks are hashed.

A request's ``cache_salt`` (the tenant salt the frontend derives, :mod:`frontend.tenants`) picks the seed
of its chain, :func:`chain_root`: every site that hashes a prefix (engines, mocker, router, KV tiers) asks
it for the first block's parent, so equal salts agree everywhere and a different salt shares no hash.
Without a salt the seed is ``ROOT_HASH``: unsalted hashes are exactly what they were before salts existed.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0
_MASK = 0x7FFF_FFFF_FFFF_FFFF
_SALT_DOMAIN = b"dynamo-rt/kvhash/salt/v1\0"


@functools.lru_cache(maxsize=1024)
def chain_root(cache_salt: str = "") -> int:
    """The parent hash of a chain's first block: ``ROOT_HASH`` without a salt, else a 63-bit digest of it.

    The salt is digested in its own domain (a block hash digests a parent and token ids), so a seed
    equals some block's hash only by 64-bit chance: a salted chain does not continue an unsalted one."""
    if not cache_salt:
        return ROOT_HASH
    h = hashlib.blake2b(_SALT_DOMAIN + cache_salt.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=False) & _MASK


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    h = hashlib.blake2b(parent.to_bytes(8, "little", signed=False), digest_size=8)
    h.update(array("I", tokens).tobytes())
    return int.from_bytes(h.digest(), "little", signed=False) & _MASK


def block_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None, *,
                 cache_salt: str = "") -> list[int]:
    """Hashes of every full block of ``tokens``, chained from ``parent`` (default: the seed of
    ``cache_salt``'s chain, :func:`chain_root`)."""
    if parent is None:
        parent = chain_root(cache_salt)
    buf = array("I", tokens).tobytes()  # one conversion, then byte slices per block
    step = 4 * block_size
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        h = hashlib.blake2b(parent.to_bytes(8, "little", signed=False), digest_size=8)
        h.update(buf[i * step : (i + 1) * step])
        parent = int.from_bytes(h.digest(), "little", signed=False) & _MASK
        out.append(parent)
    return out
