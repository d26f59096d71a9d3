"""The start-up memory plan, from config.json shapes only (no weights): real Llama-3.1-8B and
Llama-3.2-1B shapes, the issue's deployment (max_batch 16, 8192 context, budget 24, K = 6) on
80 GB devices, clear errors for configs that cannot fit, and the pools the engine really builds."""
from __future__ import annotations

import json

import pytest
import torch

from actors.engine_spec import EngineSpec
from cluster.config import ConfigError, load_config, parse_config
from cluster.launch.memory_plan import GiB, parse_memory, plan_memory

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
    from cluster.launch.deployment import engine_spec

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


LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_hidden_layers": 80, "num_key_value_heads": 8}   # meta-llama/Llama-3.1-70B-Instruct's shapes
H100 = 85_520_809_984   # torch.cuda.get_device_properties(0).total_memory of an 80 GB H100 (79.6 GiB)


def _yaml_plan(path: str, tmp_path, launcher: str | None = None):
    """The plan a deployment YAML gets on 80 GB GPUs, with config.json-only checkpoints at its
    models' real shapes (engine_spec itself would also read their tokenizers)."""
    from cluster.launch.deployment import _target_rank_args

    for name, c in (("70b", LLAMA_70B), ("1b", LLAMA_1B)):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(json.dumps(c))
    over = {"models.target.path": str(tmp_path / "70b"), "models.draft.path": str(tmp_path / "1b")}
    if launcher == "local":
        over.update({"cluster.launcher": "local", "cluster.address": None})
    cfg = load_config(path, over)
    m, sp, en = cfg.models, cfg.speculation, cfg.engine
    spec = EngineSpec(target=m.target.path, draft=m.draft.path, target_dtype=m.target.dtype,
                      draft_dtype=m.draft.dtype, target_device=m.target.device, draft_device=m.draft.device,
                      mode=sp.mode, k=sp.k, fan_out_budget=sp.fan_out_budget, max_batch=en.max_batch,
                      max_seq_len=en.max_seq_len, tensor_parallel_size=m.target.tensor_parallel_size)
    return spec, plan_memory(spec, en.kv_cache_memory, memory={"cuda": H100},
                             target_args=_target_rank_args(cfg, m.target.path), launcher=cfg.cluster.launcher)


@pytest.mark.parametrize("config", ["configs/llama70b-8gpu.yaml", "configs/llama70b-5gpu.yaml"])
def test_70b_configs_get_the_kv_budget_their_engine_settings_need(config, tmp_path):
    """Under Ray every role has its own GPU bundle: the verifier keeps 32 full 8192-token sequences."""
    spec, plan = _yaml_plan(config, tmp_path)
    assert (spec.max_batch, spec.max_seq_len, spec.k, spec.tensor_parallel_size) == (32, 8192, 8, 4)
    # by hand: a table reaches 8192 + K + 2 = 8202 positions = 513 blocks of 16; x 32 sequences
    assert plan.target_blocks == 32 * 513 == 16_416
    target, draft = plan.roles
    assert target.key != draft.key and plan.notes == []    # two GPUs, and nothing was cut
    # rank 0's shard by hand: per layer 1/4 of q, k, v, o (8192x8192, 2 x 8192x1024, 8192x8192) and of
    # gate, up, down (3 x 8192x28672), two norms whole; embedding and head whole (8192 x 128256 each)
    layer = (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672) // 4 + 2 * 8192
    params = 80 * layer + 2 * 128256 * 8192 + 8192
    assert target.weights == 2 * params                                  # bf16: 38.4 GB
    # KV per block per rank: K and V x 80 layers x 16 positions x 2 KV heads (8 / 4) x 128 x 2 bytes
    assert target.block_bytes == 2 * 80 * 16 * 2 * 128 * 2 == 1_310_720
    assert target.kv == 16_416 * 1_310_720                               # 21.5 GB
    # the reserve: CUDA context + cuBLAS + two NCCL communicators (the TP group, the drafter's bulk group)
    assert target.reserve == (768 + 64 + 2 * 1024) << 20
    assert target.total < 0.9 * H100 and draft.total < 0.9 * H100
    # the drafter: every verifier block, plus 32 sequences x (1 + 32 branches) x 2 blocks
    assert plan.draft_blocks == 16_416 + 32 * 33 * 2
    assert all(plan.fits().values())


def test_only_the_local_launcher_puts_two_cuda_roles_on_one_gpu(tmp_path):
    """The same YAML under launcher: local shares cuda:0: the KV budget shrinks to what one GPU
    leaves after both roles, with a note (the cut the Ray launcher must not make)."""
    _, plan = _yaml_plan("configs/llama70b-8gpu.yaml", tmp_path, launcher="local")
    target, draft = plan.roles
    assert target.key == draft.key == "cuda:0"
    assert plan.target_blocks < 16_416 / 3 and plan.notes and "the drafter" in plan.notes[0]
    assert plan.used("cuda:0") <= 0.9 * H100
    from cluster.launch.memory_plan import role_devices, shares_device
    assert shares_device("cuda", "cuda", "local") and not shares_device("cuda", "cuda", "ray")
    assert shares_device("cuda:1", "cuda:1", "ray") and not shares_device("cuda:0", "cuda:1", "local")
    assert role_devices("cuda", "cuda", "ray") == ("cuda (target bundle)", "cuda (draft bundle)")


def test_the_plan_fits_within_ninety_percent_with_the_reserve(llama_dirs):
    """A plan that would fill 95 % of the device is refused: the fit is checked against 0.9 of it,
    with the per-process reserve counted (an explicit budget gets no silent shrink)."""
    from cluster.launch.memory_plan import RESERVE

    spec = _spec(llama_dirs, mode="ar", max_batch=64, max_seq_len=32768)   # KV for all of it would not fit
    free = plan_memory(spec, memory={"cuda:0": GB80, "cuda:1": GB80})
    target = free.roles[0]
    assert target.reserve == RESERVE.bytes(0)   # no NCCL communicator: no drafter, no TP group
    fixed = target.weights + target.workspace + target.reserve
    with pytest.raises(ConfigError, match="90%"):
        plan_memory(spec, int(0.95 * GB80) - fixed, memory={"cuda:0": GB80, "cuda:1": GB80})
    ok = plan_memory(spec, int(0.85 * GB80) - fixed, memory={"cuda:0": GB80, "cuda:1": GB80})
    assert ok.used("cuda:0") <= 0.9 * GB80
    # engine.compile on CUDA: the CUDA-graph pool (one workspace) and the scratch block join the plan
    plain = plan_memory(_spec(llama_dirs, mode="ar"), memory={"cuda:0": GB80})
    comp = plan_memory(_spec(llama_dirs, mode="ar", compile=True), memory={"cuda:0": GB80})
    t, c = plain.roles[0], comp.roles[0]
    assert c.reserve == t.reserve + t.workspace and c.kv == (comp.target_blocks + 1) * t.block_bytes
