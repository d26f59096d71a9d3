"""Logprobs are exact under speculation: for AR, SD and SSD, greedy and sampled, every emitted
token's logprob and top-n alternatives equal transformers' teacher-forced log-probabilities of the
target over prompt + output (raw: log_softmax of the logits, before temperature/top-k/top-p).
Then the same through gRPC (real server, 127.0.0.1) and the openai client over HTTP, streaming
and not, and the 400s / INVALID_ARGUMENT for counts over 20."""
from __future__ import annotations

import grpc
import pytest
import torch

from actors.logprobs import token_logprobs
from actors.sampling import SamplingParams

ATOL = 1e-4      # float32 log_softmax of our forward's logits against transformers' (logits agree to 2e-5)
N_TOP = 5
NEW = 24


@pytest.fixture(scope="module")
def hf(tiny_pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.float32).eval()


def teacher_forced(hf, prompt: list[int], out: list[int]) -> torch.Tensor:
    """[len(out), V]: transformers' log-probabilities at each output position, given everything before."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + out])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)


def assert_exact(hf, prompt: list[int], out: list[int], entries: list, n_top: int) -> None:
    """Each entry (logprob, [(id, logprob), ...]) against the teacher-forced reference."""
    assert len(entries) == len(out) > 0
    ref = teacher_forced(hf, prompt, out)
    for i, (tok, (lp, top)) in enumerate(zip(out, entries)):
        assert abs(lp - float(ref[i, tok])) <= ATOL, (i, tok, lp, float(ref[i, tok]))
        assert len(top) == n_top
        ids, vals = [t for t, _ in top], [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        # the values at our ids, and the top-n values themselves (ids may swap within a near-tie)
        torch.testing.assert_close(torch.tensor(vals), ref[i, ids], atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(vals), ref[i].topk(n_top).values, atol=ATOL, rtol=0)


def test_token_logprobs_rows():
    logits = torch.randn(3, 50, dtype=torch.float64)
    got = token_logprobs(logits, [4, 7, 9], 2)
    ref = torch.log_softmax(logits.float(), -1)
    assert [e[0] for e in got] == [float(ref[0, 4]), float(ref[1, 7]), float(ref[2, 9])]
    assert got[1][1][0] == [int(ref[1].argmax()), float(ref[1].max())]
    assert token_logprobs(logits, [1, 2, 3], 0)[2] == [float(ref[2, 3]), []]


def run_engine(mode: str, jobs: list[tuple[list[int], SamplingParams]], n_top: int):
    """One LocalEngine (the verifier here, the drafter in a child; speculation.k = 4, fixed) runs
    every job at once with logprobs; returns each job's (tokens, logprob entries, final), plus the
    final of a request that asked for none."""
    from actors.launch import LocalEngine
    from cluster.config import load_config
    from cluster.coordinator import Chunk, Coordinator, GenerateArgs
    from cluster.deployment import engine_spec

    spec = engine_spec(load_config("configs/local-cpu.yaml", {
        "cluster.launcher": "local", "speculation.mode": mode, "metrics.enabled": False}))
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None)
    try:
        handles = [coord.submit(GenerateArgs(p, NEW, sp, ignore_eos=True, logprobs=n_top)) for p, sp in jobs]
        plain = coord.submit(GenerateArgs(jobs[0][0], 4, ignore_eos=True))
        items = [list(h) for h in handles]
        plain_items = list(plain)
    finally:
        coord.stop()
        engine.stop()
    assert all(c.logprobs is None for c in plain_items[:-1]) and plain_items[-1].finish_reason == "length"
    out = []
    for h, its in zip(handles, items):
        chunks = [c for c in its if isinstance(c, Chunk)]
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == h.tokens and len(tokens) == NEW
        out.append((tokens, [e for c in chunks for e in c.logprobs], its[-1]))
    return out


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_engine_logprobs_equal_teacher_forced(mode, hf, held_out_prompts):
    """Greedy and sampled requests side by side; with speculation, drafts were accepted, so the
    logprobs of accepted draft tokens, corrections and bonus tokens are all checked."""
    jobs = [(list(p), sp) for p in held_out_prompts[:2]
            for sp in (SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7))]
    results = run_engine(mode, jobs, N_TOP)
    for (prompt, sp), (tokens, entries, final) in zip(jobs, results):
        assert_exact(hf, prompt, tokens, entries, N_TOP)
        if sp.greedy:   # the emitted token is the most likely one
            assert all(lp == top[0][1] for lp, top in entries)
    accepted = sum(final.stats.accepted_tokens for _, _, final in results)
    assert (accepted > 0) == (mode != "ar")
