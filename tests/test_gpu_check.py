"""The prepared GPU check in its CPU form (`python -m cluster.gpu_check --device cpu --tiny`): the
same code path at tiny shapes, in a Python where Ray, grpcio, pydantic, prometheus_client and
scipy cannot be imported (the GPU machine has none of them), so the check cannot rot before a
GPU runs it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BLOCKED = ("ray", "grpc", "pydantic", "prometheus_client", "scipy")
pytestmark = pytest.mark.timeout(300)


def test_the_gpu_check_runs_on_cpu_without_ray_grpc_or_pydantic(tmp_path):
    code = (f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None  # any import of them now fails\n"
            "from cluster.gpu_check.__main__ import main\n"
            f"sys.exit(main(['--device', 'cpu', '--tiny', '--out', {str(tmp_path)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    table = out.stdout[out.stdout.index("outrider GPU check"):]
    rows = {line.split("  ")[0]: line for line in table.splitlines()[2:]}
    for check in ("greedy AR = transformers", "greedy SD = transformers", "greedy SSD = transformers",
                  "sampling SSD chi-square", "one device, local launcher"):
        assert " ok " in rows[check], table
    assert "3/3 identical" in rows["greedy SSD = transformers"] and "FAIL" not in table
    for check in ("peak memory vs plan", "t_decode(1)", "t_verify(5)", "engine.compile capture",
                  "compiled t_decode(1)", "compiled t_verify(5)"):
        assert check in rows, table
    assert "gloo channel" in rows["one device, local launcher"]
    # the seeded pair is real Hugging Face checkpoints
    assert (tmp_path / "target" / "config.json").exists() and (tmp_path / "draft" / "model.safetensors").exists()


def test_the_check_s_planned_shapes_are_llama_3_2_1b_s():
    from cluster.gpu_check.seeded import LLAMA_1B, config

    c = config(LLAMA_1B, LLAMA_1B.layers, "bfloat16")
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["intermediate_size"], c["vocab_size"], c["head_dim"]) == (2048, 16, 32, 8, 8192, 128256, 64)
