"""Exactness of in-process AR and synchronous SD against Hugging Face transformers.

The reference is transformers' own LlamaForCausalLM loading the very same files. A mismatch is
only acceptable at a genuine floating-point near-tie of the target (top-2 logit gap < 1e-4 at the
first differing position), and the test says so when it happens.
"""
from __future__ import annotations

import pytest

from actors.generate import generate_ar, generate_sd
from actors.loader import load_model
from actors.sampling import SamplingParams
from actors.stopping import StopCriteria
from tests.conftest import assert_matches_or_near_tie

NEW = 64  # must equal conftest.HF_NEW: hf_refs holds that many tokens per prompt


@pytest.fixture(scope="module")
def models(tiny_pair):
    return load_model(tiny_pair / "target"), load_model(tiny_pair / "draft")


def test_ar_greedy_equals_hf(models, hf_refs, held_out_prompts):
    target, _ = models
    hf, refs = hf_refs
    eos = frozenset(target.args.eos_token_ids)
    exact = sum(assert_matches_or_near_tie(hf, p, generate_ar(target, p, StopCriteria(NEW, eos)).tokens, r)
                for p, r in zip(held_out_prompts, refs))
    assert exact >= len(refs) - 2


@pytest.mark.parametrize("k", [1, 4])
def test_sd_greedy_equals_hf(models, hf_refs, held_out_prompts, k):
    target, draft = models
    hf, refs = hf_refs
    eos = frozenset(target.args.eos_token_ids)
    assert len(held_out_prompts) >= 20
    exact, accepted = 0, 0
    for p, r in zip(held_out_prompts, refs):
        g = generate_sd(target, draft, p, StopCriteria(NEW, eos), k=k)
        exact += assert_matches_or_near_tie(hf, p, g.tokens, r)
        accepted += g.stats.accepted_tokens
    assert exact >= len(refs) - 2
    assert accepted > 0  # the drafter really drafted and was really checked


def test_ar_sampling_reproducible_with_seed(models, held_out_prompts):
    target, _ = models
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    a = generate_ar(target, held_out_prompts[0], StopCriteria(32), params)
    b = generate_ar(target, held_out_prompts[0], StopCriteria(32), params)
    c = generate_ar(target, held_out_prompts[0], StopCriteria(32), SamplingParams(0.9, 50, 0.95, seed=8))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stop_strings_and_token_stops(models, tiny_tok, held_out_prompts):
    target, draft = models
    p = held_out_prompts[1]
    full = generate_ar(target, p, StopCriteria(48), decode=tiny_tok.decode)
    stop_at = full.tokens[10]
    g = generate_sd(target, draft, p, StopCriteria(48, frozenset([stop_at])), k=3)
    assert g.finish_reason == "stop" and g.tokens[-1] == stop_at and stop_at not in g.tokens[:-1]
    snippet = full.text[len(full.text) // 2:][:3]
    if snippet.strip():
        s = generate_sd(target, draft, p, StopCriteria(48, stop_strings=(snippet,)), k=3, decode=tiny_tok.decode)
        assert s.finish_reason == "stop" and snippet not in s.text
        assert full.text.startswith(s.text)


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "k must be"),
    (dict(params=SamplingParams(temperature=-1.0)), "temperature"),
    (dict(params=SamplingParams(temperature=0.5, top_p=0.0)), "top_p"),
    (dict(prompt=[]), "empty"),
    (dict(max_new=10 ** 6), "context"),
])
def test_bad_arguments_raise_clear_errors(models, bad, match):
    target, draft = models
    with pytest.raises(ValueError, match=match):
        generate_sd(target, draft, bad.get("prompt", [1, 2, 3]), StopCriteria(bad.get("max_new", 8)),
                    k=bad.get("k", 2), params=bad.get("params", SamplingParams()))
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopCriteria(0)
