"""`engine.compile: true`: the model's forward through torch.compile.

The forward reads no number back from the device (the cache is prepared from host bookkeeping,
actors/kv/), so it compiles as one graph (tests/test_compile.py proves it with fullgraph=True,
where any host sync is an error instead of a silent graph break). Shapes are dynamic: kv_len
grows every step and batch sizes and K vary per round, so a static graph would recompile every
step. Distinct graphs
remain for what changes the computation (one query row or several, masked or not, a fresh
prefill), a handful per role, compiled on first use.

With padded shapes (`EngineSpec.pads`: compile on CUDA, or `engine.pad_shapes`) decode/verify
forwards run at fixed bucket shapes (actors/model/buckets.py, PagedKVCache.prepare_padded), so the
static forward compiles with `dynamic=False`, one graph per bucket, and on CUDA with
mode="reduce-overhead": CUDA graphs, the pool's k/v marked static so their in-place writes are
captured instead of copied. Prefill chunks keep the eager forward. docs/compiled.md has the CPU
measurements; the CUDA-graph capture itself is untested (no GPU here).
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
    model.pack(False)   # the traced forward uses the module weights anyway (model.eager); free the copies
    model.forward = torch.compile(model.forward, dynamic=True)
    log.info("%s: forward compiled with torch.compile (dynamic shapes); graphs build on first use", role)


def compile_static(model: nn.Module, role: str, cache, n_shapes: int, backend: str = "inductor") -> None:
    """A fixed-shape forward as `model.static_forward` (the padded decode/verify path); the
    module's own forward stays eager for prefill chunks. On CUDA: CUDA graphs. `n_shapes`: the
    buckets' count (Buckets.n_shapes); dynamo's recompile limit is raised to it, or shapes past
    its default 8 would silently run eager. `backend`: inductor (serving); the GPU check's CPU
    form passes aot_eager, which traces the same graphs without inductor's minutes of C++ builds."""
    cuda = cache.pool.k.is_cuda
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * n_shapes)   # two models may share Transformer.forward
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * n_shapes)
    if cuda:   # written in place by every replay: static addresses, as gpt-fast's cache buffers
        torch._dynamo.mark_static_address(cache.pool.k)
        torch._dynamo.mark_static_address(cache.pool.v)
    # Not fullgraph, as compile_forward: tests/test_buckets.py proves one graph per bucket with it.
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    # packed weights stay for the eager prefill chunks; the traced forward skips them (model.eager)
    model.static_forward = torch.compile(model.forward, dynamic=False, backend=backend, mode=mode)
    log.info("%s: padded forward compiled with torch.compile (static shapes%s); one graph per bucket",
             role, ", CUDA graphs" if cuda else "")
