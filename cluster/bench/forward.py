"""The target's forward on CPU, measured for docs/bf16.md: `python -m cluster.bench.forward [target]`.

One process, everything interleaved round by round (this host is shared, so read ratios and
medians): per dtype and thread count, t(1), t(5) and t(17) through the paged cache at a
256-token context, with packed weights (actors/model/packed.py) and with the plain modules; the
memory floor (streamed weight bytes over the copy bandwidth of one and of two threads); greedy
decoding tokens/s against transformers' greedy at the same dtype and threads; and where one
bfloat16 decode step's time goes (torch.profiler, self time by kind of kernel).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections import defaultdict

import torch

from cluster.bench.kernels import copy_bandwidth, streamed_bytes, torch_threads

log = logging.getLogger(__name__)
CTX = 256


def _step_fn(model, T: int):
    from actors.kv import PagedKVCache

    cache = PagedKVCache.for_model(model.args, (CTX + 64) // 16 + 2, 16, CTX + 64, dtype=model.dtype)
    h = cache.alloc()
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.args.vocab_size, (1, CTX + T), generator=g)
    with torch.inference_mode():
        cache.prepare([h], torch.arange(CTX)[None], CTX)
        model(toks[:, :CTX], torch.arange(CTX)[None], cache, kv_len=CTX, last=True)
        cache.advance(h, CTX)
    pos = torch.arange(CTX, CTX + T)[None]

    @torch.inference_mode()
    def step():
        cache.prepare([h], pos, CTX + T)
        return model(toks[:, CTX:], pos, cache, kv_len=CTX + T)
    return step


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def forward_table(target: str, rounds: int, dtypes, threads) -> dict:
    from actors.model.loader import load_model

    models = {}
    for d in dtypes:
        for packed in (True, False):
            models[(d, packed)] = load_model(target, d, pack=packed)
    steps = {(d, p, T): _step_fn(m, T) for (d, p), m in models.items() for T in (1, 5, 17)}
    times = defaultdict(list)
    for _ in range(rounds):
        for t in threads:
            with torch_threads(t):
                for (d, p, T), fn in steps.items():
                    times[(d, p, t, T)].append(_time(fn, 3))
    bw = {t: _bw(t) for t in threads}
    out = {"bandwidth_bytes_per_s": bw, "rows": []}
    for (d, p, t, T), v in sorted(times.items(), key=lambda kv: (kv[0][0], not kv[0][1], kv[0][2], kv[0][3])):
        m = models[(d, p)]
        floor = streamed_bytes(m) / bw[t]
        out["rows"].append({"dtype": d, "packed": p, "threads": t, "T": T, "ms": 1e3 * statistics.median(v),
                            "floor_ms": 1e3 * floor})
    return out


def _bw(t: int) -> float:
    with torch_threads(t):
        return copy_bandwidth("cpu")


def ar_vs_hf(target: str, rounds: int, dtypes, threads, n: int = 48) -> dict:
    """Greedy decoding tokens/s (prefill excluded: the first token's time is subtracted) of
    outrider's AR and of transformers' generate, same dtype and threads, interleaved."""
    from transformers import AutoModelForCausalLM

    from actors.generate import generate_ar
    from actors.model.loader import load_model, parse_dtype
    from actors.spec.stopping import StopCriteria

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 49152 if "smol" in target else 4096, (128,), generator=g).tolist()
    ours = {d: load_model(target, d) for d in dtypes}
    hf = {d: AutoModelForCausalLM.from_pretrained(target, dtype=parse_dtype(d)).eval() for d in dtypes}
    for m in hf.values():
        m.generation_config.eos_token_id = None
    res = defaultdict(list)

    def hf_run(m, k):
        x = torch.tensor([prompt])
        with torch.inference_mode():
            m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, do_sample=False)

    for _ in range(rounds):
        for t in threads:
            with torch_threads(t):
                for d in dtypes:
                    for name, fn in (("outrider", lambda k, d=d: generate_ar(ours[d], prompt, StopCriteria(k))),
                                     ("hf", lambda k, d=d: hf_run(hf[d], k))):
                        t0 = time.perf_counter()
                        fn(1)
                        t1 = time.perf_counter()
                        fn(n)
                        t2 = time.perf_counter()
                        res[(name, d, t)].append((n - 1) / ((t2 - t1) - (t1 - t0)))
    return {f"{name} {d} {t}t": statistics.median(v) for (name, d, t), v in sorted(res.items())}


KINDS = (("linear", ("linear_pointwise", "aten::mm", "aten::addmm", "aten::linear")),
         ("attention", ("scaled_dot_product", "flash_attention")),
         ("kv cache write/read", ("index_copy", "index_select", "copy_", "slice_scatter")),
         ("norm", ("rms_norm", "rsqrt", "pow", "mean")),
         ("elementwise (rope, silu, residual)", ("aten::mul", "aten::add", "silu", "flip", "aten::neg", "aten::cat")))


def profile_decode(target: str, dtype: str, steps: int = 10) -> dict:
    """Self CPU time per decode step by kind of kernel (one thread)."""
    from torch.profiler import ProfilerActivity, profile

    from actors.model.loader import load_model

    with torch_threads(1):
        fn = _step_fn(load_model(target, dtype), 1)
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t0) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
    kinds = defaultdict(float)
    calls = 0
    for e in prof.key_averages():
        calls += e.count
        kind = next((k for k, keys in KINDS if any(s in e.key for s in keys)), "other (views, dispatch, allocation)")
        kinds[kind] += e.self_cpu_time_total / 1e3 / steps
    return {"wall_ms_unprofiled": 1e3 * wall, "ms_by_kind": dict(kinds), "ops_per_step": calls / steps}


def main() -> None:
    from cluster.models.build import models_root
    from actors.model.loader import cpu_has_fast_bf16

    ap = argparse.ArgumentParser()
    ap.add_argument("target", nargs="?", default=str(models_root() / "smol-v1" / "target"))
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    dtypes = ["float32"] + (["bfloat16"] if cpu_has_fast_bf16() else [])
    out = {"cpu": torch.cpu.get_capabilities().get("cpu_name"), "bf16_native": cpu_has_fast_bf16(),
           "torch": torch.__version__, "context": CTX}
    print(json.dumps(out), flush=True)   # section by section: a long run that dies keeps what it measured
    print(json.dumps({"profile": {d: profile_decode(a.target, d) for d in dtypes}}), flush=True)
    print(json.dumps({"forward": forward_table(a.target, a.rounds, dtypes, (1, 2))}), flush=True)
    print(json.dumps({"greedy_tok_s": ar_vs_hf(a.target, max(2, a.rounds // 2), dtypes, (1, 2))}), flush=True)


if __name__ == "__main__":
    main()
