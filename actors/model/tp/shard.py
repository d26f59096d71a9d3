"""How rank r of N holds its part of the target (Megatron's split, as gpt-fast's tp.py does it).

Column-parallel (q/k/v, gate/up): each rank holds 1/N of the output features, i.e. n_heads / N
query heads, n_kv_heads / N key/value heads and intermediate_size / N MLP features; its slice of
the weight is rows [r*n/N, (r+1)*n/N) of the Hugging Face [out, in] tensor. Row-parallel (o, down):
each rank holds the matching 1/N of the input features (columns), computes a partial sum, and an
all-reduce adds the N partial sums (model.py `tp_reduce`); the bias is added once, so it is
loaded on rank 0 and zero elsewhere. Embedding, norms, Qwen3's q/k norms and the head are
replicated. Heads are contiguous, so rank r's query heads use exactly rank r's KV heads (GQA).
"""
from __future__ import annotations

import dataclasses

from actors.model.config import ModelArgs

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def split_error(args: ModelArgs, n: int) -> str | None:
    """Why `args` cannot be split N ways (which numbers do not divide), or None."""
    sizes = {"num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
             "intermediate_size": args.intermediate_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % n]
    return f"{', '.join(bad)} not divisible by {n}" if bad else None


def rank_args(args: ModelArgs, n: int) -> ModelArgs:
    """The shapes one of N ranks builds its Transformer with."""
    if n == 1:
        return args
    why = split_error(args, n)
    if why:
        raise ValueError(f"cannot split the model {n} ways: {why}")
    return dataclasses.replace(args, n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                               intermediate_size=args.intermediate_size // n)


def load_part(sf, name: str, rank: int, n: int):
    """Rank `rank`'s part of checkpoint tensor `name`, read from an open safetensors file: only
    that slice leaves the file."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if n == 1 or module not in COLUMN + ROW:
        return sf.get_tensor(name)
    sl = sf.get_slice(name)
    shape = sl.get_shape()
    if module in COLUMN:
        size = shape[0] // n
        return sl[rank * size:(rank + 1) * size]
    if parts[-1] == "bias":   # row-parallel: every rank's partial sum would add it; rank 0 alone does
        b = sf.get_tensor(name)
        return b if rank == 0 else b.zero_()
    size = shape[1] // n
    return sl[:, rank * size:(rank + 1) * size]


def rank_device(device: str, rank: int) -> str:
    """Rank r's device on a host that runs every rank (launcher: local): the GPU r after rank 0's."""
    if not device.startswith("cuda"):
        return device
    return f"cuda:{int(device.partition(':')[2] or 0) + rank}"


def attach(model, group) -> None:
    """Give every row-parallel layer the group its partial sums are all-reduced over."""
    for layer in model.model.layers:
        layer.self_attn.tp = layer.mlp.tp = group
