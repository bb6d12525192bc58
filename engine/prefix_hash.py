"""The identity of a full KV block: a hash chained over its tokens.

A block's KV depends on every token before it, on its own tokens and on the weights
that computed it, so its hash covers the previous block's hash, its token ids and a
salt naming the adapter version (engine/sequence.py: `Sequence.cache_salt`). BLAKE2b
rather than Python's `hash`: a lookup that matched another tenant's prompt by a
crafted collision would hand it that prompt's KV, so the hash must be one nobody can
collide on purpose.
"""

from __future__ import annotations

import hashlib
from array import array

DIGEST_BYTES = 16


def block_hashes(
    token_ids: list[int], block_size: int, first: int, end: int, previous: bytes | None, salt: bytes
) -> list[bytes]:
    """Hashes of blocks [first, end) of `token_ids`; `previous` is block first-1's hash
    (None for the first block)."""
    digests = []
    parent = previous or b""
    for i in range(first, end):
        tokens = array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=DIGEST_BYTES, salt=salt).digest()
        digests.append(parent)
    return digests
