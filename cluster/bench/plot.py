"""The bench report's PNG: tokens/s per mode against the hidden-draft bound, and acceptance and
speculation-cache hits by position (cluster/bench/report.py writes it beside the JSON and Markdown).
"""
from __future__ import annotations

from pathlib import Path


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = {**rep["modes"], **rep["saguaro"]}
    names = list(modes)
    med = [modes[n]["tokens_per_s"] for n in names]
    lo = [m - modes[n]["tokens_per_s_spread"]["min"] for n, m in zip(names, med)]
    hi = [modes[n]["tokens_per_s_spread"]["max"] - m for n, m in zip(names, med)]
    colors = ["tab:red" if n.startswith("ssd") else "tab:blue" if n.startswith("sd") else
              "tab:green" if n.startswith("hf") else "tab:gray" for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    a.bar(names, med, yerr=[lo, hi], color=colors, capsize=3)
    a.axhline(rep["derived"]["bound_tok_s"], color="black", linestyle="--",
              label=f"hidden-draft bound E/t_verify = {rep['derived']['bound_tok_s']:.0f}")
    # SSD/bound pools all prompts (as E does): mark that figure on each outrider bar too.
    pooled = [(i, modes[n].get("tokens_per_s_aggregate")) for i, n in enumerate(names)
              if modes[n].get("kind") == "outrider"]
    a.plot([i for i, v in pooled if v], [v for i, v in pooled if v], "D", color="black", markersize=4,
           label="all prompts pooled (all tokens / all seconds)")
    a.set_ylabel("tokens/s (median, min–max)")
    a.set_title(f"batch 1, {rep['settings']['new_tokens']} new tokens, {rep['settings']['prompts']} prompts")
    a.tick_params(axis="x", rotation=45)
    a.legend(loc="upper left", fontsize=8)
    ssd, sd = rep["modes"]["ssd"], rep["modes"][rep["derived"]["sd_best"]]
    for m, label, style in ((ssd, "SSD accepted at position", "o-"),
                            (sd, f"{rep['derived']['sd_best']} accepted at position", "s--")):
        acc = m.get("acceptance_per_position") or []
        b.plot(range(1, len(acc) + 1), acc, style, label=label)
    hits = ssd.get("hit_rate_by_depth") or []
    b.plot(range(len(hits)), [h if h is not None else float("nan") for h in hits], "^-", label="SSD hit rate by depth")
    b.set_xlabel("position (acceptance) / depth k (hit rate)")
    b.set_ylim(0, 1.05)
    b.legend(fontsize=8)
    b.set_title("acceptance and speculation-cache hits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
