"""A draft head's directory: config.json, model.safetensors, in the public EAGLE-3 layout.

    config.json        a Llama config of one layer: architectures ["LlamaForCausalLMEagle3"],
                       hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
                       rms_norm_eps, rope_theta, vocab_size (the target's), draft_vocab_size, and
                       eagle_config.eagle_aux_hidden_state_layer_ids (default: layers 2, L/2, L-3)
    model.safetensors  fc.weight                [dim, 3 * dim]   fuses the target's features
                       midlayer.*               the decoder layer (q/k/v_proj take 2 * dim inputs),
                                                midlayer.hidden_norm normalises the feature half
                       norm.weight, lm_head.weight [draft_vocab_size, dim]
                       d2t [draft_vocab_size]   target id = draft id + d2t[draft id]
                       t2d [vocab_size] (bool)  which target ids are in the draft vocabulary
                                                (read as a check, derived from d2t when absent)

Heads trained elsewhere for a Llama or Qwen target (EAGLE-3's own releases, SpecForge) use
these names; some write `layers.0.` for `midlayer.`, which loads too. The head shares the
target's token embedding, so `embed_tokens.weight` is not needed (and ignored when present).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from actors.model.config import CheckpointError, ModelArgs
from actors.eagle.head import EagleHead, HeadArgs, default_aux_layers

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle")


def is_head_dir(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    archs = json.loads(f.read_text()).get("architectures") or []
    return bool(archs) and archs[0] in ARCHITECTURES


def head_args(cfg: dict, target: ModelArgs, source: str = "config.json") -> HeadArgs:
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"{source}: not a draft head (architectures {archs!r}; expected one of "
                              f"{', '.join(ARCHITECTURES)})")
    layer_cfg = dict(cfg, architectures=["LlamaForCausalLM"], num_hidden_layers=1)
    layer = ModelArgs.from_hf(layer_cfg, source)
    if layer.dim != target.dim or layer.vocab_size != target.vocab_size:
        raise CheckpointError(f"{source}: the head is for hidden size {layer.dim} and vocabulary "
                              f"{layer.vocab_size}, the target has {target.dim} and {target.vocab_size}")
    aux = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    aux = tuple(int(i) for i in aux) if aux else default_aux_layers(target.n_layers)
    if any(not 0 <= i < target.n_layers for i in aux):
        raise CheckpointError(f"{source}: feature layers {list(aux)} outside the target's {target.n_layers} layers")
    return HeadArgs(layer, int(cfg.get("draft_vocab_size") or layer.vocab_size), aux)


def load_head(path: str | Path, target, dtype: torch.dtype | None = None) -> EagleHead:
    """The head in `path`, attached to `target`'s embedding, in the target's dtype and device."""
    return read_head(path, target.args, target.model.embed_tokens, dtype or target.dtype, target.device)


def load_head_for(path: str | Path, target_path: str | Path, dtype: torch.dtype, device: str = "cpu") -> EagleHead:
    """The head in `path` with the token embedding read from the target checkpoint at
    `target_path` (the drafter holds that one tensor of the target, nothing else)."""
    from safetensors import safe_open

    from actors.model.loader import weight_files

    target_args = ModelArgs.from_dir(target_path)
    for f in weight_files(Path(target_path)):
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            if "model.embed_tokens.weight" in sf.keys():
                embed = torch.nn.Embedding.from_pretrained(sf.get_tensor("model.embed_tokens.weight").to(dtype))
                return read_head(path, target_args, embed, dtype, device)
    raise CheckpointError(f"{target_path}: no model.embed_tokens.weight for the draft head")


def read_head(path: str | Path, target_args: ModelArgs, embed: torch.nn.Embedding, dtype: torch.dtype,
              device) -> EagleHead:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a draft head directory)")
    args = head_args(json.loads(cfg_file.read_text()), target_args, str(cfg_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {("midlayer." + k[len("layers.0."):]) if k.startswith("layers.0.") else k: v for k, v in state.items()}
    state.pop("embed_tokens.weight", None)
    t2d = state.pop("t2d", None)
    head = EagleHead(args)
    if "d2t" not in state:
        if args.draft_vocab != args.layer.vocab_size:
            raise CheckpointError(f"{path}: a reduced draft vocabulary needs d2t")
        state["d2t"] = torch.zeros(args.draft_vocab, dtype=torch.long)
    state["d2t"] = state["d2t"].long()
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the head: missing {missing}, unexpected {unexpected}")
    if t2d is not None:
        ids = head.target_ids()
        if int(t2d.bool().sum()) != args.draft_vocab or not bool(t2d.bool()[ids].all()):
            raise CheckpointError(f"{path}: t2d and d2t name different draft vocabularies")
    head = head.to(device=device, dtype=dtype)
    head.d2t = head.d2t.long()
    return head.eval().requires_grad_(False).attach(embed)


def save_head(head: EagleHead, out: Path, extra: dict | None = None) -> None:
    """Write `head` as a directory in the layout above (float32 or its own dtype)."""
    a = head.args
    la = a.layer
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": la.dim, "intermediate_size": la.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": la.n_heads, "num_key_value_heads": la.n_kv_heads, "head_dim": la.head_dim,
        "rms_norm_eps": la.norm_eps, "rope_theta": la.rope_theta, "max_position_embeddings": la.max_position_embeddings,
        "vocab_size": la.vocab_size, "draft_vocab_size": a.draft_vocab, "tie_word_embeddings": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(a.aux_layers)},
        **(extra or {}),
    }
    if la.rope_scaling and la.rope_scaling.get("rope_type") != "default":
        cfg["rope_scaling"] = la.rope_scaling
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    t2d = torch.zeros(la.vocab_size, dtype=torch.bool)
    t2d[head.target_ids().cpu()] = True
    state["t2d"] = t2d
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
