"""One sequence's draft head state: its KV rows and the last hidden state it drafts from.

Real rows sit at positions 0..n-2 of a committed sequence x_0..x_{n-1}: row t is the target's
features at t with the token x_{t+1}, so the last real row predicts x_n, the first draft token.
Further drafts run on the head's own output (`step`), at positions past the real rows; they are
rolled back every round and replaced by real rows once the target has verified them (the
verify forward yields the features of every position it read, accepted or not; the accepted
ones are real).
"""
from __future__ import annotations

import torch

from actors.eagle.head import EagleHead


class HeadStream:
    def __init__(self, head: EagleHead, max_len: int):
        self.head = head
        self.cache = head.new_cache(1, max_len)
        self.handle = self.cache.alloc()
        self.real = 0   # real rows held (positions 0..real-1)

    @torch.inference_mode()
    def _run(self, feats: torch.Tensor, tokens: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(tokens)
        pos = torch.arange(start, start + n)[None]
        dev = self.head.d2t.device
        self.cache.prepare([self.handle], pos, start + n)
        logits, h = self.head(feats[None].to(self.head.lm_head.weight.dtype), torch.tensor([tokens], device=dev),
                              pos.to(dev), self.cache, start + n)
        self.cache.advance(self.handle, start + n)
        return logits[0, -1].float(), h[0, -1]

    def feed(self, feats: torch.Tensor, next_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append real rows: the target's features [n, feature_dim] at positions real.. and the
        tokens that followed each. Returns the last row's draft logits and hidden state."""
        out = self._run(feats, next_tokens, self.real)
        self.real += len(next_tokens)
        return out

    def step(self, hidden: torch.Tensor, token: int, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft one more token from the head's own hidden state: the row `depth` past the real ones."""
        return self._run(hidden[None], [token], self.real - 1 + depth)

    def rollback(self, real: int) -> None:
        self.real = min(self.real, real)
        self.cache.truncate(self.handle, self.real)
