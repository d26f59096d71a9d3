"""The model, its KV cache and the loader against transformers' own implementation.

Tiny random checkpoints of each supported family are written with `save_pretrained` (float32);
outrider loads the same files. Logits must agree after a prefill, after incremental decoding,
and after a rollback (truncate) followed by decoding a different continuation.
"""
from __future__ import annotations

import json

import pytest
import torch

from actors.config import CheckpointError
from actors.kv_cache import KVCache
from actors.loader import load_model

ATOL = 2e-5
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, "rope_theta": 500000.0}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def _save(tmp_path, family: str):
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    hf = getattr(transformers, model_cls)(cfg).eval()
    path = tmp_path / family
    hf.save_pretrained(path)
    return hf, path


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
    cache = KVCache.for_model(model.args, 2, 128)
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


@pytest.mark.parametrize("order", ["run", "gather"])
@torch.inference_mode()
def test_stale_cache_tail_is_never_read(tmp_path, order):
    """truncate() only moves the committed length back; whatever stays behind it (rejected
    drafts) must never reach attention — also when a longer row in the same batch makes the
    attended key range longer than this row's prefix. Both ways a batch reads the cache: a view
    over consecutive slots, and a gather for any other slot order."""
    hf, path = _save(tmp_path, "llama")
    model = load_model(path)
    g = torch.Generator().manual_seed(2)
    short, long_ = torch.randint(0, 96, (40,), generator=g).tolist(), torch.randint(0, 96, (50,), generator=g).tolist()
    cache = KVCache.for_model(model.args, 2, 64)
    a, b = cache.alloc(), cache.alloc()
    model(torch.tensor([short]), torch.arange(40)[None], cache, torch.tensor([a]))
    model(torch.tensor([long_]), torch.arange(50)[None], cache, torch.tensor([b]))
    cache.advance(a, 48)
    cache.truncate(a, 40)                 # 8 rejected positions of slot a ...
    cache.k[:, a, :, 40:] = 1e4           # ... left behind as garbage
    cache.v[:, a, :, 40:] = -1e4
    rows = [(a, 7, 40, short), (b, 9, 50, long_)]
    if order == "gather":
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
    cache = KVCache.for_model(model.args, 4, 64)
    root = cache.alloc()
    model(torch.tensor([prompt]), torch.arange(30)[None], cache, torch.tensor([root]))
    cache.advance(root, 30)
    branches = [cache.alloc() for _ in range(3)]
    cache.fork(root, branches, 30)
    nxt = torch.tensor([[7], [8], [9]])
    out = model(nxt, torch.full((3, 1), 30), cache, torch.tensor(branches))[:, -1]
    for b, t in enumerate((7, 8, 9)):
        torch.testing.assert_close(out[b], _hf_logits(hf, prompt + [t])[-1], atol=ATOL, rtol=0)


def test_dtypes_load(tmp_path):
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
