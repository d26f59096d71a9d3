"""One role's model and KV cache behind one call: what the verifier's and the drafter's
forwards have in common.

`runner(tokens, host positions, handles, last)` prepares the cache from host bookkeeping (padded
to a bucket shape when fixed shapes are on, actors/buckets.py), lets the other tensor-parallel
ranks run the very same forward (the verifier of a split target sets `tp`), runs the model
(compiled as `engine.compile` says) and returns float32 logits left on the device: nothing is
read back here.
"""
from __future__ import annotations

import torch

from actors.buckets import Buckets, kv_step_for, pad_tokens
from actors.compiled import compile_forward, compile_static
from actors.kv import PagedKVCache
from actors.spec import EngineSpec


class Runner:
    def __init__(self, model, spec: EngineSpec, role: str, device: str, n_blocks: int, max_rows: int,
                 max_len: int, compile_ok: bool = True):
        self.model, self.device = model, device
        pads = spec.pads(device)
        self.cache = PagedKVCache.for_model(model.args, n_blocks, spec.kv_block_size, max_len, model.dtype, device,
                                            scratch=pads)
        self.buckets = Buckets(max_rows, spec.k, max_len, kv_step_for(spec.kv_block_size)) if pads else None
        if spec.compile and compile_ok:
            if self.buckets:
                compile_static(model, role, self.cache, self.buckets.n_shapes())
            else:
                compile_forward(model, role)
        self.tp = None   # the verifier's TPLead when the target is split (actors/tp/)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, handles: list[int],
                 last: bool = False) -> torch.Tensor:
        with torch.inference_mode():
            kv_len = int(pos.max()) + 1   # host positions: no device read
            B, T = tokens.shape
            shape = self.buckets.shape(B, T, kv_len, last) if self.buckets else None
            if shape is not None:   # fixed shapes (actors/buckets.py): pad, run, slice back
                pos = self.cache.prepare_padded(handles, pos, kv_len, shape)
                tokens, kv_len = pad_tokens(tokens, shape), shape[2]
            else:
                self.cache.prepare(handles, pos, kv_len)
            if self.tp is not None:   # the other ranks run this very forward with us
                self.tp.call(tokens, pos, kv_len, last, self.cache)
            fwd = self.model if shape is None else getattr(self.model, "static_forward", self.model)
            logits = fwd(tokens.to(self.device), pos.to(self.device), self.cache, kv_len=kv_len, last=last)
            if shape is not None:   # a CUDA graph's output is overwritten by its next replay
                logits = logits[:B, :T].clone()
        return logits.float()
