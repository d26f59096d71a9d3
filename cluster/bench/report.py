"""The bench report: per-mode figures, derived bounds and ratios, then JSON, Markdown and a PNG.

Definitions (DESIGN.md §2): a round is one verify pass; E = mean acceptance length (vLLM's
1 + accepted/drafts, tokens per round); the hidden-draft bound is E / t_verify(K+1). E pools
every round of every prompt, so SSD/bound pools tokens/s the same way (all tokens / all
seconds): the median prompt accepts more than the pooled E, and dividing its speed by the
pooled bound would overstate the ratio (0.84 against 0.72 pooled in one run). Sync SD's
ideal speed-up of SSD is (K·t_draft + t_verify) / t_verify at the same K. Per-round times are
the verifier's view of its critical path: verify (target forward + verification), draft (time
blocked on the drafter's reply, less the estimated wire time), transport (that wire time) and
control (admission, stop checks, streaming: the coordinator work inside the verifier).
"""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from actors.spec.stats import SpecStats
from cluster.bench.plot import plot

log = logging.getLogger(__name__)


def _r(x, nd: int = 4):
    return None if x is None else round(float(x), nd)


def _div(a, b):
    return a / b if a is not None and b else None


def _spread(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"min": _r(min(xs), 2), "q1": _r(q[0], 2), "q3": _r(q[2], 2), "max": _r(max(xs), 2)}


def _breakdown(runs, mode) -> dict | None:
    v = [r.verifier for r in runs if r.verifier]
    if not v:
        return None
    tot = {key: sum(d[key] for d in v) for key in v[0]}
    rounds = tot["rounds"] or 1
    seconds = sum(r.seconds for r in runs)
    per = {"verify": tot["verify_s"], "draft": tot["wait_s"] - tot["transport_s"], "transport": tot["transport_s"],
           "control": tot["control_s"], "prefill": tot["prefill_s"]}
    # Inside verify: the target forward alone, and the loop thread's CPU time (the rest of
    # verify it was descheduled or waiting for the GIL).
    inner = {f"{key}_ms": _r(1e3 * tot[f"{key}_s"] / rounds, 3)
             for key in ("forward", "verify_cpu") if f"{key}_s" in tot}
    per["other"] = seconds - tot["verify_s"] - tot["wait_s"] - tot["control_s"] - tot["prefill_s"]
    out = {"rounds": tot["rounds"], "rounds_per_run": _r(tot["rounds"] / len(runs), 2),
           "wall_ms": _r(1e3 * seconds / rounds, 3), **{f"{k}_ms": _r(1e3 * s / rounds, 3) for k, s in per.items()},
           **inner,
           # Transport plus coordination: the wire, the verifier's bookkeeping (control, without the
           # prefill) and whatever of the request's wall time the verifier loop did not see at all
           # (submission, the coordinator's last poll): everything that is neither model nor drafting.
           "transport_plus_control_frac": _r((per["transport"] + per["control"] + max(0.0, per["other"])) / seconds),
           "prefill_frac": _r(per["prefill"] / seconds), "prefill_ms_per_run": _r(1e3 * per["prefill"] / len(runs), 2)}
    d = [r.drafter for r in runs if r.drafter]
    if d:
        dt = {key: sum(x[key] for x in d) for key in d[0]}
        out.update(drafter_reply_ms=_r(1e3 * dt["reply_s"] / rounds, 3),
                   drafter_prespec_ms=_r(1e3 * dt["prespec_s"] / rounds, 3),
                   drafter_prespec_cpu_ms=_r(1e3 * dt.get("prespec_cpu_s", 0.0) / rounds, 3),
                   branches_per_round=_r(dt["branches"] / rounds, 2))
    return out


def mode_summary(mode, runs) -> dict:
    tok_s = [r.tok_s for r in runs]
    out = {"kind": mode.kind, "threads": mode.threads, "overrides": mode.overrides,
           "temperature": mode.params.temperature, "runs": len(runs),
           "tokens": sum(len(r.tokens) for r in runs), "seconds": _r(sum(r.seconds for r in runs)),
           "tokens_per_s": _r(statistics.median(tok_s), 2), "tokens_per_s_spread": _spread(tok_s),
           "tokens_per_s_aggregate": _r(sum(len(r.tokens) for r in runs) / sum(r.seconds for r in runs), 2),
           "per_run": [{"tokens": len(r.tokens), "seconds": _r(r.seconds), "tok_s": _r(r.tok_s, 2)} for r in runs]}
    if all(r.ttft is not None and r.seconds > r.ttft for r in runs):
        # Decode only (after the first token): the steady state the bound E/t_verify describes.
        dec = [(len(r.tokens) - 1) / (r.seconds - r.ttft) for r in runs]
        out.update(decode_tokens_per_s=_r(statistics.median(dec), 2),
                   decode_tokens_per_s_aggregate=_r(sum(len(r.tokens) - 1 for r in runs)
                                                    / sum(r.seconds - r.ttft for r in runs), 2),
                   ttft_ms=_r(1e3 * statistics.median(r.ttft for r in runs), 2))
    stats = [r.stats for r in runs if r.stats is not None]
    if stats:
        m = SpecStats(k=max(s.k for s in stats))
        for s in stats:
            m.merge(s)
        out["spec"] = m.to_dict()
        out["acceptance_per_position"] = [_r(_div(a, m.drafts)) for a in m.accepted_per_position] if m.drafts else []
        out["hit_rate_by_depth"] = ([_r(_div(h, n)) for h, n in zip(m.hits_by_depth, m.lookups_by_depth)]
                                    if m.cache_hits + m.cache_misses else [])
        out["breakdown_per_round"] = _breakdown(runs, mode)
    return out


def check_greedy(runs: dict, modes: list) -> dict[str, dict]:
    """Every greedy mode's tokens against outrider AR's, prompt by prompt."""
    ref = runs["ar"]
    out = {}
    for m in modes:
        if m.name == "ar" or not m.params.greedy:
            continue
        firsts = []
        for i, (a, b) in enumerate(zip(ref, runs[m.name])):
            if a.tokens != b.tokens:
                j = next((j for j, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y),
                         min(len(a.tokens), len(b.tokens)))
                firsts.append({"prompt": i, "position": j})
        out[m.name] = {"mismatches": len(firsts), "first_divergence": firsts}
        if firsts:
            log.warning("%s differs from outrider AR on %d prompt(s): %s", m.name, len(firsts), firsts)
    return out


def derive(report: dict, k: int) -> dict:
    ms, kern = report["modes"], report["kernels"]
    tps = {name: m["tokens_per_s"] for name, m in ms.items()}
    sd = {name: v for name, v in tps.items() if name.startswith("sd-k")}
    best = max(sd, key=sd.get)
    # t_verify is sampled between the main phase's generations (the machine state the modes saw)
    # and once more, quietly, after them. This host's speed drifts by up to ~20 % over minutes,
    # so the bound uses the faster of the two: a slow moment of the host lowers the bound
    # and would flatter SSD/bound, never the other way round.
    tv = min(kern.get("t_verify_interleaved_s") or kern["t_verify_s"][k], kern["t_verify_s"][k])
    td = kern["t_draft_1_s"]
    e_ssd = ms["ssd"]["spec"]["mean_acceptance_length"]
    e_sd = ms[f"sd-k{k}"]["spec"]["mean_acceptance_length"]
    bound = e_ssd / tv
    ideal = (k * td + tv) / tv
    ssd, pooled = tps["ssd"], ms["ssd"]["tokens_per_s_aggregate"]
    fwd_ssd, fwd_sd = _forward_ms(ms["ssd"]), _forward_ms(ms[f"sd-k{k}"])
    # SSD's drafter works on the other core during the forward, sync SD's waits: the same
    # engine's forward at the same K, SSD over SD, is what the overlap costs in hardware.
    overlap = max(1.0, fwd_ssd / fwd_sd) if fwd_ssd and fwd_sd else None  # below 1 is noise
    ceilings = _ceilings(ms["ssd"], bound, overlap)
    fixed = report["settings"].get("ssd_fixed")   # SSD at the sweep's best fixed K, timed beside "ssd"
    return {"k": k, "sd_best": best, "sd_best_k": int(best.removeprefix("sd-k")), "ssd_fixed": fixed,
            "ssd_k_histogram": ms["ssd"].get("spec", {}).get("k_histogram"),
            "ssd_drafting_rounds": _drafting_rounds(ms["ssd"]),
            "mean_acceptance_length_ssd": e_ssd, "mean_acceptance_length_sd": e_sd,
            "t_verify_ms": _r(1e3 * tv, 3), "t_verify_quiet_ms": _r(1e3 * kern["t_verify_s"][k], 3),
            "t_verify_interleaved_ms": _r(1e3 * kern["t_verify_interleaved_s"], 3)
            if kern.get("t_verify_interleaved_s") else None,
            "t_draft_ms": _r(1e3 * td, 3),
            "bound_tok_s": _r(bound, 2), "sd_ideal_ratio": _r(ideal),
            "ar_model_tok_s": _r(1 / kern["t_target_1_s"], 2), "sd_model_tok_s": _r(e_sd / (k * td + tv), 2),
            "ratios": {"SSD/AR": _r(ssd / tps["ar"]), "SSD/SD": _r(ssd / sd[best]),
                       "SSD/SD-ideal": _r(ssd / tps[f"sd-k{k}"] / ideal),
                       "SSD/HF": _r(_div(ssd, tps.get("hf-assisted", tps["hf"]))),   # plain HF beside a head
                       "SSD/bound": _r(pooled / bound), "SSD/AR-2t": _r(ssd / tps["ar-2t"]),
                       "SSD/HF-plain": _r(ssd / tps["hf"]), "SSD/SD-same-K": _r(ssd / tps[f"sd-k{k}"]),
                       "SSD-decode/bound": _r(_div(ms["ssd"].get("decode_tokens_per_s_aggregate"), bound)),
                       "SSD-median-prompt/bound": _r(ssd / bound),
                       "SSD/SSD-fixed": _r(_div(ssd, tps.get(fixed))),
                       **{f"SSD/{name}": _r(_div(pooled, c)) for name, c in ceilings.items()}},
            "ceilings_tok_s": {name: _r(c, 2) for name, c in ceilings.items()},
            "verify_overhead_ms": _r(_verify_ms(ms["ssd"]) - 1e3 * tv if _verify_ms(ms["ssd"]) else None, 3),
            "forward_ms_ssd": fwd_ssd, "forward_ms_sd_same_k": fwd_sd, "overlap_slowdown": _r(overlap),
            "memory_floor": _floor(kern, tv, _verify_ms(ms["ssd"]))}


def _drafting_rounds(m: dict) -> tuple[int, int] | None:
    """(rounds that verified a draft, all verify rounds) from a mode's K histogram."""
    hist = (m.get("spec") or {}).get("k_histogram")
    return (sum(hist[1:]), sum(hist)) if hist else None


def _floor(kern: dict, tv: float, ssd_verify_ms: float | None) -> dict | None:
    """The target forward's memory floor (its streamed bytes over the measured copy bandwidth)
    and how far each measured step sits above it."""
    w, bw = kern.get("target_streamed_bytes"), kern.get("copy_bytes_per_s")
    if not w or not bw:
        return None
    floor_ms = 1e3 * w / bw
    return {"device": kern.get("device", "cpu"), "target_streamed_mb": _r(w / 1e6, 1),
            "copy_gb_per_s": _r(bw / 1e9, 1), "floor_ms": _r(floor_ms, 4),
            "t_target_1_x": _r(1e3 * kern["t_target_1_s"] / floor_ms, 2), "t_verify_x": _r(1e3 * tv / floor_ms, 2),
            "ssd_verify_per_round_x": _r(_div(ssd_verify_ms, floor_ms), 2)}


def _ceilings(ssd: dict, bound: float, overlap: float | None) -> dict[str, float]:
    """What the hardware allows end to end, beyond the hidden-draft bound: the target's prefill
    (measured in the SSD runs) comes first, and while the drafter works on the other core the
    forward is slower (shared L3 and memory bandwidth; `overlap`, SSD's forward over sync SD's)."""
    b = ssd.get("breakdown_per_round") or {}
    if not b.get("prefill_ms_per_run"):
        return {}
    n = ssd["tokens"] / ssd["runs"]
    prefill = b["prefill_ms_per_run"] / 1e3
    out = {"bound+prefill": n / (prefill + (n - 1) / bound)}
    if overlap:
        out["bound+prefill+overlap"] = n / (prefill + (n - 1) / bound * overlap)
    return out


def _verify_ms(m: dict) -> float | None:
    return (m.get("breakdown_per_round") or {}).get("verify_ms")


def _forward_ms(m: dict) -> float | None:
    return (m.get("breakdown_per_round") or {}).get("forward_ms")


def summarize(modes, runs, greedy, kernels, sag, sag_runs, env, settings) -> dict:
    k = settings["k"]
    kern = {"context_tokens": kernels["context_tokens"], "threads": kernels["threads"], "reps": kernels["reps"],
            "t_target_1_s": kernels["t_target_1_s"], "t_draft_1_s": kernels["t_draft_1_s"],
            "t_verify_s": dict(kernels["t_verify_s"]),
            "t_verify_interleaved_s": kernels.get("t_verify_interleaved_s"),
            "t_verify_interleaved_n": kernels.get("t_verify_interleaved_n"), "device": kernels.get("device", "cpu"),
            "target_streamed_bytes": kernels.get("target_streamed_bytes"),
            "copy_bytes_per_s": kernels.get("copy_bytes_per_s"), "dtype": kernels.get("dtype"),
            "dtypes": kernels.get("dtypes"), "llama_cpp": kernels.get("llama_cpp")}
    report = {"settings": settings, "modes": {m.name: mode_summary(m, runs[m.name]) for m in modes},
              "kernels": kern, "greedy_check": greedy,
              "outrider_mismatches": sum(g["mismatches"] for name, g in greedy.items() if not name.startswith("hf")),
              "hf_mismatches": sum(g["mismatches"] for name, g in greedy.items() if name.startswith("hf")),
              "saguaro": {m.name: mode_summary(m, sag_runs[m.name]) for m in sag if m.name in sag_runs}, "env": env}
    for name, g in greedy.items():
        report["modes"][name]["mismatches"] = g["mismatches"]
    d = report["derived"] = derive(report, k)
    ra = d["ratios"]
    report["summary_line"] = " ".join(f"{key}={ra[key]:.2f}" for key in
                                      ("SSD/AR", "SSD/SD", "SSD/SD-ideal", "SSD/HF", "SSD/bound"))
    if ra.get("SSD/SSD-fixed") is not None:
        report["summary_line"] += f" SSD/{d['ssd_fixed']}={ra['SSD/SSD-fixed']:.2f}"
    lines = [f"{name:>18}: {m['tokens_per_s']:8.1f} tok/s  (min {m['tokens_per_s_spread']['min']:.1f}, "
             f"max {m['tokens_per_s_spread']['max']:.1f})"
             + (f"  E={m['spec']['mean_acceptance_length']:.2f}" if m.get("spec", {}).get("drafts") else "")
             for name, m in {**report["modes"], **report["saguaro"]}.items()]
    if d["ssd_drafting_rounds"]:
        lines.append(f"{'ssd K by round':>18}: {d['ssd_k_histogram']} (K = 0..{k}; drafted in "
                     f"{d['ssd_drafting_rounds'][0]} of {d['ssd_drafting_rounds'][1]} rounds)")
    lines.append(f"{'bound':>18}: {d['bound_tok_s']:8.1f} tok/s  (E={d['mean_acceptance_length_ssd']:.2f} / "
                 f"t_verify({k + 1})={d['t_verify_ms']:.2f} ms; t_draft={d['t_draft_ms']:.3f} ms; "
                 f"greedy mismatches: outrider {report['outrider_mismatches']}, hf {report['hf_mismatches']})")
    if d["memory_floor"]:
        f = d["memory_floor"]
        lines.append(f"{'memory floor':>18}: {f['floor_ms']:8.3f} ms  ({f['target_streamed_mb']} MB of target weights "
                     f"/ {f['copy_gb_per_s']} GB/s copy on {f['device']}; t_target(1) x{f['t_target_1_x']}, "
                     f"t_verify x{f['t_verify_x']}, SSD's verify per round x{f['ssd_verify_per_round_x']})")
    pooled = report["modes"]["ssd"]["tokens_per_s_aggregate"]
    lines += [f"{name:>18}: {v:8.1f} tok/s  (SSD, all prompts pooled: {pooled:.1f} tok/s, {pooled / v:.2f} of it)"
              for name, v in d["ceilings_tok_s"].items()]
    report["summary_lines"] = lines
    return report


# -- files -------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(rep: dict) -> str:
    s, d, env = rep["settings"], rep["derived"], rep["env"]
    sb = rep["modes"].get("ssd", {}).get("breakdown_per_round") or {}
    frac, pre = sb.get("transport_plus_control_frac"), sb.get("prefill_frac")
    ar = rep["modes"]["ar"]["tokens_per_s"]
    ssd_pooled, ssd_med = rep["modes"]["ssd"]["tokens_per_s_aggregate"], rep["modes"]["ssd"]["tokens_per_s"]
    ssd_dec = rep["modes"]["ssd"].get("decode_tokens_per_s_aggregate")
    out = [f"# outrider bench{' (quick)' if s['quick'] else ''}", "",
           f"{s['prompts']} prompts (≤128 tokens) × {s['new_tokens']} new tokens, greedy, batch 1, K={s['k']}; "
           f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu_count']} CPUs; "
           f"config `{env['config_path']}`; wall {rep.get('wall_s', 0):.0f} s.", "",
           "| mode | threads | tok/s (median) | min–max | ×AR | decode tok/s | E[acc+1] | accept rate | hit rate | "
           "verify ms | draft ms | transport ms | control ms | mismatches | rounds drafted | K by round (0..k) |",
           "|" + "---|" * 16]
    for name, m in {**rep["modes"], **rep["saguaro"]}.items():
        sp, b = m.get("spec") or {}, m.get("breakdown_per_round") or {}
        spec_on = bool(sp.get("drafts"))
        out.append(f"| {name} | {m['threads']} | {m['tokens_per_s']:.1f} | {m['tokens_per_s_spread']['min']:.1f}–"
                   f"{m['tokens_per_s_spread']['max']:.1f} | {m['tokens_per_s'] / ar:.2f} | "
                   f"{_fmt(m.get('decode_tokens_per_s'))} | "
                   f"{_fmt(sp.get('mean_acceptance_length') if spec_on else None, '.2f')} | "
                   f"{_fmt(sp.get('acceptance_rate') if spec_on else None, '.2f')} | "
                   f"{_fmt(sp.get('hit_rate') if sp.get('cache_hits', 0) + sp.get('cache_misses', 0) else None, '.2f')}"
                   f" | {_fmt(b.get('verify_ms'), '.2f')} | {_fmt(b.get('draft_ms'), '.2f')} | "
                   f"{_fmt(b.get('transport_ms'), '.3f')} | {_fmt(b.get('control_ms'), '.3f')} | "
                   f"{m.get('mismatches', '–')} | {_rounds_cell(m)} | {_hist_cell(m)} |")
    out += ["", "tok/s is end to end (submit to last token, prefill included); decode tok/s excludes the first "
            "token. Per-round times are the verifier's critical path (ms per verify round); the Saguaro rows "
            "(temperature 0.7) have no greedy check.", "", "## Derived", "",
            f"- t_verify({s['k'] + 1}) = {d['t_verify_ms']:.2f} ms, the faster of: the median of "
            f"{rep['kernels'].get('t_verify_interleaved_n') or 1} samples taken between the main phase's "
            f"generations ({_fmt(d.get('t_verify_interleaved_ms'), '.2f')} ms) and a quiet measurement after them "
            f"({_fmt(d.get('t_verify_quiet_ms'), '.2f')} ms); "
            f"t_draft(1) = {d['t_draft_ms']:.3f} ms, "
            f"t_target(1) = {1e3 * rep['kernels']['t_target_1_s']:.2f} ms (one thread, "
            f"{rep['kernels']['context_tokens']}-token context, median of {rep['kernels']['reps']})",
            f"- hidden-draft bound E/t_verify = {d['bound_tok_s']:.1f} tok/s "
            f"(E = {d['mean_acceptance_length_ssd']:.2f})",
            f"- SD ideal ratio (K·t_draft + t_verify)/t_verify = {d['sd_ideal_ratio']:.3f}; "
            f"best SD K = {d['sd_best_k']}",
            f"- hidden-draft bound against SSD with all prompts pooled (all tokens / all seconds, as E pools all "
            f"rounds): {ssd_pooled:.1f} tok/s end to end, {_fmt(ssd_dec)} decode only; the median prompt: "
            f"{ssd_med:.1f} tok/s",
            f"- SSD's verify per round exceeds the direct t_verify by {_fmt(d['verify_overhead_ms'], '.2f')} ms; "
            f"the target forward alone in the engine: SSD {_fmt(d.get('forward_ms_ssd'), '.2f')} ms, sync SD at the "
            f"same K {_fmt(d.get('forward_ms_sd_same_k'), '.2f')} ms (its drafter idle meanwhile): the overlap "
            f"slows the forward by x{_fmt(d.get('overlap_slowdown'), '.3f')}",
            f"- SSD's drafter: pre-speculation {_fmt(sb.get('drafter_prespec_ms'), '.2f')} ms per round, "
            f"{_fmt(sb.get('drafter_prespec_cpu_ms'), '.2f')} ms of it on its core (the rest: descheduled), while "
            f"the verifier verifies ({_fmt(sb.get('verify_ms'), '.2f')} ms): a table that comes later is exposed "
            f"drafting ({_fmt(sb.get('draft_ms'), '.2f')} ms per round, misses included)",
            f"- SSD transport + coordination (wire, verifier bookkeeping, time outside the verifier loop): "
            f"{_fmt(None if frac is None else 100 * frac)} % of its wall time; the target's prefill: "
            f"{_fmt(None if pre is None else 100 * pre)} % (the bound E/t_verify has no prefill term)",
            _floor_line(d.get("memory_floor")),
            "- end-to-end ceilings: " + (", ".join(f"{name} {v:.1f} tok/s" for name, v in d["ceilings_tok_s"].items())
                                         or "–"),
            _adaptive_line(rep),
            "- ratios: " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in d["ratios"].items()), "",
            "```", rep["summary_line"], "```", ""]
    ssd = rep["modes"]["ssd"]
    acc, hits = ssd.get("acceptance_per_position") or [], ssd.get("hit_rate_by_depth") or []
    if acc or hits:
        n = max(len(acc) + 1, len(hits))
        out += ["## SSD by position / depth", "", "| i | " + " | ".join(str(i) for i in range(n)) + " |",
                "|" + "---|" * (n + 1)]
        if acc:
            out.append("| drafts with position i accepted | – | " + " | ".join(_fmt(x, ".2f") for x in acc) + " |")
        if hits:
            out.append("| cache hit rate at depth i | " + " | ".join(_fmt(x, ".2f") for x in hits) + " |")
    from cluster.bench.dtype import markdown as dtype_lines

    k = rep["kernels"]
    out += dtype_lines(k.get("dtypes"), k.get("llama_cpp"), k.get("dtype"))
    return "\n".join(out) + "\n"


def _adaptive_line(rep: dict) -> str:
    d, s = rep["derived"], rep["settings"]
    how = "adaptive K, as shipped" if s.get("adaptive", True) else "fixed K (adaptive off in the config)"
    line = (f"- ssd ({how}, K ≤ {s['k']}) drafted in {_rounds_cell(rep['modes']['ssd'])} rounds; its rounds by K "
            f"(0..{s['k']}): {d.get('ssd_k_histogram')}")
    if d.get("ssd_fixed"):
        line += (f"; beside it, timed interleaved, SSD at the sweep's best fixed K ({d['ssd_fixed']}): "
                 f"ssd/{d['ssd_fixed']} = {_fmt(d['ratios'].get('SSD/SSD-fixed'), '.2f')}")
    return line


def _rounds_cell(m: dict) -> str:
    r = _drafting_rounds(m)
    return "–" if r is None else f"{r[0]} of {r[1]}"


def _hist_cell(m: dict) -> str:
    hist = (m.get("spec") or {}).get("k_histogram")
    return "–" if not hist else " ".join(str(x) for x in hist)


def _floor_line(f: dict | None) -> str:
    if not f:
        return "- memory floor: not measured"
    return (f"- memory floor of a target forward on {f['device']}: {f['target_streamed_mb']} MB of weights (the "
            f"embedding table excepted) / {f['copy_gb_per_s']} GB/s measured copy bandwidth (bytes read + written) "
            f"= {f['floor_ms']:.3f} ms; t_target(1) is x{f['t_target_1_x']} of it, t_verify x{f['t_verify_x']}, "
            f"SSD's verify per round x{_fmt(f['ssd_verify_per_round_x'], '.2f')}")


def write_report(rep: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    (out / "report.md").write_text(markdown(rep))
    plot(rep, out / "bench.png")
    log.info("report written to %s (report.json, report.md, bench.png)", out)
