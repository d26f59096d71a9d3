"""Inference weights for the CPU: every projection reordered once into oneDNN's own layout, with
q/k/v and gate/up fused into one matrix each.

Why: on CPU a float32 or bfloat16 `F.linear` reorders its weight into oneDNN's blocked layout on
every call (bfloat16) or runs MKL's gemm, which is slow at a few rows (float32). Reordered once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing pass does) and run with
`torch.ops.mkldnn._linear_pointwise`, a SmolLM2 projection costs 1.5-3x less at 1-17 rows
(docs/bf16.md has the numbers). The results are bit-identical to `F.linear` in bfloat16 and, in
both dtypes, row r of a forward does not depend on how many rows it runs with (tests/
test_packed.py), so a verify of K+1 tokens and K+1 single-token decodes agree.

The packed tensors are copies (opaque layout): the module's own weights stay as they are, for
the state dict, training, tensor-parallel slicing and the GPU path. Memory for the weights
doubles on CPU. A model in training mode never uses them (no autograd through these ops), and
`Transformer.train(False)` packs again, so weights changed by training are picked up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


def supported(weight: torch.Tensor) -> bool:
    """Whether this build and device run packed oneDNN linears for `weight`'s dtype."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@dataclass
class Packed:
    """One fused projection: the reordered weight and its bias (None without one)."""
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack(*linears: nn.Linear) -> Packed:
    """The linears' outputs concatenated (in order) as one packed projection."""
    w = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype)
                          for m in linears])
    # No batch-size hint: one layout serves every row count (a hint changes no result, only speed).
    return Packed(torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None), bias)
