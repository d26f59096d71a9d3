"""`python -m cluster.gpu_check [--device cuda] [--tiny]`: build the seeded pair, run every check,
print one table; exit status 1 if any check failed. docs/gpu-check.md says what each row means."""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from cluster.gpu_check import reference, runs, seeded
from cluster.launch.memory_plan import fmt

log = logging.getLogger("gpu_check")
GiB = 1 << 30


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m cluster.gpu_check", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU form CI runs)")
    ap.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", help="where the seeded checkpoints go (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, help="greedy prompts (default 8; tiny 3)")
    ap.add_argument("--new", type=int, help="tokens per greedy prompt (default 64; tiny 16)")
    ap.add_argument("--samples", type=int, help="sampled continuations for the chi-square (default 600; tiny 200)")
    ap.add_argument("--ctx", type=int, help="context of the timed forwards (default 512; tiny 64)")
    ap.add_argument("--no-compile", action="store_true", help="skip the engine.compile rows")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="the run's time budget: the compile rows are skipped when less than --compile-s is left")
    ap.add_argument("--compile-s", type=float, default=240.0, help="what the compile rows may need (two shapes)")
    ap.add_argument("--compile-backend", help="torch.compile backend of the compile rows (default inductor; "
                                              "aot_eager for --tiny on CPU, where inductor's C++ builds take minutes)")
    ap.add_argument("--tie-gap", type=float, help="logit gap that counts as a near-tie (default: 1e-4 float32, "
                                                  "0.125 bfloat16)")
    return ap.parse_args(argv)


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, result: str, detail: str = "", ok: bool | None = None) -> None:
        self.rows.append((check, result, detail, {True: "ok", False: "FAIL", None: "info"}[ok]))
        log.info("%s: %s %s (%s)", check, result, detail, self.rows[-1][3])

    @property
    def failed(self) -> bool:
        return any(r[3] == "FAIL" for r in self.rows)

    def render(self) -> str:
        head = ("check", "result", "status", "detail")
        rows = [head] + [(c, r, s, d) for c, r, d, s in self.rows]
        w = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join(f"{a.ljust(w[0])}  {b.ljust(w[1])}  {c.ljust(w[2])}  {d}".rstrip() for a, b, c, d in rows)


def _timing_rows(table: Table, t: dict, k: int, ctx: int, backend: str, device: str) -> None:
    floor, dec, ver = t["floor_ms"], t["decode_ms"], t["verify_ms"]
    table.add("t_decode(1)", f"{dec:.2f} ms", f"{dec / floor:.2f}x the floor {floor:.2f} ms "
              f"({t['bytes'] / GiB:.2f} GiB / {t['copy_gbs']:.0f} GB/s copy), ctx {ctx}")
    table.add(f"t_verify({k + 1})", f"{ver:.2f} ms", f"{ver / dec:.2f}x t_decode(1), {ver / floor:.2f}x the floor")
    if "capture_s" not in t:
        return
    graphs = " + CUDA graphs" if device.startswith("cuda") and backend == "inductor" else f" on {device}"
    table.add("engine.compile capture", f"{t['capture_s']:.1f} s",
              f"{len(t['shapes'])} bucket shapes {t['shapes']}, {backend}{graphs}")
    c_dec, c_ver = t["c_decode_ms"], t["c_verify_ms"]
    table.add("compiled t_decode(1)", f"{c_dec:.2f} ms", f"speed-up {dec / c_dec:.2f}x, {c_dec / floor:.2f}x floor")
    table.add(f"compiled t_verify({k + 1})", f"{c_ver:.2f} ms",
              f"speed-up {ver / c_ver:.2f}x, {c_ver / floor:.2f}x floor")


def main(argv=None) -> int:
    a = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tiny = a.tiny
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    n_prompts, new = a.prompts or (3 if tiny else 8), a.new or (16 if tiny else 64)
    n_samples, ctx = a.samples or (200 if tiny else 600), a.ctx or (64 if tiny else 512)
    tie_gap = a.tie_gap or (0.125 if dtype != "float32" else 1e-4)
    shapes = seeded.TINY if tiny else seeded.LLAMA_1B
    t_start = time.perf_counter()
    table = Table()
    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="outrider-gpu-check-")
    out = Path(a.out or tmp.name)
    try:
        t0 = time.perf_counter()
        tdir, ddir = seeded.build_pair(out, shapes, a.seed, dtype, a.device)
        table.add("seeded pair", f"{shapes.layers}+{shapes.draft_layers} layers",
                  f"hidden {shapes.hidden}, heads {shapes.heads}/{shapes.kv_heads}, vocab {shapes.vocab}, {dtype}, "
                  f"{time.perf_counter() - t0:.0f}s", None)
        prompts = seeded.prompts(shapes, n_prompts, 32, a.seed)
        # the reference, then transformers leaves the device to the engine
        hf = reference.load_hf(tdir, dtype, a.device)
        refs, ref_logits = reference.greedy(hf, prompts, new)
        temp, top_k, depth = 1.0, 4, 3
        law = reference.exact_law(hf, prompts[0], depth, temp, top_k)
        del hf
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        from actors.spec.sampling import SamplingParams

        params = [SamplingParams(temperature=temp, top_k=top_k, seed=1000 + i) for i in range(n_samples)]
        max_seq = 32 + max(new, depth) + 4 * a.k + 16
        for mode in ("ar", "sd", "ssd"):
            spec = runs.spec_for(tdir, ddir, mode, a.device, dtype, a.k, max_seq, max_batch=8)
            r = runs.run_engine(spec, prompts, new, (prompts[0], depth, params) if mode == "ssd" else None)
            c = reference.compare(r["outs"], refs, ref_logits, tie_gap)
            detail = f"{c['same']}/{c['n']} identical"
            if mode != "ar":
                detail += f", drafts {r['drafts']}, accepted {r['accepted']}, hits {r['hits']}"
            detail += "".join(f"; near-tie {t}" for t in c["near_ties"]) + "".join(f"; MISMATCH {m}"
                                                                                   for m in c["mismatches"])
            ok = not c["mismatches"] and not r["errors"] and (mode == "ar" or r["drafts"] > 0)
            table.add(f"greedy {mode.upper()} = transformers", f"{c['same'] + len(c['near_ties'])}/{c['n']}",
                      detail + (f"; errors {r['errors']}" if r["errors"] else ""), ok)
            if mode == "ssd":
                stat, df, p = reference.chi_square(law, reference.outcomes(r["samples"], depth))
                table.add("sampling SSD chi-square", f"p={p:.3f}",
                          f"{n_samples} x {depth} tokens, T={temp}, top-k {top_k}, chi2 {stat:.1f} on {df} df",
                          p > 0.001)
                plan, used = r["plan"], r["used"]
                predicted = plan.used(plan.roles[0].key)
                cuda = a.device.startswith("cuda")
                detail = (f"plan {fmt(predicted)} (both roles, reserve incl.); "
                          + (f"device in use {fmt(used)}, verifier peak reserved {fmt(r['peak_reserved'])}" if cuda
                             else f"peak RSS of this process + children {fmt(used)} (CPU: informational)"))
                table.add("peak memory vs plan", f"{used / max(predicted, 1):.2f}x of plan", detail,
                          (used <= predicted) if cuda else None)
                table.add("one device, local launcher", f"{r['backend']} channel",
                          f"verifier + drafter on {a.device}, SSD up in {r['up_s']:.1f}s, "
                          f"{len(prompts)} x {new} greedy tokens in {r['greedy_s']:.1f}s", not r["errors"])
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        backend = a.compile_backend or ("aot_eager" if tiny and not a.device.startswith("cuda") else "inductor")
        left = a.budget_s - (time.perf_counter() - t_start)
        compile_too = not a.no_compile and left >= a.compile_s
        if not a.no_compile and not compile_too:
            table.add("engine.compile capture", "skipped", f"{left:.0f}s of the {a.budget_s:.0f}s budget left, "
                      f"the compile rows may need {a.compile_s:.0f}s (--budget-s, --compile-s)", None)
        t = runs.timings(tdir, a.device, dtype, a.k, ctx, 5 if tiny else 20, compile_too, backend)
        _timing_rows(table, t, a.k, ctx, backend, a.device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    sys.stdout.write(f"outrider GPU check on {dev} ({a.device}{', tiny' if tiny else ''}), torch {torch.__version__}, "
                     f"{time.perf_counter() - t_start:.0f}s\n{table.render()}\n")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
