"""`engine.compile: true`: the model's forward through torch.compile.

The forward reads no number back from the device (the cache is prepared from host bookkeeping,
actors/kv/), so it compiles as one graph (tests/test_compile.py proves it with fullgraph=True,
where any host sync is an error instead of a silent graph break). Shapes are dynamic: kv_len
grows every step and batch sizes and K vary per round, so a static graph would recompile every
step. Distinct graphs
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
    cfg = torch._dynamo.config
    # Every model compiled in one process shares Transformer.forward's code object, and all their
    # graphs (a handful per role) count against one recompile limit (default 8). Not fullgraph
    # here: a serving engine that meets a new break or the limit degrades to eager for that call
    # instead of dying; tests/test_compile.py proves with fullgraph=True that there is no break.
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
    model.forward = torch.compile(model.forward, dynamic=True)
    log.info("%s: forward compiled with torch.compile (dynamic shapes); graphs build on first use", role)
