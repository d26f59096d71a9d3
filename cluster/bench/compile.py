"""`engine.compile` measured: eager against compiled, interleaved, in one run.

    outrider bench -c configs/local-cpu.yaml --compile [--quick]
    python -m cluster.bench.compile -c configs/local-cpu.yaml [--prompts 6] [--new-tokens 64]
    python -m cluster.bench.compile --padded-forward   # eager vs the padded, static-shape forward

Two parts, both A/B within the same run so the machine's drift falls on both alike:
  * t_verify(K+1) and t(1): the target's forward alone over a prepared paged cache (the verify
    and decode steps), eager and compiled timed in alternation, the context growing one
    position per step as in decoding;
  * AR, SD and SSD end to end: every mode twice (engine.compile false/true), all engines up
    side by side, prompt by prompt every engine once in a rotating order (cluster/bench/run.py's
    run_phases). Greedy outputs must be identical across all of them.
Prints a table of medians and compiled/eager ratios; writes it as JSON with `--out`.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def forward_ab(target_dir: str, k: int, ctx: int = 128, steps: int = 40, padded: bool = False) -> dict:
    """Median ms of the target's forward at T = 1 and T = K+1, eager vs compiled, alternating.
    `padded`: the compiled side is the fixed-shape path CUDA graphs need (actors/model/buckets.py): one
    real row padded to a batch of 2, kv_len to a multiple of 128, a static-shape compile."""
    from actors.model.buckets import Buckets, pad_tokens
    from actors.model.compiled import compile_forward, compile_static
    from actors.kv import PagedKVCache
    from actors.model.loader import load_model

    eager, compiled = load_model(target_dir), load_model(target_dir)
    fwd = {"eager": eager, "compiled": compiled}
    if not padded:
        compile_forward(compiled, "bench")
    out = {}
    for T in (1, k + 1):
        times = {"eager": [], "compiled": []}
        caches = {}
        for name, m in (("eager", eager), ("compiled", compiled)):
            max_len = ctx + steps + 3 + T
            pad = padded and name == "compiled"
            c = PagedKVCache.for_model(m.args, -(-max_len // 16) + pad, 16, max_len, scratch=pad)
            h = c.alloc()
            pos = torch.arange(ctx)[None]
            with torch.inference_mode():
                c.prepare([h], pos, ctx)
                m(torch.zeros(1, ctx, dtype=torch.long), pos, c, kv_len=ctx)
            c.advance(h, ctx)
            caches[name] = (c, h)
        if padded:
            c = caches["compiled"][0]
            buckets = Buckets(max_rows=2, k=k, max_len=c.max_len)
            if T == 1:
                compile_static(compiled, "bench", c, buckets.n_shapes())
            fwd["compiled"] = compiled.static_forward
        t_compile = time.perf_counter()
        for i in range(steps + 3):   # the first calls compile: not timed
            for name in (("eager", "compiled") if i % 2 else ("compiled", "eager")):
                c, h = caches[name]
                L = ctx + i
                pos, toks, kv_len = torch.arange(L, L + T)[None], torch.ones(1, T, dtype=torch.long), L + T
                with torch.inference_mode():
                    if padded and name == "compiled":   # both sides time the forward alone
                        shape = (2, T, buckets.shape(1, T, kv_len)[2])
                        pos = c.prepare_padded([h], pos, kv_len, shape)
                        toks, kv_len = pad_tokens(toks, shape), shape[2]
                    else:
                        c.prepare([h], pos, kv_len)
                    t0 = time.perf_counter()
                    fwd[name](toks, pos, c, kv_len=kv_len)
                    dt = time.perf_counter() - t0
                c.advance(h, L + 1)
                if i >= 3:
                    times[name].append(dt)
            if i == 2:
                log.info("forward T=%d: compiled and warm after %.1fs", T, time.perf_counter() - t_compile)
        out[f"t({T})"] = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    return out


def engines_ab(config_path: str, n_prompts: int, new_tokens: int) -> dict:
    """Median tokens/s of AR, SD and SSD with engine.compile false and true, interleaved."""
    from tqdm import tqdm

    from cluster.bench.run import build_prompts, plan_phases, run_phases
    from cluster.bench.modes import _outrider
    from cluster.bench.report import check_greedy
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec, shutdown_ray, tokenizer_for

    cfg = load_config(config_path)
    k = cfg.speculation.k
    local = cfg.cluster.launcher == "local"
    modes = []
    for mode, name in (("ar", "ar"), ("sd", f"sd-k{k}"), ("ssd", "ssd")):
        modes += [_outrider(name, mode, k), _outrider(f"{name}+compile", mode, k, **{"engine.compile": True})]
    base = engine_spec(load_config(config_path, {"speculation.mode": "ssd"}))
    prompts, warm = build_prompts(tokenizer_for(base), (n_prompts + 1) // 2, n_prompts // 2)
    owned, capacity = (False, float("inf"))
    if not local:
        from cluster.bench.run import _ray_up

        owned, capacity = _ray_up(cfg, 16)
    bar = tqdm(total=len(prompts), desc="compile A/B", unit="rep", file=sys.stderr)
    try:
        phases = plan_phases(modes, capacity, local)
        bar.total = len(prompts) * len(phases)
        runs = run_phases(config_path, phases, None, prompts, warm, new_tokens, bar, quiet=owned)
    finally:
        bar.close()
        if owned:
            shutdown_ray()
    greedy = all(v["mismatches"] == 0 for v in check_greedy(runs, modes).values())
    tok_s = {m.name: statistics.median(r.tok_s for r in runs[m.name]) for m in modes}
    return {"tok_s": tok_s, "greedy_identical": greedy, "prompts": len(prompts), "new_tokens": new_tokens,
            "phases": [[m.name for m in p] for p in phases]}


def report_lines(fwd: dict, eng: dict) -> list[str]:
    lines = ["| measure | eager | compiled | compiled/eager |", "|---|---|---|---|"]
    for key, v in fwd.items():
        lines.append(f"| {key} ms | {v['eager']:.2f} | {v['compiled']:.2f} | {v['compiled'] / v['eager']:.2f}x |")
    t = eng["tok_s"]
    for name in [n for n in t if not n.endswith("+compile")]:
        a, b = t[name], t[f"{name}+compile"]
        lines.append(f"| {name} tok/s | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    lines.append(f"greedy outputs identical across all engines: {eng['greedy_identical']}")
    return lines


def run(config_path: str, out: str | None, n_prompts: int, new_tokens: int) -> int:
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec

    spec = engine_spec(load_config(config_path, {"speculation.mode": "ssd"}))
    torch.set_num_threads(1)
    fwd = forward_ab(spec.target, spec.k)
    eng = engines_ab(config_path, n_prompts, new_tokens)
    lines = report_lines(fwd, eng)
    sys.stdout.write("\n".join(lines) + "\n")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compile-ab.json").write_text(json.dumps({"forward_ms": fwd, **eng, "table": lines}, indent=1))
    return 0 if eng["greedy_identical"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="configs/local-cpu.yaml")
    p.add_argument("--out", default=None)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--padded-forward", action="store_true",
                   help="only the forward A/B: eager against the padded, static-shape compiled forward")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.padded_forward:
        from cluster.config import load_config
        from cluster.launch.deployment import engine_spec

        spec = engine_spec(load_config(a.config, {"speculation.mode": "ssd"}))
        torch.set_num_threads(1)
        for key, v in forward_ab(spec.target, spec.k, padded=True).items():
            sys.stdout.write(f"| {key} ms | {v['eager']:.2f} | {v['compiled']:.2f} | "
                             f"{v['compiled'] / v['eager']:.2f}x |\n")
        return 0
    return run(a.config, a.out, a.prompts, a.new_tokens)


if __name__ == "__main__":
    sys.exit(main())
