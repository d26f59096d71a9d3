"""The verification rule and the sampling helpers it relies on.

The distribution tests run many independent draft-and-verify rounds with fixed seeds and check,
with a chi-square test, that what gets emitted follows the target p and not the drafter's q.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from actors.spec.sampling import SamplingParams, probs_from_logits, saguaro_scale, sample
from actors.spec.verify import Outcome, round_outcomes, verify_greedy, verify_sampling

N = 20_000  # rounds per distribution test
ALPHA = 0.01

torch.set_num_threads(1)


# -- helpers ---------------------------------------------------------------------------------
def _dist(*probs: float) -> torch.Tensor:
    t = torch.tensor(probs, dtype=torch.float32)
    return t / t.sum()


def _random_rows(n: int, V: int, seed: int, sharpness: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, V, generator=g), -1)


def _draw_drafts(q: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n independent drafts [n, K], position i drawn from q[i]."""
    return torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(q.shape[0])], 1)


def _rounds(p: torch.Tensor, q: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, list[Outcome]]:
    """Run n independent rounds: draft from q, verify against p."""
    g = torch.Generator().manual_seed(seed)
    drafts = _draw_drafts(q, n, g)
    return drafts, [verify_sampling(drafts[j], q, p, g) for j in range(n)]


def _first_tokens(drafts: torch.Tensor, outs: list[Outcome]) -> np.ndarray:
    """The first token each round emits: the draft token if accepted, else the correction."""
    d0 = drafts[:, 0].tolist()
    return np.array([d0[j] if o.accepted >= 1 else o.token for j, o in enumerate(outs)])


def _fit_pvalue(samples: np.ndarray, probs: torch.Tensor) -> float:
    """Chi-square goodness-of-fit p-value; 0 if any sample falls outside probs' support."""
    probs = probs.double().numpy()
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support] / probs[support].sum() * counts.sum()
    expected *= counts.sum() / expected.sum()  # scipy insists the totals agree to ~1e-8
    return float(chisquare(counts[support], expected).pvalue)


def _assert_distributed_as(samples: np.ndarray, probs: torch.Tensor) -> None:
    pvalue = _fit_pvalue(samples, probs)
    counts = np.bincount(samples, minlength=len(probs))
    assert pvalue > ALPHA, f"counts {counts} vs p {probs.tolist()}: p-value {pvalue:.2e}"


# -- sampling: distribution of emitted tokens -------------------------------------------------
def _case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(p [K+1, V], q [K, V]) for the named scenario, V = 8."""
    if name == "generic-K1":
        return _random_rows(2, 8, 1), _random_rows(1, 8, 2)
    if name == "generic-K3":
        return _random_rows(4, 8, 3), _random_rows(3, 8, 4)
    if name == "q-zeros":  # the drafter cannot propose tokens 5..7, the target likes them
        p = _random_rows(3, 8, 5, sharpness=0.5)
        q = _random_rows(2, 8, 6)
        q[0, 5:] = 0
        return p, q / q.sum(-1, keepdim=True)
    if name == "p-zeros":  # the target rules out the drafter's favourite tokens 0 and 3
        p = _random_rows(3, 8, 7)
        p[0, [0, 3]] = 0
        q = torch.stack([_dist(30, 5, 5, 30, 5, 5, 10, 10), _dist(*[1] * 8)])
        return p / p.sum(-1, keepdim=True), q
    raise KeyError(name)


@pytest.mark.parametrize("name", ["generic-K1", "generic-K3", "q-zeros", "p-zeros"])
def test_first_emitted_token_follows_p(name: str) -> None:
    p, q = _case(name)
    drafts, outs = _rounds(p, q, N, seed=11)
    _assert_distributed_as(_first_tokens(drafts, outs), p[0])
    # The test has power: the raw drafts (q) are rejected as samples of p.
    assert _fit_pvalue(drafts[:, 0].numpy(), p[0]) < 1e-6
    assert all(0 <= o.accepted <= q.shape[0] for o in outs)


def test_two_token_joint_distribution_k2() -> None:
    """With a position-independent p, tokens 1 and 2 of the output are i.i.d. p."""
    V = 6
    p_row = _dist(0.3, 0.25, 0.15, 0.12, 0.10, 0.08)
    p = p_row.expand(3, V).contiguous()
    q = torch.stack([_dist(0.1, 0.1, 0.4, 0.1, 0.2, 0.1), _dist(0.5, 0.05, 0.05, 0.1, 0.1, 0.2)])
    g = torch.Generator().manual_seed(21)
    drafts, again = _draw_drafts(q, N, g), _draw_drafts(q, N, g)
    pairs = np.empty(N, dtype=np.int64)
    for j in range(N):
        o = verify_sampling(drafts[j], q, p, g)
        d = drafts[j].tolist()
        if o.accepted == 2:
            x1, x2 = d
        elif o.accepted == 1:
            x1, x2 = d[0], o.token
        else:  # one token this round; the second is the next round's first token
            x1 = o.token
            o2 = verify_sampling(again[j], q, p, g)
            x2 = int(again[j, 0]) if o2.accepted >= 1 else o2.token
        pairs[j] = x1 * V + x2
    _assert_distributed_as(pairs, torch.outer(p_row, p_row).flatten())


def test_every_position_follows_its_own_p_row_including_the_bonus() -> None:
    """A different p row at every position (and a different q row): the token a round emits at
    position j, among rounds that got that far, follows p[j]. Position K is the bonus row, drawn
    only when every draft was accepted; a bonus drawn from the wrong row fails."""
    K, V = 3, 6
    p, q = _random_rows(K + 1, V, 91, sharpness=1.0), _random_rows(K, V, 92, sharpness=1.0)
    drafts, outs = _rounds(p, q, N, seed=93)
    d = drafts.tolist()
    for j in range(K + 1):
        emitted = np.array([d[r][j] if o.accepted > j else o.token for r, o in enumerate(outs) if o.accepted >= j])
        assert len(emitted) > 1000, f"position {j} reached only {len(emitted)} times"
        _assert_distributed_as(emitted, p[j])
    bonus = np.array([o.token for o in outs if o.accepted == K])
    _assert_distributed_as(bonus, p[K])
    for wrong in range(K):  # the rows really differ, and the test can tell them apart
        assert _fit_pvalue(bonus, p[wrong]) < 1e-6


def _markov_rows(seed: int, n_pos: int, V: int, sharpness: float) -> torch.Tensor:
    """[n_pos, V, V]: row [n, prev] is the distribution of the token at position n after `prev`."""
    return _random_rows(n_pos * V, V, seed, sharpness).view(n_pos, V, V)


def test_joint_law_of_a_whole_continuation_with_context_dependent_rows() -> None:
    """Speculative decoding of L tokens over several rounds, where both models' rows depend on the
    position and on the previous token (as a real model's do). The joint law of the L tokens must
    be the target's exact product of conditionals: accepted drafts, corrections, bonus tokens and
    round boundaries all included."""
    L, K, V = 4, 2, 3
    T, Q = _markov_rows(94, L, V, 1.2), _markov_rows(95, L, V, 1.2)
    g = torch.Generator().manual_seed(96)
    n = N
    codes = np.empty(n, dtype=np.int64)
    bonuses = 0
    for r in range(n):
        seq = [0]  # a fixed start token; positions count from 1
        while len(seq) <= L:
            pos0, k = len(seq) - 1, min(K, L - (len(seq) - 1) - 1)
            draft, q_rows, prev = [], [], seq[-1]
            for i in range(k):
                q_row = Q[pos0 + i, prev]
                prev = int(torch.multinomial(q_row, 1, generator=g))
                draft.append(prev)
                q_rows.append(q_row)
            ctx = [seq[-1]] + draft
            p_rows = torch.stack([T[pos0 + i, ctx[i]] for i in range(k + 1)])
            o = verify_sampling(torch.tensor(draft, dtype=torch.long),
                                torch.stack(q_rows) if k else torch.empty(0, V), p_rows, g)
            bonuses += k > 0 and o.accepted == k
            seq += draft[:o.accepted] + [o.token]
        code = 0
        for t in seq[1:L + 1]:
            code = code * V + t
        codes[r] = code
    exact = torch.ones(V ** L, dtype=torch.float64)
    for c in range(V ** L):
        toks = [int(x) for x in np.base_repr(c, V).zfill(L)]
        prev = 0
        for pos, t in enumerate(toks):
            exact[c] *= float(T[pos, prev, t])
            prev = t
    assert bonuses > n // 10  # bonus rows were really drawn
    _assert_distributed_as(codes, exact)
    # Power: the drafter's own law of the same continuation is rejected.
    draft_law = torch.ones(V ** L, dtype=torch.float64)
    for c in range(V ** L):
        prev = 0
        for pos, t in enumerate(int(x) for x in np.base_repr(c, V).zfill(L)):
            draft_law[c] *= float(Q[pos, prev, t])
            prev = t
    assert _fit_pvalue(codes, draft_law) < 1e-6


def test_k0_is_plain_sampling_from_p() -> None:
    p = _random_rows(1, 8, 31)
    g = torch.Generator().manual_seed(32)
    outs = [verify_sampling(torch.empty(0, dtype=torch.long), torch.empty(0, 8), p, g) for _ in range(5000)]
    assert all(o.accepted == 0 and o.tokens_committed == 1 for o in outs)
    _assert_distributed_as(np.array([o.token for o in outs]), p[0])


# -- sampling: edge cases ---------------------------------------------------------------------
def test_draft_with_zero_q_is_rejected_and_not_the_correction() -> None:
    p = torch.stack([_dist(0.7, 0.1, 0.1, 0.1), _dist(1, 1, 1, 1)])
    q = _dist(0, 1, 0, 0)[None]  # token 0 could not have been drawn from q
    g = torch.Generator().manual_seed(41)
    for _ in range(200):
        o = verify_sampling(torch.tensor([0]), q, p, g)
        assert o.accepted == 0 and o.token in (2, 3)


def test_zero_residual_falls_back_to_p_without_the_draft() -> None:
    # p <= q everywhere (p slightly unnormalised, as rounding can leave it): a rejection finds an
    # all-zero residual, and the correction must come from p with the rejected token excluded.
    p = torch.tensor([[0.25, 0.5], [0.5, 0.5]])
    q = torch.tensor([[0.5, 0.5]])
    g = torch.Generator().manual_seed(42)
    outs = {(o.accepted, o.token) for o in (verify_sampling(torch.tensor([0]), q, p, g) for _ in range(200))}
    assert (0, 1) in outs and any(k == 1 for k, _ in outs)
    assert all(t == 1 for k, t in outs if k == 0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 3), V=st.integers(2, 6))
def test_rejected_draft_is_never_the_correction(seed: int, K: int, V: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # Sparse rows (with zeros in p and q), and drafts that ignore q, so q(d) == 0 happens too.
    p = torch.rand(K + 1, V, generator=g) * (torch.rand(K + 1, V, generator=g) < 0.7)
    p[:, 0] += 0.1
    p[:, 1] += 0.1
    q = torch.rand(K, V, generator=g) * (torch.rand(K, V, generator=g) < 0.7)
    q[:, -1] += 0.1
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    draft = torch.randint(0, V, (K,), generator=g)
    for _ in range(20):
        o = verify_sampling(draft, q, p, g)
        assert 0 <= o.accepted <= K
        if o.accepted < K:
            assert o.token != int(draft[o.accepted])
        assert p[o.accepted, o.token] > 0


def test_shape_errors() -> None:
    p, q = torch.full((3, 4), 0.25), torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="q must be"):
        verify_sampling(torch.tensor([0, 1]), q[:1], p)
    with pytest.raises(ValueError, match="p must be"):
        verify_sampling(torch.tensor([0, 1]), q, p[:2])
    with pytest.raises(ValueError, match="target_logits"):
        verify_greedy(torch.tensor([0, 1]), p[:2])


# -- greedy -----------------------------------------------------------------------------------
def _logits_with_argmax(best: list[int], V: int = 6) -> torch.Tensor:
    x = torch.zeros(len(best), V)
    x[torch.arange(len(best)), torch.tensor(best)] = 5.0
    return x


def test_greedy_all_accepted_takes_bonus_from_last_row() -> None:
    o = verify_greedy(torch.tensor([3, 1, 4]), _logits_with_argmax([3, 1, 4, 5]))
    assert o == Outcome(3, 5) and o.tokens_committed == 4


def test_greedy_first_rejected() -> None:
    o = verify_greedy(torch.tensor([2, 1, 4]), _logits_with_argmax([3, 1, 4, 5]))
    assert o == Outcome(0, 3) and o.tokens_committed == 1


def test_greedy_stops_at_first_mismatch() -> None:
    # The later match at position 2 must not count: acceptance is a prefix.
    assert verify_greedy(torch.tensor([3, 0, 4]), _logits_with_argmax([3, 1, 4, 5])) == Outcome(1, 1)


def test_greedy_k0_is_argmax_decoding() -> None:
    assert verify_greedy(torch.empty(0, dtype=torch.long), _logits_with_argmax([2])) == Outcome(0, 2)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 5), V=st.integers(2, 6))
def test_batched_greedy_round_matches_row_by_row(seed: int, B: int, V: int) -> None:
    """The verifier's batched greedy path (one argmax for the batch) on rows of different draft
    lengths and pending tokens agrees with verify_greedy on each row's own logits."""
    from types import SimpleNamespace

    from actors.spec.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(0, 5, (B,), generator=g).tolist()
    pend = torch.randint(1, 3, (B,), generator=g).tolist()
    T = max(k + n for k, n in zip(ks, pend))
    # Small integer logits, so argmax ties are common and both paths must break them alike.
    logits = torch.randint(0, 3, (B, T, V), generator=g).float()
    seqs, rows = [], []
    for b, (k, n) in enumerate(zip(ks, pend)):
        best = logits[b, n - 1:n - 1 + k].argmax(-1)
        noise = torch.randint(0, V, (k,), generator=g)
        draft = torch.where(torch.rand(k, generator=g) < 0.75, best, noise).tolist()
        seqs.append(SimpleNamespace(draft=draft, req=SimpleNamespace(params=SamplingParams())))
        rows.append([0] * n + draft)
    out = round_outcomes(seqs, rows, logits, V)
    for b, (s, n) in enumerate(zip(seqs, pend)):
        ref = verify_greedy(torch.tensor(s.draft, dtype=torch.long), logits[b, n - 1:n + len(s.draft)])
        assert out[b] == (ref.accepted, ref.token)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(0, 4))
def test_sampling_rule_on_one_hot_rows_is_greedy(seed: int, K: int) -> None:
    """Greedy params turn both sides into one-hots, and the sampling rule then is the greedy one."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (K + 1, 5), generator=g).float()
    draft_logits = torch.randint(0, 3, (K, 5), generator=g).float()
    greedy = SamplingParams()
    q = probs_from_logits(draft_logits, greedy)
    draft = sample(q, g)
    o = verify_sampling(draft, q, probs_from_logits(target, greedy), g)
    assert o == verify_greedy(draft, target)


# -- sampling params --------------------------------------------------------------------------


def test_saguaro_is_lossless_and_steers_corrections_to_top_f() -> None:
    F = 2
    p = torch.stack([_dist(0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02)] * 2 + [_dist(*[1] * 8)])
    q_raw = torch.stack([_dist(0.40, 0.25, 0.05, 0.10, 0.05, 0.05, 0.05, 0.05), _random_rows(1, 8, 74)[0]])
    top_f = set(q_raw[0].topk(F).indices.tolist())

    def top_f_share(c: float, n: int) -> tuple[float, np.ndarray]:
        q = saguaro_scale(q_raw, torch.tensor([F, F]), c)
        drafts, outs = _rounds(p, q, n, seed=75)
        fixes = [o.token for o in outs if o.accepted == 0]
        return sum(t in top_f for t in fixes) / len(fixes), _first_tokens(drafts, outs)

    share_plain, _ = top_f_share(1.0, N // 4)
    share_saguaro, first = top_f_share(0.3, N)
    _assert_distributed_as(first, p[0])
    # Analytically 0 without scaling (p < q on the top-2) and about 0.68 with c = 0.3.
    assert share_saguaro > share_plain + 0.3


# -- reproducibility --------------------------------------------------------------------------
def _seeded_run(seed: int) -> list[tuple[int, int]]:
    p, q = _case("generic-K3")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(200):
        draft = sample(q, g)
        o = verify_sampling(draft, q, p, g)
        out.append((o.accepted, o.token))
    return out


def test_same_seed_same_outcomes() -> None:
    assert _seeded_run(81) == _seeded_run(81)
    assert _seeded_run(81) != _seeded_run(82)
