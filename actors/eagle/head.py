"""The draft head: the target's hidden states in, a draft distribution over a reduced vocabulary out.

Row t of the head reads two things: the target's hidden states at position t (the residual
stream entering a low, a middle and a high layer, concatenated, `aux_layers`) fused to one
vector by `fc`, and the embedding of token t+1 (the token the target itself predicted there).
One decoder layer, whose attention reads both side by side (its q/k/v take 2 * dim inputs), turns
them into a prediction of token t+2. Drafting further than one token, the head's own output
(before the final norm) stands in for the target's features it does not have yet: that is why it
is trained unrolled on its own outputs (actors/eagle/train.py).

The vocabulary head covers `draft_vocab` tokens only (the most frequent in the target's own
output); `d2t` maps a draft id to the target's (`target = draft + d2t[draft]`, the public EAGLE-3
convention). The draft's q is zero outside that set, and verification against the target's full p
stays exact: the residual max(0, p - q) covers every other token (actors/spec/verify.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from actors.model.config import ModelArgs, rope_inv_freq
from actors.kv import PagedKVCache, read_len
from actors.model.model import MLP, Attention, RMSNorm, attention_masks, rope, rope_tables


@dataclass(frozen=True)
class HeadArgs:
    layer: ModelArgs               # the decoder layer's shape (n_layers 1; vocab_size the target's)
    draft_vocab: int
    aux_layers: tuple[int, ...]    # the target layers whose inputs are the features

    @property
    def feature_dim(self) -> int:
        return len(self.aux_layers) * self.layer.dim


def default_aux_layers(n_layers: int) -> tuple[int, ...]:
    """A low, a middle and a high layer, as EAGLE-3 and vLLM pick them by default."""
    return (2, n_layers // 2, n_layers - 3) if n_layers >= 6 else tuple(sorted({0, n_layers // 2, n_layers - 1}))


class MidLayer(nn.Module):
    """One decoder layer whose attention reads [norm(embedding), norm(feature)]; the feature is the
    residual stream it adds to."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        att = self.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):   # 2 * dim inputs: the embedding and the feature
            old = getattr(att, name)
            setattr(att, name, nn.Linear(2 * a.dim, old.out_features, bias=old.bias is not None))
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.hidden_norm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def attn_input(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.input_layernorm(emb), self.hidden_norm(feat)), dim=-1)


class EagleHead(nn.Module):
    def __init__(self, args: HeadArgs):
        super().__init__()
        a = args.layer
        self.args = args
        self.fc = nn.Linear(args.feature_dim, a.dim, bias=False)
        self.midlayer = MidLayer(a)
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, args.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(args.draft_vocab, dtype=torch.long))
        # the target's token embedding, shared (not saved with the head): `attach`
        self.embed_tokens: nn.Embedding | None = None
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)

    def attach(self, embed_tokens: nn.Embedding) -> EagleHead:
        self.embed_tokens = embed_tokens
        return self

    # -- ids -------------------------------------------------------------------------------
    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def target_ids(self) -> torch.Tensor:
        """The target ids of the draft vocabulary, in draft-id order."""
        return self.to_target(torch.arange(self.args.draft_vocab, device=self.d2t.device))

    def full_probs(self, q: torch.Tensor) -> torch.Tensor:
        """Draft probabilities [..., draft_vocab] as the target's vocabulary [..., vocab]: zero
        outside the draft set."""
        out = q.new_zeros(*q.shape[:-1], self.args.layer.vocab_size)
        return out.index_copy_(-1, self.target_ids(), q)

    # -- forward ---------------------------------------------------------------------------
    def fuse(self, feats: torch.Tensor) -> torch.Tensor:
        """The target's concatenated features [..., feature_dim] -> the head's input [..., dim];
        the head's own outputs ([..., dim]) pass as they are."""
        return self.fc(feats) if feats.shape[-1] != self.args.layer.dim else feats

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, input_pos: torch.Tensor,
                cache: PagedKVCache, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [B, T]: features (the target's [B, T, feature_dim] or the head's own [B, T, dim]),
        the next tokens, positions; the cache prepared for them (cache.prepare). Returns the
        draft-vocabulary logits [B, T, draft_vocab] and the hidden states before the final norm
        [B, T, dim], which feed the next draft step."""
        a = self.args.layer
        h = self.fuse(feats)
        x = self.embed_tokens(tokens).to(h.dtype)
        cos, sin = rope_tables(input_pos, self.inv_freq, h.dtype)
        n_keys = read_len(kv_len, cache.causal, h)
        aligned = cache.aligned and n_keys == kv_len
        mask = attention_masks(a, input_pos, n_keys, True, aligned, h)[0]
        layer = self.midlayer
        h = h + layer.self_attn(layer.attn_input(x, h), cos, sin, mask, cache.causal, 0, cache)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)), h

    def new_cache(self, n_rows: int, max_len: int) -> PagedKVCache:
        """A cache for `n_rows` sequences of the head's one layer, up to `max_len` positions each."""
        w = self.lm_head.weight
        return PagedKVCache.for_rows(self.args.layer, n_rows, max_len, w.dtype, w.device)


def ttt_attention(layer: MidLayer, a: ModelArgs, xs: list[torch.Tensor], cos, sin) -> torch.Tensor:
    """Training-time test's attention for unroll step j = len(xs) - 1 over whole sequences (no
    cache): row t of step j stands where the head drafts j tokens past the last real feature, at
    t - j. It reads the real rows' keys up to t - j (step 0) and the one key of each step i = 1..j
    at t - j + i: exactly the keys it would see drafting. xs: each step's attention inputs
    [B, T, 2 * dim]. Returns step j's attention output [B, T, dim]."""
    att = layer.self_attn
    B, T, _ = xs[0].shape
    H, Hkv, D = att.n_heads, att.n_kv_heads, att.head_dim
    j = len(xs) - 1
    q = att.q_proj(xs[j]).view(B, T, H, D)
    ks, vs = [], []
    for x in xs:
        ks.append(att.k_proj(x).view(B, T, Hkv, D))
        vs.append(att.v_proj(x).view(B, T, Hkv, D))
    if att.qk_norm:
        q, ks = att.q_norm(q), [att.k_norm(k) for k in ks]
    q = rope(q, cos, sin).transpose(1, 2)
    k = torch.cat([rope(k, cos, sin) for k in ks], dim=1).transpose(1, 2)   # [B, Hkv, (j+1)T, D]
    v = torch.cat(vs, dim=1).transpose(1, 2)
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    blocks = [s <= t - j] + [s == t - j + i for i in range(1, j + 1)]
    mask = torch.cat(blocks, dim=1).to(q.device)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
    return att.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def ttt_forward(head: EagleHead, feats: torch.Tensor, tokens: torch.Tensor, steps: int):
    """The head unrolled `steps` times over whole sequences (training). Step 0 reads the target's
    features; step j reads, at row t, the head's own step j-1 output at row t - 1. Yields each
    step's (hidden states before the final norm [B, T, dim], j); rows t >= j are valid at step j
    (the trainer applies norm and lm_head to the rows it scores)."""
    a = head.args.layer
    B, T = tokens.shape
    pos = torch.arange(T).expand(B, T)
    cos, sin = rope_tables(pos, head.inv_freq, feats.dtype)
    x = head.embed_tokens(tokens)
    layer = head.midlayer
    h = head.fuse(feats)
    xs = []
    for j in range(steps):
        if j:   # row t takes row t-1's output of the last step (row 0 has none: never valid again)
            h = torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), dim=1)
        xs.append(layer.attn_input(x, h))
        out = h + ttt_attention(layer, a, xs, cos, sin)
        out = out + layer.mlp(layer.post_attention_layernorm(out))
        yield out, j
        h = out
