"""Automatic prefix caching (actors/kv/prefix.py): cached blocks are shared, never written, parked
when unused and evicted LRU under pressure without touching a running sequence; a verifier and a
drafter that reuse them produce exactly what they produce without them (and what transformers
produces); the hit-rate metric counts a repeated prompt; the config key is validated."""
from __future__ import annotations

import pytest
import torch

from actors.drafter import Drafter
from actors.protocol.frame import Frame, Rec, Record
from actors.kv import BlockPool, PagedKVCache
from actors.kv.paged import build_indices, read_kv, write_kv
from actors.kv import CacheFullError
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.sequence import Request
from actors.engine_spec import EngineSpec
from actors.verifier import Verifier
from actors.protocol.wire import encode_params
from cluster.config import ConfigError, load_config
from cluster.launch.deployment import engine_spec
from cluster.serving.metrics import EngineCollector, InFlight
from tests.conftest import assert_matches_or_near_tie, hf_greedy
from tests.test_drafter import _greedy


def _cache(n_blocks=8, bs=4) -> PagedKVCache:
    return PagedKVCache(BlockPool(1, n_blocks, bs, 1, 2, prefix=True), 64)


def _write(c: PagedKVCache, h: int, start: int, n: int, value: float) -> None:
    """A forward's write of n positions from `start` (one layer), as the model does it."""
    k = torch.full((1, 1, n, 2), value)
    c.prepare([h], torch.arange(start, start + n)[None], start + n)
    write_kv(c.pool, 0, k, k, c.plan)
    c.advance(h, start + n)


def _read(c: PagedKVCache, h: int) -> list[float]:
    n = c.lengths[h]
    return read_kv(c.pool, 0, build_indices([c.tables[h]], torch.arange(n)[None], n, c.block_size, "cpu"))[0][0, 0, :,
                                                                                                            0].tolist()


def test_a_repeated_prefix_shares_full_blocks_and_a_cached_block_is_never_written():
    c = _cache()
    toks = list(range(100, 110))
    a = c.alloc()
    _write(c, a, 0, 10, 1.0)
    c.publish(a, toks, 10)                          # two full blocks named; the half-full third is not
    assert c.pool.prefix.n_blocks == 2
    b = c.alloc()
    assert c.reuse(b, toks[:9] + [7, 7], limit=10) == 8   # the whole blocks of the common prefix
    assert c.tables[b] == c.tables[a][:2] and c.pool.ref[c.tables[a][0]] == 2
    _write(c, b, 8, 3, 2.0)                         # past the shared blocks: a block of its own
    assert c.tables[b][2] != c.tables[a][2] and _read(c, a) == [1.0] * 10
    cached = c.tables[a][1]
    c.free(a)                                       # its named blocks are parked (b holds them), the rest freed
    assert c.pool.ref[cached] == 1 and cached in c.pool.prefix
    c.truncate(b, 5)                                # b rolls back into the named block, held by b alone ...
    _write(c, b, 5, 3, 3.0)                         # ... and writing there copies it first
    assert c.tables[b][1] != cached and c.pool.copies == 1
    d = c.alloc()
    assert c.reuse(d, toks, limit=9) == 8 and c.tables[d][1] == cached
    _write(c, d, 8, 1, 4.0)
    assert _read(c, d) == [1.0] * 8 + [4.0]         # the cached block still holds what a computed
    assert _read(c, b) == [1.0] * 5 + [3.0] * 3
    c.check()
    assert c.pool.prefix.query_tokens == 21 and c.pool.prefix.hit_tokens == 16


def test_eviction_takes_parked_blocks_lru_tail_first_and_never_a_held_one():
    c = _cache(n_blocks=6)
    old, new = list(range(8)), list(range(50, 58))
    for toks, value in ((old, 1.0), (new, 2.0)):
        h = c.alloc()
        _write(c, h, 0, 8, value)
        c.publish(h, toks, 8)
        c.free(h)
    assert c.pool.n_parked == 4 and c.pool.n_free == 2 and c.pool.n_used == 0
    assert c.can_reserve(24)                        # parked blocks are reclaimable: admission ignores them
    run = c.alloc(reserve_tokens=16)
    _write(c, run, 0, 12, 5.0)                      # 3 blocks: both free ones and the oldest parked one
    assert c.pool.prefix.evictions == 1
    probe = c.alloc()
    assert c.reuse(probe, old, limit=8) == 4        # `old` lost its tail block first, kept its head
    c.free(probe)
    _write(c, run, 12, 4, 5.0)                      # needs one more: the least recently parked goes
    assert _read(c, run) == [5.0] * 16 and c.pool.n_parked == 2
    other = c.alloc()
    _write(c, other, 0, 8, 6.0)                     # the last two parked blocks
    with pytest.raises(CacheFullError):             # held blocks are never taken
        _write(c, other, 8, 1, 6.0)
    assert _read(c, run) == [5.0] * 16
    c.check()


def _serve(v: Verifier, requests: list[Request], max_steps: int = 6000,
           cached: dict | None = None) -> dict[int, list[int]]:
    """Submit every request, step until all finish; the reference counts and the reservations
    are checked at every step. `cached` gets each request's cached prompt tokens."""
    for r in requests:
        v.submit(r)
    out: dict[int, list[int]] = {r.id: [] for r in requests}
    done: set[int] = set()
    for _ in range(max_steps):
        v.step()
        for e in v.poll(timeout=0):
            out[e["id"]] += e["tokens"]
            if e["done"]:
                done.add(e["id"])
                if cached is not None:
                    cached[e["id"]] = e["cached_tokens"]
        v.cache.check()
        assert v.cache.pool.n_used <= v.cache.n_reserved
        if len(done) == len(requests):
            return out
    raise AssertionError(f"only {len(done)} of {len(requests)} requests finished")


NEW = 24


def test_verifier_with_prefix_caching_equals_without_and_transformers_under_eviction(tiny_pair, held_out_prompts,
                                                                                      hf_refs):
    """Prompts sharing a 48-token system prefix, one repeated, through a pool that holds two
    requests at a time: cached blocks pile up and are evicted while others run. Greedy output is
    the same with caching on and off, and equals transformers'."""
    system = held_out_prompts[0][:48]
    prompts = [system + held_out_prompts[i][-37:] for i in range(1, 6)]
    prompts.append(prompts[0])
    hf, _ = hf_refs
    refs = hf_greedy(hf, prompts, NEW)
    outs = {}
    for on in (True, False):
        spec = EngineSpec(target=str(tiny_pair / "target"), mode="ar", max_batch=4, max_seq_len=256,
                          kv_block_size=8, target_kv_blocks=32, prefix_caching=on)
        v = Verifier(spec)
        cached: dict[int, int] = {}
        got = _serve(v, [Request(i, list(p), NEW, ignore_eos=True) for i, p in enumerate(prompts)], cached=cached)
        outs[on] = [got[i] for i in range(len(prompts))]
        assert v.cache.pool.n_used == 0 and v.cache.n_reserved == 0
        if on:
            assert v.cache.pool.prefix.evictions > 0       # the pool ran full of cached blocks
            # the first two are admitted together (nothing cached yet); later ones find the system
            # prefix, and the repeated prompt more than that (what eviction left of its tail)
            assert [cached[i] for i in range(5)] == [0, 0, 48, 48, 48] and 48 < cached[5] <= 80
            assert v.metrics()["prefix_hit_tokens"] == sum(cached.values())
        else:
            assert v.cache.pool.prefix is None and not any(cached.values())
    assert outs[True] == outs[False]
    exact = sum(assert_matches_or_near_tie(hf, p, o, r) for p, o, r in zip(prompts, outs[True], refs))
    assert exact >= len(prompts) - 1


def test_the_hit_rate_metric_counts_a_repeated_prompt(tiny_pair, held_out_prompts):
    spec = EngineSpec(target=str(tiny_pair / "target"), mode="ar", max_batch=2, max_seq_len=256, kv_block_size=8)
    v = Verifier(spec)
    prompt = held_out_prompts[2][:61]

    def scrape() -> dict:   # a fresh collector: the server's caches its reads for a second
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in EngineCollector(lambda: v, InFlight()).collect()
                if fam.name.startswith("outrider:prefix_cache") for s in fam.samples}

    _serve(v, [Request(1, list(prompt), 4)])
    first = scrape()
    assert first[("outrider:prefix_cache_queries_total", (("role", "target"),))] == 61
    assert first[("outrider:prefix_cache_hits_total", (("role", "target"),))] == 0
    _serve(v, [Request(2, list(prompt), 4)])
    second = scrape()
    assert second[("outrider:prefix_cache_hits_total", (("role", "target"),))] == 56   # 7 whole blocks of 8
    assert second[("outrider:prefix_cache_hit_rate", (("role", "target"),))] == pytest.approx(56 / 122)
    parked = second[("outrider:prefix_cache_blocks", (("role", "target"), ("state", "parked")))]
    assert parked >= 7 and second[("outrider:prefix_cache_blocks", (("role", "target"), ("state", "in_use")))] == 0


def test_the_drafter_reuses_a_released_prompt_and_drafts_as_from_scratch(tiny_pair, held_out_prompts):
    K = 3
    spec = EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), mode="ssd", k=K,
                      fan_out_budget=4, max_batch=2, max_seq_len=256, kv_block_size=4)
    d = Drafter(spec)
    ref = load_model(spec.draft)
    prompt = held_out_prompts[4][:42]
    for sid in (1, 2):
        d.handle(Frame(Rec.ADMIT, 0, [Record(Rec.ADMIT, sid, 0, K, spec.fan_out_budget,
                                             tokens=encode_params(SamplingParams(), 0, prompt))]))
        assert d.seqs[sid].length == (0 if sid == 1 else 40)   # the second admission starts on 10 cached blocks
        d.prespeculate()
        for (_, t), br in d.seqs[sid].branches.items():
            assert br.tokens == _greedy(ref, prompt + [t], K)
        d.handle(Frame(Rec.OUTCOME, 1, [Record(Rec.OUTCOME, sid, 0, 0, 5, tokens=[K, spec.fan_out_budget])]))
        assert d.seqs[sid].draft == _greedy(ref, prompt + [5], K)
        d.cache.check()
        d.handle(Frame(Rec.RELEASE, 2, [Record(Rec.RELEASE, sid)]))
    assert d.stats()["prefix_hit_tokens"] == 40 and d.cache.pool.n_used == 0
    d.cache.check()


def test_engine_prefix_caching_is_a_checked_config_key(tiny_pair):
    assert engine_spec(load_config("configs/local-cpu.yaml")).prefix_caching is True
    off = engine_spec(load_config("configs/local-cpu.yaml", {"engine.prefix_caching": False}))
    assert off.prefix_caching is False and not off.draft_prefix_caching
    with pytest.raises(ConfigError, match=r"engine\.prefix_caching"):
        load_config("configs/local-cpu.yaml", {"engine.prefix_caching": "sometimes"})
