"""The hot path's forward has no host syncs: it compiles with torch.compile(fullgraph=True).

A host sync (`.tolist()`, `int(t.max())`, `.item()`, a branch on a tensor's value) breaks a
graph, and fullgraph=True turns any break into an error, so compiling on CPU proves what a CUDA
graph capture needs. The caches are prepared from host bookkeeping first (handles, host
positions, kv_len), exactly as the verifier and drafter do. The compiled logits must also equal
eager's, so the proof is about the real computation.
"""
from __future__ import annotations

import pytest
import torch

from actors.kv import PagedKVCache
from actors.model.loader import load_model


@pytest.fixture(scope="module")
def target(tiny_pair):
    torch._dynamo.reset()
    return load_model(tiny_pair / "target")


def _prefilled(model, lengths: list[int]):
    """A cache holding len(lengths) sequences of those lengths (random tokens)."""
    a = model.args
    cache = PagedKVCache.for_model(a, 64, 8, 128)
    handles = [cache.alloc() for _ in lengths]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for h, n in zip(handles, lengths):
            pos = torch.arange(n)[None]
            cache.prepare([h], pos, n)
            model(torch.randint(0, a.vocab_size, (1, n), generator=g), pos, cache, kv_len=n)
            cache.advance(h, n)
    return cache, handles


def _step(model, cache, handles, lengths, T: int, fn):
    """One forward of T new tokens per row at each row's next positions, through `fn`."""
    pos = torch.stack([torch.arange(n, n + T) for n in lengths])
    kv_len = int(pos.max()) + 1
    cache.prepare(handles, pos, kv_len)
    toks = (pos * 7 + 3) % model.args.vocab_size
    with torch.inference_mode():
        return fn(toks, pos, cache, kv_len=kv_len)


@pytest.mark.parametrize("T", [1, 5], ids=["decode", "verify"])
def test_forward_compiles_without_graph_breaks(target, T):
    lengths = [9, 14, 11]   # rows of different lengths: the masked, gathered general case
    cache, handles = _prefilled(target, lengths)
    eager = _step(target, cache, handles, lengths, T, target)
    compiled = torch.compile(target, fullgraph=True, dynamic=False)
    got = _step(target, cache, handles, lengths, T, compiled)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_single_row_decode_compiles(target):
    """Batch 1 reads the cache as a view and needs no mask at all (aligned rows)."""
    cache, handles = _prefilled(target, [20])
    assert _step(target, cache, handles, [20], 1, lambda *a, **k: None) is None and cache.aligned
    eager = _step(target, cache, handles, [20], 1, target)
    got = _step(target, cache, handles, [20], 1, torch.compile(target, fullgraph=True, dynamic=False))
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_compiled_engine_equals_transformers(tiny_pair, hf_refs, held_out_prompts):
    """engine.compile: true end to end (verifier here, drafter in a child, both compiled): SD
    greedy output equals transformers' token for token, and the drafter really drafted."""
    from tests.conftest import local_sd_equals_transformers

    def compiled(engine):
        assert engine.spec.compile
        assert hasattr(engine.verifier.model.forward, "_torchdynamo_orig_callable")   # really compiled

    local_sd_equals_transformers(hf_refs, held_out_prompts[:3], {"engine.compile": True}, compiled)
