"""A preallocated, slot-based KV cache.

One cache holds `n_slots` sequences side by side: k/v are [n_layers, n_slots, n_kv_heads,
max_len, head_dim]. A slot is one sequence (or one speculative branch). Nothing is ever
erased: `truncate` only moves the committed length back, because the model attends a query at
position p to keys 0..p only, and every key in that range is rewritten before it is read again.
`fork` copies a prefix into other slots so several continuations of it decode as one batch.
Slots given out as a run (`alloc_run`) are consecutive, so a batch over them reads the cache
as a view instead of gathering it (`prepare` notes the run, `attend` reads it).
"""
from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """No free slot, or a sequence would outgrow max_len."""


def first_of_run(slots: list[int]) -> int | None:
    """The first slot when `slots` are consecutive and ascending (a batch over them then reads or
    writes the cache through a slice, no gather or scatter), else None."""
    return slots[0] if slots and slots == list(range(slots[0], slots[0] + len(slots))) else None


def rows_aligned(pos: torch.Tensor, kv_len: int) -> bool:
    """Whether every row's positions are the last T before kv_len (host positions [B, T]). Then
    attention needs no explicit mask: one query sees every key, and T == kv_len is plain causal."""
    return bool((pos[:, -1] == kv_len - 1).all()) and bool((pos[:, 0] == kv_len - pos.shape[1]).all())


KEY_BLOCK = 16   # keys a reduced-precision CPU attention reads come in whole blocks of this many


def read_len(kv_len: int, causal: bool, like: torch.Tensor) -> int:
    """How many keys a forward's attention reads: kv_len, or for bfloat16/float16 on CPU kv_len
    rounded up to a multiple of KEY_BLOCK, the keys past kv_len masked. The fused CPU kernel sums
    a tail of fewer keys in another order, so a row at position p would get other bits in a
    decode (p + 1 keys) than inside a verify (more keys, the later ones masked); with whole
    blocks it gets the same (tests/test_packed.py), and greedy SD/SSD stay token-identical to AR.
    A fresh prefill (`causal`, SDPA's own causal mask) reads exactly kv_len. `like`: a tensor of
    the KV's dtype and device. The model and the caches call this same function, so a plan built
    on one rank and a forward on another agree (actors/tp/)."""
    if causal or like.dtype == torch.float32 or like.device.type != "cpu":
        return kv_len
    return -(-kv_len // KEY_BLOCK) * KEY_BLOCK


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        # room for read_len's rounding past max_len (never written, only read and masked)
        cap = read_len(max_len, False, torch.empty(0, dtype=dtype, device=device))
        shape = (n_layers, n_slots, n_kv_heads, cap, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * n_slots
        self._free = list(range(n_slots - 1, -1, -1))

    @classmethod
    def for_model(cls, args, n_slots: int, max_len: int, dtype=torch.float32, device="cpu") -> KVCache:
        return cls(args.n_layers, n_slots, args.n_kv_heads, max_len, args.head_dim, dtype, device)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def n_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.n_slots} KV-cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def alloc_run(self, n: int) -> list[int]:
        """`n` consecutive free slots (the lowest such run)."""
        free = set(self._free)
        for first in range(self.n_slots - n + 1):
            if all(first + i in free for i in range(n)):
                run = list(range(first, first + n))
                self._free = [f for f in self._free if not first <= f < first + n]
                for slot in run:
                    self.lengths[slot] = 0
                return run
        raise CacheFullError(f"no {n} consecutive free KV-cache slots (of {self.n_slots}, {len(free)} free)")

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Roll back to `length` committed positions (drop rejected draft tokens)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def advance(self, slot: int, length: int) -> None:
        """Record that positions up to `length` of `slot` now hold valid keys/values."""
        if length > self.max_len:
            raise CacheFullError(f"sequence length {length} exceeds the cache's max_len {self.max_len}")
        self.lengths[slot] = length

    def fork(self, src: int, dsts: list[int], length: int | None = None, start: int = 0) -> None:
        """Copy positions [start, length) of `src` into every slot in `dsts`: the first `length`
        positions of each then equal src's, if they already did up to `start`."""
        n = self.lengths[src] if length is None else length
        if dsts and n > start:
            first = first_of_run(dsts)  # a run: one strided copy
            idx = slice(first, first + len(dsts)) if first is not None else torch.tensor(dsts, device=self.k.device)
            self.k[:, idx, :, start:n] = self.k[:, src:src + 1, :, start:n]
            self.v[:, idx, :, start:n] = self.v[:, src:src + 1, :, start:n]
        for d in dsts:
            self.lengths[d] = n

    def copy_range(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy positions [start, end) of `src` into `dst` (adopting a speculative branch)."""
        if end > start:
            self.k[:, dst, :, start:end] = self.k[:, src, :, start:end]
            self.v[:, dst, :, start:end] = self.v[:, src, :, start:end]

    def prepare(self, slots: list[int], input_pos: torch.Tensor, kv_len: int) -> None:
        """Before a forward, from host bookkeeping: the rows' slots and (host) positions. Builds
        the device-side indices every layer's `attend` uses, so the forward itself never asks the
        device for a number (no host sync, capturable as a graph)."""
        pos = input_pos.cpu()   # callers pass host positions; a device tensor costs one sync here
        self.aligned = rows_aligned(pos, kv_len)
        self.causal = self.aligned and pos.shape[1] == kv_len   # a fresh prefill: SDPA's own causal mask
        self._plan = (torch.tensor(slots, device=self.k.device), pos.to(self.k.device),
                      read_len(kv_len, self.causal, self.k), first_of_run(list(slots)))

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new k/v [B, H, T, D] at the prepared rows' positions; return every
        row's keys and values 0..n-1 as [B, H, n, D], n = read_len(kv_len, ...) (a view when the
        slots are a run)."""
        slots, input_pos, kv_len, first_slot = self._plan
        kc, vc = self.k[layer], self.v[layer]  # [S, H, M, D]
        B, T = input_pos.shape
        rows = slots[:, None].expand(B, T)
        kc[rows, :, input_pos] = k.transpose(1, 2)
        vc[rows, :, input_pos] = v.transpose(1, 2)
        if first_slot is not None:  # consecutive slots: a view, no gather
            return kc[first_slot:first_slot + B, :, :kv_len], vc[first_slot:first_slot + B, :, :kv_len]
        return kc[:, :, :kv_len].index_select(0, slots), vc[:, :, :kv_len].index_select(0, slots)
