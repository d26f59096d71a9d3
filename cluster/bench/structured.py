"""Structured outputs with and without speculation: a JSON-schema workload, AR against SSD.

    python -m cluster.bench.structured [--config configs/local-cpu.yaml] [--prompts 8] [--new 64]
                                       [--reps 1] [--out FILE]

Each arm (speculation.mode ar / ssd, the config's drafter and K) runs in a worker process of its
own with one plain-process engine (`cluster.launcher: local`, no Ray): a warm-up request, then
`--prompts` greedy requests one at a time, each constrained to the same JSON schema (an object
with a name, an age and a city), at most `--new` tokens. It reports generated tokens per second,
the drafts' acceptance and the table's hit rate, and checks that every answer that finished
parses against the schema and that SSD's answers equal AR's token for token. Arms alternate
(ar, ssd, then ssd, ar, ...) over `--reps` repetitions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cluster.bench.worker import ab_main, ab_parser, run_arm
from actors.spec.stats import SpecStats

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 120},
                         "city": {"type": "string", "maxLength": 24}}}


def _prompts(tok, n: int) -> list[list[int]]:
    """Held-out prose, then an ask for the JSON: the output is free text but for the schema."""
    from cluster.models.corpus import prompts

    return [tok.encode(t[-200:] + "\nThe person above, as JSON: ") for t in prompts("text", n)]


def valid(doc) -> bool:
    return (isinstance(doc, dict) and set(doc) == {"name", "age", "city"} and isinstance(doc["name"], str)
            and isinstance(doc["city"], str) and type(doc["age"]) is int and 0 <= doc["age"] <= 120)


def worker(a) -> None:
    from actors.spec.grammar import GrammarSpec
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec, start_engine, tokenizer_for
    from cluster.serving.coordinator import Coordinator, GenerateArgs

    over = {"cluster.launcher": "local", "speculation.mode": a.mode, "engine.max_batch": 1, "metrics.enabled": False}
    if a.mode == "ar":
        over["models.draft"] = None
    cfg = load_config(a.config, over)
    spec = engine_spec(cfg)
    tok = tokenizer_for(spec)
    prompts = _prompts(tok, a.prompts + 1)
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    eng = start_engine(cfg, spec)
    coord = Coordinator(eng, None, max_queue=64)
    try:
        coord.submit(GenerateArgs(prompts[-1], 8, grammar=grammar)).result()   # warm-up: grammar engines up
        _drafter_grammars_up(eng)
        finals, tokens = [], []
        t0 = time.perf_counter()
        for p in prompts[:a.prompts]:
            h = coord.submit(GenerateArgs(list(p), a.new, grammar=grammar))
            finals.append(h.result())
            tokens.append(list(h.tokens))
        wall = time.perf_counter() - t0
    finally:
        coord.stop()
        eng.stop()
    stats = SpecStats.total(f.stats for f in finals)
    done = [tok.decode(t) for t, f in zip(tokens, finals) if f.finish_reason == "stop"]
    print(json.dumps({
        "mode": a.mode, "tok_s": sum(map(len, tokens)) / wall, "tokens": tokens,
        "finished": len(done), "valid": sum(valid(_loads(t)) for t in done),
        "acceptance": stats.acceptance_rate if a.mode != "ar" else None,
        "hit_rate": stats.hit_rate if a.mode == "ssd" else None}), flush=True)


def _drafter_grammars_up(eng, timeout_s: float = 120.0) -> None:
    """Wait for the drafter's grammar engine: it is built in the background on the first
    constrained request, and until it is up the drafter drafts unmasked (a cold start, not what
    the workload costs)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        d = eng.metrics().get("drafter")
        if d is None or d.get("grammars", True):   # (AR: no drafter)
            return
        time.sleep(0.5)
    raise RuntimeError(f"the drafter's grammar engine was not up within {timeout_s:.0f} s")


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def run_worker(a, mode: str) -> dict:
    return run_arm("cluster.bench.structured", ["--mode", mode, "--config", a.config, "--prompts", str(a.prompts),
                                                "--new", str(a.new)])


def compare(a) -> int:
    res: dict[str, list[dict]] = {"ar": [], "ssd": []}
    for rep in range(a.reps):
        for mode in (("ar", "ssd") if rep % 2 == 0 else ("ssd", "ar")):
            r = run_worker(a, mode)
            res[mode].append(r)
            print(f"rep {rep} {mode:3s} {r['tok_s']:8.1f} tok/s  answers finished {r['finished']}/{a.prompts}, "
                  f"valid {r['valid']}  acceptance {r['acceptance']}  hit rate {r['hit_rate']}", flush=True)
    same = all(x["tokens"] == y["tokens"] for x, y in zip(res["ar"], res["ssd"]))
    med = {m: statistics.median(r["tok_s"] for r in rs) for m, rs in res.items()}
    print(f"\nJSON schema, {a.prompts} prompts x <= {a.new} tokens, greedy: AR {med['ar']:.1f} tok/s, "
          f"SSD {med['ssd']:.1f} tok/s ({med['ssd'] / med['ar']:.2f}x), SSD's answers equal AR's: {same}")
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": {k: getattr(a, k) for k in ("config", "prompts", "new", "reps")},
                                           "runs": res, "median_tok_s": med, "ssd_equals_ar": same}, indent=1))
    return 0 if same else 1


def main(argv=None) -> int:
    p = ab_parser("bench_structured", __doc__, new=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--mode", choices=["ar", "ssd"], default="ssd", help=argparse.SUPPRESS)
    return ab_main(p, argv, worker, compare)

if __name__ == "__main__":
    sys.exit(main())
