"""Paged KV (actors/kv/): the block pool's bookkeeping, attention through scattered block tables
at batch > 1 against one row at a time and against transformers, the verifier at batch > 1 with
requests arriving and leaving mid-run, admission by free KV, and the drafter's branches over a
long run (no leaked block)."""
from __future__ import annotations

import random

import pytest
import torch

from actors.drafter import Drafter
from actors.protocol.frame import Frame, Rec, Record
from actors.kv import BlockPool, CacheFullError, PagedKVCache
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.sequence import Request
from actors.engine_spec import EngineSpec
from actors.verifier import Verifier
from actors.protocol.wire import encode_params
from tests.conftest import HF_NEW, assert_matches_or_near_tie


def _cache(n_blocks=12, bs=4, max_len=64) -> PagedKVCache:
    return PagedKVCache(BlockPool(1, n_blocks, bs, 1, 2), max_len)


def _write(c: PagedKVCache, h: int, start: int, n: int, value: float) -> None:
    """A forward's write of n positions from `start` (what the model does, one layer)."""
    pos = torch.arange(start, start + n)[None]
    k = torch.full((1, 1, n, 2), value)
    c.prepare([h], pos, start + n)
    from actors.kv.paged import write_kv

    write_kv(c.pool, 0, k, k, c._plan)
    c.advance(h, start + n)


def _read(c: PagedKVCache, h: int) -> list[float]:
    from actors.kv.paged import build_indices, read_kv

    n = c.lengths[h]
    plan = build_indices([c.tables[h]], torch.arange(n)[None], n, c.block_size, "cpu")
    return read_kv(c.pool, 0, plan)[0][0, 0, :, 0].tolist()


def test_fork_shares_blocks_copy_on_write_rollback_frees():
    c = _cache()
    a = c.alloc()
    _write(c, a, 0, 10, 1.0)                      # 3 blocks of 4: the last one half full
    assert len(c.tables[a]) == 3 and c.pool.n_free == 9
    b = c.fork(a, 10)                             # shares all three
    assert c.tables[b] == c.tables[a] and c.pool.n_free == 9 and c.pool.ref[c.tables[a][0]] == 2
    _write(c, b, 10, 4, 2.0)                      # writes into the shared block: copied first, then one new
    assert c.tables[b][:2] == c.tables[a][:2] and c.tables[b][2] != c.tables[a][2]
    assert c.pool.copies == 1 and c.pool.n_free == 7
    assert _read(c, a) == [1.0] * 10              # the source never sees the branch's positions
    assert _read(c, b) == [1.0] * 10 + [2.0] * 4
    _write(c, a, 10, 1, 3.0)                      # the source writes into its own (now unshared) block
    assert _read(c, b) == [1.0] * 10 + [2.0] * 4 and _read(c, a) == [1.0] * 10 + [3.0]
    c.truncate(b, 5)                              # rollback: blocks past position 5 go back
    assert len(c.tables[b]) == 2 and c.pool.n_free == 9   # its copied block and its own new one
    c.check()
    c.free(a)
    c.free(b)
    assert c.pool.n_free == 12 and not c.tables
    c.check()
    with pytest.raises(ValueError):
        c.pool.decref(0)                          # a double free is caught


def test_reservations_bound_admission():
    c = _cache(n_blocks=6, bs=4)
    assert c.can_reserve(24) and not c.can_reserve(25)
    a = c.alloc(reserve_tokens=13)                # 4 blocks
    assert c.n_reserved == 4 and c.can_reserve(8) and not c.can_reserve(9)
    with pytest.raises(CacheFullError):
        c.alloc(reserve_tokens=9)
    c.free(a)
    assert c.n_reserved == 0 and c.can_reserve(24)


@torch.inference_mode()
def test_paged_attention_at_batch_gt_1_equals_one_row_at_a_time(tiny_pair):
    """Rows of different lengths on scattered, shared and copied blocks, read by a gather, give the
    logits each row gets alone in its own cache (consecutive blocks, read as a view)."""
    model = load_model(tiny_pair / "target")
    a = model.args
    gen = torch.Generator().manual_seed(0)
    alone = [PagedKVCache.for_rows(a, 1, 96) for _ in range(3)]
    for c in alone:
        c.alloc()
    paged = PagedKVCache.for_model(a, 40, 4, 96)
    hs = [paged.alloc() for _ in range(3)]
    spare = paged.alloc()                          # interleave another table's blocks: scattered tables
    lens = [0, 0, 0]
    for rnd, n_new in enumerate([(9, 3, 14), (5, 5, 5), (1, 7, 2), (3, 3, 3)]):
        T = max(n_new)
        toks = torch.randint(0, a.vocab_size, (3, T), generator=gen)
        pos = torch.stack([torch.arange(lens[i], lens[i] + T) for i in range(3)])
        ref = torch.cat([model(toks[i:i + 1], pos[i:i + 1], alone[i], torch.tensor([0])) for i in range(3)])
        got = model(toks, pos, paged, torch.tensor(hs))
        for i in range(3):   # rows' real tokens (the padding past a row's n_new is rewritten next round)
            torch.testing.assert_close(got[i, :n_new[i]], ref[i, :n_new[i]], rtol=1e-5, atol=1e-5)
            lens[i] += n_new[i]
            alone[i].advance(0, lens[i])
            paged.advance(hs[i], lens[i])
        _ = model(torch.randint(0, a.vocab_size, (1, 3), generator=gen), torch.arange(rnd * 3, rnd * 3 + 3)[None],
                  paged, torch.tensor([spare]))
        paged.advance(spare, rnd * 3 + 3)
    assert any(t != list(range(t[0], t[0] + len(t))) for t in paged.tables.values())   # the gather path ran
    # a fork of row 0 continues exactly as row 0 would
    f = paged.fork(hs[0], lens[0])
    x, p = torch.tensor([[5]]), torch.tensor([[lens[0]]])
    torch.testing.assert_close(model(x, p, paged, torch.tensor([f])), model(x, p, alone[0], torch.tensor([0])),
                               rtol=1e-5, atol=1e-5)
    paged.check()


def _run(v: Verifier, arrivals: dict[int, list[Request]], max_steps=4000) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    done: set[int] = set()
    n = sum(len(r) for r in arrivals.values())
    peak = 0
    for step in range(max_steps):
        for r in arrivals.get(step, []):
            v.submit(r)
        v.step()
        peak = max(peak, len(v.seqs))
        for e in v.poll(timeout=0):
            out.setdefault(e["id"], []).extend(e["tokens"])
            if e["done"]:
                done.add(e["id"])
        v.cache.check()
        assert v.cache.pool.n_used <= v.cache.n_reserved   # held blocks within reservations (parked: reclaimable)
        if len(done) == n and step > max(arrivals):
            return out, peak
    raise AssertionError(f"only {len(done)} of {n} requests finished")


def test_verifier_paged_equals_transformers_with_arrivals_and_departures(tiny_pair, held_out_prompts, hf_refs):
    """AR on the verifier alone (the target's own greedy decoding through paged KV), requests of
    different lengths arriving and leaving mid-run; a pool smaller than max_batch full-length
    sequences, so requests also wait for free KV and blocks are reused out of order."""
    hf, refs = hf_refs
    spec = EngineSpec(target=str(tiny_pair / "target"), mode="ar", max_batch=4, max_seq_len=256,
                      kv_block_size=8, target_kv_blocks=3 * -(-(96 + HF_NEW + 6) // 8))
    v = Verifier(spec)
    rng = random.Random(1)
    idx = list(range(8))
    lens = {i: rng.choice([HF_NEW, 20, 37]) for i in idx}
    arrivals: dict[int, list[Request]] = {}
    for i in idx:
        arrivals.setdefault(rng.choice([0, 0, 3, 9, 17, 30]), []).append(
            Request(i, list(held_out_prompts[i]), lens[i], ignore_eos=True))
    out, peak = _run(v, arrivals)
    assert peak == 3   # at most 3 fit the pool at once (max_batch is 4): the rest waited, none failed
    exact = 0
    for i in idx:
        exact += assert_matches_or_near_tie(hf, held_out_prompts[i], out[i], refs[i][:lens[i]])
    assert exact >= len(idx) - 1
    assert v.cache.pool.n_used == 0 and not v.cache.tables and v.cache.n_reserved == 0


def test_a_request_larger_than_the_whole_cache_is_refused_at_submit(tiny_pair):
    spec = EngineSpec(target=str(tiny_pair / "target"), mode="ar", max_batch=2, max_seq_len=256,
                      kv_block_size=8, target_kv_blocks=4)
    v = Verifier(spec)
    with pytest.raises(ValueError, match="KV blocks"):
        v.submit(Request(1, [1] * 20, 20))
    v.submit(Request(2, [1] * 10, 10))   # 10 + 10 + K + 1 positions: 4 blocks of 8, fits


def test_drafter_branches_at_batch_3_over_a_long_run_equal_scratch_and_leak_nothing(tiny_pair, held_out_prompts):
    """Three sequences, many rounds of hits and misses (adopted branches, rollbacks), one joining
    late and one leaving early: every branch equals drafting from scratch, and afterwards every
    block is back in the pool."""
    K = 3
    spec = EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), mode="ssd", k=K,
                      fan_out_budget=4, max_batch=3, max_seq_len=256, kv_block_size=4)
    d = Drafter(spec)
    ref = load_model(spec.draft)

    @torch.inference_mode()
    def greedy(tokens, n):
        out = list(tokens)
        for _ in range(n):
            out.append(int(ref(torch.tensor([out]))[0, -1].argmax()))
        return out[len(tokens):]

    def admit(sid, prompt, step):
        d.handle(Frame(Rec.ADMIT, step, [Record(Rec.ADMIT, sid, 0, K, spec.fan_out_budget,
                                                tokens=encode_params(SamplingParams(), 0, prompt))]))
        return (sid, 0, prompt[-1] % 7)   # first outcome: (0, some first token)

    rng = random.Random(3)
    pending = [admit(1, held_out_prompts[0][:30], 0), admit(2, held_out_prompts[1][:45], 0)]
    for step in range(1, 40):
        d.prespeculate()
        d.cache.check()
        for s in d.seqs.values():
            for (j, t), br in s.branches.items():
                assert br.tokens == greedy(s.tokens + s.draft[:j] + [t], K), (step, s.id, j, t)
        recs = []
        for sid, k, t in pending:
            recs.append(Record(Rec.OUTCOME, sid, d.seqs[sid].round, k, t, tokens=[K, spec.fan_out_budget]))
        d.handle(Frame(Rec.OUTCOME, step, recs))
        for s in d.seqs.values():
            assert s.draft == greedy(s.tokens, K), (step, s.id)
        if step == 12:
            pending_new = admit(3, held_out_prompts[2][:20], step)
        pending = []
        for s in d.seqs.values():
            if s.branches and rng.random() < 0.6:
                k, t = rng.choice(sorted(s.branches))      # a hit
            else:
                k = rng.randrange(len(s.draft) + 1)         # a miss: a correction nobody pre-drafted
                t = next(x for x in range(100) if (k, x) not in s.branches and x not in s.draft[k:k + 1])
            pending.append((s.id, k, t))
        if step == 12:
            pending.append(pending_new)
        if step == 25:   # sequence 1 leaves
            pending = [p for p in pending if p[0] != 1]
            d.handle(Frame(Rec.RELEASE, step, [Record(Rec.RELEASE, 1)]))
        d.cache.check()
    assert d.times.branches > 100 and d.cache.pool.copies > 0
    d.handle(Frame(Rec.RELEASE, 99, [Record(Rec.RELEASE, 2), Record(Rec.RELEASE, 3)]))
    assert not d.seqs and not d.cache.tables
    assert d.cache.pool.n_used == 0   # no block leaked (cached ones are parked, reclaimable)
    d.cache.check()


def test_read_indices_are_each_position_s_pool_row():
    """The gather indices (built on the model's device from the block tables alone) name, for
    every row and position < kv_len, block table[p // bs] at offset p % bs; padded tables read
    their first block (masked), scratch-padded ones the scratch block."""
    from actors.kv.paged import build_indices, build_padded_indices

    rng = random.Random(0)
    bs, kv_len = 4, 23
    tables = [rng.sample(range(100), rng.randint(2, 7)) for _ in range(5)]
    pos = torch.tensor([[min(len(t) * bs - 1, kv_len - 1)] for t in tables])
    _, (kind, read, n) = build_indices(tables, pos, kv_len, bs, torch.device("cpu"))
    assert kind == "gather" and n == kv_len
    want = [(t[p // bs] if p // bs < len(t) else t[0]) * bs + p % bs for t in tables for p in range(kv_len)]
    assert read.tolist() == want
    _, (_, read, _) = build_padded_indices(tables[:3], torch.zeros(4, 1, dtype=torch.long), 1, kv_len, bs, 99,
                                           torch.device("cpu"))
    want = [(t[p // bs] if p // bs < len(t) else 99) * bs + p % bs for t in tables[:3] + [[]] for p in range(kv_len)]
    assert read.tolist() == want
