"""Adaptive speculation: the policy's decisions from an engine's recorded measurements (the bench
pair's costs and acceptance, slow and stale forwards, probes and whole-round overhead in a batch).
The policy on given costs: tests/test_adaptive.py."""
from __future__ import annotations

import pytest

from actors.adaptive import PROBE_FIRST, Controller
from actors.adaptive_costs import modelled_time

MS = 1e-3


# -- decisions from recorded measurements ------------------------------------------------------
# The bench pair (configs/bench-cpu.yaml: target and drafter on one core each), as its engine
# measured it: t_verify by the verify's tokens, pre-speculation by its draft steps (16 branches),
# one just-in-time draft step, the wire, the table's hit rate and the acceptance by position.
BENCH = {"t_verify_ms": {1: 4.83, 2: 5.45, 3: 5.9, 4: 6.4, 5: 6.85, 6: 7.3},
         "prespec_ms": {1: 2.1, 2: 2.9, 3: 3.7, 4: 4.5, 5: 5.3}, "draft_step_ms": 0.49, "transport_ms": 0.3,
         "hit_rate": 0.8, "acceptance": [0.86, 0.82, 0.8, 0.78, 0.76]}


def drive(c: Controller, rounds: int, rec: dict, acceptance: list[float], seed: int = 0, sid: int = 1,
          verify_ms=None, prespec_ms=None) -> list[int]:
    """Run one sequence through `c` for `rounds` rounds, feeding it what the engine would measure
    for each K it picks (the recorded times; `verify_ms` / `prespec_ms` override them by shape
    and round). Returns the K of every round."""
    import random

    rnd = random.Random(seed)
    ks, prev = [], 0
    for r in range(rounds):
        k = c.decide([sid])[sid]
        if k and prev:
            c.observe_lookup(rnd.random() < rec["hit_rate"])
        elif k:   # no table after a round at K = 0: a just-in-time draft
            c.observe_draft(k, k * rec["draft_step_ms"] * MS, rec["transport_ms"] * MS)
        tv = (verify_ms(k + 1, r) if verify_ms else None) or rec["t_verify_ms"][k + 1]
        c.observe_verify(k + 1, tv * MS)
        accepted = 0
        while accepted < k and rnd.random() < acceptance[accepted]:
            accepted += 1
        c.observe_round(sid, k, accepted)
        if k:
            pre = (prespec_ms(k, r) if prespec_ms else None) or rec["prespec_ms"][k]
            c.observe_prespec(k, pre * MS, tv * MS)
        ks.append(k)
        prev = k
    return ks


def calibrated(rec: dict, k_max: int = 5) -> Controller:
    """A fresh SSD engine's policy after the verifier's calibration (5 forwards at 1 and k+1 tokens)."""
    c = Controller(k_max, "ssd", 16)
    for _ in range(5):
        for n in (1, k_max + 1):
            c.observe_verify(n, rec["t_verify_ms"][n] * MS)
    return c


def test_bench_pair_measurements_choose_k_of_three_or_more_at_batch_1():
    c = calibrated(BENCH)
    c.add(1)
    ks = drive(c, 300, BENCH, BENCH["acceptance"])
    assert min(ks[:3]) >= 3, ks[:3]                    # from the first round on
    assert sum(k >= 3 for k in ks) >= 0.95 * len(ks), ks
    assert ks.count(0) == 0, ks


def test_useless_drafter_with_bench_costs_chooses_k_zero():
    c = calibrated(BENCH)
    c.add(1)
    ks = drive(c, 300, BENCH, [0.01] * 5)
    assert ks[-250:].count(0) >= 240, ks              # off, but for probes that back off
    c.remove(1)
    c.add(2)                                          # the next request starts knowing it
    assert drive(c, 20, BENCH, [0.01] * 5, sid=2).count(0) >= 19


def test_a_cold_first_forward_does_not_switch_speculation_off():
    """A fresh engine's first verify forward is its slowest (40 ms where 7 is usual: allocations,
    kernel selection). Priced from it, every speculating K looked too dear, the policy went to
    K = 0, and the shapes it stopped choosing were never measured again: speculation stayed off
    (it did, before the lower quartile)."""
    c = Controller(5, "ssd", 16)
    c.add(1)
    ks = drive(c, 200, BENCH, BENCH["acceptance"], verify_ms=lambda n, r: 40.0 if r == 0 else None)
    assert sum(k >= 3 for k in ks) >= 0.95 * len(ks), ks


def test_one_slow_forward_does_not_switch_speculation_off():
    """A verify preempted once (10x its time) at the shape the policy uses: one sample of nine,
    not a mean that keeps it and prices that shape out, after which it is never measured again."""
    c = calibrated(BENCH)
    c.add(1)
    ks = drive(c, 200, BENCH, BENCH["acceptance"], verify_ms=lambda n, r: 10 * BENCH["t_verify_ms"][n] if r == 20
               else None)
    assert sum(k >= 3 for k in ks[21:]) >= 0.95 * len(ks[21:]), ks


def test_a_stale_cost_at_an_unchosen_k_is_measured_again():
    """The first pre-speculation of a request carried a long catch-up (4x its time) at K = 5: the
    policy steps down, and must come back once the K above is measured at its real cost."""
    c = calibrated(BENCH)
    c.add(1)
    ks = drive(c, 300, BENCH, BENCH["acceptance"], prespec_ms=lambda k, r: 4 * BENCH["prespec_ms"][k] if r < 2
               else None)
    assert sum(k >= 4 for k in ks[-100:]) >= 80, ks


def test_a_seeded_sampling_request_is_pinned_to_the_policys_k():
    c = calibrated(BENCH)
    c.add(1)
    drive(c, 100, BENCH, [0.01] * 5)                 # the engine has learnt its drafter is useless
    assert c.add(2, pin=True) == 0 and c.fixed[2] == 0
    good = calibrated(BENCH)
    good.add(1)
    drive(good, 100, BENCH, BENCH["acceptance"])
    k = good.add(2, pin=True)
    assert k >= 3 and good.decide([2])[2] == k == good.decide([2])[2]
    assert good.add(3, fixed_k=2) == 2 and good.add(4) is None


def test_probes_of_a_batch_share_rounds():
    """Eight sequences with a useless drafter, admitted a few rounds apart: each probe round makes
    the whole batch wait for a just-in-time draft, so sequences whose probe is half due join it,
    and few rounds carry a probe."""
    c = calibrated(BENCH)
    c.add(0)
    drive(c, 30, BENCH, [0.0] * 5, sid=0)     # the engine has learnt its drafter never agrees
    c.remove(0)
    c._probe_every = PROBE_FIRST
    sids, rounds_with_probe = [], 0
    for r in range(400):
        if r % 5 == 0 and len(sids) < 8:    # admissions 5 rounds apart: probe schedules start apart
            sids.append(len(sids) + 1)
            c.add(sids[-1])
        ks = c.decide(sids)
        for s in sids:
            c.observe_round(s, ks[s], 0)
        rounds_with_probe += any(ks.values())
    assert rounds_with_probe <= 20, rounds_with_probe      # 62 on separate schedules


def test_a_round_that_costs_more_than_its_parts_stops_marginal_speculation():
    """Batch 8, acceptance 0.6: by its parts speculation pays a few %. Measured whole
    rounds that speculated took 1.5 ms more than the parts say (the exchange, the table, the
    bookkeeping of drafts), rounds at K = 0 0.1 ms more: then K = 1 loses, and the policy stops.
    One preempted round moves the overhead by a tenth of a round at most."""
    c = calibrated(BENCH)
    for n in range(8, 57, 8):
        for _ in range(3):
            c.observe_verify(n, (4.3 + 0.5 * n) * MS)
    for k in range(1, 6):                       # eight sequences' branches: 8 x 0.8 ms per step
        c.observe_prespec(k, (1.3 + 6.4 * k) * MS, 8 * MS, n_seqs=8)
    import random

    rnd = random.Random(0)
    sids = list(range(8))
    for s in sids:
        c.add(s)
        for _ in range(40):                     # acceptance 0.6 at every position
            accepted = 0
            while accepted < 5 and rnd.random() < 0.6:
                accepted += 1
            c.observe_round(s, 5, accepted)
    ks = list(c.decide(sids).values())
    assert any(ks), ks                           # by its parts, speculation pays
    spec_round = modelled_time("ssd", ks, c.costs)
    c.observe_round_time(ks, 10 * spec_round)                 # one preempted round
    assert c.costs.overhead_spec_s <= 0.1 * spec_round + 1e-9
    for _ in range(30):
        c.observe_round_time(ks, spec_round + 1.5 * MS)
        c.observe_round_time([0] * 8, modelled_time("ssd", [0] * 8, c.costs) + 0.1 * MS)
    assert c.costs.overhead_spec_s == pytest.approx(1.5 * MS, rel=0.2)
    assert set(c.decide(sids).values()) == {0}


def test_a_batch_admitted_together_does_not_start_at_the_cap():
    """Eight requests admitted in one step where speculation does not pay at batch 8: each first
    K is chosen beside the others', so the batch's first round is not eight drafts at the cap."""
    c = calibrated(BENCH)
    for n in range(8, 57, 8):
        for _ in range(3):
            c.observe_verify(n, (4.3 + 0.9 * n) * MS)
    for k in range(1, 6):
        c.observe_prespec(k, (1.3 + 6.4 * k) * MS, 8 * MS, n_seqs=8)
    firsts = []
    for s in range(8):
        c.add(s)
        firsts.append(c.admit_k(s))
    assert firsts[0] >= 1                      # alone, it speculates
    assert sum(firsts) <= 8, firsts            # beside the others, most start off
