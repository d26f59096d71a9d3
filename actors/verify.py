"""Lossless verification of a draft against the target (Leviathan et al., 2023).

A round proposes K draft tokens d_0..d_{K-1}; the target scores K+1 positions.

greedy:   accept the longest prefix with d_i == argmax p_i; k = its length; t* = argmax p_k.
sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection,
          position k, draw t* from normalize(max(p_k - q_k, 0)); if all K are accepted, draw the
          bonus t* from p_K. Each emitted token is then distributed exactly as under p alone.

Either way a round commits k + 1 tokens: the accepted prefix, then t*.

A rejected draft token can never be the correction token (greedy: it differed from the argmax;
sampling: a rejection needs p(d) < q(d), so the residual is zero there). The drafter relies on
this when it picks the correction tokens to pre-draft for, and the edge cases below keep it true.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.sampling import ACCEPT, TOKEN, keyed_uniforms, probs_from_logits, sample


@dataclass(frozen=True)
class Outcome:
    accepted: int   # k: draft tokens accepted, 0..K
    token: int      # t*: the correction token, or the bonus token when k == K

    @property
    def tokens_committed(self) -> int:
        return self.accepted + 1


def _check_shapes(draft: torch.Tensor, rows: torch.Tensor, name: str) -> int:
    K = draft.numel()
    if draft.dim() != 1:
        raise ValueError(f"draft must be 1-D [K], got shape {tuple(draft.shape)}")
    if rows.dim() != 2 or rows.shape[0] != K + 1:
        raise ValueError(f"{name} must be [K+1, V] = [{K + 1}, V], got shape {tuple(rows.shape)}")
    return K


def verify_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> Outcome:
    """draft [K], target_logits [K+1, V] (logits or probabilities). K == 0 is plain decoding."""
    K = _check_shapes(draft, target_logits, "target_logits")
    best = target_logits.argmax(-1)
    k = int((draft == best[:K]).long().cumprod(0).sum()) if K else 0
    return Outcome(k, int(best[k]))


def verify_sampling(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                    generator: torch.Generator | None = None, key: tuple[int, int] | None = None) -> Outcome:
    """draft [K], q [K, V], p [K+1, V] -> Outcome. All randomness comes from `generator`, or with
    `key` = (seed, position of draft[0]) from keyed draws (actors/sampling.py: the test at each
    position and the token emitted there each have their own uniform).

    q must be the distribution each draft token was really drawn from (after temperature, top-k,
    top-p and any Saguaro scaling); p is the target's rows processed with the same settings.

    Edge cases:
    - q(d) == 0: d could not have been drawn from q, so the draft is inconsistent; it is rejected
      (no division by zero) and d is excluded from the correction draw, keeping the invariant
      that a rejected token is never the correction token.
    - the residual max(p - q, 0) sums to 0: only possible when p == q numerically on that row (so
      the rejection itself had ~0 probability); t* is drawn from p with d excluded.
    """
    K = _check_shapes(draft, p, "p")
    # q rows arrive over the data plane (on the GPU with NCCL) while p may be on the host: one
    # device for both, or the residual p - q would mix devices at the first rejection.
    q, draft = q.to(p.device), draft.to(p.device)
    if tuple(q.shape) != (K, p.shape[1]):
        raise ValueError(f"q must be [K, V] = [{K}, {p.shape[1]}], got shape {tuple(q.shape)}")
    if K:
        # Python floats are doubles, so tiny ratios are not flushed to zero; a few list reads are
        # also far cheaper than a chain of small tensor ops in this per-sequence path.
        idx = torch.arange(K, device=draft.device)
        pd, qd = p[idx, draft].tolist(), q[idx, draft].tolist()
        if key is not None:
            u = keyed_uniforms(key[0], range(key[1], key[1] + K), ACCEPT)
        else:
            u = torch.rand(K, generator=generator, dtype=torch.float64, device=p.device).tolist()
        for i in range(K):
            # u < p/q written as u * q < p: no division, and q(d) == 0 is an explicit reject.
            if not (qd[i] > 0 and u[i] * qd[i] < pd[i]):
                return Outcome(i, _correction(p[i], q[i], int(draft[i]), generator, _token_key(key, i)))
    return Outcome(K, _draw(p[K].double(), generator, _token_key(key, K)))


def _token_key(key: tuple[int, int] | None, i: int) -> list[float] | None:
    return None if key is None else keyed_uniforms(key[0], [key[1] + i], TOKEN)


def _draw(probs: torch.Tensor, generator: torch.Generator | None, uniforms: list[float] | None) -> int:
    if uniforms is not None:
        return int(sample(probs, uniforms=uniforms))
    return int(torch.multinomial(probs, 1, generator=generator))


def _correction(p_row: torch.Tensor, q_row: torch.Tensor, rejected: int,
                generator: torch.Generator | None, uniforms: list[float] | None = None) -> int:
    """Draw t* from normalize(max(p - q, 0)), never returning the rejected token."""
    residual = (p_row.double() - q_row.double()).clamp_min(0)
    # A genuine rejection already has a zero residual at d; this only matters when q(d) == 0.
    residual[rejected] = 0
    if residual.sum() <= 0:
        residual = p_row.double().clone()
        residual[rejected] = 0
        if residual.sum() <= 0:
            # p is entirely on d, yet d was rejected: inputs are malformed (q(d) == 0 with
            # p(d) == 1). Returning d is the only choice that p allows.
            return rejected
    return _draw(residual, generator, uniforms)


def round_outcomes(seqs, rows: list[list[int]], logits: torch.Tensor, vocab: int) -> list[tuple[int, int]]:
    """(k, t*) for each sequence of one batched verify forward. Row i of `logits` scores
    rows[i] = pending committed tokens + draft; a sequence's draft is `s.draft` (with q rows
    `s.q` when sampling with `s.req.params`; draws keyed by `s.seed` and position). All-greedy batches
    take one argmax."""
    n_pend = [len(r) - len(s.draft) for s, r in zip(seqs, rows)]
    if all(s.req.params.greedy for s in seqs):
        # One argmax for the whole batch, then a plain comparison per row: this runs right after
        # the forward, with cold caches, where every extra tensor op costs several times its
        # warm price.
        best = logits.argmax(-1).tolist()
        out = []
        for s, b, n in zip(seqs, best, n_pend):
            b, k = b[n - 1:], 0
            while k < len(s.draft) and s.draft[k] == b[k]:
                k += 1
            out.append((k, b[k]))
        return out
    out = []
    for i, s in enumerate(seqs):
        kd, p0 = len(s.draft), n_pend[i] - 1
        rows_i = logits[i, p0:p0 + kd + 1]
        d = torch.tensor(s.draft, dtype=torch.long)
        if s.req.params.greedy:
            o = verify_greedy(d, rows_i)
        else:
            q = s.q if kd else torch.empty(0, vocab)
            o = verify_sampling(d, q, probs_from_logits(rows_i, s.req.params), key=(s.seed, len(s.tokens)))
        out.append((o.accepted, o.token))
    return out
