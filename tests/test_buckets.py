"""Padded fixed shapes (actors/model/buckets.py, PagedKVCache.prepare_padded): what CUDA-graph capture
needs, proven on CPU.

  * a padded forward's real rows give the unpadded forward's logits, write exactly the positions
    the unpadded one writes (dummy rows and padding positions land in the scratch block only),
    and take no extra blocks (PagedKVCache.check passes);
  * over many steps of growing kv_len and changing batch sizes, a static-shape compiled forward
    builds no more graphs than there are buckets seen;
  * an engine with engine.pad_shapes generates transformers' greedy output.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from actors.model.buckets import Buckets, pad_tokens
from actors.kv import PagedKVCache
from actors.model.loader import load_model

K, BS, MAX_LEN = 4, 8, 160


@pytest.fixture(scope="module")
def target(tiny_pair):
    return load_model(tiny_pair / "target")


def test_bucket_policy():
    b = Buckets(max_rows=6, k=K, max_len=300, kv_step=128)
    assert b.shape(1, 1, 5) == (1, 1, 128)
    assert b.shape(3, 1, 128) == (4, 1, 128)
    assert b.shape(5, 3, 129) == (6, K + 1, 256)       # rows capped at max_rows, T padded to K + 1
    assert b.shape(6, K + 1, 290) == (6, K + 1, 300)   # kv_len capped at max_len
    assert b.shape(1, K + 2, 10) is None and b.shape(1, 1, 10, last=True) is None   # prefill: unpadded
    assert len({b.shape(B, T, n) for B in range(1, 7) for T in (1, 2, K + 1) for n in range(1, 301)}) == b.n_shapes()


def _pair(model, lengths: list[int], fork: tuple[int, int] | None, seed: int):
    """Two caches holding the same sequences (random tokens): a plain one and one with a scratch
    block. `fork` = (src, length): one more table forked from row src (shared blocks: its writes
    copy on write)."""
    a = model.args
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, a.vocab_size, (1, n), generator=g) for n in lengths]
    out = []
    for scratch in (False, True):
        cache = PagedKVCache.for_model(a, 96 + scratch, BS, MAX_LEN, scratch=scratch)
        handles = [cache.alloc() for _ in lengths]
        with torch.inference_mode():
            for h, x in zip(handles, prompts):
                n = x.shape[1]
                pos = torch.arange(n)[None]
                cache.prepare([h], pos, n)
                model(x, pos, cache, kv_len=n)
                cache.advance(h, n)
        if fork is not None:
            handles.append(cache.fork(handles[fork[0]], fork[1]))
        out.append((cache, handles))
    return out


def _flat_rows(cache, handles, pos) -> list[int]:
    """The pool rows (block * block_size + offset) the real positions live at, row by row."""
    return [cache.tables[h][p // BS] * BS + p % BS for h, row in zip(handles, pos.tolist()) for p in row]


@pytest.mark.parametrize("seed", range(6))
def test_padded_logits_equal_unpadded(target, seed):
    rng = random.Random(seed)
    n_rows = rng.randint(1, 5)
    lengths = [rng.randint(3, 90) for _ in range(n_rows)]
    fork = (0, rng.randint(1, lengths[0])) if seed % 2 else None   # a shared, partly filled block
    (plain, hp), (padc, hq) = _pair(target, lengths, fork, seed)
    starts = lengths + ([fork[1]] if fork else [])
    T = rng.choice([1, K + 1]) if seed % 3 else rng.randint(2, K)   # a short verify row pads to K + 1
    pos = torch.stack([torch.arange(n, n + T) for n in starts])
    tokens = (pos * 7 + seed) % target.args.vocab_size
    kv_len = int(pos.max()) + 1
    buckets = Buckets(max_rows=8, k=K, max_len=MAX_LEN, kv_step=32)
    B = len(starts)
    shape = buckets.shape(B, T, kv_len)
    assert shape[0] >= B and shape[1] >= T and shape[2] >= kv_len

    with torch.inference_mode():
        plain.prepare(hp, pos, kv_len)
        want = target(tokens, pos, plain, kv_len=kv_len)
        before_k, held = padc.pool.k.clone(), {b for t in padc.tables.values() for b in t}
        padded_pos = padc.prepare_padded(hq, pos, kv_len, shape)
        assert not padc.aligned and not padc.causal and padded_pos.shape == shape[:2]
        got = target(pad_tokens(tokens, shape), padded_pos, padc, kv_len=shape[2])
    assert got.shape[:2] == shape[:2]
    torch.testing.assert_close(got[:B, :T], want, rtol=1e-5, atol=1e-5)

    # Writes: the real positions, the scratch block and blocks new to the tables (a copy on write
    # fills a whole block), nothing else: no other row of the pool moved.
    changed = (padc.pool.k != before_k).flatten(3).any(-1).any(0).flatten().nonzero().flatten().tolist()
    fresh = {b for t in padc.tables.values() for b in t} - held
    allowed = set(_flat_rows(padc, hq, pos)) | {b * BS + i for b in fresh | {padc.scratch} for i in range(BS)}
    assert changed and set(changed) <= allowed
    # The same keys land at the real positions in both caches.
    kq = padc.pool.k.flatten(1, 2)[:, _flat_rows(padc, hq, pos)]
    kp = plain.pool.k.flatten(1, 2)[:, _flat_rows(plain, hp, pos)]
    torch.testing.assert_close(kq, kp, rtol=1e-5, atol=1e-5)

    # Blocks: the same tables' lengths, one block more in use (the scratch block), accounts balance.
    padc.check()
    plain.check()
    assert [len(padc.tables[h]) for h in hq] == [len(plain.tables[h]) for h in hp]
    assert padc.pool.n_blocks - padc.pool.n_free == plain.pool.n_blocks - plain.pool.n_free + 1
    assert padc.pool.copies == plain.pool.copies and padc.capacity == plain.capacity
    assert padc.scratch not in {b for t in padc.tables.values() for b in t}


def test_static_compile_builds_one_graph_per_bucket(target):
    """Growing kv_len and changing batch sizes: with padding, a static-shape forward compiles only
    once per bucket seen. (The eager backend: dynamo's graph count is the backend's; inductor
    compiles the same graphs, tests/test_compile.py, at seconds each.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(target.forward, fullgraph=True, dynamic=False, backend="eager")
    a = target.args
    cache = PagedKVCache.for_model(a, 160, BS, MAX_LEN, scratch=True)
    buckets = Buckets(max_rows=4, k=K, max_len=MAX_LEN, kv_step=32)
    rng = random.Random(0)
    lengths = {}
    seen, steps = set(), 0
    with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=64):   # as compile_static
        for h in range(4):
            lengths[cache.alloc()] = n = 5 + 9 * h
            pos = torch.arange(n)[None]
            cache.prepare([h], pos, n)
            target(torch.ones(1, n, dtype=torch.long), pos, cache, kv_len=n)
            cache.advance(h, n)
        while max(lengths.values()) < 100:
            rows = rng.sample(sorted(lengths), rng.randint(1, 4))
            T = rng.choice([1, 1, K + 1])
            pos = torch.stack([torch.arange(lengths[h], lengths[h] + T) for h in rows])
            kv_len = int(pos.max()) + 1
            shape = buckets.shape(len(rows), T, kv_len)
            seen.add(shape)
            padded = cache.prepare_padded(rows, pos, kv_len, shape)
            out = compiled(pad_tokens((pos * 3) % a.vocab_size, shape), padded, cache, kv_len=shape[2])
            assert out.shape[:2] == shape[:2]
            for h in rows:
                lengths[h] += 1 if T == 1 else rng.randint(1, T)   # a verify round keeps 1..K+1
                cache.advance(h, lengths[h])
            steps += 1
    cache.check()
    graphs = counters["stats"]["unique_graphs"]
    assert steps > 3 * len(seen) and len(seen) >= 6, (steps, seen)
    assert 0 < graphs <= len(seen), (graphs, len(seen))


def test_padded_engine_equals_transformers(tiny_pair, hf_refs, held_out_prompts):
    """engine.pad_shapes: true end to end (SD, eager): the verifier's and the drafter's decode and
    verify forwards run at bucket shapes; greedy output equals transformers' token for token."""
    from tests.conftest import local_sd_equals_transformers

    def padded(engine):
        assert engine.spec.pad_shapes and engine.spec.pads("cpu")
        assert engine.verifier._forward.buckets is not None and engine.verifier.cache.scratch is not None

    v = local_sd_equals_transformers(hf_refs, held_out_prompts[:3], {"engine.pad_shapes": True}, padded).verifier
    assert v.cache.padded_forwards > 0
    v.cache.check()


def test_precompile_is_bounded_and_nothing_compiles_once_serving(target, tiny_pair):
    """engine.compile with padded shapes: a role compiles its bounded bucket set at start-up (every
    kv size of the smallest batches first, at most PRECOMPILE_MAX); afterwards a shape outside the
    set runs padded but eager (no graph is built while serving) and gives the same logits; a split
    target's rank 0 waits for its workers before compiling."""
    from torch._dynamo.utils import counters

    from actors.model.buckets import PRECOMPILE_MAX
    from actors.model.runner import Runner
    from actors.engine_spec import EngineSpec

    big = Buckets(max_rows=1056, k=8, max_len=8210)   # a 70B drafter's rows and context
    assert big.n_shapes() == 12 * 2 * 12 and len(big.precompile_order()) == PRECOMPILE_MAX
    assert big.precompile_order()[:24] == [(1, t, kv) for kv in big.kv_sizes() for t in (1, 9)]
    assert big.shape(1, 1, 1500) == (1, 1, 2048) and big.shape(3, 9, 8203) == (4, 9, 8210)

    spec = EngineSpec(target=str(tiny_pair / "target"), mode="ar", k=K, compile=True, pad_shapes=True,
                      max_batch=2, max_seq_len=40)
    torch._dynamo.reset()
    counters.clear()
    r = Runner(target, spec, "drafter", "cpu", spec.target_blocks(), 2, spec.target_max_len, backend="eager")
    order = r.buckets.precompile_order()
    assert r.compiled == set(order) and len(order) == r.buckets.n_shapes() == 2 * 2 * 1
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= len(order)
    plain = Runner(target, dataclasses.replace(spec, compile=False), "x", "cpu", spec.target_blocks(), 2,
                   spec.target_max_len)
    x = torch.randint(0, target.args.vocab_size, (2, 12))
    outs = []
    for run in (r, plain):
        hs = [run.cache.alloc(), run.cache.alloc()]
        run(x, torch.arange(12).repeat(2, 1), hs)
        for h in hs:
            run.cache.advance(h, 12)
        outs.append(run(x[:, :K + 1], torch.arange(12, 13 + K).repeat(2, 1), hs))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs   # served from the precompiled set

    # a set cut short: the shape it lacks runs eager, and still nothing compiles
    torch._dynamo.reset()
    counters.clear()
    cut = Runner(target, spec, "drafter", "cpu", spec.target_blocks(), 2, spec.target_max_len, precompile=False,
                 backend="eager")
    cut.precompile([(1, 1, spec.target_max_len)])
    before = counters["stats"]["unique_graphs"]
    h = cut.cache.alloc()
    cut(x[:1], torch.arange(12)[None], [h])
    cut.cache.advance(h, 12)
    cut(x[:1, :K + 1], torch.arange(12, 13 + K)[None], [h])   # (1, K + 1, kv): not in the set
    assert counters["stats"]["unique_graphs"] == before and cut.compiled == {(1, 1, spec.target_max_len)}
    # rank 0 of a split target: nothing before join_tp
    tp = Runner(target, dataclasses.replace(spec, tensor_parallel_size=2), "verifier", "cpu", spec.target_blocks(),
                2, spec.target_max_len, backend="eager")
    assert tp.compiled is None
