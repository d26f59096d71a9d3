"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain torch.

Module names follow Hugging Face's (model.layers.N.self_attn.q_proj, ...), so a checkpoint's
state dict loads without a name map and the demo builder saves files transformers can read.
`forward` serves three callers: training (no cache, full causal), prefill/verify (T tokens per
row written into the cache) and batched branch decoding (one token per slot). Every row carries
its own positions, so rows of different lengths share one batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from actors.model import packed as pk
from actors.model.config import ModelArgs, rope_inv_freq
from actors.kv import PagedKVCache, read_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementation, then cast back before the
        # weight (the reference rounds there too); one fused kernel for the normalisation.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def tp_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """A row-parallel layer's output: its partial sums added over the tensor-parallel group
    (actors/model/tp/), or x itself without one. Traced, a functional collective (what torch.compile
    captures, as in gpt-fast); eager, the plain in-place one (gloo: about 4x less overhead)."""
    if group is None:
        return x
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", group)
    dist.all_reduce(x, group=group)
    return x


def eager(packed):
    """Packed weights (actors/model/packed.py) in eager mode; None while torch.compile traces the forward:
    inductor cannot lower oneDNN's opaque packed layout, and packs and fuses on its own."""
    return None if torch.compiler.is_compiling() else packed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def row_pad(n: int, q: torch.Tensor) -> int:
    """Query rows to add (copies of row 0, dropped after) so that n rows of one k/v head are a
    multiple of 4, for bfloat16/float16 on CPU. The fused CPU kernel takes query rows in blocks
    (of 32 and more) and runs a block of fewer than 4 rows through another kernel whose sums
    round differently; with whole blocks of 4, a row's bits no longer depend on how many rows
    share the forward, so a decode (G rows) and the same row inside a verify ((K+1) * G rows)
    agree and greedy SD/SSD stay token-identical to AR (tests/test_packed.py)."""
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return 0
    return -n % 4


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, bit for bit, in four kernels: `sin` carries rotate_half's
    sign (its first half negated) and the halves swap by a flip of a [2, D/2] view. x [..., D]."""
    D = x.shape[-1]
    swapped = x.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        if a.qk_norm:  # Qwen3: each head's q and k normalised over head_dim, before RoPE
            self.q_norm = RMSNorm(a.head_dim, a.norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.norm_eps)
        self.qk_norm = a.qk_norm
        self.tp = None   # the tensor-parallel group when `a` holds this rank's heads only (actors/model/tp/)
        self.packed = None   # (qkv, o) for inference on CPU (actors/model/packed.py), set by Transformer.pack

    def forward(self, x, cos, sin, mask, causal: bool, layer: int, cache: PagedKVCache | None):
        """x [B, T, dim]; cos/sin [B, T, 1, head_dim] (sin signed, see `rope`); mask: None or
        [B, 1, T * group (+ row_pad), n_keys], folded as the query rows below (attention_masks)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        packed = eager(self.packed)
        if packed is not None:   # q, k and v in one oneDNN call (actors/model/packed.py)
            qkv = packed[0](x).view(B, T, H + 2 * Hkv, D)
            q, k, v = qkv.split((H, Hkv, Hkv), dim=2)
        else:
            q = self.q_proj(x).view(B, T, H, D)
            k = self.k_proj(x).view(B, T, Hkv, D)
            v = self.v_proj(x).view(B, T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if packed is not None and not self.qk_norm:   # RoPE on q and k at once: half the kernels
            qk = rope(qkv[:, :, :H + Hkv], cos, sin)
            q, k = qk.split((H, Hkv), dim=2)
        else:
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:  # write the new k/v, read keys 0..kv_len-1 (PagedKVCache.attend)
            k, v = cache.attend(layer, k, v)
        G = H // Hkv
        if causal and mask is None:
            # SDPA's own causal mask (a fresh prefill, training): flash-capable as it is, GQA included.
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=G > 1)
            return tp_reduce(self._out(y.transpose(1, 2).reshape(B, T, H * D)), self.tp)
        # GQA folded into the query axis: the G query heads that share a k/v head become G query
        # rows of that head ([B, Hkv, T * G, D], row t * G + g), so SDPA sees plain multi-head
        # attention. Without it, SDPA with GQA and an explicit mask falls back to the math kernel,
        # which repeats k/v per query head (CUDA: tens of GiB per layer at long contexts); on CPU the
        # fused kernel with GQA runs one query row at a time (6x slower at T = 1, bfloat16). One
        # row (T = 1) folds as a view. The mask comes folded the same way (attention_masks).
        n = T * G
        qf = q.reshape(B, T, Hkv, G, D).transpose(1, 2).reshape(B, Hkv, n, D)
        pad = row_pad(n, q)
        if pad:
            qf = torch.cat((qf, qf[:, :, :1].expand(B, Hkv, pad, D)), dim=2)
        y = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)
        if pad:
            y = y[:, :, :n]
        return tp_reduce(self._out(y.reshape(B, Hkv, T, G, D).transpose(1, 2).reshape(B, T, H * D)), self.tp)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        packed = eager(self.packed)
        return packed[1](y) if packed is not None else self.o_proj(y)

    def pack(self, on: bool) -> None:
        self.packed = (pk.pack(self.q_proj, self.k_proj, self.v_proj), pk.pack(self.o_proj)) if on else None


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.dim, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.dim, bias=a.mlp_bias)
        self.tp = None   # as Attention's
        self.packed = None   # (gate_up, down), as Attention's

    def forward(self, x):
        packed = eager(self.packed)
        if packed is not None:   # gate and up in one oneDNN call
            gate, up = packed[0](x).chunk(2, dim=-1)
            return tp_reduce(packed[1](F.silu(gate) * up), self.tp)
        return tp_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), self.tp)

    def pack(self, on: bool) -> None:
        self.packed = (pk.pack(self.gate_proj, self.up_proj), pk.pack(self.down_proj)) if on else None


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: PagedKVCache | None = None, slots: torch.Tensor | list[int] | None = None,
                kv_len: int | None = None, last: bool = False,
                aux: tuple[int, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V] (`last`: only the last position's, [B, 1, V]).

        `aux`: layer indices whose input hidden states (the residual stream entering layer i) are
        also returned, concatenated, as features [B, T, len(aux) * dim] for a feature-conditioned
        draft head (actors/eagle/); then the result is (logits, features).

        Without a cache: plain causal attention over the T tokens (training, reference).
        With a cache: row b's tokens sit at positions input_pos[b] of its sequence; they are
        written into the cache and attend to every cached key at or before their position.
        The hot path prepares the cache from host bookkeeping first (`cache.prepare(handles,
        host positions, kv_len)`) and passes kv_len, so the forward never reads a number back
        from the device (tests/test_compile.py compiles it with fullgraph=True). Passing `slots` (the
        rows' cache handles) instead prepares here (one host read of the positions when they live on a GPU).
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        aligned = cache is None
        if cache is not None:
            if slots is not None:
                kv_len = int(input_pos.max()) + 1 if kv_len is None else kv_len
                cache.prepare(slots.tolist() if torch.is_tensor(slots) else list(slots), input_pos, kv_len)
            elif kv_len is None:
                raise ValueError("a prepared cache needs kv_len (or pass slots)")
            # the keys attention reads (kv_len, or whole key blocks past it, masked): read_len
            n_keys = read_len(kv_len, cache.causal, self.model.embed_tokens.weight)
            aligned = cache.aligned and n_keys == kv_len
        masks = self._masks(input_pos, n_keys if cache is not None else T, cache is not None, aligned)
        causal = cache is None or cache.causal   # host-known: aligned rows with T == kv_len
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_tables(input_pos, self.inv_freq, x.dtype)
        feats = []
        for i, layer in enumerate(self.model.layers):
            if i in aux:
                feats.append(x)
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, masks[i], causal, i, cache)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if last:  # a prefill needs one row: the vocabulary head is the costliest matmul of a small model
            x = x[:, -1:]
        x = self.model.norm(x)
        head = eager(self._head)
        logits = head(x) if head is not None else self.lm_head(x)
        return (logits, torch.cat(feats, dim=-1)) if aux else logits

    # -- packed CPU weights (actors/model/packed.py) ------------------------------------------------
    _head = None       # the packed vocabulary head, when packed
    _packing = False   # pack() was asked for: eval mode packs, training mode drops the packed copies

    def pack(self, on: bool = True) -> bool:
        """Use (on) or drop (off) oneDNN-packed, fused copies of the projections for inference on
        CPU. Returns whether they are in use (False where the device or dtype has no packed path)."""
        on = on and pk.supported(self.model.embed_tokens.weight)
        self._packing = on
        self._apply_packing(on and not self.training)
        return on

    def _apply_packing(self, on: bool) -> None:
        for layer in self.model.layers:
            layer.self_attn.pack(on)
            layer.mlp.pack(on)
        self._head = pk.pack(self.lm_head) if on and isinstance(self.lm_head, nn.Linear) else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self._packing:   # packed copies are inference-only; back in eval they are rebuilt from
            self._apply_packing(not mode)   # the (possibly trained) weights
        return self

    def _masks(self, input_pos: torch.Tensor, n_keys: int, cached: bool, aligned: bool) -> list[torch.Tensor | None]:
        return attention_masks(self.args, input_pos, n_keys, cached, aligned, self.model.embed_tokens.weight)

    @property
    def device(self) -> torch.device:   # the embedding: a tensor-parallel worker has no head
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def rope_tables(input_pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """RoPE's cos and sin for positions [B, T], in float32 (as the reference does), applied in the
    activation dtype: [B, T, 1, D] each, sin with rotate_half's sign folded in (see `rope`)."""
    freqs = input_pos[:, :, None, None].float() * inv_freq
    c, s = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat((c, c), dim=-1), torch.cat((-s, s), dim=-1)


def attention_masks(a: ModelArgs, input_pos: torch.Tensor, n_keys: int, cached: bool, aligned: bool,
                    like: torch.Tensor) -> list[torch.Tensor | None]:
    """One boolean attention mask per layer, [B, 1, T, n_keys] with its rows folded as Attention
    folds the query rows (`fold_mask`); None means no explicit mask:
    SDPA's own causal mask, or none at all for one aligned query row (`aligned`: every row's
    positions are the last T before n_keys, known from host bookkeeping). `like`: a tensor of
    the activations' dtype and device."""
    T = input_pos.shape[1]
    window = a.sliding_window
    if window is not None and window >= n_keys:
        window = None  # every key is within reach anyway
    windowed = set() if window is None else set(range(a.n_layers) if a.sliding_layers is None else a.sliding_layers)
    plain = not cached or (aligned and (T == 1 or n_keys == T))
    if plain and not windowed:
        return [None] * a.n_layers
    keys = torch.arange(n_keys, device=input_pos.device)
    qpos = input_pos[:, None, :, None]
    causal = keys <= qpos
    slid = causal & (keys > qpos - window) if windowed else None
    if plain:
        causal = None
    causal, slid = (None if m is None else fold_mask(a, m, like) for m in (causal, slid))
    return [slid if i in windowed else causal for i in range(a.n_layers)]


def fold_mask(a: ModelArgs, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B, 1, T, n_keys] mask for Attention's folded query rows: row t * G + g is row t's,
    and padding rows (row_pad) are row 0's."""
    G = a.n_heads // a.n_kv_heads
    if G > 1:
        mask = mask.repeat_interleave(G, dim=2)
    pad = row_pad(mask.shape[2], like)
    if pad:
        mask = torch.cat((mask, mask[:, :, :1].expand(-1, -1, pad, -1)), dim=2)
    return mask
