"""The adaptive policy's cost model (actors/spec/adaptive.py chooses K with it): t_verify by batch
tokens (`ShapeCost`), the drafter's costs on or hidden from the critical path (`Costs`), and the
expected seconds of a round for a batch's K's (`round_time`, `modelled_time`).
"""
from __future__ import annotations

from dataclasses import dataclass, field


# Samples after which a shape not measured again leaves its cost line (t_verify, pre-speculation):
# about two rounds one K up (EXPLORE_EVERY in actors/spec/adaptive_choice.py) at batch 1.
STALE_AFTER = 32


class ShapeCost:
    """t(n) for a forward over n tokens: per shape seen, the lower quartile of its last `window`
    times, and across shapes a weighted least-squares line through them. The lower quartile, not
    a mean: the first forward at a new shape (allocations, kernel selection) and a forward
    preempted by another thread take up to 10x the usual time, never less, and a mean that kept
    them priced that shape out of the policy's choices until it was measured again, which,
    priced out, it never was. With a single shape seen, the slope is `rel_slope` of that shape's
    time per extra token (a CPU verify of 6 tokens costs 1.5-1.8x one token; a GPU's is nearly
    flat, which the second shape seen then shows)."""

    def __init__(self, window: int = 8, rel_slope: float = 0.1, stale_after: int | None = None):
        """`stale_after`: a shape not measured in that many of the latest samples leaves the line
        while a fresher shape remains (None: shapes never go stale)."""
        self.window, self.rel_slope, self.stale_after = window, rel_slope, stale_after
        self.samples: dict[int, list[float]] = {}
        self.count: dict[int, int] = {}
        self.mean: dict[int, float] = {}   # per shape: the lower quartile of its window
        self.last: dict[int, int] = {}     # per shape: the sample number of its latest time
        self.n_added = 0
        self._line: tuple[float, float] | None = None   # the fit, until the next sample

    def add(self, n: int, seconds: float) -> None:
        self._line = None
        self.n_added += 1
        self.last[n] = self.n_added
        w = self.samples.setdefault(n, [])
        w.append(seconds)
        if len(w) > self.window:
            del w[0]
        self.count[n] = self.count.get(n, 0) + 1
        self.mean[n] = _lower_quartile(w)

    @property
    def known(self) -> bool:
        return bool(self.mean)

    def line(self) -> tuple[float, float]:
        """(intercept, slope) of t(n) = a + b n (fitted once per sample: the policy prices every
        option of every round with it, on the verifier's critical path)."""
        if self._line is None:
            self._line = self._fit()
        return self._line

    def _fit(self) -> tuple[float, float]:
        if not self.mean:
            return 0.0, 0.0
        shapes = list(self.mean)
        if self.stale_after is not None:
            # A shape measured only long ago holds the times of conditions that may be gone (a
            # busy machine, a cold start): set beside a fresh shape it priced the shapes the
            # policy stopped choosing by those times. With one fresh shape, that shape alone.
            fresh = [n for n in shapes if self.n_added - self.last[n] < self.stale_after]
            shapes = fresh if fresh else [max(shapes, key=self.last.get)]
        if len(shapes) == 1:  # t(n) = c (1 + rel_slope n) through the one point
            n0 = shapes[0]
            c = self.mean[n0] / (1 + self.rel_slope * n0)
            return c, c * self.rel_slope
        w = {n: min(self.count[n], self.window) for n in shapes}
        sw = sum(w.values())
        mx = sum(w[n] * n for n in w) / sw
        my = sum(w[n] * self.mean[n] for n in w) / sw
        sxx = sum(w[n] * (n - mx) ** 2 for n in w)
        b = max(0.0, sum(w[n] * (n - mx) * (self.mean[n] - my) for n in w) / sxx)
        return my - b * mx, b

    def __call__(self, n: int) -> float:
        # Always the line, never a shape's own median beside it: the policy compares shapes, and
        # a well-measured shape (the one it keeps choosing) set against the line's guess at the
        # others made the comparison depend on which shapes happened to be measured.
        a, b = self.line()
        return max(a + b * n, 0.0)


def _lower_quartile(xs: list[float]) -> float:
    """One sample: itself; two or three: the smallest; eight: the second smallest."""
    return sorted(xs)[(len(xs) - 1) // 4]


@dataclass
class Costs:
    """The round's cost model, in seconds. `verify` is t_verify by batch tokens; the rest are the
    drafter's costs on (or hidden from) the critical path, as the caller measured them."""
    verify: ShapeCost = field(default_factory=lambda: ShapeCost(stale_after=STALE_AFTER))
    draft_step_s: float | None = None   # one just-in-time draft step of the batch (None: unmeasured)
    transport_s: float = 0.0            # a frame to the drafter and its reply back
    prespec_step_s: float | None = None  # pre-speculation time per draft step (SSD; hidden up to t_verify)
    hit_rate: float = 0.9               # SSD: a round's outcome found in the table
    # SSD: pre-speculation time by its draft steps, measured. A round's pre-speculation has a
    # part that does not grow with K (the forward over the draft just verified, the forks, the
    # top-k per depth): priced per step, that part made every K below the last one look
    # dearer per step than it is, and each step down raised the price of the next.
    prespec: ShapeCost = field(default_factory=lambda: ShapeCost(rel_slope=1.0, stale_after=STALE_AFTER))
    # What a whole round took beyond the model above, measured per round: rounds that verified a
    # draft (the exchange with the drafter, decoding its table, the bookkeeping of drafts) and
    # rounds at K = 0. The parts above are what changes with K; this is what a speculating round
    # costs that no part names, and under load it decides whether K = 1 pays at all.
    overhead_spec_s: float = 0.0
    overhead_off_s: float = 0.0

    def draft_step(self) -> float:
        if self.draft_step_s is not None:
            return self.draft_step_s
        return 0.1 * self.verify(1)  # a drafter ~10x cheaper than the target until measured

    def prespec_time(self, k: int, n_seqs: int = 1) -> float:
        """Pre-speculation time for drafts of k tokens for `n_seqs` sequences (hidden behind the
        verify up to t_verify). Keyed by k * n_seqs: every sequence fans out its own branches,
        so the drafter's rows per step grow with the sequences that speculate."""
        if self.prespec.known:
            return self.prespec(k * n_seqs)
        return k * n_seqs * (self.prespec_step_s if self.prespec_step_s is not None else self.draft_step())


def round_time(mode: str, ks: list[int], costs: Costs) -> float:
    """Expected seconds of one round where sequence s drafts ks[s] tokens."""
    k_max = max(ks, default=0)
    return modelled_time(mode, ks, costs) + (costs.overhead_spec_s if k_max else costs.overhead_off_s)


def modelled_time(mode: str, ks: list[int], costs: Costs) -> float:
    """`round_time` without the measured overhead: the verify and what drafting exposes."""
    n = sum(k + 1 for k in ks)
    tv = costs.verify(n)
    k_max = max(ks, default=0)
    if k_max == 0:
        return tv
    jit_s = k_max * costs.draft_step() + costs.transport_s
    if mode != "ssd":
        return tv + jit_s
    n_spec = sum(1 for k in ks if k > 0)
    hit = max(tv, costs.prespec_time(k_max, n_spec)) + costs.transport_s
    p_all_hit = costs.hit_rate ** n_spec
    return hit + (1.0 - p_all_hit) * jit_s
