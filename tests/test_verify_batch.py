"""Batched verification against the per-sequence rule.

verify_batch (actors/spec/verify.py) must give exactly the (k, t*) of verify_greedy / verify_sampling
for the same keyed uniforms, edge cases included, and probs_per_row (actors/spec/sampling.py) must give
each row what probs_from_logits gives it alone; round_outcomes, which joins the two, must agree
with the per-sequence rule on batches that mix greedy and sampling sequences. The chi-square
tests then check that what the batched rule emits follows p, as tests/test_verify.py does for the
per-sequence rule.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.spec.sampling import SamplingParams, probs_from_logits, probs_per_row, row_settings
from actors.spec.verify import round_outcomes, round_uniforms, verify_batch, verify_greedy, verify_sampling
from tests.test_verify import N, _assert_distributed_as, _case, _draw_drafts, _fit_pvalue, _random_rows

torch.set_num_threads(1)


# -- helpers ---------------------------------------------------------------------------------
def _pick(g: torch.Generator, options: list):
    return options[int(torch.randint(0, len(options), (1,), generator=g))]


def _random_params(g: torch.Generator, V: int) -> SamplingParams:
    """Greedy, or a temperature with top-k (often tied at the cut, sometimes >= V) and top-p."""
    t = _pick(g, [0.0, 0.0, 0.5, 1.0, 1.7])
    top_k, top_p = _pick(g, [0, 0, 1, 2, 3, V, V + 2]), _pick(g, [1.0, 1.0, 0.3, 0.6, 0.9])
    return SamplingParams(temperature=t, top_k=top_k, top_p=top_p)


def _random_logits(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Gaussian rows, or small integers where argmax, top-k and top-p all meet ties."""
    ints = torch.randint(-2, 3, shape, generator=g).float()
    return torch.where(torch.rand(shape[:-1], generator=g)[..., None] < 0.5, ints, 2 * torch.randn(shape, generator=g))


def _sparse_rows(g: torch.Generator, n: int, V: int) -> torch.Tensor:
    """n distributions over V tokens with about a third of their entries zero."""
    x = torch.rand(n, V, generator=g) * (torch.rand(n, V, generator=g) < 0.7)
    x[:, int(torch.randint(0, V, (1,), generator=g))] += 0.05
    return x / x.sum(-1, keepdim=True)


def _random_round(g: torch.Generator, kd: int, V: int, greedy: bool) -> dict:
    """One sequence's round: draft [kd], p [kd+1, V], q [kd, V], with every edge case of the rule
    planted at some positions."""
    p, q = _sparse_rows(g, kd + 1, V), _sparse_rows(g, kd, V)
    draft = torch.multinomial(q, 1, generator=g)[:, 0] if kd else torch.empty(0, dtype=torch.long)
    for i in range(kd):
        d = int(draft[i])
        case = _pick(g, ["drawn from q", "q(d) = 0", "p == q", "p one-hot on d", "p < q", "d = argmax p"])
        if case == "q(d) = 0":  # a draft q could not have drawn: rejected, never the correction
            q[i, d] = 0
            q[i, (d + 1) % V] += 0.1
        elif case == "p == q":  # always accepted
            p[i] = q[i]
        elif case == "p one-hot on d":  # with q(d) = 0: rejected, and d is all p allows
            p[i] = 0
            p[i, d] = 1
            q[i, d] = 0
            q[i, (d + 1) % V] += 0.1
        elif case == "p < q":  # unnormalised p below q everywhere: a rejection finds no residual
            p[i] = q[i] * 0.5
        elif case == "d = argmax p":
            draft[i] = p[i].argmax()
        q[i] /= q[i].sum()
    if greedy and _pick(g, [True, False]):  # as probs_from_logits gives a greedy row; else argmax p
        p = torch.nn.functional.one_hot(p.argmax(-1), V).float()
    seed, pos = (int(x) for x in torch.randint(0, 2**31, (2,), generator=g))
    return {"draft": draft, "p": p, "q": q, "greedy": greedy, "seed": seed, "pos": pos}


def _reference(r: dict) -> tuple[int, int]:
    if r["greedy"]:
        o = verify_greedy(r["draft"], r["p"])
    else:
        o = verify_sampling(r["draft"], r["q"], r["p"], key=(r["seed"], r["pos"]))
    return o.accepted, o.token


def _batched(rounds: list[dict], K: int, g: torch.Generator) -> list[tuple[int, int]]:
    """verify_batch on the rounds padded to K; the padding is noise, so reading it would show."""
    B, V = len(rounds), rounds[0]["p"].shape[-1]
    draft = torch.randint(0, V, (B, K), generator=g)
    p, q = torch.rand(B, K + 1, V, generator=g), torch.rand(B, K, V, generator=g)
    u = []
    for b, r in enumerate(rounds):
        kd = len(r["draft"])
        draft[b, :kd], p[b, :kd + 1], q[b, :kd] = r["draft"], r["p"], r["q"]
        u.append(round_uniforms(r["seed"], r["pos"], kd, K))
    u = torch.tensor(u, dtype=torch.float64)
    lengths = torch.tensor([len(r["draft"]) for r in rounds])
    greedy = torch.tensor([r["greedy"] for r in rounds])
    k, t = verify_batch(draft, lengths, p, q, u[:, :K], u[:, K:], greedy)
    return list(zip(k.tolist(), t.tolist()))


# -- per-row processing -----------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), V=st.integers(2, 10))
def test_probs_per_row_is_probs_from_logits_row_by_row(seed: int, n: int, V: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = _random_logits(g, n, V)
    params = [_random_params(g, V) for _ in range(n)]
    out = probs_per_row(logits, *row_settings(params))
    for row, x, got in zip(logits, params, out):
        assert torch.equal(got, probs_from_logits(row, x)), x
        if not x.greedy and 0 < x.top_k < V and x.top_p == 1:  # exactly k tokens, none below one dropped
            kept = got > 0
            assert int(kept.sum()) == x.top_k and (kept.sum() == V or row[kept].min() >= row[~kept].max())


# -- verify_batch against the per-sequence rule -----------------------------------------------
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), K=st.integers(0, 4), V=st.integers(2, 6))
def test_verify_batch_is_the_per_sequence_rule(seed: int, B: int, K: int, V: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rounds = [_random_round(g, int(torch.randint(0, K + 1, (1,), generator=g)), V, _pick(g, [False, False, True]))
              for _ in range(B)]
    assert _batched(rounds, K, g) == [_reference(r) for r in rounds]


@pytest.mark.parametrize("case", ["q(d) = 0", "zero residual", "p entirely on d"])
def test_verify_batch_edge_cases(case: str) -> None:
    """The per-sequence tests' edge cases, each over 200 keyed draws in one batch."""
    if case == "q(d) = 0":
        p, q = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25] * 4]), torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    elif case == "zero residual":
        p, q = torch.tensor([[0.25, 0.5], [0.5, 0.5]]), torch.tensor([[0.5, 0.5]])
    else:
        p, q = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]), torch.tensor([[0.0, 0.5, 0.5]])
    rounds = [{"draft": torch.tensor([0]), "p": p, "q": q, "greedy": False, "seed": s, "pos": 7} for s in range(200)]
    got = _batched(rounds, 1, torch.Generator().manual_seed(1))
    assert got == [_reference(r) for r in rounds]
    if case == "q(d) = 0":
        assert {t for _, t in got} == {2, 3} and all(k == 0 for k, _ in got)
    elif case == "zero residual":  # accepted half the time; rejections fall back to p without d
        assert {k for k, _ in got} == {0, 1} and all(t == 1 for k, t in got if k == 0)
    else:
        assert set(got) == {(0, 0)}


def test_verify_batch_at_the_boundaries_of_its_uniforms() -> None:
    """Hand-picked uniforms on the rule's boundaries: u * q(d) == p(d) rejects (the test is
    strict), and a uniform landing exactly on a step of the running sum takes the next token
    that has mass, never a zero-probability one (searchsorted right=True, as `sample`)."""
    p = torch.tensor([[[0.25, 0.25, 0.5], [0.5, 0.0, 0.5]]])
    q = torch.tensor([[[0.5, 0.25, 0.25]]])

    def run(u_accept: float, u_token: list[float]) -> tuple[int, int]:
        u = torch.tensor([[u_accept] + u_token], dtype=torch.float64)
        k, t = verify_batch(torch.tensor([[0]]), torch.tensor([1]), p, q, u[:, :1], u[:, 1:])
        return int(k), int(t)

    assert run(0.5, [0.0, 0.0])[0] == 0            # 0.5 * 0.5 == 0.25: rejected
    assert run(0.5 - 2**-53, [0.0, 0.0])[0] == 1   # just below: accepted
    assert run(0.0, [0.0, 0.5]) == (1, 2)          # the bonus row's step at 0.5 leads to token 2, not 1
    assert run(0.9, [0.5, 0.0]) == (0, 2)          # residual [0, 0, 0.25] after a rejection: token 2


def test_verify_batch_large_vocabulary() -> None:
    """A real vocabulary's width (4096 tokens, most of them tiny steps in the running sum), with
    every draft length up to K and some greedy rows in the batch."""
    g = torch.Generator().manual_seed(3)
    V, K = 4096, 3
    rounds = []
    for b in range(48):
        kd = b % (K + 1)
        p, q = _random_rows(kd + 1, V, 1000 + b, sharpness=2.0), _random_rows(kd, V, 2000 + b, sharpness=2.0)
        draft = torch.multinomial(q, 1, generator=g)[:, 0] if kd else torch.empty(0, dtype=torch.long)
        rounds.append({"draft": draft, "p": p, "q": q, "greedy": b % 5 == 0, "seed": b, "pos": 100 + b})
    for r in rounds:
        if r["greedy"]:
            r["p"] = torch.nn.functional.one_hot(r["p"].argmax(-1), V).float()
    assert _batched(rounds, K, g) == [_reference(r) for r in rounds]


# -- the batched rule emits p -----------------------------------------------------------------
def _batch_rounds(p: torch.Tensor, q: torch.Tensor, lengths: torch.Tensor, seed: int):
    """len(lengths) rounds in one verify_batch: draft from q, verify against p; uniforms from a
    generator (verify_batch takes any)."""
    g = torch.Generator().manual_seed(seed)
    n, K = len(lengths), q.shape[0]
    drafts = _draw_drafts(q, n, g)
    u = torch.rand(n, 2 * K + 1, generator=g, dtype=torch.float64)
    k, t = verify_batch(drafts, lengths, p.expand(n, -1, -1), q.expand(n, -1, -1), u[:, :K], u[:, K:])
    return drafts, k, t


@pytest.mark.parametrize("name", ["generic-K1", "generic-K3", "q-zeros", "p-zeros"])
def test_first_emitted_token_follows_p(name: str) -> None:
    p, q = _case(name)
    drafts, k, t = _batch_rounds(p, q, torch.full((N,), q.shape[0]), seed=11)
    first = torch.where(k >= 1, drafts[:, 0], t).numpy()
    _assert_distributed_as(first, p[0])
    assert _fit_pvalue(drafts[:, 0].numpy(), p[0]) < 1e-6  # the test has power


def test_every_position_follows_its_own_p_row_with_mixed_lengths() -> None:
    """A different p and q row at every position, and rounds of every length 0..K in one batch:
    among rounds that reach position j, the token emitted there follows p[j] (a draft accepted,
    a correction, or the bonus when the round's draft ends at j)."""
    K, V = 3, 6
    p, q = _random_rows(K + 1, V, 91, sharpness=1.0), _random_rows(K, V, 92, sharpness=1.0)
    lengths = torch.randint(0, K + 1, (4 * N,), generator=torch.Generator().manual_seed(100))
    drafts, k, t = _batch_rounds(p, q, lengths, seed=0)
    for j in range(K + 1):
        reached = (k >= j) & (lengths >= j)
        emitted = torch.where(k > j, drafts[:, min(j, K - 1)], t)[reached].numpy()
        assert len(emitted) > 1000, f"position {j} reached only {len(emitted)} times"
        _assert_distributed_as(emitted, p[j])
    bonus = t[k == lengths]
    for j in range(K + 1):  # bonus rows come from the row where each round's draft ends
        _assert_distributed_as(bonus[lengths[k == lengths] == j].numpy(), p[j])
    assert _fit_pvalue(t[(k == lengths) & (lengths == K)].numpy(), p[0]) < 1e-6


# -- round_outcomes ---------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 5), V=st.integers(2, 8), aligned=st.booleans())
def test_round_outcomes_mixed_batch_is_the_per_sequence_rule(seed: int, B: int, V: int, aligned: bool) -> None:
    """Greedy and sampling sequences (temperature, top-k, top-p) in one batched forward, with
    drafts of different lengths after different numbers of pending tokens, or (aligned) all of
    one length after as many pending tokens."""
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(0, 5, (1 if aligned else B,), generator=g).expand(B).tolist()
    pend = torch.randint(1, 3, (1 if aligned else B,), generator=g).expand(B).tolist()
    logits = _random_logits(g, B, max(k + n for k, n in zip(ks, pend)), V)
    seqs, rows, expected = [], [], []
    for b, (kd, n) in enumerate(zip(ks, pend)):
        params = _random_params(g, V)
        if b == 0 and params.greedy:  # keep the batch off the all-greedy path
            params = SamplingParams(temperature=0.9, top_k=params.top_k, top_p=params.top_p)
        q = _sparse_rows(g, kd, V)
        # Mostly drawn from q; otherwise any token, so q(d) == 0 happens too.
        draft = torch.where(torch.rand(kd, generator=g) < 0.8, torch.multinomial(q, 1, generator=g)[:, 0] if kd
                            else torch.empty(0, dtype=torch.long), torch.randint(0, V, (kd,), generator=g))
        s = SimpleNamespace(draft=draft.tolist(), q=None if params.greedy else q, seed=b * 7919 + seed,
                            tokens=[0] * int(torch.randint(3, 40, (1,), generator=g)),
                            req=SimpleNamespace(params=params))
        seqs.append(s)
        rows.append([0] * n + s.draft)
        target = logits[b, n - 1:n + kd]
        if params.greedy:
            o = verify_greedy(draft, target)
        else:
            o = verify_sampling(draft, q, probs_from_logits(target, params), key=(s.seed, len(s.tokens)))
        expected.append((o.accepted, o.token))
    before = logits.clone()
    assert round_outcomes(seqs, rows, logits, V, batched=True) == expected   # the GPU's path
    assert torch.equal(logits, before)  # processing works on its own buffers, never the forward's
    assert round_outcomes(seqs, rows, logits, V) == expected                 # the CPU's

