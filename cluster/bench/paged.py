"""Paged KV on CPU: an interleaved A/B against another source tree, and a concurrency sweep.

    python -m cluster.bench.paged ab --prev /tmp/outrider-prev [--reps 5] [--modes ar,ssd]
    python -m cluster.bench.paged sweep [--streams 1,4,8] [--modes ar,sd,ssd]

A *worker* (this module run inside a tree, copied there if that tree lacks it, so the same
driver times either tree) starts one engine with `cluster.launcher: local` (no Ray), warms it up, then times
`--runs` generations of `--streams` concurrent greedy requests of `--new` tokens each (EOS
ignored), and prints one JSON line: aggregate tokens/s and per-request latency. `ab` alternates
the two trees run by run, in an order that flips every repetition, so the drift of a shared
machine falls on both alike; it reports the median tokens/s per tree and mode and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(a) -> None:
    from cluster.models.corpus import prompts
    from cluster.config import load_config
    try:
        from cluster.launch.deployment import engine_spec, start_engine, tokenizer_for
        from cluster.serving.coordinator import Coordinator, GenerateArgs
    except ImportError:   # copied into a tree from before cluster/ had subpackages (driver_in)
        from cluster.coordinator import Coordinator, GenerateArgs
        from cluster.deployment import engine_spec, start_engine, tokenizer_for

    over = {"cluster.launcher": "local", "speculation.mode": a.mode, "engine.max_batch": max(a.streams, 1),
            "metrics.enabled": False}
    if a.mode == "ar":
        over["models.draft"] = None
    cfg = load_config(a.config, over)
    spec = engine_spec(cfg)
    tok = tokenizer_for(spec)
    ids = [tok.encode(t)[-128:] for t in prompts("code", 4) + prompts("text", 4)]
    eng = start_engine(cfg, spec)
    coord = Coordinator(eng, None, max_queue=64)
    try:
        coord.submit(GenerateArgs(list(ids[0]), 8, ignore_eos=True)).result()   # warm-up
        runs = []
        for r in range(a.runs):
            t0 = time.perf_counter()
            hs = [coord.submit(GenerateArgs(list(ids[(r + i) % len(ids)]), a.new, ignore_eos=True))
                  for i in range(a.streams)]
            lat = []
            for h in hs:
                f = h.result()
                if f.error or f.finish_reason != "length":
                    raise RuntimeError(f"generation ended with {f.finish_reason}: {f.error}")
                lat.append(f.total_s if getattr(f, "total_s", None) else time.perf_counter() - t0)
            wall = time.perf_counter() - t0
            runs.append({"tok_s": a.streams * a.new / wall, "latency_s": statistics.median(lat)})
    finally:
        coord.stop()
        eng.stop()
    print(json.dumps({"mode": a.mode, "streams": a.streams,
                      "tok_s": statistics.median(r["tok_s"] for r in runs),
                      "latency_s": statistics.median(r["latency_s"] for r in runs)}), flush=True)


def driver_in(tree: Path) -> str:
    """The module that runs the worker in `tree`, this file copied there if the tree lacks it (the
    same driver in the other tree): cluster/bench/paged.py, or in a tree from before cluster/ had
    subpackages (cluster/bench.py a module), cluster/bench_paged.py."""
    if (tree / "cluster" / "bench").is_dir():
        dest, module = tree / "cluster" / "bench" / HERE.name, "cluster.bench.paged"
    else:
        dest, module = tree / "cluster" / "bench_paged.py", "cluster.bench_paged"
    if not dest.exists():
        dest.write_text(HERE.read_text())
    return module


def run_worker(tree: str, mode: str, streams: int, new: int, runs: int, config: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    cmd = [sys.executable, "-m", driver_in(Path(tree)), "worker", "--mode", mode, "--streams", str(streams),
           "--new", str(new), "--runs", str(runs), "--config", config]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"worker in {tree} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def ab(a) -> None:
    trees = {"prev": str(Path(a.prev).resolve()), "paged": str(HERE.parents[2])}
    res: dict[tuple[str, str], list[float]] = {}
    for rep in range(a.reps):
        for mode in a.modes:
            order = list(trees) if rep % 2 == 0 else list(reversed(trees))
            for name in order:
                r = run_worker(trees[name], mode, 1, a.new, a.runs, a.config)
                res.setdefault((name, mode), []).append(r["tok_s"])
                print(f"rep {rep} {mode:4s} {name:6s} {r['tok_s']:7.1f} tok/s", flush=True)
    print("\nmode  prev tok/s (runs)            paged tok/s (runs)           paged/prev (median)")
    for mode in a.modes:
        p, q = res[("prev", mode)], res[("paged", mode)]
        print(f"{mode:5s} {statistics.median(p):7.1f} {[round(x) for x in p]}  "
              f"{statistics.median(q):7.1f} {[round(x) for x in q]}  {statistics.median(q) / statistics.median(p):.3f}")


def sweep(a) -> None:
    run_concurrency(a.config, None, a.streams, a.modes, a.new, a.runs)


def run_concurrency(config: str, out: str | None, streams: list[int], modes: list[str], new: int = 64,
                    runs: int = 2) -> int:
    """`outrider bench --concurrency`: aggregate tokens/s and median request latency for each mode
    at each number of concurrent streams (each point a fresh plain-process engine); the table is
    printed and, with `out`, written to <out>/concurrency.json."""
    tree = str(HERE.parents[2])
    rows = []
    print("mode  streams  tok/s   median latency (s)")
    for mode in modes:
        for n in streams:
            r = run_worker(tree, mode, n, new, runs, config)
            rows.append(r)
            print(f"{mode:5s} {n:7d}  {r['tok_s']:6.1f}  {r['latency_s']:.2f}", flush=True)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "concurrency.json").write_text(json.dumps({"config": config, "new_tokens": new, "runs": runs,
                                                                "points": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.paged")
    sub = p.add_subparsers(dest="cmd", required=True)
    csv = lambda f: (lambda s: [f(x) for x in s.split(",")])  # noqa: E731
    for name in ("worker", "ab", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--config", default="configs/bench-cpu.yaml")
        s.add_argument("--new", type=int, default=64)
        s.add_argument("--runs", type=int, default=3)
        if name == "worker":
            s.add_argument("--mode", default="ssd")
            s.add_argument("--streams", type=int, default=1)
        else:
            s.add_argument("--modes", type=csv(str), default=["ar", "ssd"])
        if name == "ab":
            s.add_argument("--prev", required=True)
            s.add_argument("--reps", type=int, default=5)
        if name == "sweep":
            s.add_argument("--streams", type=csv(int), default=[1, 4, 8])
    a = p.parse_args(argv)
    {"worker": worker, "ab": ab, "sweep": sweep}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
