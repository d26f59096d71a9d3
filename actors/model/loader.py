"""Load a Hugging Face checkpoint directory from local disk into `Transformer`.

Reads config.json plus model.safetensors or a sharded model.safetensors.index.json. Weights
are built on the meta device and assigned straight from the safetensors files, so loading does
not first allocate and randomly initialise a second copy. A tensor-parallel rank (`tp=(rank, N)`)
reads only its slices of the split tensors (actors/model/tp/shard.py), so no process ever holds the
whole target; a rank without `head` (a TP worker: rank 0 alone samples) skips the vocabulary head.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from actors.model.config import CheckpointError, ModelArgs, rope_inv_freq
from actors.model.model import Transformer
from actors.model.tp.shard import load_part, rank_args

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AMX-BF16 tiles or AVX512-BF16 dot
    products), as torch's own CPU feature query reports them (the ISA oneDNN dispatches on); on
    other CPUs oneDNN emulates bfloat16 and it is slower than float32."""
    if not torch.backends.mkldnn.is_available():
        return False
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """`dtype: auto`: bfloat16 on CUDA and on a CPU with native bfloat16, float32 elsewhere. CUDA is
    not queried: the host that plans memory may have no GPU, and every GPU the configs target
    (Ampere and later) computes bfloat16 natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               tp: tuple[int, int] = (0, 1), head: bool = True, pack: bool = True) -> Transformer:
    """The checkpoint at `path`; with `tp=(rank, N)` rank `rank`'s part of it (its heads and MLP
    features, actors/model/tp/shard.py); without `head`, no vocabulary head (forward returns the final
    hidden states). `dtype` may be "auto" (auto_dtype). `pack`: on CPU, inference runs on
    oneDNN-packed fused copies of the projections (actors/model/packed.py)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    args = rank_args(ModelArgs.from_dir(path), tp[1])
    dt = parse_dtype(dtype, device)
    with torch.device("meta"):
        model = Transformer(args)
    if not head:
        model.lm_head = nn.Identity()
    skip = {"lm_head.weight"} if args.tie_word_embeddings or not head else set()
    state = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for name in sf.keys():
                if name not in skip:
                    state[name] = load_part(sf, name, *tp).to(dt)
    expected = set(model.state_dict()) - skip
    missing = sorted(expected - state.keys())
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = sorted(k for k in state.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors, e.g. %s", path, len(unexpected), unexpected[:3])
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if args.tie_word_embeddings and head:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)  # the only non-checkpoint buffer, still on meta
    model.eval().requires_grad_(False)
    if pack:
        model.pack()
    return model
