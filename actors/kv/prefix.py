"""Automatic prefix caching: full KV blocks kept by the hash of the token prefix they hold.

A *full* block of a table (all block_size positions hold keys/values of committed tokens) is
named by a chained digest, as vLLM names its blocks: digest_i = sha256(digest_{i-1} + the
block's tokens). Equal digests mean equal token prefixes up to and including the block, so the
block's keys/values can serve any later sequence whose tokens start the same way.

The index maps digest -> block and back. A block it names stays in the pool after the last table
drops it: its reference count is 0 but it is *parked* in an LRU list instead of the free list,
and it is evicted (its digest forgotten, the block handed out as free) only when the pool has no
free block left. Parked blocks are therefore reclaimable: reservations never count them, so
admission never waits on them.

A block the index names is never written: PagedKVCache._own copies it first, even when no table
but the writer holds it (copy on write, as for forks). Decisions are made from host bookkeeping
only (token ids, tables, counts), so a tensor-parallel rank 0 decides and its workers replay the
resulting forwards' plans and copies (actors/model/tp/).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

ROOT = b"outrider-prefix-v1"


def block_digests(tokens: list[int], block_size: int, start: int = 0, prev: bytes = ROOT,
                  limit: int | None = None) -> list[bytes]:
    """The chained digests of the full blocks of `tokens` from block `start` (whose parent
    digest is `prev`) up to position `limit` (default: all of them)."""
    n = len(tokens) if limit is None else min(limit, len(tokens))
    out = []
    for i in range(start, n // block_size):
        chunk = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        prev = hashlib.sha256(prev + chunk).digest()
        out.append(prev)
    return out


class PrefixIndex:
    """digest <-> block, the LRU list of parked (unreferenced, reclaimable) blocks, and the
    hit counters in tokens."""

    def __init__(self):
        self.by_digest: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.parked: OrderedDict[int, None] = OrderedDict()   # oldest first: the next to evict
        self.query_tokens = 0    # prompt tokens looked up
        self.hit_tokens = 0      # of which found cached (their prefill skipped)
        self.evictions = 0

    def __contains__(self, block: int) -> bool:
        return block in self.digest_of

    @property
    def n_blocks(self) -> int:
        """Blocks the index names (held by tables or parked)."""
        return len(self.digest_of)

    @property
    def n_parked(self) -> int:
        return len(self.parked)

    def lookup(self, digests: list[bytes]) -> list[int]:
        """The blocks of the longest cached run of `digests` from the first."""
        out = []
        for d in digests:
            b = self.by_digest.get(d)
            if b is None:
                break
            out.append(b)
        return out

    def register(self, digest: bytes, block: int) -> None:
        """Name `block` by `digest`, unless either is named already (a prefix computed twice
        keeps its first block; the second stays private to its table)."""
        if digest not in self.by_digest and block not in self.digest_of:
            self.by_digest[digest] = block
            self.digest_of[block] = digest

    def park(self, block: int) -> None:
        self.parked[block] = None

    def unpark(self, block: int) -> None:
        del self.parked[block]

    def evict(self) -> int | None:
        """The least recently parked block, forgotten; None when none is parked."""
        if not self.parked:
            return None
        b, _ = self.parked.popitem(last=False)
        del self.by_digest[self.digest_of.pop(b)]
        self.evictions += 1
        return b

    def stats(self) -> dict:
        return {"prefix_query_tokens": self.query_tokens, "prefix_hit_tokens": self.hit_tokens,
                "prefix_blocks": self.n_blocks, "prefix_blocks_parked": self.n_parked,
                "prefix_evictions": self.evictions}
