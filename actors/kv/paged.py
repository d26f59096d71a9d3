"""Attention reads and writes through block tables.

The pool's k/v are [n_layers, n_blocks, block_size, n_kv_heads, head_dim]; one layer flattened
is [n_blocks * block_size, H, D], so position p of a table lives at flat row
`table[p // block_size] * block_size + p % block_size`. Per forward (built once, by
PagedKVCache.prepare before the forward, and used by every layer):

  * write: one `index_copy_` of the new rows [B*T, H, D] at their flat rows;
  * read: each row's keys/values 0..kv_len-1 in position order, [B, H, kv_len, D]. A single row
    whose blocks are consecutive in the pool (the common case at batch 1: a fresh pool hands out
    blocks lowest first) is read as a strided view, no copy. Otherwise one `index_select` per
    layer gathers them (positions a row has not reached point at some valid row and are hidden
    by the caller's mask).

On CPU the gather is what runs. On CUDA the same pool is what a paged kernel reads without a
gather: flash-attn's `flash_attn_with_kvcache(q, k_cache, v_cache, block_table=...)` takes
k_cache as [num_blocks, block_size, H, D] exactly, and FlexAttention reads it through a
BlockMask whose logical->physical map is the same table (torch's paged-attention example); the
block table tensor built here ([B, n_blocks_per_row], int32 there) is the argument both take.
That kernel path is not wired yet: the gather runs on every device (docs/paged-kv.md).
"""
from __future__ import annotations

import torch


def build_indices(tables: list[list[int]], pos: torch.Tensor, kv_len: int, block_size: int,
                  device: torch.device, lo: int = -1, hi: int = -1) -> tuple:
    """(write, read): write is flat rows [B*T] or ("slice", first_row, T); read is
    ("view", first_row, kv_len) or ("gather", rows [B*kv_len], kv_len). `lo`, `hi`: row 0's first
    and last position (a batch-1 forward over consecutive blocks needs no index tensor at all)."""
    B, T = pos.shape
    nblk = -(-kv_len // block_size)
    # A view reads only blocks the table holds (kv_len may run past them: read_len's rounding).
    if B == 1 and hi - lo + 1 == T and len(tables[0]) >= nblk:
        t = tables[0][:max(nblk, hi // block_size + 1)]
        if t[-1] - t[0] == len(t) - 1 and t == list(range(t[0], t[0] + len(t))):
            base = t[0] * block_size
            return ("slice", base + lo, T), ("view", base, kv_len)
    width = max(nblk, max(len(t) for t in tables))
    blk = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], dtype=torch.long)
    p = pos.long()
    write = (blk.gather(1, p // block_size) * block_size + p % block_size).reshape(B * T)
    if B == 1 and len(tables[0]) >= nblk:
        t = tables[0][:nblk]
        if t == list(range(t[0], t[0] + len(t))):
            return write.to(device), ("view", t[0] * block_size, kv_len)
    return write.to(device), ("gather", _read_rows(blk[:, :nblk], kv_len, block_size, device), kv_len)


def _read_rows(blk: torch.Tensor, kv_len: int, block_size: int, device) -> torch.Tensor:
    """Every row's pool rows for positions 0..kv_len-1, [B * kv_len], computed on `device` from
    the block tables [B, nblk]: only the tables cross from the host (1/block_size of the index
    bytes; a 70B drafter's 1024 branch rows x 8k keys were 69 MB of int64 built on one CPU thread
    every draft step)."""
    blk = blk.to(device)
    ar = torch.arange(kv_len, device=blk.device)
    return (blk[:, ar // block_size] * block_size + ar % block_size).reshape(-1)


def write_kv(pool, layer: int, k: torch.Tensor, v: torch.Tensor, plan: tuple) -> None:
    """Store k/v [B, H, T, D] at the plan's write rows."""
    write = plan[0]
    B, H, T, D = k.shape
    if isinstance(write, tuple):  # one row on consecutive blocks: a slice
        a = write[1]
        pool.k[layer].view(-1, H, D)[a:a + T] = k[0].transpose(0, 1)
        pool.v[layer].view(-1, H, D)[a:a + T] = v[0].transpose(0, 1)
        return
    pool.k[layer].view(-1, H, D).index_copy_(0, write, k.transpose(1, 2).reshape(B * T, H, D))
    pool.v[layer].view(-1, H, D).index_copy_(0, write, v.transpose(1, 2).reshape(B * T, H, D))


def read_kv(pool, layer: int, plan: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's keys and values 0..kv_len-1, [B, H, kv_len, D]."""
    kind, where, kv_len = plan[1]
    kf, vf = pool.k[layer], pool.v[layer]
    H, D = kf.shape[-2:]
    kf, vf = kf.view(-1, H, D), vf.view(-1, H, D)
    if kind == "view":
        return (kf[where:where + kv_len].permute(1, 0, 2).unsqueeze(0),
                vf[where:where + kv_len].permute(1, 0, 2).unsqueeze(0))
    B = where.numel() // kv_len
    return (kf.index_select(0, where).view(B, kv_len, H, D).transpose(1, 2),
            vf.index_select(0, where).view(B, kv_len, H, D).transpose(1, 2))


def build_padded_indices(tables: list[list[int]], pos: torch.Tensor, n_real: int, kv_len: int, block_size: int,
                         scratch: int, device: torch.device) -> tuple:
    """(write, read) for a padded forward (actors/model/buckets.py), always as index tensors so their
    shapes depend on the bucket alone: write [rows*T], read ("gather", [rows*kv_len], kv_len).
    `pos` is the padded [rows, T]; `tables` are the real rows', whose first `n_real` positions are
    theirs. Every other write (a dummy row's, a real row's padding) lands in the `scratch` block,
    so a real row writes nothing outside its own positions; every read past a table's end reads
    scratch, and the caller's mask hides it from real queries."""
    rows, T = pos.shape
    nblk = -(-kv_len // block_size)
    blk = torch.full((rows, nblk), scratch, dtype=torch.long)
    for i, t in enumerate(tables):
        n = min(len(t), nblk)
        blk[i, :n] = torch.tensor(t[:n], dtype=torch.long)
    write = scratch * block_size + torch.arange(T).remainder(block_size).repeat(rows, 1)
    p = pos[:len(tables), :n_real].long()
    write[:len(tables), :n_real] = blk[:len(tables)].gather(1, p // block_size) * block_size + p % block_size
    return write.reshape(rows * T).to(device), ("gather", _read_rows(blk, kv_len, block_size, device), kv_len)
