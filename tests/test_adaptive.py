"""Adaptive speculation: the policy's decisions given measurements (actors/spec/adaptive.py): the model
of a round, the K's it chooses for given costs and acceptance, and the state it keeps per sequence.
Decisions from an engine's recorded measurements: tests/test_adaptive_recorded.py; the engines it
drives: tests/test_adaptive_engines.py."""
from __future__ import annotations

import pytest

from actors.spec.adaptive import Controller
from actors.spec.adaptive_choice import (PROBE_FIRST, PROBE_K, PROBE_MAX, Acceptance, Probe, choose_ks, expected_curve,
                                         expected_tokens, fan_budget)
from actors.spec.adaptive_costs import Costs, ShapeCost, round_time

MS = 1e-3


def cpu_costs(draft_step_ms=0.5, transport_ms=0.3, hit_rate=0.9, prespec_step_ms=None, slope_ms=0.75):
    """A cost model shaped like the bench pair on one core: t_verify(n) = 7.5 ms + 0.75 ms per token."""
    v = ShapeCost()
    for n in range(1, 12):
        for _ in range(3):
            v.add(n, (7.5 + slope_ms * n) * MS)
    return Costs(verify=v, draft_step_s=draft_step_ms * MS, transport_s=transport_ms * MS,
                 prespec_step_s=None if prespec_step_ms is None else prespec_step_ms * MS, hit_rate=hit_rate)


def k_for(alpha, mode="sd", k_max=8, costs=None, batch=1):
    curves = [expected_curve([alpha] * k_max, k_max)] * batch
    return choose_ks(curves, mode, costs or cpu_costs())


# -- the model ---------------------------------------------------------------------------------

def test_expected_tokens_is_one_plus_the_sum_of_survival_products():
    a = [0.5, 0.5, 0.2]
    assert expected_tokens(a, 0) == 1.0
    assert expected_tokens(a, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(a, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.05)
    assert expected_curve(a, 3) == pytest.approx([1.0, 1.5, 1.75, 1.8])


def test_round_time_by_mode():
    c = cpu_costs()
    t1 = c.verify(1)
    assert round_time("sd", [0], c) == pytest.approx(t1)        # K = 0: nothing but the verify
    assert round_time("ssd", [0], c) == pytest.approx(t1)
    sd = round_time("sd", [4], c)
    assert sd == pytest.approx(c.verify(5) + 4 * c.draft_step_s + c.transport_s)
    ssd = round_time("ssd", [4], c)
    assert ssd < sd                                             # drafting hidden on a hit
    c.hit_rate = 0.0
    assert round_time("ssd", [4], c) > sd                       # every round a miss: a jit draft more


def test_shape_cost_fits_a_line_through_the_shapes_seen():
    v = ShapeCost()
    assert not v.known
    v.add(2, 10 * MS)
    assert v(2) == pytest.approx(10 * MS)
    assert v(6) > v(2)                                          # one shape: a prior slope
    v.add(6, 14 * MS)
    assert v(4) == pytest.approx(12 * MS)                       # two shapes: the line through them
    assert v(10) == pytest.approx(18 * MS)
    one = ShapeCost(rel_slope=0.1)
    one.add(20, 30 * MS)
    assert 0 < one(1) < one(20) < one(30)                       # one shape: proportional, never negative


# -- decisions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_a_drafter_that_never_agrees_gets_k_zero(mode):
    assert k_for(0.01, mode) == [0]
    assert k_for(0.1, mode) == [0]


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_high_acceptance_speculates_deep(mode):
    k = k_for(0.95, mode)[0]
    assert k >= 5, k


def test_returns_diminish_so_k_stops_short_of_the_cap():
    # a = 0.8: E(K) saturates at 5 while every draft token costs verify and drafting time
    k = k_for(0.8, "sd", k_max=16)[0]
    assert 2 <= k < 16, k
    assert k_for(0.8, "sd", k_max=16, costs=cpu_costs(draft_step_ms=0.05))[0] >= k  # cheaper drafts: deeper


def test_k_grows_with_acceptance():
    ks = [k_for(a)[0] for a in (0.05, 0.3, 0.5, 0.7, 0.9, 0.97)]
    assert ks == sorted(ks), ks
    assert ks[0] == 0 and ks[-1] >= 6, ks


def test_ssd_speculates_at_least_as_deep_as_sync_sd():
    for a in (0.4, 0.6, 0.8, 0.9):
        assert k_for(a, "ssd")[0] >= k_for(a, "sd")[0], a


def test_a_bigger_batch_speculates_less():
    # t_verify grows with the batch's tokens: each draft token costs the whole batch's round
    c = cpu_costs(slope_ms=2.0)
    k1 = k_for(0.7, "sd", costs=c, batch=1)
    k8 = k_for(0.7, "sd", costs=c, batch=8)
    assert max(k8) < k1[0], (k1, k8)


def test_gpu_like_flat_verify_speculates_deeper_than_cpu_verify():
    flat = cpu_costs(slope_ms=0.01)
    assert k_for(0.7, "sd", costs=flat)[0] > k_for(0.7, "sd", costs=cpu_costs(slope_ms=2.0))[0]


def test_mixed_batch_turns_off_only_the_sequence_that_does_not_pay():
    k_max = 6
    curves = [expected_curve([0.9] * k_max, k_max), expected_curve([0.02] * k_max, k_max)]
    good, bad = choose_ks(curves, "ssd", cpu_costs())
    assert good >= 3 and bad == 0


def test_near_free_drafting_of_a_drafter_that_barely_agrees_stays_off():
    """A flat t_verify and hidden, always-hit pre-speculation make drafting look almost free; an
    acceptance of 2 % (a prior's floor) must still not turn speculation on: it has to pay by a
    margin, not by rounding."""
    free = cpu_costs(slope_ms=0.0, draft_step_ms=0.01, transport_ms=0.01, hit_rate=1.0, prespec_step_ms=0.01)
    assert k_for(0.02, "ssd", costs=free) == [0]
    assert k_for(0.5, "ssd", costs=free)[0] > 0   # and a drafter that agrees still speculates


def test_a_cap_bounds_the_choice():
    curves = [expected_curve([0.99] * 8, 2)]
    assert choose_ks(curves, "ssd", cpu_costs()) == [2]


def test_fan_budget_shrinks_when_prespeculation_outlasts_the_verify_and_grows_back():
    assert fan_budget(16, 16, 10 * MS, 5 * MS) == 16
    shrunk = fan_budget(16, 16, 10 * MS, 20 * MS)
    assert 1 <= shrunk <= 8
    assert fan_budget(shrunk, 16, 10 * MS, 5 * MS) == shrunk + 1
    assert fan_budget(1, 16, 1 * MS, 50 * MS) == 1                     # never below one branch
    assert fan_budget(16, 16, 10 * MS, 14 * MS, miss_cost=5 * MS) == 16   # late, but cheaper than a miss


# -- state ---------------------------------------------------------------------------------------

def test_acceptance_by_position_from_verified_drafts():
    a = Acceptance(4, prior=0.6, weight=2.0, decay=1.0)
    for _ in range(20):
        a.update(4, 4)
    r = a.rates()
    assert all(x > 0.9 for x in r)
    b = Acceptance(4, prior=0.6, weight=2.0, decay=1.0)
    for _ in range(20):
        b.update(4, 1)                    # position 1 always kept, position 2 always rejected
    r = b.rates()
    assert r[0] > 0.9 and r[1] < 0.1
    # position 3 was never reached: it borrows its neighbour's estimate
    assert r[2] == pytest.approx(r[1])


def test_acceptance_forgets_old_rounds():
    a = Acceptance(2, decay=0.9)
    for _ in range(50):
        a.update(2, 2)
    assert a.rates()[0] > 0.9
    for _ in range(50):
        a.update(2, 0)
    assert a.rates()[0] < 0.15


def test_probe_backs_off_and_resets_when_speculation_returns():
    p = Probe()
    ks = [p.next_k(0) for _ in range(PROBE_FIRST)]
    assert ks == [0] * (PROBE_FIRST - 1) + [PROBE_K]
    ks = [p.next_k(0) for _ in range(2 * PROBE_FIRST)]       # the probe did not pay: twice as long
    assert ks == [0] * (2 * PROBE_FIRST - 1) + [PROBE_K]
    for _ in range(20):
        for _ in range(PROBE_MAX):
            p.next_k(0)
    assert p.every == PROBE_MAX
    assert p.next_k(3) == 3                                   # it paid: back on, backoff reset
    assert p.every == PROBE_FIRST


def test_controller_turns_a_useless_drafter_off_then_probes_and_comes_back():
    c = Controller(k_max=4, mode="ssd")
    c.costs = cpu_costs()
    c.add(1)
    ks = []
    for _ in range(40):
        k = c.decide([1])[1]
        ks.append(k)
        c.observe_round(1, k, 0)              # nothing is ever accepted
    assert ks[0] == 4 or ks[0] > 0            # starts speculating on the prior
    assert ks[-30:].count(0) >= 26            # then off, with a few probes
    assert PROBE_K in ks[5:]
    # the drafter starts agreeing: the probes see it and speculation returns
    for _ in range(200):
        k = c.decide([1])[1]
        c.observe_round(1, k, k)
    assert c.decide([1])[1] >= 3
    # a new sequence inherits the engine's experience as its prior
    c2 = Controller(k_max=4, mode="ssd")
    c2.costs = cpu_costs()
    for _ in range(100):
        c2.observe_round(99, 4, 0)
    c2.add(2)
    assert c2.decide([2])[2] == 0


def test_controller_keeps_a_requests_own_k():
    c = Controller(k_max=4, mode="sd")
    c.costs = cpu_costs()
    c.add(1, fixed_k=2)
    c.add(2)
    for _ in range(30):
        ks = c.decide([1, 2])
        assert ks[1] == 2
        c.observe_round(1, ks[1], 0)
        c.observe_round(2, ks[2], 0)
    c.remove(1)
    assert 1 not in c.fixed and 1 not in c.acc


def test_a_new_sequence_starts_its_probe_backoff_where_the_last_one_ended():
    c = Controller(k_max=4, mode="sd")
    c.costs = cpu_costs()
    c.add(1)
    for _ in range(200):
        k = c.decide([1])[1]
        c.observe_round(1, k, 0)
    assert c.probe[1].every == PROBE_MAX
    c.remove(1)
    c.add(2)
    assert c.probe[2].every == PROBE_MAX
    assert c.decide([2])[2] == 0
