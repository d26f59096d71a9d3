"""One role's model and KV cache behind one call: what the verifier's and the drafter's
forwards have in common.

`runner(tokens, host positions, handles, last)` prepares the cache from host bookkeeping (padded
to a bucket shape when fixed shapes are on, actors/model/buckets.py), lets the other tensor-parallel
ranks run the very same forward (the verifier of a split target sets `tp`), runs the model
(compiled as `engine.compile` says) and returns float32 logits left on the device: nothing is
read back here.

With engine.compile and padded shapes, `precompile` compiles (and on CUDA captures) a bounded
set of bucket shapes up front, with progress logged; a shape outside the set then runs padded
but eager. The roles call it before they join the data plane (a TP verifier after its group
forms, so its workers compile the same graphs in step); the first forward calls it otherwise.
"""
from __future__ import annotations

import logging
import time

import torch

from actors.model.buckets import PRECOMPILE_MAX, Buckets, Shape, kv_step_for, pad_tokens
from actors.model.compiled import compile_forward, compile_static
from actors.kv import PagedKVCache
from actors.engine_spec import EngineSpec


log = logging.getLogger(__name__)


class Runner:
    def __init__(self, model, spec: EngineSpec, role: str, device: str, n_blocks: int, max_rows: int,
                 max_len: int, compile_ok: bool = True, precompile: bool = True, backend: str = "inductor",
                 prefix: bool = False):
        self.model, self.device = model, device
        pads = spec.pads(device)
        self.cache = PagedKVCache.for_model(model.args, n_blocks, spec.kv_block_size, max_len, model.dtype, device,
                                            scratch=pads, prefix=prefix)
        self.buckets = Buckets(max_rows, spec.k, max_len, kv_step_for(spec.kv_block_size)) if pads else None
        self.role = role
        self.compiled: set[Shape] | None = None   # shapes precompiled; None: not yet (or nothing to compile)
        self._static = bool(spec.compile and compile_ok and self.buckets)
        self._auto = precompile   # False: the caller picks the shapes (precompile(shapes)); others run eager
        if spec.compile and compile_ok:
            if self.buckets:
                compile_static(model, role, self.cache, self.buckets.n_shapes(), backend)
            else:
                compile_forward(model, role)
        self.tp = None   # the verifier's TPLead when the target is split (actors/model/tp/)
        # A split target's rank 0 compiles once its workers have joined (Verifier.join_tp), so they
        # compile the same graphs in step; every other role compiles now, before the data plane.
        if precompile and self._static and not (role == "verifier" and spec.tensor_parallel_size > 1):
            self.precompile()

    def precompile(self, shapes: list[Shape] | None = None, reps: int = 3) -> float:
        """Compile (and on CUDA capture) the static forward at `shapes` (default: the buckets'
        bounded precompile_order), each run `reps` times with dummy rows only (they write the
        scratch block): CUDA-graph trees warm up, record, then replay. Returns the seconds spent.
        Any shape outside the set later runs eager. Idempotent for shapes already compiled."""
        if not self._static:
            return 0.0
        self.compiled = self.compiled if self.compiled is not None else set()
        wanted = shapes if shapes is not None else self.buckets.precompile_order()
        todo = [s for s in wanted if s not in self.compiled]
        if not todo:
            return 0.0
        total = self.buckets.n_shapes()
        log.info("%s: compiling %d of %d bucket shapes (at most %d at start-up; the rest run eager)",
                 self.role, len(todo), total, PRECOMPILE_MAX)
        t0 = time.perf_counter()
        for i, shape in enumerate(todo, 1):
            t1 = time.perf_counter()
            for _ in range(reps):
                self._warm(shape)
            self.compiled.add(shape)
            log.info("%s: bucket %d/%d (rows %d, T %d, kv_len %d) compiled in %.1fs, %.0fs so far",
                     self.role, i, len(todo), *shape, time.perf_counter() - t1, time.perf_counter() - t0)
        return time.perf_counter() - t0

    def _warm(self, shape: Shape) -> None:
        rows, T, kv = shape
        with torch.inference_mode():
            pos = self.cache.prepare_padded([], torch.zeros(0, T, dtype=torch.long), 1, shape)
            tokens = torch.zeros(rows, T, dtype=torch.long)
            if self.tp is not None:
                self.tp.call(tokens, pos, kv, False, self.cache)
            out = self.model.static_forward(tokens.to(self.device), pos.to(self.device), self.cache, kv_len=kv,
                                            last=False)
            out[:1, :1, :1].cpu()   # finished before it is timed or replaced

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, handles: list[int],
                 last: bool = False, aux: tuple[int, ...] = ()):
        """float32 logits [B, T, V]; with `aux`, (logits, the target's features at those layers
        [B, T, len(aux) * dim]) for a draft head (actors/eagle/), from the eager forward."""
        with torch.inference_mode():
            kv_len = int(pos.max()) + 1   # host positions: no device read
            B, T = tokens.shape
            shape = self.buckets.shape(B, T, kv_len, last) if self.buckets and not aux else None
            if shape is not None and self._static and self.compiled is None and self._auto:
                self.precompile()   # not called at start-up (a TP verifier before join_tp): now
            if shape is not None:   # fixed shapes (actors/model/buckets.py): pad, run, slice back
                pos = self.cache.prepare_padded(handles, pos, kv_len, shape)
                tokens, kv_len = pad_tokens(tokens, shape), shape[2]
            else:
                self.cache.prepare(handles, pos, kv_len)
            if self.tp is not None:   # the other ranks run this very forward with us
                self.tp.call(tokens, pos, kv_len, last, self.cache)
            compiled = shape is not None and (self.compiled is None or shape in self.compiled)
            fwd = getattr(self.model, "static_forward", self.model) if compiled else self.model
            if aux:
                logits, feats = self.model(tokens.to(self.device), pos.to(self.device), self.cache, kv_len=kv_len,
                                           last=last, aux=aux)
                return logits.float(), feats
            logits = fwd(tokens.to(self.device), pos.to(self.device), self.cache, kv_len=kv_len, last=last)
            if shape is not None:   # a CUDA graph's output is overwritten by its next replay
                logits = logits[:B, :T].clone()
        return logits.float()
