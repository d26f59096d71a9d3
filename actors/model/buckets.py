"""Fixed forward shapes: the bucket policy a CUDA graph replay needs.

A captured CUDA graph replays fixed shapes only, and a decoding step's are not fixed: the batch
changes as sequences come and go, a verify row holds 1 + K tokens for that round's K, and kv_len
grows every step. So with padding on (`EngineSpec.pads`), a decode/verify forward runs at the
next bucket up, all decided here on the host:

  * batch B -> the next of 1, 2, 4, 8, ... capped at the most rows the role ever batches;
  * T -> 1 (decode) or K + 1 (verify, and a drafter's catch-up of at most K + 1 tokens);
  * kv_len -> the next multiple of `kv_step` positions up to `kv_fine`, then the next power of
    two times kv_fine, capped at the cache's max_len (kv_sizes: 12 sizes for an 8k context,
    where steps of 128 gave 65: every size is a graph per (rows, T) to compile and capture).

Prefill chunks (and anything longer than K + 1, or a forward that wants only its last row) stay
unpadded and eager: they are not per-token work. The extra rows and positions are the cache's
business (PagedKVCache.prepare_padded: they write into a scratch block and are masked out), so
the model sees an ordinary batch and the caller slices the logits back to its real [B, T].
The number of distinct shapes, hence of compiled graphs, is (log2(max_rows) + 1) * 2 *
len(kv_sizes) per role (n_shapes). With engine.compile a role compiles at most PRECOMPILE_MAX of
them at start-up (precompile_order: every kv size of the smallest batches first, the
lowest-latency case), and runs any other shape padded but eager: nothing compiles lazily once
serving, where a compile of seconds to minutes would stall every sequence (and, under tensor
parallelism, outlast the others' collective timeout).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

Shape = tuple[int, int, int]   # (rows, tokens per row, kv_len) of a padded forward
PRECOMPILE_MAX = 64            # graphs a role compiles at start-up; seconds to a minute each on a GPU
PRECOMPILE_S = 3600.0          # how long a role's start-up may take with them (the bring-up's waits)


@dataclass(frozen=True)
class Buckets:
    max_rows: int       # the most rows this role's forward ever batches
    k: int              # the spec's largest K: verify rows are K + 1 long
    max_len: int        # the cache's max_len (positions a table may reach)
    kv_step: int = 128  # kv_len granularity (a multiple of the block size keeps gathers block-aligned)
    kv_fine: int = 1024  # past this many positions kv_len buckets double (padding waste stays < 2x
                         # the keys read, where the weights' bytes dominate a step anyway)

    def kv_sizes(self) -> list[int]:
        """Every padded kv_len, ascending."""
        out, n = [], self.kv_step
        while n < self.max_len:
            out.append(n)
            n = n + self.kv_step if n < self.kv_fine else 2 * n
        return out + [self.max_len]

    def row_sizes(self) -> list[int]:
        return [1 << i for i in range((self.max_rows - 1).bit_length())] + [self.max_rows]

    def shape(self, n_rows: int, n_tok: int, kv_len: int, last: bool = False) -> Shape | None:
        """The padded (rows, tokens per row, kv_len) of a forward of n_rows x n_tok tokens, or
        None for one that runs unpadded."""
        verify = self.k + 1
        if last or n_tok > verify:
            return None
        rows = min(1 << (n_rows - 1).bit_length(), max(self.max_rows, n_rows))   # past max_rows: as is
        sizes = self.kv_sizes()
        kv = sizes[min(bisect.bisect_left(sizes, kv_len), len(sizes) - 1)]
        return rows, (1 if n_tok == 1 else verify), max(kv, kv_len)

    def n_shapes(self) -> int:
        """How many distinct shapes `shape` can return (the compiled graphs' upper bound)."""
        return len(self.row_sizes()) * 2 * len(self.kv_sizes())

    def precompile_order(self, limit: int = PRECOMPILE_MAX) -> list[Shape]:
        """The shapes compiled at start-up, at most `limit`: batch sizes ascending, each with every
        kv size and both T (decode, verify), so small batches are fully compiled first."""
        return [(rows, t, kv) for rows in self.row_sizes() for kv in self.kv_sizes()
                for t in (1, self.k + 1)][:limit]


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
