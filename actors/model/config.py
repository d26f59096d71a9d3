"""Model hyper-parameters, read from a Hugging Face `config.json`.

Only the fields a Llama-family forward pass needs. Unknown architectures and rope types are
rejected here, with the file and the value named, so a bad checkpoint fails at load time and
not halfway through a request.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """A checkpoint directory that outrider cannot load (missing file, unsupported model)."""


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    dim: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False          # Qwen3: RMSNorm over each head's q and k, before RoPE
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None  # layers that use the window; None = every layer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> ModelArgs:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{source}: architecture {arch!r} is not supported; outrider runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers >= 5 keeps rope settings in `rope_parameters`; older files use
        # `rope_theta` + `rope_scaling`. Accept both.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported "
                                  f"({', '.join(SUPPORTED_ROPE_TYPES)})")
        rope["rope_type"] = rope_type
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window, window_layers = cfg.get("sliding_window"), None
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            # Qwen windows only layers from max_window_layers on (or those `layer_types` names),
            # and only with use_sliding_window; transformers drops the window otherwise.
            window = window if cfg.get("use_sliding_window", False) else None
            n_layers = int(cfg["num_hidden_layers"])
            types = cfg.get("layer_types")
            if window and types:
                if len(types) != n_layers:
                    raise CheckpointError(f"{source}: layer_types has {len(types)} entries for {n_layers} layers")
                window_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
            elif window:
                first = int(cfg.get("max_window_layers", n_layers))
                window_layers = tuple(range(first, n_layers))
            if window_layers == ():
                window = None
            if window_layers == tuple(range(n_layers)):
                window_layers = None  # every layer: the Mistral case
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            intermediate_size=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            o_bias=arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(window) if window else None,
            sliding_layers=window_layers if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        f = Path(path) / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        return cls.from_hf(json.loads(f.read_text()), source=str(f))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:  # noqa: F821 (torch imported lazily)
    """Inverse RoPE frequencies, including llama3's wavelength-dependent scaling."""
    import torch

    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = args.rope_scaling
    if rs.get("rope_type") == "linear":
        inv = inv / float(rs["factor"])
    elif rs.get("rope_type") == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv
