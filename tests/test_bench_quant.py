"""cluster/bench/quant.py: the quantized weights it times compute what they stand for."""
import torch

from cluster.bench.quant import GROUP, _int4, _int8, projections, time_projection
from actors.model.config import ModelArgs


def test_quantized_projections_compute_their_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 128, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    q8, s8 = _int8(w)
    ref8 = x.float() @ (q8.float() * s8.float()[:, None]).T
    assert torch.allclose(torch.ops.aten._weight_int8pack_mm(x, q8, s8).float(), ref8, rtol=2e-2, atol=2e-3)
    # 4-bit: the same codes read back as lo + q * scale per group of 32
    wf = w.float().reshape(256, 128 // GROUP, GROUP)
    lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    deq = (lo + ((wf - lo) / scale).round().clamp(0, 15) * scale).reshape(256, 128)
    packed, sz = _int4(w)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz).float()
    assert torch.allclose(got, x.float() @ deq.T, rtol=2e-2, atol=3e-3)


def test_projection_shapes_and_timings():
    a = ModelArgs(architecture="LlamaForCausalLM", vocab_size=512, dim=64, intermediate_size=128,
                  n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)
    p = projections(a)
    assert p["qkv"] == (128, 64, 2) and p["gate_up"] == (256, 64, 2) and p["lm_head"] == (512, 64, 1)
    t = time_projection(*p["o"][:2], 1)
    assert set(t) == {"bfloat16", "int8", "int4"} and all(v > 0 for v in t.values())
