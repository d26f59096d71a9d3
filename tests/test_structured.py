"""Structured outputs are exact under speculation.

- Greedy with a grammar: AR, SD and SSD give the same tokens, and those equal transformers'
  generate() on the same checkpoint with xgrammar's own logits processor (xgrammar.contrib.hf,
  its TokenizerInfo built by xgrammar from a transformers tokenizer): an independent reference.
- Every finished JSON answer parses and validates against its schema.
- Sampling under a grammar: seeded SSD draws of the first tokens against the masked target
  distribution, by the G-test of tests/test_distribution.py.
The serving front ends' structured outputs are in tests/test_structured_api.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from actors.protocol.frame import Rec
from actors.spec.grammar import MAX_JSON_WHITESPACE, GrammarSpec, choice_spec
from actors.spec.sampling import SamplingParams
from actors.spec.stats import SpecStats

pytestmark = pytest.mark.timeout(900)

N_TOP = 3
NEW = 320     # JSON may hold up to MAX_JSON_WHITESPACE spaces between its tokens: the tiny pair uses them
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"}}}
SPECS = [GrammarSpec("json_schema", json.dumps(SCHEMA)), GrammarSpec("regex", r"[a-z]{2,8}( [a-z]{2,8}){0,3}\."),
         choice_spec(["yes", "no", "maybe not"])]


def valid(doc) -> bool:
    return (isinstance(doc, dict) and set(doc) == {"name", "age", "ok"} and isinstance(doc["name"], str)
            and len(doc["name"]) <= 6 and type(doc["age"]) is int and 0 <= doc["age"] <= 120
            and isinstance(doc["ok"], bool))


def run_engine(mode: str, args: list, before=None, **overrides):
    """One LocalEngine (the verifier here, the drafter in a child; speculation.k = 4) runs every
    GenerateArgs at once, after `before(engine, coordinator)` if given; returns the handles
    (tokens), finals and logprob entries (of the requests that asked)."""
    from actors.launch import LocalEngine
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec
    from cluster.serving.coordinator import Coordinator

    spec = engine_spec(load_config("configs/local-cpu.yaml", {
        "cluster.launcher": "local", "speculation.mode": mode, "metrics.enabled": False, **overrides}))
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None, max_queue=len(args))
    try:
        if before is not None:
            before(engine, coord)
        handles = [coord.submit(a) for a in args]
        items = [list(h) for h in handles]
    finally:
        coord.stop()
        engine.stop()
    finals = [its[-1] for its in items]
    assert not [f.error for f in finals if f.error]
    return handles, finals, [[e for c in its[:-1] for e in (c.logprobs or [])] for its in items]


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
    args = [GenerateArgs(p, NEW, SamplingParams(), grammar=g, logprobs=N_TOP) for p, g in jobs]
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
    for (_, spec), h, final in zip(jobs, *runs["ssd"][:2]):
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




def test_two_drafters_draft_their_own_sequences_grammars(tiny_pair, greedy_runs):
    """models.draft.replicas: 2 (a real verifier and two real drafters in one process, as in
    tests/test_drafters.py): each drafter gets the grammars of the sequences it owns, and the
    output equals constrained AR."""
    from actors.engine_spec import EngineSpec
    from actors.sequence import Request
    from tests.test_drafters import Drafters

    jobs, runs = greedy_runs
    p = Drafters(EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), mode="ssd", k=4,
                            adaptive=False, max_batch=8, max_seq_len=1024, draft_replicas=2))
    try:
        outs, finals = p.serve([Request(i, prompt, NEW, grammar=spec) for i, (prompt, spec) in enumerate(jobs)])
        grammars = [[r.seq for f in end[0].verifier.sent for r in f.records if r.kind == Rec.GRAMMAR]
                    for end in p.ends]
        assert grammars == [p.admitted(0), p.admitted(1)] and all(grammars)
    finally:
        p.close()
    assert outs == [h.tokens for h in runs["ar"][0]]

def test_logprobs_are_the_masked_targets(greedy_runs, reference):
    """A constrained request's logprobs are those of the target's masked logits (refused tokens
    -inf), position by position: teacher-forced transformers with xgrammar's own mask."""
    import xgrammar as xgr

    jobs, runs = greedy_runs
    hf, compiled = reference
    for (prompt, spec), h, entries in zip(jobs, runs["ssd"][0], runs["ssd"][2]):
        out = h.tokens
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()
        m, bits = xgr.GrammarMatcher(compiled(spec)), xgr.allocate_token_bitmask(1, logits.shape[-1])
        for i, t in enumerate(out):
            m.fill_next_token_bitmask(bits)
            xgr.apply_token_bitmask_inplace(logits[i:i + 1], bits)
            assert m.accept_token(t)
        ref = torch.log_softmax(logits, -1)
        assert len(entries) == len(out)
        for i, (t, (lp, top)) in enumerate(zip(out, entries)):
            assert abs(lp - float(ref[i, t])) <= 1e-4 and lp == top[0][1]   # greedy: the best allowed token
            torch.testing.assert_close(torch.tensor([v for _, v in top]), ref[i].topk(N_TOP).values, atol=1e-4,
                                       rtol=0)

@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_drafts_stay_inside_the_grammar(held_out_prompts, monkeypatch, mode):
    """The drafter drafts under the verifier's mask: the grammar takes every draft token the
    verifier checks (up to a drafted stop token that completes it), in pre-drafted branches and
    drafts made on the spot alike, greedy and sampled."""
    from actors.verifier import Verifier
    from cluster.serving.coordinator import GenerateArgs
    from tests.conftest import wait_for

    seen = []   # (tokens the grammar took, draft length, grammar completed) per constrained round
    mask, warm = Verifier._mask, []

    def recording(self, seqs, logits):
        advanced = mask(self, seqs, logits)
        if warm:
            seen.extend((a, len(s.draft), s.matcher.terminated) for a, s in zip(advanced, seqs) if s.matcher)
        return advanced

    def warm_up(engine, coord):
        """The drafter builds its grammar engine in the background on the first constrained
        request, drafting unmasked meanwhile: the rounds counted here come after."""
        coord.submit(GenerateArgs(list(held_out_prompts[5]), 4, grammar=SPECS[2])).result()
        wait_for(lambda: engine.metrics()["drafter"]["grammars"], timeout=120, what="the drafter's grammar engine")
        warm.append(True)

    monkeypatch.setattr(Verifier, "_mask", recording)   # the verifier runs in this process
    args = [GenerateArgs(list(p), 48, sp, grammar=g) for p in held_out_prompts[:3] for g in SPECS
            for sp in (SamplingParams(), SamplingParams(temperature=0.8, seed=3))]
    run_engine(mode, args, before=warm_up)
    drafted = [r for r in seen if r[1]]
    assert len(drafted) > 20
    assert all(a == n or done for a, n, done in drafted), [r for r in drafted if r[0] != r[1] and not r[2]][:5]


def test_constrained_streams_survive_a_drafter_restart(serve_tiny, reference, held_out_prompts):
    """A drafter killed while constrained streams run: the verifier decodes alone meanwhile,
    then hands the running sequences to the new drafter with their grammar and the tokens
    generated so far (the drafter's matcher catches up through them). Every stream equals
    constrained AR, those that spanned the rejoin too, and speculation resumes."""
    import os
    import signal
    import threading
    import time

    from cluster.rpc.outrider.v1 import outrider_pb2 as pb

    spec = GrammarSpec("regex", "[a-z ]{300}")   # long, and no stop token before its end
    hf, compiled = reference
    prompts = [list(p) for p in held_out_prompts[:3]]
    refs = [hf_constrained(hf, compiled(spec), p, NEW) for p in prompts]
    server, client = serve_tiny({"metrics.enabled": False, "cluster.launcher": "local"})
    runs, stop = [], threading.Event()   # (start, end, prompt, tokens, final)

    def user(i):
        while not stop.is_set():
            t0 = time.perf_counter()
            ids, final = client.generate_ids(prompts[i], max_new_tokens=NEW,
                                             structured=pb.StructuredOutput(regex=spec.text))
            runs.append((t0, time.perf_counter(), i, ids, final))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    try:
        old_pid = server.engine.drafter_pid()
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(old_pid, signal.SIGKILL)
        while not (server.engine.drafter_pid() != old_pid and server.engine.metrics()["drafter_ok"]):
            time.sleep(0.01)
        back_at = time.perf_counter()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(300)
    finally:
        stop.set()
        client.close()
        server.stop(grace_s=1)
    for _, _, i, ids, final in runs:
        assert ids == refs[i] and final.finish_reason in ("eos", "stop")
    assert any(t0 < back_at < t1 for t0, t1, *_ in runs), "no stream spanned the drafter's return"
    assert sum(f.stats.accepted_tokens for _, t1, _, _, f in runs if t1 > back_at) > 0, "speculation did not resume"

# -- sampling under a grammar: the masked target distribution ---------------------------------------

SAMPLED = GrammarSpec("regex", r"[a-z][a-z ]{2,30}\.")
N_DRAWS = 1500


class MaskedTarget:
    """transformers' target whose last logits in each row are masked by the grammar after that
    row's continuation (a fresh xgrammar matcher per row, xgrammar's own mask kernel): the
    distribution a constrained request samples from, for test_distribution's G-test."""

    def __init__(self, hf, compiled, n_prompt: int):
        self.hf, self.compiled, self.n_prompt = hf, compiled, n_prompt

    def __call__(self, ids):
        import xgrammar as xgr

        out = self.hf(ids)
        bits = xgr.allocate_token_bitmask(1, out.logits.shape[-1])
        for r in range(ids.shape[0]):
            m = xgr.GrammarMatcher(self.compiled)
            assert all(m.accept_token(int(t)) for t in ids[r, self.n_prompt:])
            m.fill_next_token_bitmask(bits)
            xgr.apply_token_bitmask_inplace(out.logits[r, -1:], bits)
        return out


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=5),
                                    SamplingParams(temperature=0.8, top_p=0.8)], ids=["top_k", "top_p"])
def test_ssd_sampling_follows_the_masked_target(reference, held_out_prompts, params):
    """Seeded SSD draws of the first NEW tokens (tests/test_distribution.py: the first from the
    prefill, the next through speculation) against the masked target's exact probabilities; the
    same counts must reject the unmasked target (the test has power)."""
    from cluster.serving.coordinator import GenerateArgs
    from tests.test_distribution import ALPHA, NEW as N_TOKENS, g_test

    hf, compiled = reference
    prompt = list(held_out_prompts[3][-32:])
    args = [GenerateArgs(prompt, N_TOKENS, SamplingParams(params.temperature, params.top_k, params.top_p, seed=i),
                         ignore_eos=True, grammar=SAMPLED) for i in range(N_DRAWS)]
    handles, finals, _ = run_engine("ssd", args, **{"engine.max_batch": 32})
    stats = SpecStats.total(f.stats for f in finals)
    assert stats.drafts > 0 and 0 < stats.accepted_tokens < stats.draft_tokens, stats.summary()
    draws = [tuple(h.tokens) for h in handles]
    with torch.inference_mode():
        p, table = g_test(MaskedTarget(hf, compiled(SAMPLED), len(prompt)), prompt, params, draws)
        assert p > ALPHA, f"sampled continuations differ from the masked target (G-test p={p:.2e}):\n{table}"
        p_free, _ = g_test(hf, prompt, params, draws)
    assert p_free < 1e-6, f"the test cannot tell the masked target from the free one (p={p_free:.2e})"
