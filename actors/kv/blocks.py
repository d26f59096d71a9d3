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
a block whose count reaches zero goes back to the pool.

Admission uses *reservations*: a sequence reserves the most blocks it can ever hold (prompt +
max_new_tokens + K), so an admitted sequence never runs out of cache halfway; `can_reserve`
tells the admitter whether the next one fits. Sides that fork (the drafter) are sized by the
memory plan (cluster/memory_plan.py) so they never need to refuse.

With padded shapes (actors/buckets.py) one block is the *scratch* block: taken out of the free
list for good, never in any table, it is where dummy rows and padding positions write and what
reads past a table's end point at. Reservations count the other blocks only (`capacity`).
"""
from __future__ import annotations

import heapq

import torch

from actors.kv_cache import CacheFullError, read_len, rows_aligned


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


class BlockPool:
    """The storage and the free list. Free blocks are handed out lowest id first, so a sequence
    admitted into a fresh pool gets consecutive blocks (a batch-1 read is then a view)."""

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.ref = [0] * n_blocks
        self._free = list(range(n_blocks))   # a heap
        self.copies = 0                      # copy-on-write block copies so far
        # A list: every copy is also logged as (src, dst), for a tensor-parallel rank 0 to have its
        # workers make the same copies in their pools (actors/tp/); None: not logged.
        self.copy_log: list[tuple[int, int]] | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.ref)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def take(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.n_blocks} KV blocks are in use")
        b = heapq.heappop(self._free)
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise ValueError(f"block {b} is free")
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise ValueError(f"block {b} is already free")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            heapq.heappush(self._free, b)

    def copy(self, src: int) -> int:
        """A private copy of block `src` (every layer); drops one reference to `src`."""
        dst = self.take()
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.decref(src)
        self.copies += 1
        if self.copy_log is not None:
            self.copy_log.append((src, dst))
        return dst


class PagedKVCache:
    """Sequences as block tables over one BlockPool. A handle (int) names a table, where the
    slot-based KVCache names a slot; `attend` is what the model's attention calls."""

    def __init__(self, pool: BlockPool, max_len: int, scratch: bool = False):
        self.pool = pool
        self.max_len = max_len
        self.block_size = pool.block_size
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.reserved: dict[int, int] = {}    # handle -> blocks reserved at admission
        self._next = 0
        self._plan: tuple | None = None       # this forward's indices, built by prepare
        # padded forwards' write target (prepare_padded); the pool's lowest free block
        self.scratch: int | None = pool.take() if scratch else None
        self.padded_forwards = 0              # plans built by prepare_padded

    @classmethod
    def for_model(cls, args, n_blocks: int, block_size: int, max_len: int, dtype=torch.float32,
                  device="cpu", scratch: bool = False) -> PagedKVCache:
        return cls(BlockPool(args.n_layers, n_blocks, block_size, args.n_kv_heads, args.head_dim, dtype, device),
                   max_len, scratch)

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
        self.tables[h], self.lengths[h] = [], 0
        if need:
            self.reserved[h] = need
        return h

    def free(self, h: int) -> None:
        for b in self.tables.pop(h):
            self.pool.decref(b)
        del self.lengths[h]
        self.reserved.pop(h, None)

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
        for b in t[keep:]:
            self.pool.decref(b)
        del t[keep:]

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
        if self.pool.n_free != sum(1 for c in counts if c == 0):
            raise AssertionError("the free list disagrees with the reference counts")

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
        """`prepare` for a forward padded to `shape` = (rows, T', kv_len') (actors/buckets.py):
        input_pos [B, T] are the real rows' host positions, kv_len >= theirs. Real rows own blocks
        for their real positions only (no extra blocks, reservations hold); dummy rows and padding
        positions write into the scratch block; reads past a table's end read scratch. The plan
        is always masked (aligned/causal False), so each real query sees exactly the keys it sees
        unpadded. Returns the padded host positions [rows, T'] the forward must be given."""
        from actors.buckets import pad_positions
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
            for i in range(a // bs, z // bs + 1):
                if self.pool.ref[t[i]] > 1:
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
