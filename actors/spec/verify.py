"""Lossless verification of a draft against the target (Leviathan et al., 2023).

A round proposes K draft tokens d_0..d_{K-1}; the target scores K+1 positions.

greedy:   accept the longest prefix with d_i == argmax p_i; k = its length; t* = argmax p_k.
sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection,
          position k, draw t* from normalize(max(p_k - q_k, 0)); if all K are accepted, draw the
          bonus t* from p_K. Each emitted token is then distributed exactly as under p alone.

Either way a round commits k + 1 tokens: the accepted prefix, then t*.

verify_batch applies the same rule to a whole verify batch at once, on the logits' device, and
round_outcomes uses it; verify_greedy and verify_sampling stay as the readable per-sequence rule
that it must reproduce exactly (tests/test_verify_batch.py).

A rejected draft token can never be the correction token (greedy: it differed from the argmax;
sampling: a rejection needs p(d) < q(d), so the residual is zero there). The drafter relies on
this when it picks the correction tokens to pre-draft for, and the edge cases below keep it true.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.spec.sampling import ACCEPT, TOKEN, keyed_uniforms, probs_from_logits, probs_per_row, row_settings, sample


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
    `key` = (seed, position of draft[0]) from keyed draws (actors/spec/sampling.py: the test at each
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


def verify_batch(draft: torch.Tensor, lengths: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                 u_accept: torch.Tensor, u_token: torch.Tensor,
                 greedy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of verify_greedy / verify_sampling for B sequences at once, on p's device.

    draft [B, Kmax] (row b padded after its lengths[b] tokens), p [B, Kmax+1, V] (row b's rows
    0..lengths[b] are its target rows), q [B, Kmax, V], u_accept [B, Kmax] and u_token [B, Kmax+1]
    float64 (the keyed uniforms of each position's test and emitted token), greedy a host bool
    tensor [B] or None (those rows compare with argmax p and read no q or uniforms). Returns
    accepted k [B] and token t* [B] as tensors on p's device: nothing here waits on the device.

    Gives the same (k, t*) as the per-sequence functions for the same uniforms: the same float64
    test u * q(d) < p(d), the same edge cases, the same inverse-CDF draw (actors/spec/sampling.py
    `sample`) from the same float64 rows.
    """
    dev, (B, K), V = p.device, draft.shape, p.shape[-1]
    draft, lengths, q = draft.to(dev), lengths.to(dev), q.to(dev)
    u_accept, u_token = u_accept.to(dev), u_token.to(dev)
    ar = torch.arange(B, device=dev)
    g_rows = greedy.nonzero()[:, 0].to(dev) if greedy is not None and greedy.any() else None  # a host mask
    # -- k: the first position whose test fails (found with a cumprod; padding fails them all) --
    d = draft[..., None]
    pd, qd = p[:, :K].gather(-1, d)[..., 0].double(), q.gather(-1, d)[..., 0].double()
    # u < p/q written as u * q < p: no division, and q(d) == 0 is an explicit reject.
    passed = (qd > 0) & (u_accept * qd < pd)
    if g_rows is not None:  # argmax over the greedy rows only
        best = p.index_select(0, g_rows).argmax(-1)
        passed.index_copy_(0, g_rows, draft.index_select(0, g_rows) == best[:, :K])
    k = (passed & (torch.arange(K, device=dev) < lengths[:, None])).long().cumprod(-1).sum(-1)
    # -- t*: a draw from row k of p, or at a rejection from the residual there ---------------
    # Rows are picked with index_select (row copies, not a gather) and worked on in place, in
    # float64 like the host rule's: few and small buffers, which a host's malloc can reuse.
    pk = p.reshape(-1, V).index_select(0, ar * (K + 1) + k)
    dist, dk, rejected = pk.double(), k, torch.zeros(B, dtype=torch.bool, device=dev)  # K == 0: all bonus
    if K:
        rejected = k < lengths
        kc = k.clamp(max=K - 1)
        dk = draft.gather(-1, kc[:, None])
        # d is excluded from the residual (a genuine rejection already has a zero there; this
        # matters when q(d) == 0), and from p where an all-zero residual falls back to it.
        dist.sub_(q.reshape(-1, V).index_select(0, ar * K + kc)).clamp_min_(0).scatter_(-1, dk, 0)
        use_residual = rejected & (dist.sum(-1) > 0)
        torch.where(use_residual[:, None], dist, pk, out=dist)   # pk's floats widen exactly
        dist.scatter_(-1, dk, torch.where(rejected[:, None], 0.0, dist.gather(-1, dk)))
        dk = dk[:, 0]
    cum = dist.cumsum_(-1)
    u = u_token.gather(-1, k[:, None]) * cum[:, -1:]
    t = torch.searchsorted(cum, u, right=True).clamp_(max=V - 1)[:, 0]
    # Rejected with nothing left: p is entirely on d, the only token p allows (see _correction).
    t = torch.where(rejected & (cum[:, -1] <= 0), dk, t)
    if g_rows is not None:
        t.index_copy_(0, g_rows, best.gather(-1, k.index_select(0, g_rows)[:, None])[:, 0])
    return k, t


def round_outcomes(seqs, rows: list[list[int]], logits: torch.Tensor, vocab: int,
                   batched: bool | None = None) -> list[tuple[int, int]]:
    """(k, t*) for each sequence of one batched verify forward. Row i of `logits` scores
    rows[i] = pending committed tokens + draft; a sequence's draft is `s.draft` (with q rows
    `s.q` when sampling with `s.req.params`; draws keyed by `s.seed` and position). All-greedy
    batches take one argmax. Otherwise, on a GPU: one probs_per_row and one verify_batch on the
    logits' device and one read of the results at the end; on a CPU the same rule one sequence at
    a time (`_per_sequence`: faster there). `batched` overrides that choice (tests)."""
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
    if not (logits.device.type != "cpu" if batched is None else batched):
        return _per_sequence(seqs, n_pend, logits, vocab)
    dev, (B, T, V) = logits.device, logits.shape
    Ks, params = [len(s.draft) for s in seqs], [s.req.params for s in seqs]
    K = max(Ks)
    # The K_b + 1 rows each sequence verifies (its rows from its last pending token on). Only
    # they are processed: one slice of the logits when every sequence has K drafts after as
    # many pending tokens, else picked by flat row number and laid out padded.
    if len(set(Ks)) == 1 and len(set(n_pend)) == 1:
        x, at = logits[:, n_pend[0] - 1:n_pend[0] + K].reshape(B * (K + 1), V), None
        per_row = [sp for sp in params for _ in range(K + 1)]
    else:
        src = [b * T + n_pend[b] - 1 + i for b in range(B) for i in range(Ks[b] + 1)]
        dst = [b * (K + 1) + i for b in range(B) for i in range(Ks[b] + 1)]
        per_row, at = [params[r // (K + 1)] for r in dst], torch.tensor([src, dst]).to(dev)
        x = logits.reshape(B * T, V).index_select(0, at[0])
    probs = probs_per_row(x, *row_settings(per_row))
    if at is not None:
        probs = probs.new_zeros(B * (K + 1), V).index_copy_(0, at[1], probs)
    # The rest of the host data in three small copies: the q rows, the ints (drafts and lengths)
    # and the keyed uniforms (float64, like the host rule's).
    q = _padded_q(seqs, K, vocab, dev)
    ints = torch.tensor([s.draft + [0] * (K - kd) + [kd] for s, kd in zip(seqs, Ks)]).to(dev)
    floats = torch.tensor([[0.0] * (2 * K + 1) if sp.greedy else round_uniforms(s.seed, len(s.tokens), kd, K)
                           for s, kd, sp in zip(seqs, Ks, params)], dtype=torch.float64).to(dev)
    k, t = verify_batch(ints[:, :K], ints[:, K], probs.view(B, K + 1, V), q, floats[:, :K], floats[:, K:],
                        torch.tensor([sp.greedy for sp in params]))
    return list(zip(*torch.stack([k, t]).tolist()))


def _per_sequence(seqs, n_pend: list[int], logits: torch.Tensor, vocab: int) -> list[tuple[int, int]]:
    """The reference rule one sequence at a time: what runs on a CPU. There the batched rule's
    [B, K+1, V] temporaries come from fresh pages on every round (glibc maps buffers that large
    anew), which made it 2.7x slower at V = 49152 (cluster/bench_verify.py with --batched and
    without: 14.2 against 5.3 ms per round, B = 8, K = 4); one sequence's rows stay in cache.
    Both give identical (k, t*) (tests/test_verify_batch.py)."""
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


def round_uniforms(seed: int, pos: int, kd: int, K: int) -> list[float]:
    """The keyed uniforms of one round whose kd-token draft starts at position `pos`, as one row
    of verify_batch's uniforms padded to K: the kd tests (ACCEPT), then the kd + 1 emitted-token
    draws (TOKEN), 2K + 1 values; the same numbers verify_sampling draws with key=(seed, pos)."""
    pad = [0.0] * (K - kd)
    return (keyed_uniforms(seed, range(pos, pos + kd), ACCEPT) + pad
            + keyed_uniforms(seed, range(pos, pos + kd + 1), TOKEN) + pad)


def _padded_q(seqs, K: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[B, K, V] q rows of the sampling sequences' drafts, zeros elsewhere (greedy rows need
    none): the rows move in one copy, then land in place on the device."""
    own = [not s.req.params.greedy and len(s.draft) > 0 for s in seqs]
    if not any(own):
        return torch.zeros(len(seqs), K, vocab, device=device)
    rows = torch.cat([s.q for s, o in zip(seqs, own) if o]).to(device)
    if len(rows) == len(seqs) * K:  # every sequence samples a K-token draft: already in place
        return rows.view(len(seqs), K, vocab)
    lengths = torch.tensor([len(s.draft) if o else 0 for s, o in zip(seqs, own)])
    bi, ii = (torch.arange(K) < lengths[:, None]).nonzero(as_tuple=True)
    q = rows.new_zeros(len(seqs) * K, vocab).index_copy_(0, (bi * K + ii).to(device), rows)
    return q.view(len(seqs), K, vocab)
