"""Structured outputs are exact under speculation.

- Greedy with a grammar: AR, SD and SSD give the same tokens, and those equal transformers'
  generate() on the same checkpoint with xgrammar's own logits processor (xgrammar.contrib.hf,
  its TokenizerInfo built by xgrammar from a transformers tokenizer): an independent reference.
- Every finished JSON answer parses and validates against its schema.
- Sampling under a grammar: seeded SSD draws of the first tokens against the masked target
  distribution, by the G-test of tests/test_distribution.py.
- The serving front ends: the openai client's response_format and vLLM's extras over HTTP, the
  same on gRPC, and bad constraints as 400s / INVALID_ARGUMENT with a message.
"""
from __future__ import annotations

import json

import pytest
import torch

from actors.grammar import MAX_JSON_WHITESPACE, GrammarSpec, choice_spec
from actors.sampling import SamplingParams

pytestmark = pytest.mark.timeout(900)

NEW = 160
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"}}}
SPECS = [GrammarSpec("json_schema", json.dumps(SCHEMA)), GrammarSpec("regex", r"[a-z]{2,8}( [a-z]{2,8}){0,3}\."),
         choice_spec(["yes", "no", "maybe not"])]


def valid(doc) -> bool:
    return (isinstance(doc, dict) and set(doc) == {"name", "age", "ok"} and isinstance(doc["name"], str)
            and len(doc["name"]) <= 6 and type(doc["age"]) is int and 0 <= doc["age"] <= 120
            and isinstance(doc["ok"], bool))


def run_engine(mode: str, args: list, **overrides):
    """One LocalEngine (the verifier here, the drafter in a child; speculation.k = 4) runs every
    GenerateArgs at once; returns the handles (tokens) and finals."""
    from actors.launch import LocalEngine
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec
    from cluster.serving.coordinator import Coordinator

    spec = engine_spec(load_config("configs/local-cpu.yaml", {
        "cluster.launcher": "local", "speculation.mode": mode, "metrics.enabled": False, **overrides}))
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None, max_queue=len(args))
    try:
        handles = [coord.submit(a) for a in args]
        finals = [h.result() for h in handles]
    finally:
        coord.stop()
        engine.stop()
    assert not [f.error for f in finals if f.error]
    return handles, finals


def _hf_tokenizer_info(tiny_pair):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_pair / "target" / "tokenizer.json"),
                                  eos_token="<|endoftext|>")
    return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=json.loads(
        (tiny_pair / "target" / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="module")
def reference(tiny_pair):
    """spec -> xgrammar's compiled grammar on xgrammar's own view of the tokenizer, and the target
    in transformers."""
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM

    compiler = xgr.GrammarCompiler(_hf_tokenizer_info(tiny_pair))
    hf = AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.float32).eval()

    def compiled(spec: GrammarSpec):
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.text, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        return compiler.compile_regex(spec.text) if spec.kind == "regex" else compiler.compile_grammar(spec.text)
    return hf, compiled


def hf_constrained(hf, compiled, prompt: list[int], new: int) -> list[int]:
    import xgrammar.contrib.hf as xhf

    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, logits_processor=[xhf.LogitsProcessor(compiled)],
                          eos_token_id=0, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def greedy_runs(held_out_prompts):
    """Greedy requests under each grammar, on two prompts, in AR, SD and SSD."""
    from cluster.serving.coordinator import GenerateArgs

    jobs = [(list(p), g) for p in held_out_prompts[:2] for g in SPECS]
    args = [GenerateArgs(p, NEW, SamplingParams(), grammar=g) for p, g in jobs]
    return jobs, {mode: run_engine(mode, args) for mode in ("ar", "sd", "ssd")}


def test_greedy_equals_constrained_ar_and_transformers(greedy_runs, reference, tiny_tok):
    jobs, runs = greedy_runs
    hf, compiled = reference
    ar = [h.tokens for h in runs["ar"][0]]
    for mode in ("sd", "ssd"):
        assert [h.tokens for h in runs[mode][0]] == ar, mode
    assert sum(f.stats.accepted_tokens for f in runs["ssd"][1]) > 0
    for (prompt, spec), tokens, final in zip(jobs, ar, runs["ar"][1]):
        ref = hf_constrained(hf, compiled(spec), prompt, NEW)
        assert tokens == ref, (spec.kind, tiny_tok.decode(tokens), tiny_tok.decode(ref))
        if final.finish_reason != "length":   # the grammar completed: the model's EOS ended it
            assert final.finish_reason in ("eos", "stop") and tokens[-1] in tiny_tok.eos_token_ids


def test_answers_match_their_grammar(greedy_runs, tiny_tok):
    jobs, runs = greedy_runs
    finished = 0
    for (_, spec), h, final in zip(jobs, *runs["ssd"]):
        text = tiny_tok.decode(h.tokens)
        if final.finish_reason == "length":
            continue
        finished += 1
        if spec.kind == "json_schema":
            assert valid(json.loads(text)), text
        elif spec.kind == "regex":
            import re
            assert re.fullmatch(spec.text, text), text
        else:
            assert text in ("yes", "no", "maybe not"), text
    assert finished >= 4, "too few answers finished to check"
