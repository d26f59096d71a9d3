"""How many correction-token candidates to pre-draft at each acceptance depth.

With per-token acceptance alpha, a round stops at depth k (k drafts accepted, then a correction)
with probability alpha^k (1 - alpha) for k < K, and accepts everything with alpha^K. Spending the
branch budget in proportion to those odds puts the candidates where outcomes actually land —
better than a flat split because acceptance lengths are roughly geometric.
"""
from __future__ import annotations


def outcome_odds(alpha: float, k: int) -> list[float]:
    a = min(max(alpha, 0.02), 0.98)  # never starve a depth completely on a short history
    return [a ** j * (1 - a) for j in range(k)] + [a ** k]


def geometric_fan_out(budget: int, k: int, alpha: float) -> list[int]:
    """Split `budget` branches over depths 0..k by outcome odds (largest remainders)."""
    if budget <= 0:
        return [0] * (k + 1)
    odds = outcome_odds(alpha, k)
    raw = [budget * w for w in odds]
    fan = [int(r) for r in raw]
    rest = budget - sum(fan)
    for j in sorted(range(k + 1), key=lambda j: raw[j] - fan[j], reverse=True)[:rest]:
        fan[j] += 1
    return fan


class AcceptanceTracker:
    """Running acceptance rate with a prior, so the first rounds have a sensible estimate."""

    def __init__(self, prior: float = 0.6, weight: int = 8):
        self.accepted = prior * weight
        self.proposed = float(weight)

    def update(self, accepted: int, proposed: int) -> None:
        self.accepted += accepted
        self.proposed += proposed

    @property
    def alpha(self) -> float:
        return self.accepted / self.proposed
