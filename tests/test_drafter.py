"""The drafter on its own, in process: what it pre-drafts must be what drafting from scratch
gives. Output exactness never depends on the drafter (the verifier decides), so only a test
like this catches a drafter that drafts from a wrong cache (a stale fork, a bad adoption)."""
from __future__ import annotations

import pytest
import torch

from actors.drafter import Drafter
from actors.frame import Frame, Rec, Record
from actors.loader import load_model
from actors.sampling import SamplingParams
from actors.spec import EngineSpec
from actors.wire import HIT, MISS, encode_params

K = 4


@torch.inference_mode()
def _greedy(model, tokens: list[int], n: int) -> list[int]:
    """The draft model's own greedy continuation, no cache: the reference."""
    out = list(tokens)
    for _ in range(n):
        out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(tokens):]


def test_pre_drafted_branches_equal_drafting_from_scratch(tiny_pair, held_out_prompts):
    spec = EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), mode="ssd", k=K,
                      fan_out_budget=6, max_batch=2, max_seq_len=256)
    d = Drafter(spec)
    ref_model = load_model(spec.draft)
    prompt = held_out_prompts[0][:40]
    # The prompt arrives before the verifier has its first token: nothing to draft yet, and
    # no reply (the verifier is prefilling); pre-speculation covers the likely first tokens.
    reply = d.handle(Frame(Rec.ADMIT, 0, [Record(Rec.ADMIT, 7, 0, tokens=encode_params(SamplingParams(), 0, prompt))]))
    s = d.seqs[7]
    assert reply is None and s.draft == [] and s.tokens == prompt
    outcomes = {HIT: 0, MISS: 0}
    for rnd in range(8):
        d.prespeculate()
        assert len(s.branches) == spec.fan_out_budget
        if rnd == 0:
            assert {j for j, _ in s.branches} == {0}
        for (j, t), br in s.branches.items():  # every branch: K tokens after tokens + d[:j] + t
            assert br.tokens == _greedy(ref_model, s.tokens + s.draft[:j] + [t], K), (rnd, j, t)
        if rnd % 3 == 2:   # an outcome nobody pre-drafted: truncate and draft just in time
            k = min(1, len(s.draft))
            t = next(x for x in range(spec.fan_out_budget + 2)
                     if (k, x) not in s.branches and x not in s.draft[k:k + 1])
        else:              # the deepest pre-drafted outcome: adopt its branch
            k, t = max(s.branches)
        frame = Frame(Rec.OUTCOME, rnd + 1, [Record(Rec.OUTCOME, 7, rnd, k, t)])
        expected, hit = s.tokens + s.draft[:k] + [t], (k, t) in s.branches
        reply = d.handle(frame)
        outcomes[HIT if hit else MISS] += 1
        # a greedy hit needs no reply (the verifier has the table); a miss answers with a draft
        assert (reply is None) == hit
        if not hit:
            assert [r.a for r in reply.records if r.kind == Rec.DRAFT] == [MISS]
        assert s.tokens == expected
        assert s.draft == _greedy(ref_model, s.tokens, K), rnd
    assert outcomes[HIT] and outcomes[MISS]
    free_before_release = d.cache.n_free
    d.handle(Frame(Rec.RELEASE, 9, [Record(Rec.RELEASE, 7)]))
    assert d.cache.n_free == free_before_release + 1 + spec.fan_out_budget == d.cache.n_slots


def test_kv_cache_runs_and_ranged_fork():
    from actors.kv_cache import CacheFullError, KVCache

    c = KVCache(1, 6, 1, 8, 2)
    assert c.alloc() == 0
    assert c.alloc_run(3) == [1, 2, 3]
    c.free(2)
    assert c.alloc_run(2) == [4, 5]          # slot 2 alone is not a run of two
    with pytest.raises(CacheFullError, match="consecutive"):
        c.alloc_run(2)
    c.k[0, 0, 0, :, :] = torch.arange(8.0)[:, None]
    c.fork(0, [4, 5], 3)                     # positions 0..2
    c.k[0, 0, 0, :, :] += 100
    c.fork(0, [4, 5], 6, start=3)            # only 3..5 copied: 0..2 keep the old values
    assert c.k[0, 4, 0, :, 0].tolist() == [0, 1, 2, 103, 104, 105, 0, 0]
    assert c.k[0, 5, 0, :, 0].tolist() == c.k[0, 4, 0, :, 0].tolist()
    assert c.lengths[4] == c.lengths[5] == 6
