"""How many correction-token candidates to pre-draft at each acceptance depth.

A round ends at depth k (k drafts accepted, then a correction) with some probability p_k; the
branch budget is spent in proportion to those odds, so the candidates sit where outcomes land.
With per-token acceptance alpha a geometric model gives p_k = alpha^k (1 - alpha) for k < K and
alpha^K for k = K. Real acceptance is not geometric (a draft that survives its first tokens
tends to survive to the end), so the tracker mixes that prior with the depths it has seen.
"""
from __future__ import annotations


def outcome_odds(alpha: float, k: int) -> list[float]:
    a = min(max(alpha, 0.02), 0.98)  # never starve a depth completely on a short history
    return [a ** j * (1 - a) for j in range(k)] + [a ** k]


def split_budget(budget: int, odds: list[float]) -> list[int]:
    """Split `budget` branches over depths in proportion to `odds` (largest remainders)."""
    if budget <= 0:
        return [0] * len(odds)
    total = sum(odds)
    raw = [budget * w / total for w in odds]
    fan = [int(r) for r in raw]
    rest = budget - sum(fan)
    for j in sorted(range(len(odds)), key=lambda j: raw[j] - fan[j], reverse=True)[:rest]:
        fan[j] += 1
    return fan


class AcceptanceTracker:
    """Per sequence: running acceptance rate and the depths rounds actually ended at, each with
    a prior so the first rounds have a sensible estimate."""

    def __init__(self, prior: float = 0.6, weight: int = 8):
        self.accepted = prior * weight
        self.proposed = float(weight)
        self.weight = weight
        self.depths: dict[int, list[int]] = {}   # draft length -> rounds that ended at depth k

    def update(self, accepted: int, proposed: int) -> None:
        self.accepted += accepted
        self.proposed += proposed
        if proposed:
            self.depths.setdefault(proposed, [0] * (proposed + 1))[accepted] += 1

    @property
    def alpha(self) -> float:
        return self.accepted / self.proposed

    def odds(self, k: int) -> list[float]:
        """Odds of each outcome depth 0..k for a draft of k tokens: the geometric prior (worth
        `weight` rounds) plus the observed depths."""
        prior = outcome_odds(self.alpha, k)
        seen = self.depths.get(k, [0] * (k + 1))
        return [self.weight * p + n for p, n in zip(prior, seen)]


def top_candidates(rows: list, exclude: list[int | None], fans: list[int]) -> list[list[int]]:
    """Each row's top fans[i] token ids (best first), `exclude[i]` never among them (the drafted
    token at that depth: a rejected token is never the correction). All rows go through one topk
    and one read-back for the round: per (sequence, depth) each was a device sync of its own, up
    to 288 a round at 70B settings."""
    import torch

    if not rows:
        return []
    scores = torch.stack(rows)   # [N, V], a copy: the sequences' distributions stay as they are
    ex = [(i, t) for i, t in enumerate(exclude) if t is not None]
    if ex:
        at = torch.tensor(ex, dtype=torch.long).to(scores.device, non_blocking=True)
        scores[at[:, 0], at[:, 1]] = float("-inf")
    k = min(max(fans), scores.shape[1] - 1)
    top = scores.topk(k, dim=-1).indices.tolist()   # the one read-back
    return [t[:min(f, k)] for t, f in zip(top, fans)]
