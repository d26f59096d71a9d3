"""Where the branch budget goes: split by outcome odds, learned from the depths rounds end at."""
from __future__ import annotations

import pytest

import torch

from actors.spec.fanout import AcceptanceTracker, outcome_odds, split_budget, top_candidates


@pytest.mark.parametrize("budget", [0, 1, 7, 16, 24])
def test_split_spends_exactly_the_budget_in_proportion(budget):
    fan = split_budget(budget, [0.5, 0.3, 0.2])
    assert sum(fan) == budget and all(f >= 0 for f in fan)
    if budget >= 10:
        assert fan[0] > fan[1] > fan[2]


def test_geometric_prior_favours_shallow_depths():
    fan = split_budget(16, outcome_odds(0.5, 5))
    assert len(fan) == 6 and sum(fan) == 16 and fan[0] >= fan[1] >= fan[2]


def test_tracker_learns_a_bimodal_outcome_profile():
    """Drafts that survive their first token mostly survive to the end: the geometric prior
    would spend little on depth K, the observed depths move the budget there."""
    t = AcceptanceTracker()
    prior_fan = split_budget(16, t.odds(5))
    for _ in range(40):
        t.update(5, 5)
        t.update(1, 5)
        t.update(1, 5)
    fan = split_budget(16, t.odds(5))
    assert fan[5] > prior_fan[5] and fan[1] > prior_fan[1]
    assert fan[2] + fan[3] + fan[4] < prior_fan[2] + prior_fan[3] + prior_fan[4]
    assert sum(fan) == 16
    # Depths are kept per draft length: a short draft's outcome counts for its own length only.
    before = t.odds(5)[0]
    t.update(0, 3)
    assert len(t.odds(3)) == 4 and t.odds(3)[0] - before > 0.9 and t.depths[5][0] == 0


def test_one_batched_topk_picks_what_a_topk_per_depth_picked():
    """The drafter's candidates for every (sequence, depth) come from one topk and one read-back;
    they are exactly what a topk per row (with the drafted token masked) picked."""
    g = torch.Generator().manual_seed(0)
    V = 50
    rows = [torch.randn(V, generator=g) for _ in range(9)] + [torch.softmax(torch.randn(V, generator=g), -1)]
    exclude = [3, None, 7, 0, None, 49, 12, None, 5, 8]
    fans = [1, 4, 2, 7, 0, 3, 60, 1, 5, 2]    # 60 > V - 1: capped as before
    old = []
    for r, ex, f in zip(rows, exclude, fans):
        scores = r.clone()
        if ex is not None:
            scores[ex] = float("-inf")
        old.append(scores.topk(min(f, scores.numel() - 1)).indices.tolist() if f else [])
    assert top_candidates(rows, exclude, fans) == old
    assert all(ex not in c for c, ex in zip(old, exclude))
    assert rows[0][3] != float("-inf")   # the sequences' own distributions are untouched
    assert top_candidates([], [], []) == []
