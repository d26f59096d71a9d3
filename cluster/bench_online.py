"""Online drafter learning, measured: a weak drafter serves a stream of requests from one domain
twice on the same prompts, with speculation.online_learning off and on (adaptive K on in both).

The weak drafter is the tiny pair's drafter shape with fresh random weights (it has never seen
the target), saved beside the pair as draft-untrained. The stream is code prompts from held-out
modules, `--concurrency` requests at a time with `--gap-s` of idle between blocks (a server that
is not saturated: the idle is where the drafter trains). Per request: acceptance (accepted /
drafted tokens) and tokens per second (completion tokens / request latency). The bench also
measures the drafters' greedy agreement with the target on the stream's own continuations,
before and after (teacher-forced, independent of how often adaptive K drafts), on the stream's
requests and on held-out code prompts the stream never contained. Writes a plot
and a JSON next to each other; prints the report.

    python -m cluster.bench_online --requests 200 --out docs/bench/online
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def untrained_drafter(pair: Path) -> Path:
    """The pair's drafter shape with random weights (the weakest possible start)."""
    from actors.demo.train import new_model
    from safetensors.torch import save_file

    out = pair / "draft-untrained"
    if (out / "model.safetensors").is_file():
        return out
    tmp = pair / ".draft-untrained-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pair / "draft", tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    model = new_model(cfg, seed=1234)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "build.json").unlink(missing_ok=True)
    tmp.rename(out)
    return out


def agreement(drafter_dir: Path, target, prompts: list[list[int]], conts: list[list[int]]) -> float:
    """Share of the target's continuation tokens the drafter's argmax predicts (teacher-forced)."""
    from actors.loader import load_model

    d = load_model(drafter_dir)
    hit = tot = 0
    with torch.inference_mode():
        for p, c in zip(prompts, conts):
            x = torch.tensor([p + c])
            pred = d(x)[0, len(p) - 1:-1].argmax(-1)
            hit += int((pred == torch.tensor(c)).sum())
            tot += len(c)
    return hit / max(tot, 1)


def run_arm(spec, prompts, concurrency: int, gap_s: float, max_new: int) -> tuple[list[dict], dict]:
    from actors.launch import LocalEngine
    from actors.sampling import SamplingParams
    from cluster.coordinator import Coordinator, GenerateArgs

    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None, max_queue=1024)
    rows = []
    try:
        for i in range(0, len(prompts), concurrency):
            hs = [coord.submit(GenerateArgs(list(p), max_new, SamplingParams())) for p in prompts[i:i + concurrency]]
            for h in hs:
                f = h.result()
                rows.append({"tokens": len(h.tokens), "seconds": f.total_s, "drafted": f.stats.draft_tokens,
                             "accepted": f.stats.accepted_tokens, "out": list(h.tokens)})
            time.sleep(gap_s)
        m = engine.metrics()
    finally:
        coord.stop()
        engine.stop()
    return rows, m


def windowed(rows: list[dict], w: int) -> tuple[list[float], list[float]]:
    acc, tps = [], []
    for i in range(len(rows)):
        part = rows[max(0, i + 1 - w):i + 1]
        d = sum(r["drafted"] for r in part)
        acc.append(sum(r["accepted"] for r in part) / d if d else float("nan"))
        tps.append(sum(r["tokens"] for r in part) / max(sum(r["seconds"] for r in part), 1e-9))
    return acc, tps


def summary(rows: list[dict], lo: int, hi: int) -> dict:
    part = rows[lo:hi]
    d = sum(r["drafted"] for r in part)
    return {"acceptance": sum(r["accepted"] for r in part) / d if d else None, "drafted": d,
            "tokens_per_s": sum(r["tokens"] for r in part) / sum(r["seconds"] for r in part)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--gap-s", type=float, default=0.1, help="idle between blocks of requests")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps-per-s", type=float, default=100.0)
    ap.add_argument("--window", type=int, default=20, help="requests per point of the plot")
    ap.add_argument("--order", default="off,on", help="which arm runs first (the CPU is shared: swap to check)")
    ap.add_argument("--out", default="docs/bench/online")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from actors.demo.build import build_pair
    from actors.demo.corpus import prompts as corpus_prompts
    from actors.tokenizer import Tokenizer
    from cluster.config import load_config
    from cluster.deployment import engine_spec

    pair = build_pair("tiny")
    weak = untrained_drafter(pair)
    tok = Tokenizer(pair / "target")
    pool = corpus_prompts("code", 10_000)
    texts, held_texts = pool[:a.requests], pool[a.requests:][-40:]   # held out: never in the stream
    prompts = [tok.encode(t)[-96:] for t in texts]
    held = [tok.encode(t)[-96:] for t in held_texts]
    prompts = (prompts * (a.requests // len(prompts) + 1))[:a.requests]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "adapted-drafter"
    base = {"models.draft.path": str(weak), "speculation.adaptive": True, "engine.max_batch": 8}
    arms = {}
    for arm in a.order.split(","):
        ov = dict(base)
        if arm == "on":
            ov.update({"speculation.online_learning.enabled": True, "speculation.online_learning.lr": a.lr,
                       "speculation.online_learning.max_steps_per_s": a.steps_per_s,
                       "speculation.online_learning.save_path": str(ckpt)})
        t0 = time.perf_counter()
        rows, m = run_arm(engine_spec(load_config("configs/local-cpu.yaml", ov)), prompts, a.concurrency, a.gap_s,
                          a.max_new)
        d = m.get("drafter") or {}
        arms[arm] = {"rows": rows, "wall_s": time.perf_counter() - t0,
                     "drafter": {k: v for k, v in d.items() if isinstance(v, (int, float))},
                     "verifier_wait_s": m.get("wait_s"), "verifier_steps": m.get("steps")}
        print(f"{arm}: {len(rows)} requests in {arms[arm]['wall_s']:.1f}s; drafter {arms[arm]['drafter']}")
    for i, (x, y) in enumerate(zip(arms["off"]["rows"], arms["on"]["rows"])):
        if x["out"] != y["out"]:
            raise SystemExit(f"request {i}: the two arms' greedy outputs differ: exactness is broken")
    from actors.loader import load_model

    target = load_model(pair / "target")
    sample = list(range(0, a.requests, max(1, a.requests // 40)))
    ps, cs = [prompts[i] for i in sample], [arms["off"]["rows"][i]["out"] for i in sample]
    from actors.generate import generate_ar
    from actors.sampling import SamplingParams
    from actors.stopping import StopCriteria

    held_c = [generate_ar(target, p, StopCriteria(a.max_new), SamplingParams()).tokens for p in held]
    agree = {"stream": {name: agreement(path, target, ps, cs) for name, path in
                        (("before", weak), ("after", ckpt), ("pair_drafter", pair / "draft"))},
             "held_out": {name: agreement(path, target, held, held_c) for name, path in
                          (("before", weak), ("after", ckpt), ("pair_drafter", pair / "draft"))}}
    n = a.requests
    marks = sorted({min(n, m) for m in (50, 100, 200, n)})
    report = {"requests": n, "concurrency": a.concurrency, "gap_s": a.gap_s, "max_new": a.max_new, "lr": a.lr,
              "steps_per_s": a.steps_per_s, "greedy_agreement": agree, "identical_outputs": True,
              "windows": {f"{max(0, m - a.window)}-{m}": {arm: summary(arms[arm]["rows"], max(0, m - a.window), m)
                                                          for arm in arms} for m in marks},
              "whole": {arm: summary(arms[arm]["rows"], 0, n) for arm in arms},
              "drafter": {arm: arms[arm]["drafter"] for arm in arms},
              "verifier_wait_s": {arm: arms[arm]["verifier_wait_s"] for arm in arms}}
    (out / "online.json").write_text(json.dumps(report, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for arm, style in (("off", "--"), ("on", "-")):
        acc, tps = windowed(arms[arm]["rows"], a.window)
        xs = range(1, n + 1)
        ax1.plot(xs, acc, style, label=f"online learning {arm}")
        ax2.plot(xs, tps, style, label=f"online learning {arm}")
    ax1.set_ylabel(f"acceptance (last {a.window} requests)")
    ax2.set_ylabel(f"tokens/s per request (last {a.window})")
    ax2.set_xlabel("requests served")
    ax1.legend()
    ax1.set_title("untrained drafter, tiny target, code stream, adaptive K")
    fig.tight_layout()
    fig.savefig(out / "online.png", dpi=100)
    print(json.dumps({k: report[k] for k in ("greedy_agreement", "windows", "whole")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
