"""Online drafter learning (actors/spec/online.py): the drafter trains on committed tokens while it
serves, and the output stays exactly the target's (greedy against transformers, sampling by a
chi-square test against plain AR sampling). The engines here make the drafter learn fast (high
lr, many steps, pauses between waves of requests where it trains while idle)."""
from __future__ import annotations

import contextlib
import time

import pytest
import torch
from prometheus_client import generate_latest
from safetensors.torch import load_file

from actors.drafter import Drafter
from actors.protocol.frame import Frame, Rec, Record
from actors.generate import generate_ar
from actors.launch import LocalEngine
from actors.model.loader import load_model
from actors.spec.online import IGNORE, OnlineLearner, ReplayBuffer
from actors.spec.sampling import SamplingParams
from actors.engine_spec import EngineSpec, OnlineLearningSpec
from actors.spec.stopping import StopCriteria
from actors.protocol.wire import encode_params
from cluster.serving.metrics import Metrics
from cluster.config import ConfigError, load_config
from cluster.serving.coordinator import Coordinator, GenerateArgs
from cluster.launch.deployment import engine_spec
from tests.conftest import HF_NEW, assert_all_match_or_rare_near_ties, assert_same_outcome_law
from tests.test_drafter import _greedy

pytestmark = pytest.mark.timeout(900)
FAST = {"enabled": True, "lr": 1e-2, "max_steps_per_s": 1000, "batch_size": 4, "window_tokens": 64}


def _spec(online: dict | None = None, **overrides):
    ov = {"engine.max_batch": 8, **overrides}
    for k, v in (online or {}).items():
        ov[f"speculation.online_learning.{k}"] = v
    return engine_spec(load_config("configs/local-cpu.yaml", ov))


@contextlib.contextmanager
def _serving(spec):
    """A started engine and its coordinator, both stopped on the way out."""
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None, max_queue=1024)
    try:
        yield engine, coord
    finally:
        coord.stop()
        engine.stop()


def _waves(coord, prompts, waves: int, pause_s: float, max_new=HF_NEW, params=None):
    """Serve the prompts `waves` times; between waves the engine idles (the drafter trains)."""
    outs = []
    for _ in range(waves):
        hs = [coord.submit(GenerateArgs(list(p), max_new, params or SamplingParams())) for p in prompts]
        finals = [h.result() for h in hs]
        outs.append(([h.tokens for h in hs], finals))
        time.sleep(pause_s)
    return outs


def test_config_is_off_by_default_and_errors_name_the_key():
    cfg = load_config("configs/local-cpu.yaml")
    assert cfg.speculation.online_learning.enabled is False
    assert engine_spec(cfg).online_learning is None
    on = _spec({"enabled": True, "lr": 3e-4, "save_path": "/tmp/x"}).online_learning
    assert on == OnlineLearningSpec(lr=3e-4, save_path="/tmp/x")
    with pytest.raises(ConfigError, match=r"speculation\.online_learning\.lrate: unknown key"):
        load_config("configs/local-cpu.yaml", {"speculation.online_learning.lrate": 1e-3})
    with pytest.raises(ConfigError, match=r"speculation\.online_learning\.lr"):
        load_config("configs/local-cpu.yaml", {"speculation.online_learning.lr": 0})
    with pytest.raises(ConfigError, match=r"speculation\.online_learning\.window_tokens"):
        load_config("configs/local-cpu.yaml", {"speculation.online_learning.window_tokens": 512,
                                               "speculation.online_learning.buffer_tokens": 100})


def test_replay_buffer_scores_every_generated_token_once_and_stays_bounded():
    b = ReplayBuffer(max_tokens=10_000, window=8)
    seq = list(range(100, 140))
    b.add(seq, 10)   # tokens 10.. were generated; 0..9 are the prompt
    scored = [w[i] for w, first in b.items for i in range(first, len(w))]
    assert sorted(scored) == seq[10:]
    inputs, targets = b.batch(len(b))
    for x, y in zip(inputs.tolist(), targets.tolist()):   # a target is the input's next token
        assert all(t == IGNORE or seq.index(t) == seq.index(x[i]) + 1 for i, t in enumerate(y))
    small = ReplayBuffer(max_tokens=20, window=8)
    for i in range(10):
        small.add(list(range(i * 50, i * 50 + 30)), 5)
    assert small.tokens <= 20 and small.items[-1][0][-1] == 9 * 50 + 29   # the newest stay


def test_a_learner_step_lowers_the_loss_and_its_checkpoint_loads_in_transformers(tiny_pair, tmp_path,
                                                                                 held_out_prompts):
    from transformers import AutoModelForCausalLM

    target = load_model(tiny_pair / "target")
    drafter = load_model(tiny_pair / "draft")
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    learner = OnlineLearner(drafter, OnlineLearningSpec(lr=1e-2, window_tokens=64, batch_size=4),
                            str(tiny_pair / "draft"))
    for i, p in enumerate(held_out_prompts[:6]):
        out = generate_ar(target, p, StopCriteria(48), SamplingParams()).tokens
        learner.admit(i, len(p))
        learner.release(i, list(p) + out)
    losses = [learner.step() for _ in range(40)]
    assert learner.steps == 40 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert any(not torch.equal(before[k], v) for k, v in drafter.state_dict().items())
    path = learner.save(str(tmp_path / "adapted"))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "online.json"):
        assert (path / f).is_file(), f
    saved = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in drafter.state_dict().items())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([held_out_prompts[0][:40]])
    with torch.inference_mode():
        torch.testing.assert_close(hf(x).logits, drafter(x), rtol=1e-4, atol=1e-4)


def test_greedy_stays_exact_while_the_drafter_learns_and_the_adapted_drafter_serves(
        tiny_pair, hf_refs, held_out_prompts, tmp_path):
    hf, refs = hf_refs
    prompts = held_out_prompts[:12]
    ckpt = tmp_path / "adapted"
    with _serving(_spec({**FAST, "save_path": str(ckpt)})) as (engine, coord):
        waves = _waves(coord, prompts, 3, pause_s=0.5)
        m = engine.metrics()["drafter"]
        scrape = generate_latest(Metrics(lambda: engine).registry).decode()
    for outs, finals in waves:
        assert_all_match_or_rare_near_ties(hf, prompts, outs, refs[:12])
        assert sum(f.stats.drafts for f in finals) > 0
    assert m["train_steps"] >= 10 and m["train_scored_tokens"] > 0 and m["train_loss"] == m["train_loss"], m
    steps = [ln for ln in scrape.splitlines() if ln.startswith("outrider:drafter_train_steps_total ")]
    assert steps and float(steps[0].split()[1]) >= 10, scrape
    assert "outrider:drafter_train_loss " in scrape and 'outrider:drafter_train_seconds_total{part="late"}' in scrape
    # The drafter really changed, and the checkpoint written on shutdown holds the change.
    orig = load_file(str(tiny_pair / "draft" / "model.safetensors"))
    new = load_file(str(ckpt / "model.safetensors"))
    assert orig.keys() == new.keys() and any(not torch.equal(orig[k], new[k]) for k in orig)
    # The adapted checkpoint serves (as the drafter), exactly.
    with _serving(_spec(**{"models.draft.path": str(ckpt)})) as (engine, coord):
        [(outs, finals)] = _waves(coord, prompts, 1, pause_s=0)
        off = engine.metrics()["drafter"]
    assert_all_match_or_rare_near_ties(hf, prompts, outs, refs[:12])
    assert sum(f.stats.accepted_tokens for f in finals) > 0
    assert not any(k.startswith("train_") for k in off), off   # off (the default): no learner at all


def test_sampling_stays_the_targets_law_while_the_drafter_learns(tiny_pair, held_out_prompts):
    """Tokens 2 and 3 of a continuation pass through speculation while the drafter's weights
    move between waves; their joint law must still be the target's (AR, another seed stream)."""
    prompt = held_out_prompts[3][-32:]
    n, new, wave = 400, 3, 50
    with _serving(_spec(FAST)) as (engine, coord):
        toks = []
        for w in range(n // wave):
            hs = [coord.submit(GenerateArgs(list(prompt), new, SamplingParams(temperature=0.8, top_k=6,
                                                                              seed=10_000 + w * wave + i)))
                  for i in range(wave)]
            for h in hs:
                h.result()
            toks += [tuple(h.tokens[1:new]) for h in hs]
            time.sleep(0.1)
        steps = engine.metrics()["drafter"]["train_steps"]
    assert steps > 0
    target = load_model(tiny_pair / "target")
    ar = [tuple(generate_ar(target, prompt, StopCriteria(new), SamplingParams(0.8, 6, seed=i)).tokens[1:new])
          for i in range(n)]
    assert_same_outcome_law(ar, toks, "sampling while learning")



def test_recompute_kv_keeps_greedy_exact(hf_refs, held_out_prompts):
    """The whole engine with recompute_kv on (SSD, branches, hits) stays transformers' greedy."""
    hf, refs = hf_refs
    prompts = held_out_prompts[:12]
    with _serving(_spec({**FAST, "recompute_kv": True})) as (engine, coord):
        waves = _waves(coord, prompts, 2, pause_s=0.5)
        m = engine.metrics()["drafter"]
    for outs, finals in waves:
        assert_all_match_or_rare_near_ties(hf, prompts, outs, refs[:12])
        assert sum(f.stats.drafts for f in finals) > 0
    assert m["train_steps"] >= 10 and "train_kv_recomputes" in m, m


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_kv_drafts_from_the_current_weights(tiny_pair, hf_refs, held_out_prompts, recompute):
    """The drafter in process, the test playing a greedy verifier with transformers' output, two
    optimizer steps between every table and the next outcome (where the loop trains). With
    recompute_kv every pre-drafted branch and just-in-time draft equals drafting from scratch
    with the weights of that moment, and every outcome recomputed the sequence's KV (counted);
    keeping the old-weight KV, some differ (what recompute_kv is for). Either way the drafter's
    committed tokens are transformers' greedy continuation."""
    K, sid = 4, 5
    _, refs = hf_refs
    ol = OnlineLearningSpec(lr=1e-2, batch_size=4, window_tokens=64, recompute_kv=recompute)
    spec = EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), mode="ssd", k=K,
                      fan_out_budget=6, max_batch=2, max_seq_len=256, online_learning=ol)
    d = Drafter(spec)
    for i in range(6, 12):   # training data: other prompts' greedy continuations
        d.online.admit(100 + i, len(held_out_prompts[i]))
        d.online.release(100 + i, held_out_prompts[i] + refs[i])
    prompt, ref = held_out_prompts[0], refs[0]
    d.handle(Frame(Rec.ADMIT, 0, [Record(Rec.ADMIT, sid, 0, K, spec.fan_out_budget,
                                         tokens=encode_params(SamplingParams(), 0, prompt))]))
    s = d.seqs[sid]
    stale = rounds = hits = 0
    g = 0   # tokens generated so far; the first outcome is (0, first token)
    while True:
        d.prespeculate()
        for (j, t), br in s.branches.items():
            stale += br.tokens != _greedy(d.model, s.tokens + s.draft[:j] + [t], K)
        d.online.step()
        d.online.step()
        k = next((i for i, x in enumerate(s.draft) if x != ref[g + i]), len(s.draft))
        if g + k + 1 > len(ref) - K - 1:
            break
        hit = (k, ref[g + k]) in s.branches
        d.handle(Frame(Rec.OUTCOME, rounds + 1, [Record(Rec.OUTCOME, sid, rounds, k, ref[g + k],
                                                        tokens=[K, spec.fan_out_budget])]))
        g, rounds, hits = g + k + 1, rounds + 1, hits + hit
        assert s.tokens == prompt + ref[:g]
        if not hit:
            stale += s.draft != _greedy(d.model, s.tokens, K)
    assert rounds >= 10 and hits, (rounds, hits)
    m = d.stats()
    assert m["train_steps"] == 2 * (rounds + 1)
    if recompute:
        assert stale == 0 and m["train_kv_recomputes"] == rounds and m["train_kv_recompute_tokens"] > 0, m
    else:
        assert stale > 0 and m["train_kv_recomputes"] == 0, m
    d.cache.check()
    d.handle(Frame(Rec.RELEASE, rounds + 2, [Record(Rec.RELEASE, sid)]))
    assert d.cache.pool.n_free == d.cache.pool.n_blocks
