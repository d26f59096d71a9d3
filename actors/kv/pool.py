"""The block pool: K/V storage for one role, reference counts and the free list.

k and v are [n_layers, n_blocks, block_size, n_kv_heads, head_dim] (block-major: the layout a
paged kernel reads as is, actors/kv/paged.py). A block whose count reaches zero goes back to the
free list, unless the prefix index (actors/kv/prefix.py) names it: then it is parked, still
holding its keys/values for a later sequence with the same prefix, and evicted (least recently
parked first) only when the free list is empty.
"""
from __future__ import annotations

import heapq

import torch

from actors.kv.prefix import PrefixIndex
from actors.kv.common import CacheFullError


class BlockPool:
    """The storage and the free list. Free blocks are handed out lowest id first, so a sequence
    admitted into a fresh pool gets consecutive blocks (a batch-1 read is then a view)."""

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", prefix: bool = False):
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
        # workers make the same copies in their pools (actors/model/tp/); None: not logged.
        self.copy_log: list[tuple[int, int]] | None = None
        self.prefix: PrefixIndex | None = PrefixIndex() if prefix else None

    @property
    def n_blocks(self) -> int:
        return len(self.ref)

    @property
    def n_free(self) -> int:
        """Blocks on the free list (parked cached blocks not counted)."""
        return len(self._free)

    @property
    def n_parked(self) -> int:
        """Cached blocks no table holds: reclaimable on demand."""
        return self.prefix.n_parked if self.prefix is not None else 0

    @property
    def n_used(self) -> int:
        """Blocks some table holds (neither free nor parked)."""
        return self.n_blocks - self.n_free - self.n_parked

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def take(self) -> int:
        if self._free:
            b = heapq.heappop(self._free)
        else:
            b = self.prefix.evict() if self.prefix is not None else None
            if b is None:
                raise CacheFullError(f"all {self.n_blocks} KV blocks are in use")
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        """One more table holds `b`; a parked block comes back into use."""
        if self.ref[b] <= 0:
            if self.prefix is None or b not in self.prefix.parked:
                raise ValueError(f"block {b} is free")
            self.prefix.unpark(b)
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise ValueError(f"block {b} is already free")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.prefix is not None and b in self.prefix:
                self.prefix.park(b)
            else:
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
