"""Import a llama.cpp GGUF file (Llama architecture, byte-level BPE tokenizer) as a Hugging Face
checkpoint directory that outrider's loader and transformers both read.

Only the `gguf` package is used: its reader for metadata and tensors, its dequantizer for the
quantized blocks. No llama.cpp. What llama.cpp's converter changed on the way in is undone here:

- Q and K projections: llama.cpp permutes their rows so that rope acts on interleaved pairs
  (x0, x1), (x2, x3), ...; transformers' Llama rotates halves (x_i, x_{i+d/2}). `unpermute_qk`
  restores the half-split order, or attention scores would be wrong from the first layer.
- The head: a file without `output.weight` ties it to the token embedding.
- The tokenizer: GGUF stores the vocabulary, merges and token types, not a tokenizer.json. A
  byte-level BPE tokenizer is rebuilt from them the way transformers' GGUF conversion does it
  (same vocabulary spelling, same GPT-2 pre-tokenizer, control tokens as special tokens), so ids
  agree with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4
# GGUF tensor-name pieces -> Hugging Face Llama module names.
RENAMES = [
    ("token_embd.", "model.embed_tokens."), ("output_norm.", "model.norm."), ("output.", "lm_head."),
    ("blk.", "model.layers."), (".attn_q.", ".self_attn.q_proj."), (".attn_k.", ".self_attn.k_proj."),
    (".attn_v.", ".self_attn.v_proj."), (".attn_output.", ".self_attn.o_proj."),
    (".attn_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
    (".ffn_gate.", ".mlp.gate_proj."), (".ffn_up.", ".mlp.up_proj."), (".ffn_down.", ".mlp.down_proj."),
]


def read_gguf(path: Path):
    from gguf import GGUFReader  # imported here: only a build needs it

    return GGUFReader(str(path))


def field(reader, key: str, default=None):
    """A metadata value as Python data (str, number, bool, list), or `default` if absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only 'llama' is imported")

    def key(name, default=None):
        return field(reader, f"llama.{name}", default)

    n_heads, dim = int(key("attention.head_count")), int(key("embedding_length"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    pad = field(reader, "tokenizer.ggml.padding_token_id", eos)
    head_dim = dim // n_heads
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF: partial rotary embeddings are not imported")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(key("vocab_size", len(tokens))), "hidden_size": dim,
        "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": head_dim, "hidden_act": "silu",
        # The file stores float32; keep that exact value (what transformers reads too).
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str:
    name = gguf_name
    for old, new in RENAMES:
        if old.startswith("."):  # a piece inside the name
            name = name.replace(old, new)
        elif name.startswith(old):  # the name's first piece
            name = new + name[len(old):]
    return name


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of a Q or K weight [n_heads * head_dim, in]. Within each
    head, llama.cpp stores the row of (half h, index i) at 2 * i + h, interleaved pairs for its
    rope; this puts it back at h * head_dim / 2 + i, transformers' rotate-half order."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader, cfg: dict) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its Hugging Face name, Q/K un-permuted."""
    from gguf.quants import dequantize

    out = {}
    for t in tqdm(reader.tensors, desc="dequantize", leave=False, mininterval=2, disable=None):
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_name(t.name)
        if ".attn_q." in t.name:
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy of the mmap
    if cfg["tie_word_embeddings"]:
        out.pop("lm_head.weight", None)
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token with it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def hf_tokenizer(reader) -> Tokenizer:
    """The byte-level BPE tokenizer the file describes, as transformers' GGUF conversion builds it:
    tokens already spelled in the byte alphabet stay as they are, others (rare mislabelled ones)
    are respelled byte by byte; the GPT-2 split regex (the file's `smollm`/`gpt2` pre-tokenizer
    types have no other); control tokens become special added tokens so they are never split."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') is imported")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in ("default", "gpt2", "smollm"):
        raise ValueError(f"GGUF pre-tokenizer {pre!r}: only the GPT-2 split is imported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1")
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel: skipped, as
    # transformers skips it (adding it would grow the vocabulary past the model's).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])
    return tok


def tokenizer_config(reader, cfg: dict) -> dict:
    tokens = field(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    out = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos_token_id"),
           "eos_token": token("eos_token_id"), "pad_token": token("padding_token_id"),
           "unk_token": token("unknown_token_id"),
           "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
           "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
           "model_max_length": cfg["max_position_embeddings"], "clean_up_tokenization_spaces": False}
    template = field(reader, "tokenizer.chat_template")
    if template:
        out["chat_template"] = template
    return out


def import_gguf(gguf_path: Path, out: Path) -> dict:
    """Write config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json and
    generation_config.json for `gguf_path` into `out`; returns the config."""
    reader = read_gguf(gguf_path)
    cfg = hf_config(reader)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_tensors(reader, cfg)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    hf_tokenizer(reader).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader, cfg), indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"]}, indent=2))
    log.info("imported %s: %d tensors, %.0fM parameters", gguf_path.name, len(state),
             sum(t.numel() for t in state.values()) / 1e6)
    return cfg
