"""What the KV cache and the model's attention share: the error a full cache raises, and how
many keys a forward reads (the same function on every rank, actors/model/tp/)."""
from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """No free block, no room to reserve, or a sequence would outgrow max_len."""


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
    the KV's dtype and device. The model and the cache call this same function, so a plan built
    on one rank and a forward on another agree (actors/model/tp/)."""
    if causal or like.dtype == torch.float32 or like.device.type != "cpu":
        return kv_len
    return -(-kv_len // KEY_BLOCK) * KEY_BLOCK
