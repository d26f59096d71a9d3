"""Fixed forward shapes: the bucket policy a CUDA graph replay needs.

A captured CUDA graph replays fixed shapes only, and a decoding step's are not fixed: the batch
changes as sequences come and go, a verify row holds 1 + K tokens for that round's K, and kv_len
grows every step. So with padding on (`EngineSpec.pads`), a decode/verify forward runs at the
next bucket up, all decided here on the host:

  * batch B -> the next of 1, 2, 4, 8, ... capped at the most rows the role ever batches;
  * T -> 1 (decode) or K + 1 (verify, and a drafter's catch-up of at most K + 1 tokens);
  * kv_len -> the next multiple of `kv_step` positions, capped at the cache's max_len.

Prefill chunks (and anything longer than K + 1, or a forward that wants only its last row) stay
unpadded and eager: they are not per-token work. The extra rows and positions are the cache's
business (PagedKVCache.prepare_padded: they write into a scratch block and are masked out), so
the model sees an ordinary batch and the caller slices the logits back to its real [B, T].
The number of distinct shapes, hence of compiled graphs, is about log2(max_rows) * 2 *
max_len / kv_step per role.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Shape = tuple[int, int, int]   # (rows, tokens per row, kv_len) of a padded forward


@dataclass(frozen=True)
class Buckets:
    max_rows: int       # the most rows this role's forward ever batches
    k: int              # the spec's largest K: verify rows are K + 1 long
    max_len: int        # the cache's max_len (positions a table may reach)
    kv_step: int = 128  # kv_len granularity (a multiple of the block size keeps gathers block-aligned)

    def shape(self, n_rows: int, n_tok: int, kv_len: int, last: bool = False) -> Shape | None:
        """The padded (rows, tokens per row, kv_len) of a forward of n_rows x n_tok tokens, or
        None for one that runs unpadded."""
        verify = self.k + 1
        if last or n_tok > verify:
            return None
        rows = min(1 << (n_rows - 1).bit_length(), max(self.max_rows, n_rows))   # past max_rows: as is
        kv = min(-(-kv_len // self.kv_step) * self.kv_step, self.max_len)
        return rows, (1 if n_tok == 1 else verify), max(kv, kv_len)

    def n_shapes(self) -> int:
        """How many distinct shapes `shape` can return (the compiled graphs' upper bound)."""
        return ((self.max_rows - 1).bit_length() + 1) * 2 * -(-self.max_len // self.kv_step)


def kv_step_for(block_size: int, target: int = 128) -> int:
    """The kv_len granularity: `target` rounded up to a whole number of blocks."""
    return -(-target // block_size) * block_size


def pad_positions(pos: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Host positions [B, T] -> [rows, T'] : a real row continues past its last position (those
    queries are discarded), a dummy row holds 0..T'-1. Every query then sees at least one key,
    so no row of the softmax is empty."""
    B, T = pos.shape
    rows, Tp, _ = shape
    out = torch.arange(Tp).repeat(rows, 1)
    out[:B] = pos[:, :1] + torch.arange(Tp)
    out[:B, :T] = pos
    return out


def pad_tokens(tokens: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Tokens [B, T] -> [rows, T'], padding with token 0."""
    B, T = tokens.shape
    out = torch.zeros(shape[0], shape[1], dtype=tokens.dtype, device=tokens.device)
    out[:B, :T] = tokens
    return out
