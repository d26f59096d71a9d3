"""The start-up memory plan, from config.json shapes only (no weights): real Llama-3.1-8B and
Llama-3.2-1B shapes, the issue's deployment (max_batch 16, 8192 context, budget 24, K = 6) on
80 GB devices, clear errors for configs that cannot fit, and the pools the engine really builds."""
from __future__ import annotations

import json

import pytest
import torch

from actors.spec import EngineSpec
from cluster.config import ConfigError, load_config, parse_config
from cluster.memory_plan import GiB, parse_memory, plan_memory

LLAMA_8B = {  # meta-llama/Llama-3.1-8B-Instruct config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
LLAMA_1B = {  # meta-llama/Llama-3.2-1B-Instruct config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
GB80 = 80 * 10**9


@pytest.fixture()
def llama_dirs(tmp_path):
    for name, cfg in (("8b", LLAMA_8B), ("1b", LLAMA_1B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "8b"), str(tmp_path / "1b")


def _spec(dirs, **kw) -> EngineSpec:
    base = dict(target=dirs[0], draft=dirs[1], target_dtype="bfloat16", draft_dtype="bfloat16",
                target_device="cuda:0", draft_device="cuda:1", mode="ssd", k=6, fan_out_budget=24,
                max_batch=16, max_seq_len=8192)
    return EngineSpec(**{**base, **kw})


def test_llama_8b_with_1b_drafter_at_16_x_8192_budget_24_fits_80gb(llama_dirs):
    spec = _spec(llama_dirs)
    plan = plan_memory(spec, memory={"cuda:0": GB80, "cuda:1": GB80})
    target, draft = plan.roles
    # weights from the shapes: 8.03B and 1.24B parameters (tied head counted once), bf16
    assert 8.0e9 * 2 < target.weights < 8.1e9 * 2 and 1.2e9 * 2 < draft.weights < 1.3e9 * 2
    # KV per position: 8B 128 KiB, 1B 32 KiB (bf16); the verifier holds 16 full sequences
    assert target.block_bytes == 16 * 128 * 1024 and draft.block_bytes == 16 * 32 * 1024
    per_seq = -(-(8192 + 6 + 2) // 16)
    assert plan.target_blocks == 16 * per_seq
    # the drafter: every committed position once, plus a few blocks per branch, not 25 full slots each
    old_drafter_kv = 16 * (1 + 24) * (8192 + 2 * 6 + 2) * 32 * 1024       # what slots reserved: ~100 GiB
    assert old_drafter_kv > 95 * GiB
    assert draft.kv < 5 * GiB
    branch_share = draft.kv - plan.target_blocks * draft.block_bytes
    assert branch_share == 16 * 25 * spec.branch_blocks * draft.block_bytes   # branches x (K + 1), in blocks
    for d in ("cuda:0", "cuda:1"):
        assert plan.used(d) <= GB80
    assert plan.used("cuda:0") > 16 * 10**9 + 16 * GiB   # weights + 16 x 8k of KV at least
    # both roles on one 80 GB GPU fit as well
    one = plan_memory(_spec(llama_dirs, draft_device="cuda:0"), memory={"cuda:0": GB80})
    assert one.used("cuda:0") <= GB80 and one.target_blocks == 16 * per_seq
    table = plan.table()
    assert "target" in table and "draft" in table and "cuda:1" in table and "KV" in table


def test_a_config_that_cannot_fit_is_a_config_error_with_the_keys_and_figures(llama_dirs):
    # a budget bigger than the device once weights and the workspace are in
    with pytest.raises(ConfigError) as e:
        plan_memory(_spec(llama_dirs, max_batch=64), "70GiB", memory={"cuda:0": GB80, "cuda:1": GB80})
    msg = str(e.value)
    for key in ("engine.kv_cache_memory", "engine.max_batch", "engine.max_seq_len", "speculation.fan_out_budget",
                "cuda:0", "GiB", "weights"):
        assert key in msg, (key, msg)
    # a budget that cannot hold one sequence of max_seq_len
    with pytest.raises(ConfigError, match=r"engine\.kv_cache_memory.*engine\.max_seq_len=8192"):
        plan_memory(_spec(llama_dirs), "512MiB", memory={"cuda:0": GB80, "cuda:1": GB80})
    # by default on a 40 GB GPU at 32 x 32k the budget shrinks to what is left; on a 16 GB GPU nothing is left
    small = plan_memory(_spec(llama_dirs, max_batch=32, max_seq_len=32768), memory={"cuda:0": 40 * 10**9,
                                                                                   "cuda:1": 141 * 10**9})
    assert small.target_blocks < 32 * -(-(32768 + 8) // 16) and small.used("cuda:0") <= 40 * 10**9
    assert small.notes and "engine.kv_cache_memory" in small.notes[0]
    with pytest.raises(ConfigError, match="engine.kv_cache_memory"):
        plan_memory(_spec(llama_dirs), memory={"cuda:0": 16 * 10**9, "cuda:1": GB80})


def test_kv_cache_memory_forms():
    assert parse_memory("12GiB") == ("bytes", 12 * GiB)
    assert parse_memory("512MiB") == ("bytes", 512 << 20)
    assert parse_memory("20GB") == ("bytes", 20 * 10**9)
    assert parse_memory(1 << 30) == ("bytes", 1 << 30)
    assert parse_memory(0.5) == ("fraction", 0.5)
    for bad in (0, -1, 1.5, 0.0, "12 parsecs", "", True):
        with pytest.raises(ValueError):
            parse_memory(bad)
    with pytest.raises(ConfigError, match="engine.kv_cache_memory"):
        parse_config({"models": {"target": {"path": "x"}, "draft": {"path": "y"}},
                      "engine": {"kv_cache_memory": "lots"}})


def test_the_engine_builds_the_pools_the_plan_names(tiny_pair):
    """The verifier's and drafter's pools are the plan's blocks (real actors, no Ray)."""
    from actors.drafter import Drafter
    from actors.verifier import Verifier
    from cluster.deployment import engine_spec

    cfg = load_config("configs/local-cpu.yaml", {"engine.kv_cache_memory": "64KiB", "engine.max_seq_len": 64,
                                                 "engine.max_batch": 2})
    spec = engine_spec(cfg)
    v, d = Verifier(spec), Drafter(spec)
    a = v.model.args
    block = 2 * a.n_layers * spec.kv_block_size * a.n_kv_heads * a.head_dim * 4
    assert v.cache.pool.n_blocks == spec.target_kv_blocks == min((64 << 10) // block, 2 * -(-(64 + 4 + 2) // 16))
    assert v.cache.pool.bytes == v.cache.pool.n_blocks * block
    assert d.cache.pool.n_blocks == spec.draft_kv_blocks == spec.target_kv_blocks + 2 * 13 * spec.branch_blocks
    assert "memory_plan" in spec.extra and "target" in spec.extra["memory_plan"]
    assert v.cache.pool.k.dtype == torch.float32
