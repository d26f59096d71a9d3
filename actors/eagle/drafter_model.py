"""The draft head in the drafter's seat: a model with the drafter's forward signature.

The drafter (actors/drafter.py) runs a draft model as `model(tokens, pos, cache, kv_len, last)`
-> logits over the target's vocabulary, one KV layer per model layer. `HeadModel` gives the head
that shape by a change of index: its row at position r reads token x_r and the feature of
position r - 1 (the target's, fused, where the target has computed it; else the head's own
hidden state at r - 1), and predicts x_{r+1}, as a draft model's row r does. The drafter sets
the rows' features before each call (`feats`, [B, T, dim]) and reads the rows' hidden states
after it (`hidden`); the logits outside the draft vocabulary are -inf, so q is zero there.
"""
from __future__ import annotations

import torch
from torch import nn

from actors.eagle.head import EagleHead


class HeadModel(nn.Module):
    def __init__(self, head: EagleHead):
        super().__init__()
        self.head = head
        self.args = head.args.layer   # one layer: the drafter's KV cache is sized from it
        self.feats: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.register_buffer("ids", head.target_ids(), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.head.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.lm_head.weight.dtype

    @property
    def dim(self) -> int:
        return self.args.dim

    def fuse(self, feats: torch.Tensor) -> torch.Tensor:
        """The target's features [n, feature_dim] as the head's input [n, dim] (done once, when they
        arrive: a third of the size to keep)."""
        with torch.inference_mode():
            return self.head.fc(feats.to(self.device, self.dtype))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache, kv_len: int,
                last: bool = False) -> torch.Tensor:
        feats, self.feats = self.feats, None
        if feats is None or feats.shape[:2] != tokens.shape:
            raise RuntimeError(f"the draft head needs features for its {tuple(tokens.shape)} rows")
        logits, h = self.head(feats.to(self.dtype), tokens, input_pos, cache, kv_len)
        if last:
            logits, h = logits[:, -1:], h[:, -1:]
        self.hidden = h
        full = logits.new_full((*logits.shape[:2], self.args.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.ids, logits)
