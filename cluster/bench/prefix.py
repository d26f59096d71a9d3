"""Prefix caching on against off: requests that share one long system prompt.

    python -m cluster.bench.prefix [--config configs/local-cpu.yaml] [--system 512] [--requests 8]
                                   [--streams 4] [--new 32] [--mode ssd] [--reps 1] [--out FILE]

Each arm (engine.prefix_caching true / false) runs in a worker process of its own with one
plain-process engine (`cluster.launcher: local`, no Ray): a warm-up request on an unrelated
prompt, then

  * sequential: `--requests` greedy requests one at a time, each the `--system`-token system
    prompt plus a question of its own (32 tokens of a held-out module): time to first token of
    the first (nothing cached yet) and the median of the rest (with caching, the system prompt's
    blocks are cached by then);
  * concurrent: `--streams` such requests at once (new questions), `--new` tokens each: aggregate
    generated tokens per second and the median time to first token.

Arms alternate (on, off, then off, on, ...) over `--reps` repetitions so a shared machine's
drift falls on both; the table reports medians and the ratio on/off. `--out` writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cluster.bench.worker import ab_main, ab_parser, run_arm

QUESTION = 32


def _prompts(tok, system: int, n: int) -> tuple[list[int], list[list[int]]]:
    """A `system`-token system prompt (prose of the held-out corpus) and n questions (code)."""
    from cluster.models.corpus import prompts

    text = "\n".join(prompts("text", 24))
    sys_ids = tok.encode(text)[:system]
    if len(sys_ids) < system:
        raise ValueError(f"the corpus gives only {len(sys_ids)} tokens of system prompt, {system} asked")
    questions = [tok.encode(t)[-QUESTION:] for t in prompts("code", n)]
    return sys_ids, questions


def worker(a) -> None:
    from cluster.config import load_config
    from cluster.serving.coordinator import Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec, start_engine, tokenizer_for

    over = {"cluster.launcher": "local", "speculation.mode": a.mode, "engine.max_batch": max(a.streams, 1),
            "engine.prefix_caching": a.caching == "on", "metrics.enabled": False}
    if a.mode == "ar":
        over["models.draft"] = None
    cfg = load_config(a.config, over)
    spec = engine_spec(cfg)
    system, questions = _prompts(tokenizer_for(spec), a.system, a.requests + a.streams + 1)
    eng = start_engine(cfg, spec)
    coord = Coordinator(eng, None, max_queue=64)

    def run(ids_list: list[list[int]]) -> tuple[list, float]:
        t0 = time.perf_counter()
        hs = [coord.submit(GenerateArgs(list(ids), a.new, ignore_eos=True)) for ids in ids_list]
        finals = [h.result() for h in hs]
        for f in finals:
            if f.error or f.finish_reason != "length":
                raise RuntimeError(f"generation ended with {f.finish_reason}: {f.error}")
        return finals, time.perf_counter() - t0

    try:
        run([questions[-1] * 4])   # warm-up: no part of the system prompt
        seq = [run([system + q])[0][0] for q in questions[:a.requests]]
        conc, wall = run([system + q for q in questions[a.requests:a.requests + a.streams]])
    finally:
        coord.stop()
        eng.stop()
    print(json.dumps({
        "caching": a.caching, "mode": a.mode,
        "ttft_first_s": seq[0].ttft_s, "ttft_rest_s": statistics.median(f.ttft_s for f in seq[1:]),
        "cached_tokens": [f.cached_tokens for f in seq],
        "tok_s": a.streams * a.new / wall, "ttft_concurrent_s": statistics.median(f.ttft_s for f in conc),
        "wall_concurrent_s": wall}), flush=True)


def run_worker(a, caching: str) -> dict:
    return run_arm("cluster.bench.prefix", ["--caching", caching, "--config", a.config, "--system", str(a.system),
                                            "--requests", str(a.requests), "--streams", str(a.streams),
                                            "--new", str(a.new), "--mode", a.mode])


KEYS = ("ttft_first_s", "ttft_rest_s", "ttft_concurrent_s", "tok_s")


def compare(a) -> int:
    res: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(a.reps):
        for caching in (("on", "off") if rep % 2 == 0 else ("off", "on")):
            r = run_worker(a, caching)
            res[caching].append(r)
            print(f"rep {rep} caching {caching:3s} " + "  ".join(f"{k} {r[k]:.3f}" for k in KEYS)
                  + f"  cached {r['cached_tokens']}", flush=True)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in KEYS} for c, rs in res.items()}
    print(f"\n{a.mode}, system prompt {a.system} tokens + {QUESTION}-token questions, {a.new} new tokens")
    print("figure                  on        off       on/off")
    for k in KEYS:
        print(f"{k:20s} {med['on'][k]:9.3f} {med['off'][k]:9.3f}  {med['on'][k] / med['off'][k]:7.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": {k: getattr(a, k) for k in
                                                        ("config", "system", "requests", "streams", "new", "mode",
                                                         "reps")},
                                           "runs": res, "median": med}, indent=1))
    return 0


def main(argv=None) -> int:
    p = ab_parser("bench_prefix", __doc__, new=32)
    p.add_argument("--system", type=int, default=512, help="system prompt tokens shared by every request")
    p.add_argument("--requests", type=int, default=8, help="sequential requests (time to first token)")
    p.add_argument("--streams", type=int, default=4, help="concurrent requests (throughput)")
    p.add_argument("--mode", default="ssd")
    p.add_argument("--caching", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    return ab_main(p, argv, worker, compare)

if __name__ == "__main__":
    sys.exit(main())
