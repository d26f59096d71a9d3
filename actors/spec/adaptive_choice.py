"""What the adaptive policy (actors/spec/adaptive.py) chooses with, as pure functions and small
records: a sequence's acceptance by position (`Acceptance`), the tokens a round commits with K
drafts (`expected_tokens`, `expected_curve`), the batch's K per sequence that maximises expected
tokens per second (`choose_ks`), the fan-out budget (`fan_budget`), and the probe schedule of a
sequence at K = 0 (`Probe`, `best_speculating_k`).
"""
from __future__ import annotations

from dataclasses import dataclass

from actors.spec.adaptive_costs import Costs, round_time

PRIOR_ALPHA = 0.6     # what a sequence assumes before anything was measured
PROBE_K = 1           # the draft length of a probe from K = 0
# Speculation must be predicted to beat plain decoding by this much: with a drafter that never
# agrees, the prior keeps its estimated acceptance a little above 0, and when drafting looks
# nearly free (a flat t_verify, pre-speculation hidden) that alone would keep it drafting.
SPEC_MARGIN = 0.05
PROBE_FIRST, PROBE_MAX = 8, 64   # rounds at K = 0 before the first probe; the backoff's cap
# Rounds at one K > 0 before one round at K + 1. The costs of a K the policy does not choose are
# never measured again, so one slow measurement there (a preempted forward, a pre-speculation that
# carried a prefill) would keep it unchosen for good; near the best K the rate curve is flat, so a
# round one step up costs little and refreshes what the next step costs.
EXPLORE_EVERY = 16


class Acceptance:
    """Per-position conditional acceptance with decayed counts and a prior.

    reached[i]: drafts whose position i+1 was verified (it existed and positions 1..i were
    accepted); kept[i]: of those, how many accepted it. a_{i+1} = (kept + w * prior) / (reached + w),
    where the prior of a position is `prior[i]` when given, else the estimate of the position
    before it (acceptance is measured position by position; a position never reached borrows
    its neighbour's)."""

    def __init__(self, k_max: int, prior: list[float] | float = PRIOR_ALPHA, weight: float = 2.0,
                 decay: float = 0.97):
        self.k_max, self.weight, self.decay = k_max, weight, decay
        self.prior = list(prior) if isinstance(prior, (list, tuple)) else [float(prior)] + [None] * (k_max - 1)
        self.prior += [None] * (k_max - len(self.prior))
        self.reached = [0.0] * k_max
        self.kept = [0.0] * k_max
        self.rounds = 0

    def update(self, n_draft: int, accepted: int) -> None:
        """One verified draft of `n_draft` tokens of which the first `accepted` were kept."""
        if n_draft <= 0:
            return
        self.rounds += 1
        d = self.decay
        for i in range(self.k_max):
            self.reached[i] *= d
            self.kept[i] *= d
        for i in range(min(accepted + 1, n_draft, self.k_max)):
            self.reached[i] += 1.0
            if i < accepted:
                self.kept[i] += 1.0

    def rates(self) -> list[float]:
        out, prev = [], PRIOR_ALPHA
        for i in range(self.k_max):
            base = self.prior[i] if self.prior[i] is not None else prev
            prev = (self.kept[i] + self.weight * base) / (self.reached[i] + self.weight)
            out.append(prev)
        return out


def expected_tokens(a: list[float], k: int) -> float:
    """E(K) = 1 + sum_{j=1..K} prod_{i<=j} a_i: tokens a round commits with K drafts."""
    e, p = 1.0, 1.0
    for j in range(min(k, len(a))):
        p *= a[j]
        e += p
    return e


def expected_curve(a: list[float], k_cap: int) -> list[float]:
    """[E(0), E(1), ..., E(k_cap)]."""
    out, e, p = [1.0], 1.0, 1.0
    for j in range(k_cap):
        p *= a[j] if j < len(a) else 0.0
        e += p
        out.append(e)
    return out


def choose_ks(curves: list[list[float]], mode: str, costs: Costs,
              fixed: list[tuple[int, float]] = ()) -> list[int]:
    """Each sequence's K maximising the batch's expected tokens per second. curves[s] is
    [E_s(0), .., E_s(cap_s)] (expected_curve over the sequence's own cap); `fixed` are the
    batch's sequences whose K is not the policy's, as (K, expected tokens): they share the round."""
    if not curves:
        return []
    fixed_ks = [k for k, _ in fixed]
    fixed_e = sum(e for _, e in fixed)

    def rate(ks: list[int]) -> float:
        e = fixed_e + sum(c[k] for c, k in zip(curves, ks))
        return e / max(round_time(mode, ks + fixed_ks, costs), 1e-12)

    best_ks, best = None, -1.0
    for start in ([0] * len(curves), [len(c) - 1 for c in curves]):
        ks = list(start)
        for _ in range(3):
            changed = False
            for s, c in enumerate(curves):
                here, pick = rate(ks), ks[s]
                for k in range(len(c)):
                    if k == ks[s]:
                        continue
                    trial = ks[:s] + [k] + ks[s + 1:]
                    r = rate(trial)
                    if r > here * (1 + 1e-9):
                        here, pick = r, k
                if pick != ks[s]:
                    ks[s], changed = pick, True
            if not changed:
                break
        r = rate(ks)
        if r > best:
            best_ks, best = ks, r
    off = [0] * len(curves)
    if any(best_ks) and best <= rate(off) * (1 + SPEC_MARGIN):
        return off
    return best_ks


def fan_budget(current: int, max_budget: int, t_verify: float, t_prespec: float | None,
               miss_cost: float = 0.0) -> int:
    """The fan-out budget for the next round. Pre-speculation hides behind the verify; a table
    that comes later than that is still worth its wait while the wait is shorter than what a
    miss costs (a just-in-time draft and a round trip). When the last one was later than that,
    shrink in proportion to fit the verify (10 % margin); otherwise grow back by one."""
    if t_prespec is None or t_verify <= 0:
        return max_budget
    if t_prespec > t_verify + miss_cost:
        return max(1, min(current - 1, int(current * 0.9 * t_verify / t_prespec)))
    return min(max_budget, current + 1)


def best_speculating_k(curve: list[float], mode: str, costs: Costs, rest: list[int]) -> int:
    """The K >= 1 with the most expected tokens per second for a sequence whose tokens per round
    are `curve`, beside the batch's other K's `rest` (what a probe drafts)."""
    if len(curve) < 2:
        return PROBE_K
    return max(range(1, len(curve)), key=lambda k: curve[k] / max(round_time(mode, [k] + rest, costs), 1e-12))


@dataclass
class Probe:
    """Per sequence at K = 0: after `every` rounds off, ask for one draft; each probe after which
    the policy still says K = 0 doubles the wait (up to PROBE_MAX). The probe drafts the K the
    policy would pick if it had to speculate (`probe_k`), not one token: at K = 0 neither the
    acceptance of later positions nor the costs of longer drafts are measured, and one-token
    probes only ever refresh the first of them."""
    every: int = PROBE_FIRST
    off: int = 0
    probing: bool = False
    up: int = 0          # rounds at K > 0 since the last round one K up

    def next_k(self, chosen: int, probe_k=lambda: PROBE_K, cap: int = 0) -> int:
        """The K to draft this round given the policy's choice; `probe_k()` gives a probe's K."""
        if chosen > 0:
            self.every, self.off, self.probing = PROBE_FIRST, 0, False
            self.up += 1
            if chosen < cap and self.up >= EXPLORE_EVERY:
                self.up = 0
                return chosen + 1
            return chosen
        if self.probing:  # the probe came back and speculation still does not pay
            self.every, self.probing = min(self.every * 2, PROBE_MAX), False
        self.off += 1
        if self.off >= self.every:
            self.off, self.probing = 0, True
            return max(1, probe_k())
        return 0
