"""Weight-only quantization against the packed bfloat16 projections, for docs/bf16.md:
`python -m cluster.bench.quant [target]` (default: the smol demo target).

torch's own CPU kernels, the ones torchao's int8 and int4 weight-only paths call on CPU:
`aten._weight_int8pack_mm` (int8, a scale per output channel) and
`aten._weight_int4pack_mm_for_cpu` (4-bit, groups of 32 with a scale and a zero, the shape of a
GGUF Q4). Each projection of the target's shapes (config.json) at 1 and 5 rows, one thread, best
of 3 runs; the sum over a forward's projections. The weights are random: speed only.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from actors.model.config import ModelArgs
from actors.model.packed import Packed

log = logging.getLogger(__name__)
GROUP = 32


def _int8(w: torch.Tensor):
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    q = (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def _int4(w: torch.Tensor):
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + scale * 8   # the kernel's zero point sits at the middle code
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz.to(torch.bfloat16)


def _best_us(fn, n: int) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def projections(a: ModelArgs) -> dict[str, tuple[int, int, int]]:
    """name -> (out features, in features, how many per forward)."""
    qkv = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    return {"qkv": (qkv, a.dim, a.n_layers), "o": (a.dim, a.n_heads * a.head_dim, a.n_layers),
            "gate_up": (2 * a.intermediate_size, a.dim, a.n_layers),
            "down": (a.dim, a.intermediate_size, a.n_layers), "lm_head": (a.vocab_size, a.dim, 1)}


def time_projection(n: int, k: int, m: int) -> dict[str, float]:
    """Microseconds of one n x k projection over m rows, per weight format."""
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    x = torch.randn(max(m, 2), k, dtype=torch.bfloat16)   # one row runs as two (packed.py)
    packed = Packed(torch.ops.mkldnn._reorder_linear_weight(w, None), None)
    w8, s8 = _int8(w)
    w4, sz4 = _int4(w)
    xm = x[:m]
    reps = 20 if n * k > 8_000_000 else 200
    return {"bfloat16": _best_us(lambda: packed._run(x[None]), reps),
            "int8": _best_us(lambda: torch.ops.aten._weight_int8pack_mm(xm, w8, s8), reps),
            "int4": _best_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xm, w4, GROUP, sz4), reps)}


def measure(a: ModelArgs, rows=(1, 5)) -> dict:
    torch.set_num_threads(1)
    out = {"per_projection_us": [], "forward_ms": {}}
    for m in rows:
        total = {"bfloat16": 0.0, "int8": 0.0, "int4": 0.0}
        for name, (n, k, times) in projections(a).items():
            t = time_projection(n, k, m)
            out["per_projection_us"].append({"rows": m, "projection": name, **{d: round(v, 1) for d, v in t.items()}})
            log.info("rows %d %-8s %s", m, name, "  ".join(f"{d} {v:8.1f} us" for d, v in t.items()))
            for d, v in t.items():
                total[d] += v * times
        out["forward_ms"][m] = {d: round(v / 1e3, 2) for d, v in total.items()}
    return out


def main() -> None:
    from cluster.models.build import resolve_demo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", nargs="?", default="demo:smol/target")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = resolve_demo(a.target) if a.target.startswith("demo:") else a.target
    print(json.dumps(measure(ModelArgs.from_dir(path))), flush=True)


if __name__ == "__main__":
    main()
