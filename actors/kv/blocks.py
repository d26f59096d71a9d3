"""A block pool and per-sequence block tables (vLLM's PagedAttention layout).

K/V live in one pool per role: k and v are [n_layers, n_blocks, block_size, n_kv_heads, head_dim]
(block-major, the layout of flash-attn's `flash_attn_with_kvcache(block_table=...)` and of
FlexAttention's paged example, so a paged kernel can read the pool as is). A sequence is a
*table*: the list of blocks that hold its positions 0, 1, ... in order (position p lives in
block table[p // block_size] at offset p % block_size).

Blocks are reference-counted. `fork` gives a new table that shares the source's blocks up to a
length (a speculative branch reads its sequence's committed prefix and owns only its own last
positions); a write into a shared block first copies it (copy on write), so neither side ever
sees the other's positions. `truncate` (rollback after a rejection) and `free` drop references;
a block whose count reaches zero goes back to the pool (actors/kv/pool.py).

With prefix caching (actors/kv/prefix.py) `publish` names a table's full blocks of committed
tokens by their prefix digest, and `reuse` starts a new table on the cached blocks of the
longest equal prefix, so its prefill skips those positions. A named block is never written:
`_own` copies it first, as it copies a shared one.

Admission uses *reservations*: a sequence reserves the most blocks it can ever hold (prompt +
max_new_tokens + K), so an admitted sequence never runs out of cache halfway; `can_reserve`
tells the admitter whether the next one fits. Sides that fork (the drafter) are sized by the
memory plan (cluster/launch/memory_plan.py) so they never need to refuse.

With padded shapes (actors/model/buckets.py) one block is the *scratch* block: taken out of the free
list for good, never in any table, it is where dummy rows and padding positions write and what
reads past a table's end point at. Reservations count the other blocks only (`capacity`).
"""
from __future__ import annotations

import torch

from actors.kv.pool import BlockPool
from actors.kv.prefix import ROOT, block_digests
from actors.kv.common import CacheFullError, read_len, rows_aligned


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


class PagedKVCache:
    """Sequences as block tables over one BlockPool. A handle (int) names a table; `prepare`
    and `attend` are what the model's forward calls."""

    def __init__(self, pool: BlockPool, max_len: int, scratch: bool = False):
        self.pool = pool
        self.max_len = max_len
        self.block_size = pool.block_size
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.digests: dict[int, list[bytes]] = {}   # prefix caching: each table's full blocks' digests so far
        self.reserved: dict[int, int] = {}    # handle -> blocks reserved at admission
        self._next = 0
        self._plan: tuple | None = None       # this forward's indices, built by prepare
        # padded forwards' write target (prepare_padded); the pool's lowest free block
        self.scratch: int | None = pool.take() if scratch else None
        self.padded_forwards = 0              # plans built by prepare_padded

    @classmethod
    def for_model(cls, args, n_blocks: int, block_size: int, max_len: int, dtype=torch.float32,
                  device="cpu", scratch: bool = False, prefix: bool = False) -> PagedKVCache:
        return cls(BlockPool(args.n_layers, n_blocks, block_size, args.n_kv_heads, args.head_dim, dtype, device,
                             prefix), max_len, scratch)

    @classmethod
    def for_rows(cls, args, n_rows: int, max_len: int, dtype=torch.float32, device="cpu",
                 block_size: int = 16) -> PagedKVCache:
        """Room for `n_rows` sequences of up to `max_len` positions each, none of them shared: a
        cache for in-process decoding (actors/generate.py), tests and benches."""
        return cls.for_model(args, n_rows * blocks_for(max_len, block_size), block_size, max_len, dtype, device)

    # -- tables --------------------------------------------------------------------------
    @property
    def n_reserved(self) -> int:
        return sum(self.reserved.values())

    @property
    def capacity(self) -> int:
        """Blocks sequences can hold: the pool's, less the scratch block."""
        return self.pool.n_blocks - (self.scratch is not None)

    def can_reserve(self, n_tokens: int) -> bool:
        return self.n_reserved + blocks_for(n_tokens, self.block_size) <= self.capacity

    def alloc(self, reserve_tokens: int = 0) -> int:
        """A new, empty table; with `reserve_tokens`, blocks for that many positions are set
        aside for it (CacheFullError when they are not there)."""
        need = blocks_for(reserve_tokens, self.block_size)
        if need and self.n_reserved + need > self.capacity:
            raise CacheFullError(f"cannot reserve {need} KV blocks: {self.n_reserved} of {self.capacity} "
                                 "are reserved")
        h = self._next
        self._next += 1
        self.tables[h], self.lengths[h], self.digests[h] = [], 0, []
        if need:
            self.reserved[h] = need
        return h

    def free(self, h: int) -> None:
        # last block first: parked blocks are evicted oldest first, and a prefix's tail is worth
        # less than its head (no later block of the chain can hit without it)
        for b in reversed(self.tables.pop(h)):
            self.pool.decref(b)
        del self.lengths[h], self.digests[h]
        self.reserved.pop(h, None)

    # -- prefix caching (actors/kv/prefix.py) ---------------------------------------------
    def reuse(self, h: int, tokens: list[int], limit: int) -> int:
        """Start the empty table `h` on the cached blocks of the longest prefix of `tokens` it
        finds, at most `limit` positions (a prefill needs one token left to compute, for its
        logits). Counts the lookup; returns the positions reused (0 without prefix caching)."""
        index = self.pool.prefix
        if index is None:
            return 0
        if self.tables[h]:
            raise ValueError(f"table {h} is not empty: a prefix is reused only by a new table")
        digests = block_digests(tokens, self.block_size, limit=limit)
        blocks = index.lookup(digests)
        for b in blocks:
            self.pool.incref(b)
        n = len(blocks) * self.block_size
        self.tables[h], self.lengths[h], self.digests[h] = list(blocks), n, digests[:len(blocks)]
        index.query_tokens += len(tokens)
        index.hit_tokens += n
        return n

    def publish(self, h: int, tokens: list[int], upto: int) -> None:
        """Name the full blocks of table `h` below position `upto` by their prefix digests:
        positions < upto must hold the keys/values of `tokens` (committed tokens only)."""
        index = self.pool.prefix
        if index is None:
            return
        done, t = self.digests[h], self.tables[h]
        n = min(upto, self.lengths[h], len(tokens)) // self.block_size
        if n <= len(done):
            return
        new = block_digests(tokens, self.block_size, len(done), done[-1] if done else ROOT,
                            limit=n * self.block_size)
        for i, d in enumerate(new, len(done)):
            index.register(d, t[i])
        done += new

    def fork(self, src: int, length: int) -> int:
        """A new table whose positions [0, length) are src's, sharing its blocks."""
        if length > self.lengths[src]:
            raise ValueError(f"cannot fork {length} positions of a table of length {self.lengths[src]}")
        shared = self.tables[src][:blocks_for(length, self.block_size)]
        for b in shared:
            self.pool.incref(b)
        h = self._next
        self._next += 1
        self.tables[h], self.lengths[h] = list(shared), length
        self.digests[h] = self.digests[src][:length // self.block_size]
        return h

    def truncate(self, h: int, length: int) -> None:
        """Roll back to `length` positions; blocks past it go back to the pool."""
        if not 0 <= length <= self.lengths[h]:
            raise ValueError(f"cannot truncate table {h} of length {self.lengths[h]} to {length}")
        self._drop_after(h, length)
        self.lengths[h] = length

    def advance(self, h: int, length: int) -> None:
        """Positions up to `length` of `h` now hold valid keys/values (written by a forward)."""
        if length > self.max_len:
            raise CacheFullError(f"sequence length {length} exceeds the cache's max_len {self.max_len}")
        if blocks_for(length, self.block_size) > len(self.tables[h]):
            raise ValueError(f"table {h} holds {len(self.tables[h])} blocks, too few for {length} positions")
        self.lengths[h] = length
        self._drop_after(h, max(length, 0))

    def _drop_after(self, h: int, length: int) -> None:
        t = self.tables[h]
        keep = blocks_for(length, self.block_size)
        for b in reversed(t[keep:]):
            self.pool.decref(b)
        del t[keep:]
        del self.digests[h][length // self.block_size:]   # a block no longer full is no longer named

    def blocks_held(self) -> int:
        """Distinct blocks referenced by any table (equals the pool's used blocks unless leaked)."""
        return len({b for t in self.tables.values() for b in t})

    def check(self) -> None:
        """Every reference count equals the number of tables that hold the block (no leak, no
        double free); the scratch block, if any, holds exactly one (its own). Raises AssertionError
        otherwise."""
        counts = [0] * self.pool.n_blocks
        if self.scratch is not None:
            counts[self.scratch] = 1
        for t in self.tables.values():
            for b in t:
                counts[b] += 1
        if counts != self.pool.ref:
            bad = [i for i, (a, b) in enumerate(zip(counts, self.pool.ref)) if a != b]
            raise AssertionError(f"block reference counts disagree with the tables at blocks {bad[:8]}")
        if self.pool.n_free + self.pool.n_parked != sum(1 for c in counts if c == 0):
            raise AssertionError("the free list and the parked blocks disagree with the reference counts")
        index = self.pool.prefix
        if index is not None:
            if any(self.pool.ref[b] for b in index.parked) or any(b not in index for b in index.parked):
                raise AssertionError("a parked block is held by a table or named by no digest")
            if any(index.by_digest[d] != b for b, d in index.digest_of.items()):
                raise AssertionError("the prefix index's two maps disagree")

    # -- the model's side ----------------------------------------------------------------
    def prepare(self, handles: list[int], input_pos: torch.Tensor, kv_len: int) -> None:
        """Before a forward, from host bookkeeping (handles, host positions [B, T], kv_len): give
        every row blocks for the positions it writes (copying any shared block it writes into),
        and build the write and read indices every layer uses. The forward then never asks the
        device for a number (no host sync, capturable as a graph)."""
        bs, device = self.block_size, self.pool.k.device
        pos = input_pos.cpu()   # callers pass host positions; a device tensor costs one sync here
        lo, hi = pos[:, 0].tolist(), pos[:, -1].tolist()   # every row's positions are ascending
        self._own(handles, lo, hi)
        from actors.kv.paged import build_indices

        self.aligned = rows_aligned(pos, kv_len)
        self.causal = self.aligned and pos.shape[1] == kv_len   # a fresh prefill: SDPA's own causal mask
        # reads read_len(...) keys (whole key blocks in bfloat16 on CPU; past kv_len masked)
        self._plan = build_indices([self.tables[h] for h in handles], pos, read_len(kv_len, self.causal, self.pool.k),
                                   bs, device, lo[0], hi[0])

    def prepare_padded(self, handles: list[int], input_pos: torch.Tensor, kv_len: int, shape) -> torch.Tensor:
        """`prepare` for a forward padded to `shape` = (rows, T', kv_len') (actors/model/buckets.py):
        input_pos [B, T] are the real rows' host positions, kv_len >= theirs. Real rows own blocks
        for their real positions only (no extra blocks, reservations hold); dummy rows and padding
        positions write into the scratch block; reads past a table's end read scratch. The plan
        is always masked (aligned/causal False), so each real query sees exactly the keys it sees
        unpadded. Returns the padded host positions [rows, T'] the forward must be given."""
        from actors.model.buckets import pad_positions
        from actors.kv.paged import build_padded_indices

        if self.scratch is None:
            raise ValueError("a padded forward needs a cache built with scratch=True")
        pos = input_pos.cpu()
        if shape[2] < kv_len or shape[0] < pos.shape[0] or shape[1] < pos.shape[1]:
            raise ValueError(f"padded shape {shape} is smaller than the forward's {tuple(pos.shape)}, kv_len {kv_len}")
        self._own(handles, pos[:, 0].tolist(), pos[:, -1].tolist())
        padded = pad_positions(pos, shape)
        self._plan = build_padded_indices([self.tables[h] for h in handles], padded, pos.shape[1],
                                          read_len(shape[2], False, self.pool.k),
                                          self.block_size, self.scratch, self.pool.k.device)
        self.aligned = self.causal = False
        self.padded_forwards += 1
        return padded

    def _own(self, handles: list[int], lo: list[int], hi: list[int]) -> None:
        """Give every row blocks for positions lo..hi, copying any shared block it writes into."""
        bs = self.block_size
        for h, a, z in zip(handles, lo, hi):
            t = self.tables[h]
            if z >= self.max_len:
                raise CacheFullError(f"position {z} exceeds the cache's max_len {self.max_len}")
            while len(t) <= z // bs:
                t.append(self.pool.take())
            index = self.pool.prefix
            for i in range(a // bs, z // bs + 1):
                # shared, or named by the prefix index (a later hit must find it as it was)
                if self.pool.ref[t[i]] > 1 or (index is not None and t[i] in index):
                    t[i] = self.pool.copy(t[i])

    @property
    def plan(self) -> tuple | None:
        """The last prepare's write and read indices (actors/kv/paged.py), as attend uses them."""
        return self._plan

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new k/v [B, H, T, D] at the prepared positions; return every row's
        keys and values 0..kv_len-1 as [B, H, kv_len, D], in position order (the caller's mask
        hides what a row has not reached)."""
        from actors.kv.paged import read_kv, write_kv

        write_kv(self.pool, layer, k, v, self._plan)
        return read_kv(self.pool, layer, self._plan)
