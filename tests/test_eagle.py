"""The draft head (actors/eagle/): its format, its training unroll, and exactness with it.

- A head written in the public EAGLE-3 layout loads, and computes what an independent plain-torch
  reading of that layout computes.
- The training-time test's unrolled forward (whole sequences, masked) gives, row for row, the
  hidden states the head produces when it drafts with its cache: training sees what drafting does.
- Speculative decoding with a head trained for a few seconds on the tiny target is greedy
  token-identical to transformers, and sampling with a draft vocabulary that leaves out the
  target's most likely tokens matches transformers' exact distribution (G-test).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from actors.model.config import CheckpointError
from cluster.models import eagle_smol
from actors.eagle.checkpoint import is_head_dir, load_head, save_head
from actors.eagle.draft import HeadStream
from actors.eagle.generate import generate_sd_head
from actors.eagle.head import EagleHead, HeadArgs, default_aux_layers, ttt_forward
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.spec.stopping import StopCriteria
from tests.conftest import HF_NEW, assert_matches_or_near_tie
from actors.spec.stats import SpecStats


@pytest.fixture(scope="module")
def target(tiny_pair):
    return load_model(tiny_pair / "target")


def _windows(tiny_tok, n=24, width=96):
    from cluster.models.corpus import read, split

    out = []
    for p in sorted(split()[0])[:200]:
        ids = tiny_tok.encode(read(p))
        for s in range(0, len(ids) - width, width * 4):
            out.append(ids[s:s + width])
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="module")
def trained_head(target, tiny_tok):
    """A head for the tiny target, trained for a few seconds on training-split code it reads,
    over a draft vocabulary of 256 of its 512 tokens."""
    from cluster.models.distill_smol import forced_labelled

    torch.manual_seed(0)
    data = forced_labelled(target, _windows(tiny_tok), top_k=20)
    aux = default_aux_layers(target.args.n_layers)
    with torch.inference_mode():
        feats = [target(r["ids"][None], aux=aux)[1][0].clone() for r in data]
    spec = replace(eagle_smol.SPEC, draft_vocab=256, budget_min=60 / eagle_smol.STEPS_PER_MIN, batch=8, lr=5e-3)
    ids = eagle_smol.draft_vocabulary(data, target.args.vocab_size, spec.draft_vocab)
    t2d = torch.full((target.args.vocab_size,), -1, dtype=torch.long)
    t2d[ids] = torch.arange(len(ids))
    items = [eagle_smol.rows(r, f, t2d) for r, f in zip(data, feats)]
    with torch.enable_grad():
        head = eagle_smol.init_head(target, spec, ids)
        before = eagle_smol.agreement(head, items[:4], 2)
        eagle_smol.train(head, items, spec)
    after = eagle_smol.agreement(head, items[:4], 2)
    assert after[0] > before[0], (before, after)   # the training does something
    return head


def _random_head(target, draft_vocab: int, seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    a = target.args
    head = EagleHead(HeadArgs(replace(a, n_layers=1), draft_vocab, default_aux_layers(a.n_layers)))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
        ids = torch.randperm(a.vocab_size)[:draft_vocab].sort().values
        head.d2t.copy_(ids - torch.arange(draft_vocab))
    return head.eval().attach(target.model.embed_tokens)


# -- format ---------------------------------------------------------------------------------
def _plain_reference(state: dict, cfg: dict, embed: torch.Tensor, feats: torch.Tensor, toks: torch.Tensor):
    """The layout read with plain torch (no outrider module): full causal attention over one
    sequence, feats [T, 3 * dim], toks [T] -> draft-vocabulary logits [T, Vd]."""
    d, H, Hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = d // H
    eps = cfg["rms_norm_eps"]

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(x, pos):
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
        ang = pos[:, None].float() * inv
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]

    m = "layers.0."
    T = len(toks)
    h = feats @ state["fc.weight"].t()
    x = torch.cat((norm(embed[toks], state[m + "input_layernorm.weight"]),
                   norm(h, state[m + "hidden_norm.weight"])), -1)
    pos = torch.arange(T)
    q = rot((x @ state[m + "self_attn.q_proj.weight"].t()).view(T, H, D), pos)
    k = rot((x @ state[m + "self_attn.k_proj.weight"].t()).view(T, Hkv, D), pos).repeat_interleave(H // Hkv, 1)
    v = (x @ state[m + "self_attn.v_proj.weight"].t()).view(T, Hkv, D).repeat_interleave(H // Hkv, 1)
    att = torch.einsum("thd,shd->hts", q, k) / D ** 0.5
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    h = h + torch.einsum("hts,shd->thd", att, v).reshape(T, H * D) @ state[m + "self_attn.o_proj.weight"].t()
    y = norm(h, state[m + "post_attention_layernorm.weight"])
    y = torch.nn.functional.silu(y @ state[m + "mlp.gate_proj.weight"].t()) * (y @ state[m + "mlp.up_proj.weight"].t())
    h = h + y @ state[m + "mlp.down_proj.weight"].t()
    return norm(h, state["norm.weight"]) @ state["lm_head.weight"].t()


def test_loads_a_head_in_the_public_eagle3_layout(target, tmp_path):
    a = target.args
    d, Vd = a.dim, 100
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    m = "layers.0."
    qd, kd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    state = {"fc.weight": r(d, 3 * d), "norm.weight": 1 + r(d), "lm_head.weight": r(Vd, d),
             m + "input_layernorm.weight": 1 + r(d), m + "hidden_norm.weight": 1 + r(d),
             m + "post_attention_layernorm.weight": 1 + r(d),
             m + "self_attn.q_proj.weight": r(qd, 2 * d), m + "self_attn.k_proj.weight": r(kd, 2 * d),
             m + "self_attn.v_proj.weight": r(kd, 2 * d), m + "self_attn.o_proj.weight": r(d, qd),
             m + "mlp.gate_proj.weight": r(a.intermediate_size, d), m + "mlp.up_proj.weight": r(a.intermediate_size, d),
             m + "mlp.down_proj.weight": r(d, a.intermediate_size)}
    ids = torch.randperm(a.vocab_size, generator=g)[:Vd].sort().values
    state["d2t"] = ids - torch.arange(Vd)
    t2d = torch.zeros(a.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    state["t2d"] = t2d
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": d, "intermediate_size": a.intermediate_size,
           "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "rms_norm_eps": 1e-5,
           "rope_theta": a.rope_theta, "vocab_size": a.vocab_size, "draft_vocab_size": Vd, "num_hidden_layers": 1,
           "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 1]}}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert is_head_dir(tmp_path) and not is_head_dir(tmp_path.parent)

    head = load_head(tmp_path, target)
    assert head.args.aux_layers == (0, 1, 1)
    assert torch.equal(head.target_ids(), ids)
    T = 12
    feats, toks = r(T, 3 * d), torch.randint(0, a.vocab_size, (T,), generator=g)
    hs = HeadStream(head, 32)
    logits = torch.stack([hs.feed(feats[t:t + 1], [int(toks[t])])[0] for t in range(T)])
    ref = _plain_reference(state, cfg, target.model.embed_tokens.weight.detach(), feats, toks)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)

    # written back out by outrider, it loads to the same head
    save_head(head, tmp_path / "again")
    again = load_head(tmp_path / "again", target)
    assert all(torch.equal(x, y) for x, y in zip(head.state_dict().values(), again.state_dict().values()))

    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_size=2 * d)))
    with pytest.raises(CheckpointError, match="hidden size"):
        load_head(tmp_path, target)
    bad = dict(state, t2d=torch.zeros(a.vocab_size, dtype=torch.bool))
    save_file(bad, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="t2d"):
        load_head(tmp_path, target)


# -- training-time test ---------------------------------------------------------------------
@torch.inference_mode()
def test_training_unroll_sees_what_drafting_computes(target):
    """Step j of the unroll at row t equals drafting j tokens past the real rows up to t - j."""
    head = _random_head(target, 64)
    T, steps = 10, 3
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, T, head.args.feature_dim, generator=g)
    toks = torch.randint(0, target.args.vocab_size, (1, T), generator=g)
    unrolled = [out[0] for out, _ in ttt_forward(head, feats, toks, steps)]
    for t in range(T):
        for j in range(min(steps, t + 1)):
            hs = HeadStream(head, 32)
            _, h = hs.feed(feats[0, :t - j + 1], toks[0, :t - j + 1].tolist())
            for depth in range(1, j + 1):
                _, h = hs.step(h, int(toks[0, t - j + depth]), depth)
            torch.testing.assert_close(h, unrolled[j][t], rtol=1e-4, atol=1e-5, msg=f"row {t}, step {j}")


# -- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_sd_with_head_greedy_equals_hf(target, trained_head, hf_refs, held_out_prompts, k):
    hf, refs = hf_refs
    accepted = 0
    for p, ref in list(zip(held_out_prompts, refs))[:8]:
        out = generate_sd_head(target, trained_head, p, StopCriteria(HF_NEW), k)
        assert_matches_or_near_tie(hf, p, out.tokens, ref)
        accepted += out.stats.accepted_tokens
    assert accepted > 0   # the head's drafts were accepted: verification did more than decode


def test_head_rejects_bad_k(target, trained_head, held_out_prompts):
    with pytest.raises(ValueError, match="k must be at least 1"):
        generate_sd_head(target, trained_head, held_out_prompts[0], StopCriteria(4), 0)


def _without(head: EagleHead, exclude: set[int]) -> EagleHead:
    """`head` with the target ids `exclude` taken out of its draft vocabulary."""
    ids = head.target_ids()
    keep = torch.tensor([i for i, t in enumerate(ids.tolist()) if t not in exclude])
    out = EagleHead(replace(head.args, draft_vocab=len(keep)))
    state = dict(head.state_dict(), **{"lm_head.weight": head.lm_head.weight[keep],
                                       "d2t": ids[keep] - torch.arange(len(keep))})
    out.load_state_dict({k: v for k, v in state.items() if not k.startswith("embed_tokens")})
    return out.eval().attach(head.embed_tokens)


@torch.inference_mode()
def _likeliest(target, prompt: list[int], n: int) -> set[int]:
    """The target's two likeliest tokens at each of the first n positions of its greedy path."""
    ids, top = list(prompt), set()
    for _ in range(n):
        logits = target(torch.tensor([ids]))[0, -1]
        top |= set(logits.topk(2).indices.tolist())
        ids.append(int(logits.argmax()))
    return top


@pytest.mark.slow   # the engine's test below covers the same in SSD, within make test
def test_sd_with_head_sampling_matches_transformers(target, trained_head, tiny_pair, held_out_prompts):
    """Sampling where the draft vocabulary leaves out the target's two likeliest tokens at each of
    the first positions: q is zero there, and the residual must give them their whole probability."""
    from tests.test_distribution import NEW, _prompt, _seeded, CASES, g_test
    from transformers import AutoModelForCausalLM

    case = CASES["top_k"]
    prompt = _prompt(held_out_prompts, case)
    params = case.params
    top = _likeliest(target, prompt, NEW)
    head = _without(trained_head, top)
    assert not top & set(head.target_ids().tolist())
    draws, accepted = [], 0
    for p in _seeded(params, 2000, 3_000_000):
        out = generate_sd_head(target, head, prompt, StopCriteria(NEW), 2, p)
        draws.append(tuple(out.tokens))
        accepted += out.stats.accepted_tokens
    assert accepted > 50   # drafts were accepted, so q and the residual both took part
    assert sum(d[0] in top for d in draws) > 200   # and the left-out tokens were emitted (from the residual)
    hf = AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.float32).eval()
    pvalue, table = g_test(hf, prompt, params, draws)
    assert pvalue > 1e-3, f"sampled continuations differ from transformers (p={pvalue:.2e}):\n{table}"


# -- the engine -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_dir(trained_head, tmp_path_factory):
    d = tmp_path_factory.mktemp("head")
    save_head(trained_head, d)
    return d


def _engine_run(head_dir, prompts, mode: str, params=None, max_new=HF_NEW, **speculation):
    """Every prompt at once through a local engine (verifier here, drafter in a child process)
    whose drafter is the head: the target's features cross the gloo data plane (FEATS records)."""
    from actors.launch import LocalEngine
    from cluster.config import load_config
    from cluster.serving.coordinator import Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec

    over = {"models.draft.path": str(head_dir), "speculation.mode": mode, "speculation.adaptive": False,
            "engine.max_batch": 8, **{f"speculation.{k}": v for k, v in speculation.items()}}
    spec = engine_spec(load_config("configs/local-cpu.yaml", over))
    assert spec.draft_head_layers is not None and not spec.target_prefix_caching
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None, max_queue=4096)
    try:
        handles = [coord.submit(GenerateArgs(list(p), max_new, p2)) for p, p2 in
                   zip(prompts, params or [SamplingParams()] * len(prompts))]
        finals = [h.result() for h in handles]
    finally:
        coord.stop()
        engine.stop()
    stats = SpecStats.total(f.stats for f in finals)
    return [h.tokens for h in handles], stats


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_engine_with_head_greedy_equals_hf(head_dir, hf_refs, held_out_prompts, mode):
    hf, refs = hf_refs
    prompts = held_out_prompts[:8]
    outs, stats = _engine_run(head_dir, prompts, mode, k=3)
    exact = sum(assert_matches_or_near_tie(hf, p, o, r) for p, o, r in zip(prompts, outs, refs))
    assert exact >= len(outs) - 1
    assert stats.accepted_tokens > 0, stats.summary()
    if mode == "ssd":
        assert stats.cache_hits > 0, stats.summary()   # branches pre-drafted on predicted features hit


def test_engine_with_head_sampling_matches_transformers(target, trained_head, tiny_pair, held_out_prompts,
                                                        tmp_path):
    """SSD sampling with the head through the engine (tokens 2-3 come from speculation), its draft
    vocabulary without the target's likeliest tokens at the first positions."""
    from tests.test_distribution import NEW, _prompt, _seeded, CASES, g_test
    from transformers import AutoModelForCausalLM

    case = CASES["top_k"]
    prompt = _prompt(held_out_prompts, case)
    top = _likeliest(target, prompt, NEW)
    save_head(_without(trained_head, top), tmp_path)
    n = 1500
    outs, stats = _engine_run(tmp_path, [prompt] * n, "ssd", _seeded(case.params, n, 4_000_000), max_new=NEW, k=2)
    assert 0 < stats.accepted_tokens < stats.draft_tokens, stats.summary()
    assert sum(o[0] in top for o in outs) > 100   # tokens q cannot propose, from the residual
    hf = AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.float32).eval()
    pvalue, table = g_test(hf, prompt, case.params, [tuple(o) for o in outs])
    assert pvalue > 1e-3, f"sampled continuations differ from transformers (p={pvalue:.2e}):\n{table}"
