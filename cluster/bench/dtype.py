"""`outrider bench`: the target's forward in bfloat16 against float32 (an A/B interleaved in one
process, one thread, the bench's mean context), each against its memory floor, and llama.cpp's
plain decoding as a row when llama-cpp-python is installed (a bench extra, never a runtime
dependency; else the row says "not measured").
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from cluster.bench.kernels import copy_bandwidth, streamed_bytes, time_forward, torch_threads

log = logging.getLogger(__name__)

ROUNDS = 5   # A/B rounds; each times every dtype's t(1) and t(K+1) with a few reps


def measure_dtypes(target_dir: str, ctx: list[int], k: int, max_len: int, device: str = "cpu") -> dict:
    """Per dtype: t_decode(1), t_verify(K+1) (medians over interleaved rounds), their ratio and the
    memory floor (streamed weight bytes over measured copy bandwidth)."""
    from actors.model.loader import cpu_has_fast_bf16, load_model

    dtypes = ["float32"] + (["bfloat16"] if torch.device(device).type == "cuda" or cpu_has_fast_bf16() else [])
    with torch_threads(1):
        models = {d: load_model(target_dir, d, device) for d in dtypes}
        bw = copy_bandwidth(device)
        t1 = {d: [] for d in dtypes}
        tv = {d: [] for d in dtypes}
        for _ in range(ROUNDS):
            for d, m in models.items():
                t1[d].append(time_forward(m, ctx, 1, max_len, reps=4))
                tv[d].append(time_forward(m, ctx, k + 1, max_len, reps=4))
    out = {"threads": 1, "rounds": ROUNDS, "k": k, "context_tokens": len(ctx), "copy_bytes_per_s": bw, "by_dtype": {}}
    for d, m in models.items():
        a, b, floor = statistics.median(t1[d]), statistics.median(tv[d]), streamed_bytes(m) / bw
        out["by_dtype"][d] = {"t_decode_1_s": a, "t_verify_s": b, "verify_over_decode": b / a,
                              "streamed_bytes": streamed_bytes(m), "floor_s": floor, "decode_over_floor": a / floor}
    return out


def llama_cpp_row(gguf: str | None, prompt: list[int], n: int, threads: tuple[int, ...] = (1, 2)) -> dict:
    """llama.cpp's plain greedy decoding of `n` tokens on the target's GGUF, tokens/s per thread
    count; {"measured": False, "why": ...} when it cannot run here."""
    try:
        import llama_cpp
    except ImportError:
        return {"measured": False, "why": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    if gguf is None:
        return {"measured": False, "why": "no GGUF file for this target"}
    out = {"measured": True, "gguf": gguf, "version": getattr(llama_cpp, "__version__", None), "tok_s": {}}
    try:
        for t in threads:
            llm = llama_cpp.Llama(model_path=gguf, n_threads=t, n_ctx=len(prompt) + n + 8, verbose=False)
            llm.eval(prompt)   # prefill, then time the decoding alone
            t0, done = time.perf_counter(), 0
            for _ in range(n):
                tok = llm.sample(temp=0.0)
                llm.eval([tok])
                done += 1
            out["tok_s"][t] = done / (time.perf_counter() - t0)
    except Exception as e:   # an optional comparison row must not fail the bench
        log.warning("llama.cpp row not measured: %s", e)
        return {"measured": False, "why": f"llama.cpp failed: {e}"}
    return out


def target_gguf(target_dir: str) -> str | None:
    """The GGUF the target was imported from, where outrider knows it (the smol demo target)."""
    from pathlib import Path

    found = sorted(Path(target_dir).glob("*.gguf"))
    if found:
        return str(found[0])
    if "smol" in str(target_dir):   # the download cache of cluster/models/smol.py (never downloads here)
        from cluster.models.build import models_root
        from cluster.models.smol import GGUF_MEMBER

        p = models_root() / "downloads" / Path(GGUF_MEMBER).name
        return str(p) if p.is_file() else None
    return None


def markdown(dt: dict | None, llama: dict | None, config_dtype: str | None) -> list[str]:
    """The report's dtype section."""
    lines = ["", "## dtype", "", f"The target runs in **{config_dtype}** in this config (`dtype: auto` picks "
             "bfloat16 on CPUs with AVX512-BF16 or AMX-BF16, as torch reports them)."]
    if dt:
        lines += ["", f"Forward of the target, one thread, {dt['context_tokens']}-token context, median of "
                  f"{dt['rounds']} interleaved rounds (A/B in one process):", "",
                  f"| dtype | t_decode(1) ms | t_verify({dt['k'] + 1}) ms | verify/decode | memory floor ms | "
                  "decode/floor |", "|---|---|---|---|---|---|"]
        for d, r in dt["by_dtype"].items():
            lines.append(f"| {d} | {1e3 * r['t_decode_1_s']:.2f} | {1e3 * r['t_verify_s']:.2f} | "
                         f"{r['verify_over_decode']:.2f} | {1e3 * r['floor_s']:.2f} | {r['decode_over_floor']:.2f} |")
        by = dt["by_dtype"]
        if "bfloat16" in by:
            lines += ["", "bfloat16 / float32: t_decode(1) "
                          f"{by['bfloat16']['t_decode_1_s'] / by['float32']['t_decode_1_s']:.2f}x, "
                      f"t_verify({dt['k'] + 1}) {by['bfloat16']['t_verify_s'] / by['float32']['t_verify_s']:.2f}x."]
    if llama is not None:
        if llama.get("measured"):
            cells = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {v:.1f} tok/s" for t, v in llama["tok_s"].items())
            lines += ["", f"llama.cpp plain decoding ({llama['gguf']}): {cells}."]
        else:
            lines += ["", f"llama.cpp: not measured ({llama['why']})."]
    return lines
