"""The drafter on its own, in process: what it pre-drafts must be what drafting from scratch
gives. Output exactness never depends on the drafter (the verifier decides), so only a test
like this catches a drafter that drafts from a wrong cache (a stale fork, a bad adoption)."""
from __future__ import annotations

import torch

from actors.drafter import Drafter
from actors.protocol.frame import Frame, Rec, Record
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.engine_spec import EngineSpec
from actors.protocol.wire import HIT, MISS, encode_params

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
    reply = d.handle(Frame(Rec.ADMIT, 0, [Record(Rec.ADMIT, 7, 0, K, spec.fan_out_budget,
                                                 tokens=encode_params(SamplingParams(), 0, prompt))]))
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
    d.cache.check()   # reference counts equal the tables holding each block
    assert d.cache.pool.n_used > 0
    d.handle(Frame(Rec.RELEASE, 9, [Record(Rec.RELEASE, 7)]))
    assert d.cache.pool.n_used == 0 and not d.cache.tables  # every block back (the prefix's parked, reclaimable)
    d.cache.check()


def test_k_travels_with_the_outcome_cuts_drafts_and_k_zero_keeps_the_cache_in_step(tiny_pair, held_out_prompts):
    """The verifier's K per round: an adopted branch is cut to it, a just-in-time draft has that
    length, K = 0 drafts nothing and asks no reply, and the cache catches up so that drafts after
    a stretch at K = 0 are still exactly the model's own continuation."""
    spec = EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), mode="ssd", k=K,
                      fan_out_budget=6, max_batch=2, max_seq_len=256)
    d = Drafter(spec)
    ref_model = load_model(spec.draft)
    prompt = held_out_prompts[1][:40]
    d.handle(Frame(Rec.ADMIT, 0, [Record(Rec.ADMIT, 3, 0, K, 6, tokens=encode_params(SamplingParams(), 0, prompt))]))
    s = d.seqs[3]
    step = 0

    def outcome(k, t, kn, budget=6):
        nonlocal step
        step += 1
        return d.handle(Frame(Rec.OUTCOME, step, [Record(Rec.OUTCOME, 3, step - 1, k, t, tokens=[kn, budget])]))

    d.prespeculate()
    k, t = max(s.branches)
    assert outcome(k, t, 2) is None                    # a greedy hit, cut to 2: no reply
    assert s.k == 2 and s.draft == _greedy(ref_model, s.tokens, 2)
    d.prespeculate()                                   # branches now draft 2 tokens, budget 6
    assert s.branches and all(len(br.tokens) == 2 for br in s.branches.values())
    assert len(s.branches) == 6
    # K = 0: the outcome commits, no draft, no reply, no pre-speculation
    for _ in range(5):
        t = _greedy(ref_model, s.tokens, 1)[0] if s.draft == [] else s.draft[0]
        assert outcome(0, t + 1, 0) is None            # (a correction the drafter did not predict)
        assert s.draft == [] and s.k == 0
        d.prespeculate()
        assert not s.branches                          # (its cache catches up when a draft is asked for)
    # a probe of one token: a miss drafted just in time, exactly the model's continuation
    reply = outcome(0, 5, 1)
    drafts = [r for r in reply.records if r.kind == Rec.DRAFT]
    assert len(drafts) == 1 and drafts[0].a != HIT and drafts[0].tokens == _greedy(ref_model, s.tokens, 1)
    # back to K = 3 with a budget of 4
    reply = outcome(1, 9, 3, 4)
    assert s.draft == _greedy(ref_model, s.tokens, 3)
    d.prespeculate()
    assert len(s.branches) == 4 and all(len(br.tokens) == 3 for br in s.branches.values())
    for (j, t), br in s.branches.items():
        assert br.tokens == _greedy(ref_model, s.tokens + s.draft[:j] + [t], 3), (j, t)
