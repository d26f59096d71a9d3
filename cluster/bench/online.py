"""Online drafter learning, measured: a weak drafter serves a stream of requests from one domain,
once per arm on the same prompts (adaptive K on in every arm): `off` (no learning), `on` (learning,
the KV computed with older weights kept) and `recompute` (learning with
speculation.online_learning.recompute_kv: that KV is recomputed after steps).

The weak drafter is the pair's drafter shape with fresh random weights (it has never seen the
target), saved beside the pair as draft-untrained; `--pair tiny` (the tests' pair: the drafter
costs half a target forward) or `--pair bench` (configs/bench-cpu.yaml: a target >= 10x its
drafter's cost, where acceptance can turn into speed). The stream is code prompts from held-out
modules, `--concurrency` requests at a time with `--gap-s` of idle between blocks (a server that
is not saturated: the idle is where the drafter trains). Per request: acceptance (accepted /
drafted tokens) and tokens per second (completion tokens / request latency). The arms' outputs
must be token-identical, and a sample of them equal plain AR decoding of the target. The bench
also measures the drafters' greedy agreement with the target on the stream's own continuations,
before and after (teacher-forced, independent of how often adaptive K drafts), on the stream's
requests and on held-out code prompts the stream never contained. Writes a plot and a JSON next
to each other; prints the report.

    python -m cluster.bench.online --requests 200 --out docs/bench/online
    python -m cluster.bench.online --pair bench --arms off,on,recompute --out docs/bench/online-bench
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

log = logging.getLogger(__name__)


def untrained_drafter(pair: Path) -> Path:
    """The pair's drafter shape with random weights (the weakest possible start)."""
    from cluster.models.train import new_model
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
    from actors.model.loader import load_model

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
    from actors.spec.sampling import SamplingParams
    from cluster.serving.coordinator import Coordinator, GenerateArgs

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


CONFIGS = {"tiny": "configs/local-cpu.yaml", "bench": "configs/bench-cpu.yaml"}


def arm_overrides(arm: str, a, ckpt: Path) -> dict:
    """The config overrides of one arm beyond the shared ones."""
    if arm == "off":
        return {}
    if arm not in ("on", "recompute"):
        raise SystemExit(f"--arms: unknown arm {arm!r} (off, on, recompute)")
    ol = "speculation.online_learning."
    return {ol + "enabled": True, ol + "lr": a.lr, ol + "max_steps_per_s": a.steps_per_s,
            ol + "batch_size": a.train_batch, ol + "window_tokens": a.train_window,
            ol + "save_path": str(ckpt), ol + "recompute_kv": arm == "recompute"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--gap-s", type=float, default=0.1, help="idle between blocks of requests")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps-per-s", type=float, default=100.0)
    ap.add_argument("--train-batch", type=int, default=8, help="windows per optimizer step")
    ap.add_argument("--train-window", type=int, default=128, help="tokens per training window")
    ap.add_argument("--window", type=int, default=20, help="requests per point of the plot")
    ap.add_argument("--arms", "--order", dest="arms", default="off,on",
                    help="arms in the order they run: off, on, recompute (the CPU is shared: swap to check)")
    ap.add_argument("--out", default="docs/bench/online")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every arm, e.g. speculation.fan_out_budget=4 (YAML value)")
    ap.add_argument("--drafters-dir", help="keep the adapted drafters here (default: a temporary directory)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from cluster.models.build import build_pair
    from cluster.models.corpus import prompts as corpus_prompts
    from actors.model.tokenizer import Tokenizer
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec

    pair = build_pair(a.pair)
    weak = untrained_drafter(pair)
    tok = Tokenizer(pair / "target")
    pool = corpus_prompts("code", 10_000)
    texts, held_texts = pool[:a.requests], pool[a.requests:][-40:]   # held out: never in the stream
    prompts = [tok.encode(t)[-96:] for t in texts]
    held = [tok.encode(t)[-96:] for t in held_texts]
    prompts = (prompts * (a.requests // len(prompts) + 1))[:a.requests]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.arms.split(",")
    # the adapted drafters (saved on shutdown, read back for the agreement figures) stay out of --out
    keep = Path(a.drafters_dir) if a.drafters_dir else Path(tempfile.mkdtemp(prefix="outrider-online-"))
    ckpts = {arm: keep / f"adapted-drafter-{arm}" for arm in names}
    base = {"models.draft.path": str(weak), "speculation.adaptive": True,
            "engine.max_batch": max(8, a.concurrency)}
    for kv in a.set:
        key, _, value = kv.partition("=")
        base[key] = yaml.safe_load(value)
    arms = {}
    for arm in names:
        ov = {**base, **arm_overrides(arm, a, ckpts[arm])}
        shutil.rmtree(ckpts[arm], ignore_errors=True)
        t0 = time.perf_counter()
        rows, m = run_arm(engine_spec(load_config(CONFIGS[a.pair], ov)), prompts, a.concurrency, a.gap_s,
                          a.max_new)
        d = m.get("drafter") or {}
        arms[arm] = {"rows": rows, "wall_s": time.perf_counter() - t0,
                     "drafter": {k: v for k, v in d.items() if isinstance(v, (int, float))},
                     "verifier": {k: m.get(k) for k in ("wait_s", "table_wait_s", "verify_s", "prefill_s", "idle_s",
                                                        "steps", "rounds")},
                     "adaptive": m.get("adaptive")}
        print(f"{arm}: {len(rows)} requests in {arms[arm]['wall_s']:.1f}s; drafter {arms[arm]['drafter']}")
    first = names[0]
    for arm in names[1:]:
        for i, (x, y) in enumerate(zip(arms[first]["rows"], arms[arm]["rows"])):
            if x["out"] != y["out"]:
                raise SystemExit(f"request {i}: arms {first} and {arm} give different greedy outputs: "
                                 "exactness is broken")
    from actors.generate import generate_ar
    from actors.model.loader import load_model
    from actors.spec.sampling import SamplingParams
    from actors.spec.stopping import StopCriteria

    target = load_model(pair / "target")
    ar = lambda p: generate_ar(target, p, StopCriteria(a.max_new), SamplingParams()).tokens  # noqa: E731
    sample = list(range(0, a.requests, max(1, a.requests // 40)))
    ps, cs = [prompts[i] for i in sample], [arms[first]["rows"][i]["out"] for i in sample]
    same_as_ar = sum(ar(p) == c for p, c in zip(ps, cs))
    held_c = [ar(p) for p in held]
    drafters = [("before", weak)] + [(f"after_{arm}", ckpts[arm]) for arm in names if arm != "off"] + \
        [("pair_drafter", pair / "draft")]
    agree = {"stream": {name: agreement(path, target, ps, cs) for name, path in drafters},
             "held_out": {name: agreement(path, target, held, held_c) for name, path in drafters}}
    n = a.requests
    marks = sorted({min(n, m) for m in (50, 100, 200, n)})
    build = json.loads((pair / "build.json").read_text())
    report = {"command": "python -m cluster.bench.online " + " ".join(argv if argv is not None else sys.argv[1:]),
              "pair": a.pair, "cost_ratio": build.get("cost_ratio"), "requests": n, "concurrency": a.concurrency,
              "gap_s": a.gap_s, "max_new": a.max_new, "lr": a.lr, "steps_per_s": a.steps_per_s,
              "train_batch": a.train_batch, "train_window": a.train_window, "arms": names,
              "greedy_agreement": agree, "identical_outputs": True,
              "equal_to_ar": f"{same_as_ar}/{len(sample)}",
              "windows": {f"{max(0, m - a.window)}-{m}": {arm: summary(arms[arm]["rows"], max(0, m - a.window), m)
                                                          for arm in arms} for m in marks},
              "whole": {arm: summary(arms[arm]["rows"], 0, n) for arm in arms},
              "wall_s": {arm: arms[arm]["wall_s"] for arm in arms},
              "drafter": {arm: arms[arm]["drafter"] for arm in arms},
              "verifier": {arm: arms[arm]["verifier"] for arm in arms},
              "adaptive_policy_at_end": {arm: arms[arm]["adaptive"] for arm in arms},
              "per_request": {arm: {"columns": ["tokens", "seconds", "drafted", "accepted"],
                                    "rows": [[r["tokens"], round(r["seconds"], 4), r["drafted"], r["accepted"]]
                                             for r in arms[arm]["rows"]]} for arm in arms}}
    (out / "online.json").write_text(json.dumps(report, indent=2))
    if not a.drafters_dir:
        shutil.rmtree(keep, ignore_errors=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    styles = {"off": "--", "on": "-", "recompute": ":"}
    for arm in names:
        acc, tps = windowed(arms[arm]["rows"], a.window)
        xs = range(1, n + 1)
        label = {"off": "online learning off", "on": "on (old-weight KV kept)",
                 "recompute": "on (KV recomputed after steps)"}[arm]
        ax1.plot(xs, acc, styles[arm], label=label)
        ax2.plot(xs, tps, styles[arm], label=label)
    ax1.set_ylabel(f"acceptance (last {a.window} requests)")
    ax2.set_ylabel(f"tokens/s per request (last {a.window})")
    ax2.set_xlabel("requests served")
    ax1.legend()
    ax1.set_title(f"untrained drafter, {a.pair} pair, code stream, adaptive K")
    fig.tight_layout()
    fig.savefig(out / "online.png", dpi=100)
    print(json.dumps({k: report[k] for k in ("greedy_agreement", "equal_to_ar", "windows", "whole")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
