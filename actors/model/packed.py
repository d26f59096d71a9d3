"""Inference weights for the CPU: every projection reordered once into oneDNN's own layout, with
q/k/v and gate/up fused into one matrix each.

Why: on CPU a float32 or bfloat16 `F.linear` reorders its weight into oneDNN's blocked layout on
every call (bfloat16) or runs MKL's gemm, which is slow at a few rows (float32). Reordered once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing pass does) and run with
`torch.ops.mkldnn._linear_pointwise`, a SmolLM2 projection costs 1.5-3x less at 1-17 rows
(docs/bf16.md has the numbers). In bfloat16 the results are bit-identical to `F.linear` at two
rows or more, and row r of a forward does not depend on how many rows it runs with
(tests/test_packed.py), so a verify of K+1 tokens and K+1 single-token decodes agree.

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
        if x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:
            # One row takes another oneDNN kernel whose sums round differently (seen at 1536 inputs:
            # ~10 % of rows differ in a bit), so a decode would part from the same row in a verify.
            # Run it as two (a stride-0 view; the extra row costs ~3 us): every row count then
            # gives the same bits, and greedy SD/SSD stay token-identical to AR in bfloat16.
            y = self._run(x.reshape(1, 1, -1).expand(1, 2, -1))[:, :1]
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
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
