"""The model, its KV cache and the loader against transformers' own implementation.

Tiny random checkpoints of each supported family are written with `save_pretrained` (float32);
outrider loads the same files. Logits must agree after a prefill, after incremental decoding,
and after a rollback (truncate) followed by decoding a different continuation; greedy generation
must agree with transformers' `generate`.

transformers initialises biases to zero and norm weights to one, which would hide a bias or a
norm that outrider forgets to apply: every such tensor is randomised before `save_pretrained`.
Sliding windows are shorter than the test context, so a window that is ignored (or off by one)
changes the logits.
"""
from __future__ import annotations

import json

import pytest
import torch

from actors.model.config import CheckpointError
from actors.kv import PagedKVCache
from actors.model.loader import load_model
from tests.conftest import assert_all_match_or_rare_near_ties

ATOL = 2e-5
WINDOW = 16  # sliding window, well below the 40-token prompt of the tests
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, "rope_theta": 500000.0}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # Qwen windows only the layers from max_window_layers on: here the second of two.
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                         "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
}


def _save(tmp_path, family: str):
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    hf = getattr(transformers, model_cls)(cfg).eval()
    _randomise(hf)
    path = tmp_path / family
    hf.save_pretrained(path)
    return hf, path


@torch.no_grad()
def _randomise(hf) -> None:
    """Non-trivial values for what transformers initialises to constants: every bias (zero) and
    every norm weight (one: input/post-attention norms, the final norm, Qwen3's q/k norms)."""
    g = torch.Generator().manual_seed(5)
    n = 0
    for name, t in hf.named_parameters():
        if name.endswith(".bias"):
            t.copy_(0.5 * torch.randn(t.shape, generator=g))
            n += 1
        elif "norm" in name:
            t.copy_(1 + 0.5 * torch.randn(t.shape, generator=g))
            n += 1
    assert n > 0


@torch.inference_mode()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.inference_mode()
def test_logits_equal_transformers(tmp_path, family):
    hf, path = _save(tmp_path, family)
    model = load_model(path)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 96, (40,), generator=g).tolist()
    cont = torch.randint(0, 96, (12,), generator=g).tolist()
    other = torch.randint(0, 96, (6,), generator=g).tolist()
    cache = PagedKVCache.for_rows(model.args, 2, 128)
    slot = cache.alloc()
    slots = torch.tensor([slot])

    # prefill
    out = model(torch.tensor([prompt]), torch.arange(40)[None], cache, slots)[0]
    cache.advance(slot, 40)  # the caller commits positions; the forward only writes them
    torch.testing.assert_close(out, _hf_logits(hf, prompt), atol=ATOL, rtol=0)
    # incremental decoding, one token at a time
    for i, t in enumerate(cont):
        step = model(torch.tensor([[t]]), torch.tensor([[40 + i]]), cache, slots)[0, -1]
        cache.advance(slot, 41 + i)
        torch.testing.assert_close(step, _hf_logits(hf, prompt + cont[:i + 1])[-1], atol=ATOL, rtol=0)
    # rollback to 44 tokens (drop 8 rejected positions) and decode a different continuation at once
    cache.truncate(slot, 44)
    out = model(torch.tensor([other]), torch.arange(44, 50)[None], cache, slots)[0]
    ref = _hf_logits(hf, prompt + cont[:4] + other)[44:]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("order", ["ab", "ba"])
@torch.inference_mode()
def test_stale_cache_tail_is_never_read(tmp_path, order):
    """Whatever stays behind a truncate() in the row's last block (rejected drafts) must never
    reach attention — also when a longer row in the same batch makes the attended key range
    longer than this row's prefix, in either row order."""
    hf, path = _save(tmp_path, "llama")
    model = load_model(path)
    g = torch.Generator().manual_seed(2)
    short, long_ = torch.randint(0, 96, (40,), generator=g).tolist(), torch.randint(0, 96, (50,), generator=g).tolist()
    cache = PagedKVCache.for_rows(model.args, 2, 64)
    a, b = cache.alloc(), cache.alloc()
    model(torch.tensor([short]), torch.arange(40)[None], cache, torch.tensor([a]))
    model(torch.tensor([long_]), torch.arange(50)[None], cache, torch.tensor([b]))
    cache.advance(a, 48)
    cache.truncate(a, 40)                 # 8 rejected positions of row a ...
    t, bs = cache.tables[a], cache.block_size
    assert len(t) * bs > 40
    for p in range(40, len(t) * bs):      # ... left behind as garbage in its last block
        cache.pool.k[:, t[p // bs], p % bs] = 1e4
        cache.pool.v[:, t[p // bs], p % bs] = -1e4
    rows = [(a, 7, 40, short), (b, 9, 50, long_)]
    if order == "ba":
        rows.reverse()
    out = model(torch.tensor([[r[1]] for r in rows]), torch.tensor([[r[2]] for r in rows]), cache,
                torch.tensor([r[0] for r in rows]))[:, -1]
    for i, (_, tok, _, prefix) in enumerate(rows):
        torch.testing.assert_close(out[i], _hf_logits(hf, prefix + [tok])[-1], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_forked_branches_decode_as_one_batch(tmp_path):
    hf, path = _save(tmp_path, "llama")
    model = load_model(path)
    prompt = list(range(3, 33))
    cache = PagedKVCache.for_rows(model.args, 4, 64)
    root = cache.alloc()
    model(torch.tensor([prompt]), torch.arange(30)[None], cache, torch.tensor([root]))
    cache.advance(root, 30)
    branches = [cache.fork(root, 30) for _ in range(3)]
    nxt = torch.tensor([[7], [8], [9]])
    out = model(nxt, torch.full((3, 1), 30), cache, torch.tensor(branches))[:, -1]
    for b, t in enumerate((7, 8, 9)):
        torch.testing.assert_close(out[b], _hf_logits(hf, prompt + [t])[-1], atol=ATOL, rtol=0)


def test_families_exercise_what_they_claim(tmp_path):
    """Each family's checkpoint really has the feature its test is for, and the feature really
    changes the logits in the test context (so ignoring it would fail test_logits_equal_transformers)."""
    import dataclasses

    from actors.model.model import Transformer

    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    for family, feature, off in [("qwen2", "qkv_bias", False), ("qwen3", "qk_norm", False),
                                 ("qwen2-window", "sliding_window", None), ("mistral-window", "sliding_window", None)]:
        _, path = _save(tmp_path, family)
        model = load_model(path)
        assert getattr(model.args, feature) not in (None, False), (family, feature)
        without = Transformer(dataclasses.replace(model.args, **{feature: off}))
        without.load_state_dict(model.state_dict(), strict=False)
        with torch.inference_mode():
            gap = (model(ids) - without(ids)).abs().max()
        assert gap > 100 * ATOL, f"{family}: {feature} hardly changes the logits ({gap:.1e})"
    qwen2 = load_model(_save(tmp_path, "qwen2")[1])
    assert qwen2.model.layers[0].self_attn.k_proj.bias.abs().min() > 0
    assert qwen2.args.sliding_window is None  # use_sliding_window is off by default
    assert load_model(_save(tmp_path, "qwen2-window")[1]).args.sliding_layers == (1,)
    assert load_model(_save(tmp_path, "mistral-window")[1]).args.sliding_layers is None  # every layer
    assert not load_model(_save(tmp_path, "qwen3")[1]).args.qkv_bias


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_equals_transformers(tmp_path, family):
    """generate_ar (prefill, then one token at a time through the KV cache) against
    transformers' generate, past the sliding window."""
    from actors.generate import generate_ar
    from actors.spec.stopping import StopCriteria

    hf, path = _save(tmp_path, family)
    hf.generation_config.eos_token_id = None  # random weights emit "EOS" too; run the full length
    model = load_model(path)
    new = 40
    prompts, outs, refs = [], [], []
    for seed in range(4):
        prompt = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(10 + seed)).tolist()
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 24, dtype=torch.long),
                              max_new_tokens=new, do_sample=False)[0, 24:].tolist()
        ours = generate_ar(model, prompt, StopCriteria(new)).tokens
        assert len(ref) == len(ours) == new
        prompts.append(prompt)
        outs.append(ours)
        refs.append(ref)
    assert_all_match_or_rare_near_ties(hf, prompts, outs, refs, max_near_ties=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral-window"])
@torch.inference_mode()
def test_bfloat16_forward_and_cache_follow_transformers(tmp_path, family):
    """dtype: bfloat16 on CPU: the model loads in bf16, the KV cache path runs in bf16, and the
    logits stay as close to transformers' float32 logits as transformers' own bf16 run does."""
    hf, path = _save(tmp_path, family)
    model = load_model(path, "bfloat16")
    assert model.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 96, (40,), generator=g).tolist()
    cont = torch.randint(0, 96, (8,), generator=g).tolist()
    ids = torch.tensor([prompt + cont])
    ref32 = hf(ids).logits[0]
    hf16 = hf.to(torch.bfloat16)
    ref16 = hf16(ids).logits[0].float()
    hf.to(torch.float32)
    # prefill + incremental decoding through a bf16 cache
    cache = PagedKVCache.for_rows(model.args, 1, 64, torch.bfloat16)
    slot = cache.alloc()
    out = [model(torch.tensor([prompt]), torch.arange(40)[None], cache, torch.tensor([slot]))[0]]
    cache.advance(slot, 40)
    for i, t in enumerate(cont):
        out.append(model(torch.tensor([[t]]), torch.tensor([[40 + i]]), cache, torch.tensor([slot]))[0])
        cache.advance(slot, 41 + i)
    ours = torch.cat(out).float()   # positions 0..47, as ids
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    err_ours = (ours - ref32).abs().max()
    err_hf = (ref16 - ref32).abs().max()
    scale = ref32.abs().max()
    assert err_ours < 3 * err_hf + 1e-3 * scale, f"bf16 error {err_ours:.3e} vs transformers' bf16 {err_hf:.3e}"
    assert err_ours > 0  # really computed in bf16
    # and the most likely next token agrees with transformers' bf16 wherever its own margin is clear
    top2 = ref16.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * max(err_hf, err_ours)
    assert (ours.argmax(-1)[clear] == ref16.argmax(-1)[clear]).all()

    _, path = _save(tmp_path, "qwen2")
    for dtype in ("bfloat16", "float16"):
        m = load_model(path, dtype)
        assert m.lm_head.weight.dtype == getattr(torch, dtype)
        assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).float()).all()


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    _, path = _save(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="GPT2"):
        load_model(path)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_demo_pair_loads_in_transformers(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for role in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(tiny_pair / role)
        tok = AutoTokenizer.from_pretrained(tiny_pair / role)
        ids = tok("def main():\n    return 1", return_tensors="pt").input_ids
        assert ids.shape[1] > 3
        ours = load_model(tiny_pair / role)
        with torch.inference_mode():
            torch.testing.assert_close(ours(ids), model(ids).logits, atol=ATOL, rtol=0)
