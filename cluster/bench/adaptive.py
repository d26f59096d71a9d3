"""Adaptive speculation against fixed K and plain decoding, on one pair, in one interleaved run.

    .venv/bin/python -m cluster.bench.adaptive -c configs/local-cpu.yaml \\
        --target DIR --draft DIR --prompts 4 --new-tokens 48 --out bench-out/adaptive.json

Modes (each an engine on the embedded Ray cluster, all up side by side): outrider AR, sync SD
at K = k, adaptive sync SD, SSD at K = k, adaptive SSD. For each prompt every mode runs once,
in an order that rotates from prompt to prompt, greedy, EOS ignored (every run makes exactly
--new-tokens tokens). Reports tokens/s (median over prompts, and pooled: all tokens over all
seconds), the ratio to AR, the K each round verified (summed over prompts), rounds the policy
turned off, and whether every output equals AR's token for token.

`random_drafter` writes a drafter that cannot agree with anything (the pair's drafter shape,
random weights): the useless-drafter scenario, in the checkpoint format every loader reads.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from actors.spec.sampling import SamplingParams
from actors.spec.stats import SpecStats


def random_drafter(src: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A copy of the checkpoint `src` (config, tokenizer) with every weight redrawn at random:
    normal(0, 0.02) matrices, norms at one. Its drafts agree with a target by chance only."""
    src, out = Path(src), Path(out)
    if (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    g = torch.Generator().manual_seed(seed)
    weights = load_file(src / "model.safetensors")
    fresh = {}
    for name, w in weights.items():
        if "norm" in name:
            fresh[name] = torch.ones_like(w)
        else:
            fresh[name] = (torch.randn(w.shape, generator=g) * 0.02).to(w.dtype)
    save_file(fresh, tmp / "model.safetensors")
    (tmp / "build.json").write_text(json.dumps({"random_drafter_of": str(src), "seed": seed}))
    tmp.rename(out)
    return out


MODES = {  # name -> speculation overrides
    "AR": {"speculation.mode": "ar"},
    "SD K=k": {"speculation.mode": "sd", "speculation.adaptive": False},
    "SD adaptive": {"speculation.mode": "sd", "speculation.adaptive": True},
    "SSD K=k": {"speculation.mode": "ssd", "speculation.adaptive": False},
    "SSD adaptive": {"speculation.mode": "ssd", "speculation.adaptive": True},
}


def run(config: str, target: str | None, draft: str | None, n_prompts: int, new_tokens: int, k: int | None,
        modes: list[str]) -> dict:
    import ray

    from cluster.models.corpus import prompts as corpus_prompts
    from cluster.config import load_config
    from cluster.serving.coordinator import Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec, tokenizer_for
    from cluster.launch.engine import RayEngine, embedded_ray_env

    base = {"cluster.launcher": "ray", "engine.max_batch": 1}
    if target:
        base["models.target.path"] = target
    if draft:
        base["models.draft.path"] = draft
    if k is not None:
        base["speculation.k"] = k
    specs = {m: engine_spec(load_config(config, {**base, **MODES[m]})) for m in modes}
    tok = tokenizer_for(specs[modes[0]])
    texts = corpus_prompts("code", (n_prompts + 1) // 2) + corpus_prompts("text", n_prompts // 2)
    prompts = [tok.encode(t)[-64:] for t in texts][:n_prompts]
    embedded_ray_env()
    ray.init(address="local", num_cpus=2 * len(modes) + 2, include_dashboard=False, configure_logging=False,
             log_to_driver=False, namespace="outrider-bench-adaptive")
    engines, coords = {}, {}
    try:
        for m in modes:
            engines[m] = RayEngine(specs[m]).start()
            coords[m] = Coordinator(engines[m], None)
        for m in modes:  # warm up every engine once
            coords[m].generate(GenerateArgs(list(prompts[0][:16]), 8, SamplingParams(), ignore_eos=True))
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for i, p in enumerate(prompts):
            order = modes[i % len(modes):] + modes[:i % len(modes)]
            for m in order:
                t0 = time.perf_counter()
                h = coords[m].submit(GenerateArgs(list(p), new_tokens, SamplingParams(), ignore_eos=True))
                f = h.result()
                wall = time.perf_counter() - t0
                runs[m].append({"tokens": list(h.tokens), "seconds": f.total_s or wall, "stats": f.stats.to_dict()})
            print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(
                f"{m} {new_tokens / runs[m][-1]['seconds']:.1f}" for m in modes), file=sys.stderr, flush=True)
        policy = {m: engines[m].metrics().get("adaptive") for m in modes if "adaptive" in m}
    finally:
        for m in modes:
            if m in coords:
                coords[m].stop()
            if m in engines:
                engines[m].stop()
        ray.shutdown()
    ref = runs[modes[0]]
    out = {"config": config, "target": specs[modes[0]].target, "draft": specs[modes[-1]].draft,
           "k": specs[modes[-1]].k, "prompts": len(prompts), "new_tokens": new_tokens, "modes": {}, "policy": policy}
    ar_rate = None
    for m in modes:
        rs = runs[m]
        rates = [new_tokens / r["seconds"] for r in rs]
        pooled = new_tokens * len(rs) / sum(r["seconds"] for r in rs)
        st = SpecStats(k=specs[m].k)
        for r in rs:
            st.merge(SpecStats.from_dict(r["stats"]))
        med = statistics.median(rates)
        ar_rate = ar_rate or med
        out["modes"][m] = {
            "tok_s_median": round(med, 2), "tok_s_pooled": round(pooled, 2), "x_ar": round(med / ar_rate, 3),
            "acceptance": round(st.acceptance_rate, 3), "hit_rate": round(st.hit_rate, 3),
            "k_histogram": st.k_histogram, "rounds_off": st.rounds_off,
            "mismatches_vs_first": sum(r["tokens"] != q["tokens"] for r, q in zip(rs, ref)),
        }
    return out


def markdown(res: dict) -> str:
    lines = [f"{res['prompts']} prompts x {res['new_tokens']} tokens, greedy, batch 1, k = {res['k']}; "
             f"target {res['target']}, draft {res['draft']}", "",
             "| mode | tok/s (median) | pooled | ×AR | acceptance | hit rate | rounds by K (0..k) | off | mismatches |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in res["modes"].items():
        lines.append(f"| {m} | {r['tok_s_median']} | {r['tok_s_pooled']} | {r['x_ar']:.2f} | {r['acceptance']} | "
                     f"{r['hit_rate']} | {r['k_histogram']} | {r['rounds_off']} | {r['mismatches_vs_first']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="configs/local-cpu.yaml")
    ap.add_argument("--target", default=None, help="target checkpoint dir (default: the config's)")
    ap.add_argument("--draft", default=None, help="draft checkpoint dir (default: the config's)")
    ap.add_argument("--random-draft", action="store_true",
                    help="draft with random weights in the draft's shape (written next to it, once)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="bench-out/adaptive.json")
    a = ap.parse_args(argv)
    draft = a.draft
    if a.random_draft:
        from cluster.config import load_config
        from cluster.launch.deployment import resolve_model

        src = Path(draft or resolve_model(load_config(a.config).models.draft.path))
        draft = str(random_drafter(src, src.with_name(src.name + "-random")))
    res = run(a.config, a.target, draft, a.prompts, a.new_tokens, a.k, a.modes.split(","))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    md = markdown(res)
    Path(a.out).with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
