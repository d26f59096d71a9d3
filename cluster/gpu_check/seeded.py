"""Llama-shaped checkpoints from a seed, at real shapes, in Hugging Face's layout (config.json +
model.safetensors), so transformers and the engine load the very same files.

Random weights at the usual init give near-uniform logits over a 128k vocabulary: every greedy
step is a near-tie and sampling tests nothing. So the weights are scaled by the fan-in
(1/sqrt(d_in): every projection's output has unit scale, whatever the width), each layer's
residual update is damped (RESIDUAL), and the head is scaled so the logits' spread is PEAK
standard deviations: softmax mass sits on a few tokens, greedy steps have clear winners.

The drafter is the target cut short: the same embedding, final norm and head, and the target's
first `draft_layers` layers. With damped updates the later layers move the hidden state only
part of the way, so the drafter agrees with the target often enough to exercise acceptance, and
never always (rejections and corrections are exercised too).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RESIDUAL = 0.35   # each layer's output projections, relative to a unit-scale update
PEAK = 6.0        # the logits' standard deviation over the vocabulary


@dataclass(frozen=True)
class Shapes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    draft_layers: int
    max_positions: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Llama-3.2-1B's shapes (its config.json): hidden 2048, 16 layers, GQA 32/8, MLP 8192, vocab 128256
LLAMA_1B = Shapes(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, draft_layers=2)
# the CPU form: the same code at shapes a CI core runs in seconds (GQA kept)
TINY = Shapes(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, vocab=512, draft_layers=1,
              max_positions=1024)


def config(s: Shapes, layers: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
        "vocab_size": s.vocab, "max_position_embeddings": s.max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 0, "eos_token_id": s.vocab - 1, "torch_dtype": dtype,
    }


def weights(s: Shapes, seed: int, device: str) -> dict[str, torch.Tensor]:
    """The target's tensors, float32 on `device` (generated there: seconds at 1B on a GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def lin(out: int, inp: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(out, inp, generator=g, device=device) * (scale / inp ** 0.5)

    d, hd = s.hidden, s.head_dim
    w = {"model.embed_tokens.weight": torch.randn(s.vocab, d, generator=g, device=device),
         "model.norm.weight": torch.ones(d, device=device),
         "lm_head.weight": lin(s.vocab, d, PEAK)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": torch.ones(d, device=device),
              p + "post_attention_layernorm.weight": torch.ones(d, device=device),
              p + "self_attn.q_proj.weight": lin(s.heads * hd, d),
              p + "self_attn.k_proj.weight": lin(s.kv_heads * hd, d),
              p + "self_attn.v_proj.weight": lin(s.kv_heads * hd, d),
              p + "self_attn.o_proj.weight": lin(d, s.heads * hd, RESIDUAL),
              p + "mlp.gate_proj.weight": lin(s.intermediate, d),
              p + "mlp.up_proj.weight": lin(s.intermediate, d),
              p + "mlp.down_proj.weight": lin(d, s.intermediate, RESIDUAL)}
    return w


def build_pair(out: Path, s: Shapes, seed: int = 0, dtype: str = "bfloat16", device: str = "cpu") -> tuple[Path, Path]:
    """(target dir, drafter dir) under `out`, written once per (shapes, seed, dtype)."""
    from safetensors.torch import save_file

    tdir, ddir = out / "target", out / "draft"
    stamp = json.dumps([s.__dict__, seed, dtype])
    if all((d / "stamp").exists() and (d / "stamp").read_text() == stamp for d in (tdir, ddir)):
        return tdir, ddir
    tdt = getattr(torch, dtype)
    w = {k: v.to(tdt).cpu().contiguous() for k, v in weights(s, seed, device).items()}
    keep = [f"model.layers.{i}." for i in range(s.draft_layers)]
    draft = {k: v for k, v in w.items() if not k.startswith("model.layers.") or k.startswith(tuple(keep))}
    for d, tensors, layers in ((tdir, w, s.layers), (ddir, draft, s.draft_layers)):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(s, layers, dtype), indent=1))
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "stamp").write_text(stamp)
    n = sum(v.numel() for v in w.values())
    log.info("built a seeded pair in %s: target %d layers (%.2fB parameters), drafter %d layers, %s",
             out, s.layers, n / 1e9, s.draft_layers, dtype)
    return tdir, ddir


def prompts(s: Shapes, n: int, length: int, seed: int) -> list[list[int]]:
    """Seeded random prompts (random weights have no language: any ids are as good)."""
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(1, s.vocab - 1, (length,), generator=g).tolist() for _ in range(n)]
