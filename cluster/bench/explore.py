"""`outrider bench --explore`: SSD over a grid of drafter sizes, K and fan-out budgets.

A larger drafter agrees with the target more often and SSD hides its cost, but only while
pre-speculation (budget branches x K drafter steps) still fits inside one verification; a larger
K accepts more per round but verifies more positions. Where the optimum lies depends on the
hardware, so it is measured: every combination runs as an SSD engine on the bench's prompts,
interleaved prompt by prompt (engines in phases that fit the cluster), greedy, and must match
outrider AR token for token. Writes explore.{json,md}; the last line printed names the best.
"""
from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from pathlib import Path

from cluster.bench.run import FULL, QUICK, Mode, _ray_up, build_prompts, plan_phases, run_phases
from cluster.bench.modes import _outrider
from cluster.bench.report import _fmt, check_greedy, mode_summary
from cluster.config import load_config
from cluster.launch.deployment import engine_spec, shutdown_ray, tokenizer_for

log = logging.getLogger(__name__)


def _name(draft: str, k: int, budget: int) -> str:
    return f"ssd {draft.rsplit('/', 1)[-1]} k={k} budget={budget}"


def explore_modes(drafts: list[str], ks: list[int], budgets: list[int]) -> list[Mode]:
    """One SSD mode per (drafter, K, budget)."""
    return [_outrider(_name(draft, k, budget), "ssd", k, **{"models.draft.path": draft,
                                                            "speculation.fan_out_budget": budget})
            for draft, k, budget in itertools.product(drafts, ks, budgets)]


def _row(name: str, m: dict, ar_tok_s: float) -> dict:
    sp, b = m.get("spec") or {}, m.get("breakdown_per_round") or {}
    return {"mode": name, "tok_s": m["tokens_per_s"], "min": m["tokens_per_s_spread"]["min"],
            "max": m["tokens_per_s_spread"]["max"], "x_ar": round(m["tokens_per_s"] / ar_tok_s, 3),
            "e_acc_plus_1": sp.get("mean_acceptance_length"), "hit_rate": sp.get("hit_rate"),
            "verify_ms": b.get("verify_ms"), "draft_ms": b.get("draft_ms"),
            "prespec_ms": b.get("drafter_prespec_ms"), "mismatches": m.get("mismatches"),
            "overrides": m["overrides"]}


def markdown(rep: dict) -> str:
    out = ["# outrider bench --explore", "",
           f"{rep['prompts']} prompts × {rep['new_tokens']} new tokens, greedy, batch 1; config "
           f"`{rep['config_path']}`; wall {rep['wall_s']:.0f} s. Every SSD engine: target on one core, "
           "drafter on the other.", "",
           "| mode | tok/s (median) | min–max | ×AR | E[acc+1] | hit rate | verify ms | exposed draft ms | "
           "pre-speculation ms | mismatches |", "|" + "---|" * 10]
    for r in rep["rows"]:
        out.append(f"| {r['mode']} | {r['tok_s']:.1f} | {r['min']:.1f}–{r['max']:.1f} | {r['x_ar']:.2f} | "
                   + " | ".join(_fmt(r[key], ".2f") for key in ("e_acc_plus_1", "hit_rate", "verify_ms", "draft_ms",
                                                                "prespec_ms")) + f" | {r['mismatches']} |")
    out += ["", "Per-round times are the verifier's (verify, exposed drafting) and the drafter's "
            "(pre-speculation, hidden while it stays below the verify).", "", f"`{rep['summary_line']}`", ""]
    return "\n".join(out)


def run_explore(config_path: str, out_dir: str, drafts: list[str] | None = None, ks: list[int] | None = None,
                budgets: list[int] | None = None, quick: bool = False) -> int:
    from tqdm import tqdm

    t_start = time.perf_counter()
    s = QUICK if quick else FULL
    cfg = load_config(config_path)
    base = engine_spec(load_config(config_path, {"speculation.mode": "ssd"}))
    if base.draft is None:
        raise ValueError(f"{config_path}: --explore needs models.draft")
    drafts = drafts or [cfg.models.draft.path]
    ks = ks or [cfg.speculation.k]
    budgets = budgets or [cfg.speculation.fan_out_budget]
    modes = explore_modes(drafts, ks, budgets)
    # Every combination must be a valid deployment (the config's own checks name the bad key),
    # and a demo drafter variant is built now, before any engine starts.
    for m in modes:
        engine_spec(load_config(config_path, m.overrides))
    prompts, warm = build_prompts(tokenizer_for(base), s["n_code"], s["n_text"])
    local = cfg.cluster.launcher == "local"
    owned, capacity = (False, float("inf")) if local else _ray_up(cfg, 16)
    # Each phase runs outrider AR beside its SSD engines: the exactness reference of that phase.
    phases = [[_outrider("ar", "ar", ks[0])] + p for p in plan_phases(modes, capacity - 1, local)]
    bar = tqdm(total=len(prompts) * len(phases), desc="explore", unit="rep", file=sys.stderr)
    runs: dict[str, list] = {}
    mismatches: dict[str, int] = {}
    try:
        for phase in phases:
            got = run_phases(config_path, [phase], None, prompts, warm, s["new_tokens"], bar, quiet=owned)
            for name, g in check_greedy(got, phase).items():
                mismatches[name] = g["mismatches"]
            runs.setdefault("ar", got["ar"])
            runs.update({name: r for name, r in got.items() if name != "ar"})
    finally:
        bar.close()
        if owned:
            shutdown_ray()
    ar = mode_summary(phases[0][0], runs["ar"])   # the first phase's AR: the speed-up's base
    rows = []
    for m in modes:
        summ = mode_summary(m, runs[m.name])
        summ["mismatches"] = mismatches[m.name]
        rows.append(_row(m.name, summ, ar["tokens_per_s"]))
    best = max((r for r in rows if r["mismatches"] == 0), key=lambda r: r["tok_s"], default=None)
    configured = _name(cfg.models.draft.path, cfg.speculation.k, cfg.speculation.fan_out_budget)
    conf_row = next((r for r in rows if r["mode"] == configured), None)
    line = (f"best: {best['mode']} {best['tok_s']:.1f} tok/s ({best['x_ar']:.2f}x AR)" if best
            else "best: none (every combination differed from outrider AR)")
    if best and conf_row:
        line += f"; configured {configured}: {conf_row['tok_s']:.1f} tok/s"
    rep = {"config_path": str(config_path), "prompts": len(prompts), "new_tokens": s["new_tokens"],
           "phases": [[m.name for m in p] for p in phases], "ar_tok_s": ar["tokens_per_s"],
           "rows": rows, "best": best, "summary_line": line,
           "wall_s": round(time.perf_counter() - t_start, 1)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explore.json").write_text(json.dumps(rep, indent=2))
    (out / "explore.md").write_text(markdown(rep))
    for r in sorted(rows, key=lambda r: -r["tok_s"]):
        print(f"{r['mode']}: {r['tok_s']:.1f} tok/s, E[acc+1] {r['e_acc_plus_1']}, hit rate {r['hit_rate']}, "
              f"pre-speculation {r['prespec_ms']} ms/round, mismatches {r['mismatches']}")
    print(line)
    sys.stdout.flush()
    return 0 if best else 1
