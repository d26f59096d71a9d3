"""`engine.compile: true`: the model's forward through torch.compile.

The forward reads no number back from the device (the cache is prepared from host bookkeeping,
actors/kv/), so it compiles as one graph: `fullgraph=True` makes any host sync an error instead
of a silent graph break (tests/test_compile.py). Shapes are dynamic: kv_len grows every step and
batch sizes and K vary per round, so a static graph would recompile every step. Distinct graphs
remain for what changes the computation (one query row or several, masked or not, a fresh
prefill), a handful per role, compiled on first use.

On CUDA this is inductor's kernels without CUDA graphs: a graph replay needs every shape fixed,
and kv_len is not (it would take a paged kernel reading a fixed-size block table, the layout
actors/kv/ already keeps, plus bucketed batch sizes and K + 1 positions). docs/compiled.md has the
CPU measurements.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_forward(model: nn.Module, role: str) -> None:
    """Route `model(...)` through a compiled forward (the module itself, its weights and its
    other methods stay as they are)."""
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=True)
    log.info("%s: forward compiled with torch.compile (fullgraph, dynamic shapes); graphs build on first use", role)
