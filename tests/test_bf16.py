"""dtype: bfloat16 on CPU, end to end: in-process AR and SD, and the SSD engine (verifier and
drafter both in bfloat16, KV caches in bfloat16), against transformers running the same
checkpoint in bfloat16.

Two bfloat16 implementations round differently (the order of additions differs), so greedy
outputs may part where the target's top two logits are within bfloat16's resolution. A mismatch
is accepted only there: our token's float32 logit is within BF16_GAP of the best one at the first
differing position. At most two of the prompts may end that way; every one is reported.
"""
from __future__ import annotations

import pytest
import torch

from actors.generate import generate_ar, generate_sd
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.spec.stopping import StopCriteria
from tests.conftest import assert_same_outcome_law, divergences, hf_greedy

pytestmark = pytest.mark.timeout(600)

NEW = 32
N_PROMPTS = 8
BF16_GAP = 0.05     # float32 logit gap treated as a bfloat16 near-tie (logits here are O(10))


@pytest.fixture(scope="module")
def bf16_refs(tiny_pair, held_out_prompts):
    """transformers' greedy continuations in bfloat16, and its float32 model to measure gaps."""
    from transformers import AutoModelForCausalLM

    hf16 = AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.bfloat16).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.float32).eval()
    hf16.generation_config.eos_token_id = None  # full length, EOS included, as ignore_eos does
    prompts = held_out_prompts[:N_PROMPTS]
    return hf32, prompts, hf_greedy(hf16, prompts, NEW)


def _check(hf32, prompts, outs, refs, what: str) -> None:
    assert len(outs) == len(refs) == len(prompts)
    ties = []
    for n, i, gap in divergences(hf32, prompts, outs, refs, NEW, what):
        assert gap < BF16_GAP, f"{what}: prompt {n} differs at position {i} with float32 gap {gap:.3f}: a real bug"
        print(f"{what}: prompt {n}, bfloat16 near-tie at position {i} (float32 gap {gap:.3f})")
        ties.append(n)
    assert len(ties) <= 2, f"{what}: {len(ties)} of {len(prompts)} prompts parted at a near-tie: {ties}"


def test_in_process_ar_and_sd_in_bfloat16(tiny_pair, bf16_refs):
    hf32, prompts, refs = bf16_refs
    target, draft = load_model(tiny_pair / "target", "bfloat16"), load_model(tiny_pair / "draft", "bfloat16")
    assert target.dtype == draft.dtype == torch.bfloat16
    ar = [generate_ar(target, p, StopCriteria(NEW)).tokens for p in prompts]
    _check(hf32, prompts, ar, refs, "AR bf16")
    sd = [generate_sd(target, draft, p, StopCriteria(NEW), k=3) for p in prompts]
    # against outrider's own bfloat16 AR: identical, no near-tie allowed (tests/test_packed.py)
    assert [g.tokens for g in sd] == ar
    assert sum(g.stats.accepted_tokens for g in sd) > 0
    sampled = generate_sd(target, draft, prompts[0], StopCriteria(NEW), k=3, params=SamplingParams(0.8, seed=3))
    assert len(sampled.tokens) == NEW


def test_ssd_engine_in_bfloat16(tiny_pair, bf16_refs):
    """models.target.dtype and models.draft.dtype: bfloat16 through the real engine (verifier
    here, drafter in a child process, gloo between them)."""
    from actors.launch import LocalEngine
    from cluster.config import load_config
    from cluster.serving.coordinator import Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec

    hf32, prompts, refs = bf16_refs
    spec = engine_spec(load_config("configs/local-cpu.yaml", {
        "models.target.dtype": "bfloat16", "models.draft.dtype": "bfloat16", "engine.max_batch": 8}))
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None)
    try:
        greedy = [coord.submit(GenerateArgs(list(p), NEW, SamplingParams(), ignore_eos=True)) for p in prompts]
        sampled = [coord.submit(GenerateArgs(list(p), NEW, SamplingParams(0.8, top_k=20, seed=i), ignore_eos=True))
                   for i, p in enumerate(prompts[:4])]
        finals = [h.result() for h in greedy + sampled]
    finally:
        coord.stop()
        engine.stop()
    assert all(f.finish_reason == "length" for f in finals)
    _check(hf32, prompts, [h.tokens for h in greedy], refs, "SSD bf16")
    target = load_model(tiny_pair / "target", "bfloat16")   # batched verifies: still AR's tokens exactly
    assert [h.tokens for h in greedy] == [generate_ar(target, p, StopCriteria(NEW)).tokens for p in prompts]
    assert all(len(h.tokens) == NEW for h in sampled)
    assert sum(f.stats.accepted_tokens for f in finals) > 0 and sum(f.stats.cache_hits for f in finals) > 0


def test_sd_sampling_keeps_the_targets_law_in_bfloat16(tiny_pair, held_out_prompts):
    """Tokens 2 and 3 of a sampled continuation pass through speculation (p and q are float32
    from bfloat16 logits); their joint law must be bfloat16 AR's (another seed stream)."""
    target, draft = load_model(tiny_pair / "target", "bfloat16"), load_model(tiny_pair / "draft", "bfloat16")
    prompt, n, new = held_out_prompts[3][-32:], 400, 3
    ar = [tuple(generate_ar(target, prompt, StopCriteria(new), SamplingParams(0.8, 6, seed=i)).tokens[1:new])
          for i in range(n)]
    sd = [tuple(generate_sd(target, draft, prompt, StopCriteria(new), k=3,
                            params=SamplingParams(0.8, 6, seed=10_000 + i)).tokens[1:new]) for i in range(n)]
    assert_same_outcome_law(ar, sd, "SD sampling in bfloat16")


def test_dtype_auto_resolves_once_from_torchs_cpu_query():
    """`dtype: auto` becomes a concrete dtype in the engine spec (so the memory plan and the actors
    agree): bfloat16 where torch reports AMX-BF16 or AVX512-BF16, float32 elsewhere; on CUDA
    bfloat16."""
    from actors.model.loader import auto_dtype, cpu_has_fast_bf16
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec

    caps = torch.cpu.get_capabilities()
    assert cpu_has_fast_bf16() == bool(torch.backends.mkldnn.is_available()
                                       and (caps.get("amx_bf16") or caps.get("avx512_bf16")))
    want = "bfloat16" if cpu_has_fast_bf16() else "float32"
    spec = engine_spec(load_config("configs/local-cpu.yaml",
                                   {"models.target.dtype": "auto", "models.draft.dtype": "auto"}))
    assert spec.target_dtype == spec.draft_dtype == want
    assert auto_dtype("cuda") == torch.bfloat16
