"""Sampled continuations against an independent reference: transformers' exact probabilities.

For one prompt, the probability of every short continuation under the target is computed by
teacher forcing in transformers (its own model class reading the same checkpoint, its own
temperature / top-k / top-p warpers), so the reference shares no code with outrider. Seeded
requests then sample the same continuation many times — outrider's AR path, and SSD through the
real engine (verifier and drafter, gloo data plane, speculation cache, Saguaro scaling) — and a
G-test compares the counts with the reference:

- the first token comes from the prefill; tokens 2 and 3 go through speculation (accepted drafts,
  corrections from the residual, and with k = 1 the bonus row and a second round);
- any continuation the reference gives probability 0 (outside top-k / top-p) fails at once;
- the test has power: the same counts are checked to reject the drafter's own distribution.

Seeds are fixed. AR draws repeat exactly; SSD draws repeat for all but a few percent of the
requests (whether a round's draft came from the speculation cache or was drafted on the spot
depends on timing, and the two consume the drafter's random stream differently), so the p-values
move a little between runs and ALPHA sits far below them. `make test` runs N_QUICK draws per
case; the slow variant (`pytest -m slow`) runs N_SLOW for smaller distortions.

Each SSD case was checked to fail on a planted bug: a bonus token drawn from the row before
(top_p, k = 1), corrections drawn from p instead of the residual (top_k, top_p, saguaro_top_p),
and a drafter that samples from the Saguaro-scaled q but ships the unscaled one (both Saguaro
cases); AR top_p fails when top-p drops the token that crosses top_p.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy.stats import power_divergence

from actors.generate import generate_ar
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.spec.stopping import StopCriteria
from actors.spec.stats import SpecStats

pytestmark = pytest.mark.timeout(900)

N_QUICK = 2000
N_SLOW = 10_000
NEW = 3                 # tokens per continuation
ALPHA = 1e-3            # per test; seeds are fixed, so a verdict does not change between runs
MIN_EXPECTED = 5.0      # cells expected less often than this are pooled into one "rest" cell


@dataclass(frozen=True)
class Case:
    params: SamplingParams
    speculation: dict = field(default_factory=dict)
    prompt: int = 3     # index into held_out_prompts


CASES = {
    # k = 4: tokens 2-3 are depth 0 and 1 of the first round (accepts and corrections).
    "top_k": Case(SamplingParams(temperature=0.8, top_k=5)),
    # k = 1: token 3 is the bonus row of the first round, or the first token of a second round
    # whose draft comes from the speculation cache (a hit) or is drafted on the spot.
    "top_p": Case(SamplingParams(temperature=0.6, top_p=0.7), {"k": 1}, prompt=8),
    # Saguaro: the drafter samples from its own q with the top-F mass scaled by c; the verifier
    # must test against that scaled q.
    "saguaro": Case(SamplingParams(temperature=0.9, top_k=8), {"saguaro_c": 0.4}),
    "saguaro_top_p": Case(SamplingParams(temperature=0.7, top_p=0.8), {"saguaro_c": 0.5, "k": 2}, prompt=2),
}


# -- the reference ----------------------------------------------------------------------------
def _warpers(params: SamplingParams):
    """transformers' own logits processors, in generate()'s order: temperature, top-k, top-p."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        procs.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList(procs)


@torch.inference_mode()
def _next_probs(hf, prompt: list[int], prefixes: list[tuple[int, ...]], params: SamplingParams) -> torch.Tensor:
    """[len(prefixes), V] float64 next-token probabilities after prompt + prefix (teacher forcing)."""
    out = []
    warp = _warpers(params)
    for i in range(0, len(prefixes), 256):
        ids = torch.tensor([prompt + list(p) for p in prefixes[i:i + 256]])
        logits = hf(ids).logits[:, -1].float()
        out.append(torch.softmax(warp(ids, logits).double(), -1))
    return torch.cat(out)


def reference(hf, prompt: list[int], params: SamplingParams, min_prob: float) -> dict[tuple[int, ...], float]:
    """Exact P(continuation) under transformers for every NEW-token continuation with
    probability >= min_prob (a prefix below min_prob cannot lead to one, so it is not expanded)."""
    frontier = {(): 1.0}
    for _ in range(NEW):
        prefixes = list(frontier)
        probs = _next_probs(hf, prompt, prefixes, params)
        nxt = {}
        for pre, row in zip(prefixes, probs):
            joint = frontier[pre] * row
            for t in ((joint >= min_prob) & (joint > 0)).nonzero().flatten().tolist():
                nxt[pre + (t,)] = float(joint[t])
        frontier = nxt
    return frontier


def sequence_probs(hf, prompt: list[int], seqs: list[tuple[int, ...]], params: SamplingParams) -> list[float]:
    """Exact P(seq) under transformers for arbitrary continuations (teacher forcing)."""
    total = [1.0] * len(seqs)
    for j in range(NEW):
        rows = _next_probs(hf, prompt, [s[:j] for s in seqs], params)
        for i, s in enumerate(seqs):
            total[i] *= float(rows[i, s[j]])
    return total


def g_test(hf, prompt: list[int], params: SamplingParams, draws: list[tuple[int, ...]]):
    """(p-value, table) of a G-test of the draws against the reference; p-value 0 if any draw
    has probability 0 under the reference."""
    n = len(draws)
    counts = collections.Counter(draws)
    impossible = [s for s, p in zip(counts, sequence_probs(hf, prompt, list(counts), params)) if p == 0.0]
    if impossible:
        return 0.0, f"continuations impossible under transformers: {impossible[:5]}"
    ref = reference(hf, prompt, params, MIN_EXPECTED / n)
    cells = sorted(ref, key=ref.get, reverse=True)
    obs = [counts[c] for c in cells]
    exp = [n * ref[c] for c in cells]
    rest_p = max(0.0, 1.0 - sum(ref.values()))
    obs.append(n - sum(obs))
    exp.append(n * rest_p)
    if exp[-1] < MIN_EXPECTED:  # too little mass left for a cell of its own: fold into the smallest
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    assert len(cells) >= 5, f"too few cells to test: {cells}"
    obs_a, exp_a = np.array(obs, dtype=np.float64), np.array(exp, dtype=np.float64)
    exp_a *= obs_a.sum() / exp_a.sum()  # scipy wants equal totals to ~1e-8
    pvalue = float(power_divergence(obs_a, exp_a, lambda_="log-likelihood").pvalue)
    table = "\n".join(f"  {c}: observed {o}, expected {e:.1f}" for c, o, e in
                      zip(cells + ["rest"], obs, exp))
    return pvalue, table


def check(hf, draft_hf, prompt, params, draws, what: str) -> None:
    pvalue, table = g_test(hf, prompt, params, draws)
    assert pvalue > ALPHA, f"{what}: sampled continuations differ from transformers (G-test p={pvalue:.2e}):\n{table}"
    # Power: the same counts must tell the target from the drafter.
    p_draft, _ = g_test(draft_hf, prompt, params, draws)
    print(f"{what}: G-test p={pvalue:.3f} against the target, p={p_draft:.1e} against the drafter")
    assert p_draft < 1e-6, f"{what}: the test cannot tell the target from the drafter (p={p_draft:.2e})"


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair(tiny_pair):
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(tiny_pair / r, dtype=torch.float32).eval()
                 for r in ("target", "draft"))


def _prompt(held_out_prompts, case: Case) -> list[int]:
    return list(held_out_prompts[case.prompt][-32:])


def _seeded(params: SamplingParams, n: int, base: int) -> list[SamplingParams]:
    return [SamplingParams(params.temperature, params.top_k, params.top_p, seed=base + i) for i in range(n)]


def _ar_draws(tiny_pair, prompt, params, n) -> list[tuple[int, ...]]:
    target = load_model(tiny_pair / "target")
    return [tuple(generate_ar(target, prompt, StopCriteria(NEW), p).tokens) for p in _seeded(params, n, 1_000_000)]


def _ssd_draws(prompt, case: Case, n) -> list[tuple[int, ...]]:
    """n seeded requests through the real engine (verifier here, drafter in a child process),
    all in flight at once so they share verify batches."""
    from actors.launch import LocalEngine
    from cluster.config import load_config
    from cluster.serving.coordinator import Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec

    overrides = {f"speculation.{k}": v for k, v in case.speculation.items()}
    spec = engine_spec(load_config("configs/local-cpu.yaml", {**overrides, "engine.max_batch": 32,
                                                                "speculation.mode": "ssd"}))
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None, max_queue=n)
    try:
        handles = [coord.submit(GenerateArgs(list(prompt), NEW, p, ignore_eos=True))
                   for p in _seeded(case.params, n, 2_000_000)]
        finals = [h.result() for h in handles]
    finally:
        coord.stop()
        engine.stop()
    assert all(f.finish_reason == "length" for f in finals)
    stats = SpecStats.total(f.stats for f in finals)
    # Speculation really happened: drafts were accepted and rejected.
    assert stats.drafts > 0 and 0 < stats.accepted_tokens < stats.draft_tokens, stats.summary()
    if case.speculation.get("k") == 1:
        # Every request's first draft came from the table pre-drafted at admission (a sampled
        # hit), and second rounds were looked up there too. (Their hits stay rare, ~1 %: after a
        # rejection the correction falls outside a top-p-truncated drafter's candidates.)
        assert sum(stats.lookups_by_depth) > 0, stats.summary()
    return [tuple(h.tokens) for h in handles]


# -- tests ------------------------------------------------------------------------------------
def test_reference_is_a_distribution(hf_pair, held_out_prompts):
    """The enumerated reference sums to 1 when nothing is pruned, and its support is what
    top-k allows (at most k^NEW continuations)."""
    hf, _ = hf_pair
    case = CASES["top_k"]
    ref = reference(hf, _prompt(held_out_prompts, case), case.params, 0.0)
    nonzero = [p for p in ref.values() if p > 0]
    assert len(nonzero) == case.params.top_k ** NEW
    assert abs(sum(nonzero) - 1) < 1e-9


@pytest.mark.parametrize("name", ["top_k", "top_p"])  # AR has no Saguaro: the other cases add nothing
def test_ar_sampling_matches_transformers(tiny_pair, hf_pair, held_out_prompts, name):
    case = CASES[name]
    prompt = _prompt(held_out_prompts, case)
    check(*hf_pair, prompt, case.params, _ar_draws(tiny_pair, prompt, case.params, N_QUICK), f"AR {name}")


@pytest.mark.parametrize("name", list(CASES))
def test_ssd_sampling_matches_transformers(tiny_pair, hf_pair, held_out_prompts, name):
    case = CASES[name]
    prompt = _prompt(held_out_prompts, case)
    check(*hf_pair, prompt, case.params, _ssd_draws(prompt, case, N_QUICK), f"SSD {name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ssd_sampling_matches_transformers_many_draws(tiny_pair, hf_pair, held_out_prompts, name):
    case = CASES[name]
    prompt = _prompt(held_out_prompts, case)
    check(*hf_pair, prompt, case.params, _ssd_draws(prompt, case, N_SLOW), f"SSD {name}, {N_SLOW} draws")
