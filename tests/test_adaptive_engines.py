"""Adaptive speculation in the engines it drives (sync SD, SSD, the one-process SD loop) on real
processes: still exact, K drops to 0 with a drafter that never agrees, and a request's own k is
honoured. The policy itself: tests/test_adaptive.py."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def useless_draft(tiny_pair, tmp_path_factory):
    """The tiny drafter's shape with random weights: its drafts agree with the target by chance."""
    from cluster.bench.adaptive import random_drafter

    return random_drafter(tiny_pair / "draft", tmp_path_factory.mktemp("drafters") / "random")


def _adaptive_spec(mode, draft=None, k=4):
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec

    overrides = {"speculation.mode": mode, "speculation.adaptive": True, "speculation.k": k,
                 "engine.max_batch": 8}
    if draft is not None:
        overrides["models.draft.path"] = str(draft)
    return engine_spec(load_config("configs/local-cpu.yaml", overrides))


def _generate(engine, prompts, n, **kw):
    from actors.spec.sampling import SamplingParams
    from cluster.serving.coordinator import Coordinator, GenerateArgs

    coord = Coordinator(engine, None, max_queue=256)
    try:
        handles = [coord.submit(GenerateArgs(list(p), n, SamplingParams(), **kw)) for p in prompts]
        finals = [h.result() for h in handles]
    finally:
        coord.stop()
    return [h.tokens for h in handles], finals


def _exact(hf_refs, prompts, outs, n, first=0):
    """outs for held_out_prompts[first:first + len(outs)] against transformers' greedy."""
    from tests.conftest import assert_matches_or_near_tie

    hf, refs = hf_refs
    refs = refs[first:first + len(outs)]
    same = sum(assert_matches_or_near_tie(hf, p, o, r[:n]) for p, o, r in zip(prompts, outs, refs))
    assert same >= len(outs) - 1, f"only {same}/{len(outs)} identical"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["ssd", "sd"])
def test_a_useless_drafter_is_turned_off_and_output_stays_exact(ray_local, useless_draft, hf_refs,
                                                                held_out_prompts, mode):
    """The Ray engine with a drafter whose acceptance is ~0: K falls to 0 (the per-sequence stats
    show the rounds by K), probes still happen, and greedy output equals transformers' while K
    changes mid-sequence (4 -> 0 -> probe 1 -> 0 ...)."""
    from cluster.launch.engine import RayEngine

    from tests.conftest import HF_NEW

    prompts = held_out_prompts[:6]
    engine = RayEngine(_adaptive_spec(mode, useless_draft)).start()
    try:
        outs, finals = _generate(engine, prompts, HF_NEW)
        m = engine.metrics()
    finally:
        engine.stop()
    _exact(hf_refs, prompts, outs, HF_NEW)
    total = _sum_stats(finals)
    assert total.acceptance_rate < 0.2, total.summary()
    hist = total.k_histogram
    rounds = sum(hist)
    # nearly every round decoded without drafts, and the policy (not a missing drafter) did it
    assert hist[0] >= 0.8 * rounds, hist
    assert total.rounds_off >= 0.7 * rounds, (total.rounds_off, hist)
    assert sum(hist[1:]) > 0, hist                  # it speculated (at first, and in probes)
    for f in finals:                                # every sequence, not just the pool
        assert f.stats.k_histogram[0] > sum(f.stats.k_histogram[1:]), f.stats.k_histogram
    assert m["adaptive"]["acceptance"][0] < 0.3, m["adaptive"]


def _sum_stats(finals):
    from actors.spec.stats import SpecStats

    return SpecStats.total(f.stats for f in finals)


@pytest.mark.timeout(900)
def test_a_requests_own_k_is_kept_and_exact(tiny_pair, hf_refs, held_out_prompts):
    """Per-request k on an adaptive SSD engine (plain processes, gloo): k = 0 never drafts and
    leaves the drafter alone, k = 2 drafts exactly 2 every round, and both are exact; a k above
    the engine's is refused."""
    from actors.launch import LocalEngine
    from actors.sequence import Request

    prompts = held_out_prompts[6:12]
    n = 40
    engine = LocalEngine(_adaptive_spec("ssd")).start()
    try:
        off, f_off = _generate(engine, prompts[:3], n, k=0)
        two, f_two = _generate(engine, prompts[3:], n, k=2)
        with pytest.raises(ValueError, match="speculation.k"):
            engine.submit(Request(999, list(prompts[0]), 8, k=5))
    finally:
        engine.stop()
    _exact(hf_refs, prompts[:3], off, n, first=6)
    _exact(hf_refs, prompts[3:], two, n, first=9)
    for f in f_off:
        assert f.stats.drafts == 0 and f.stats.rounds_off == 0 and sum(f.stats.k_histogram[1:]) == 0
    for f in f_two:
        h = f.stats.k_histogram
        assert h[2] > 0 and h[1] == h[3] == h[4] == 0, h   # never more than its k; 0 only when cut short
        assert f.stats.accepted_tokens > 0 and f.stats.cache_hits > 0, f.stats.summary()


@pytest.mark.timeout(900)
def test_a_seeded_request_drafts_one_k_and_that_k_reproduces_it(tiny_pair, held_out_prompts):
    """On an adaptive SSD engine a seeded sampling request drafts the one K the policy chose at
    admission and reports it; the same seed with k set to it gives the same tokens. An unseeded
    sampling request stays adaptive (no fixed_k)."""
    from actors.launch import LocalEngine
    from actors.spec.sampling import SamplingParams
    from cluster.serving.coordinator import Coordinator, GenerateArgs

    n = 40
    engine = LocalEngine(_adaptive_spec("ssd")).start()
    coord = None

    def run(prompt, params, k=None):
        h = coord.submit(GenerateArgs(list(prompt), n, params, ignore_eos=True, k=k))
        final = h.result()
        return list(h.tokens), final

    try:
        _generate(engine, held_out_prompts[:2], n)   # the policy measures something first
        coord = Coordinator(engine, None, max_queue=16)   # one poller at a time: after _generate's
        seeded = SamplingParams(temperature=0.8, seed=11)
        toks, final = run(held_out_prompts[2], seeded)
        k = final.stats.fixed_k
        again, f_again = run(held_out_prompts[2], seeded, k=k)
        _, unseeded = run(held_out_prompts[3], SamplingParams(temperature=0.8))
    finally:
        if coord is not None:
            coord.stop()
        engine.stop()
    assert k is not None and 0 <= k <= 4, final.stats
    h = final.stats.k_histogram
    assert sum(h) - h[k] <= 1, h              # one K throughout (a last round may be cut short)
    assert len(toks) == n and again == toks
    assert f_again.stats.fixed_k == k
    assert unseeded.stats.fixed_k is None


@pytest.mark.parametrize("which", ["useless", "tiny"])
def test_one_process_adaptive_sd_is_exact(tiny_pair, useless_draft, held_out_prompts, which):
    """The in-process SD loop runs the same policy: greedy output equals AR's, and with a drafter
    that never agrees nearly every round is at K = 0."""
    from actors.generate import generate_ar, generate_sd
    from actors.model.loader import load_model
    from actors.spec.stopping import StopCriteria

    target = load_model(str(tiny_pair / "target"))
    draft = load_model(str(useless_draft if which == "useless" else tiny_pair / "draft"))
    for p in held_out_prompts[:3]:
        stop = StopCriteria(48, frozenset(), ())
        ar = generate_ar(target, p, stop)
        sd = generate_sd(target, draft, p, stop, 4, adaptive=True)
        assert sd.tokens == ar.tokens
        h = sd.stats.k_histogram
        if which == "useless":
            assert h[0] > sum(h[1:]) and sd.stats.rounds_off == h[0], h
