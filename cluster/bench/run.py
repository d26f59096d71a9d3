"""`outrider bench`: outrider AR, sync SD (a K sweep), SSD and HF transformers side by side.

Every mode decodes the same prompts from the same checkpoints: greedy, batch 1, a fixed number
of new tokens (EOS ignored everywhere, so each run produces exactly that many). Repetitions are
interleaved: for each prompt every mode runs once, in an order that rotates from prompt to
prompt, so slow drift of a busy machine spreads over all modes alike. All outrider engines stay
up side by side when the Ray cluster has room for them (a cluster this function starts gets
enough logical CPUs); a smaller, already running cluster is used in phases of engines that fit.
With `cluster.launcher: local` (no Ray: a bare GPU machine) the engines are plain processes and
each phase holds at most one engine with a drafter (its verifier owns this process's
torch.distributed group).
Per-round times come from the verifier's and drafter's counters (deltas around each timed run);
t_verify(K+1) and t_draft(1) are measured directly in this process on one thread, in the same run.
The report (JSON, Markdown, PNG) is written by cluster/bench/report.py.
"""
from __future__ import annotations

import copy
import logging
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from actors.spec.sampling import SamplingParams
from cluster.config import load_config
from cluster.serving.coordinator import Coordinator, GenerateArgs
from cluster.bench.kernels import VerifyProbe, measure_kernels, torch_threads
from cluster.bench.modes import (SAGUARO_C, SAGUARO_T, Mode, Run, build_modes, build_prompts, saguaro_modes,
                                 sweep_modes)
from cluster.bench.quiet import engine_pids, in_background, isolated, on_cpus
from cluster.launch.deployment import engine_spec, shutdown_ray, start_engine, tokenizer_for

log = logging.getLogger(__name__)

FULL = dict(n_code=6, n_text=6, new_tokens=128, sweep=(2, 3, 4, 5, 6), saguaro_prompts=4)
QUICK = dict(n_code=1, n_text=1, new_tokens=24, sweep=(), saguaro_prompts=1)
VERIFIER_KEYS = ("steps", "rounds", "tokens", "verify_s", "verify_cpu_s", "forward_s", "prefill_s", "wait_s",
                 "transport_s", "control_s", "idle_s")
DRAFTER_KEYS = ("wait_s", "reply_s", "prespec_s", "prespec_cpu_s", "branches", "frames", "replies")


# -- running one generation ------------------------------------------------------------------
def _delta(before: dict | None, after: dict | None, keys) -> dict | None:
    if not before or not after:
        return None
    return {k: after[k] - before[k] for k in keys}


def run_outrider(mode: Mode, prompt: list[int], n: int, seed: int | None = None) -> Run:
    eng = mode.engine
    params = mode.params if seed is None or mode.params.greedy else SamplingParams(mode.params.temperature, seed=seed)
    before = eng.metrics()
    coord = Coordinator(eng, None)   # one poller at a time: idle pollers would eat the CPU being measured
    try:
        t0 = time.perf_counter()
        h = coord.submit(GenerateArgs(list(prompt), n, params, ignore_eos=True))
        final = h.result()
        seconds = time.perf_counter() - t0
    finally:
        coord.stop()
    if final.error or final.finish_reason not in ("length", "stop"):
        raise RuntimeError(f"{mode.name}: generation ended with {final.finish_reason}: {final.error}")
    after = eng.metrics()
    return Run(list(h.tokens), seconds, final.stats, _delta(before, after, VERIFIER_KEYS),
               _delta(before.get("drafter"), after.get("drafter"), DRAFTER_KEYS), final.ttft_s)


class HF:
    """transformers' own greedy and assisted generation, on the very same checkpoint files."""

    def __init__(self, target_dir: str, draft_dir: str | None, device: str = "cpu", dtype: str = "float32"):
        try:
            import matplotlib  # noqa: F401 (the report's plot; fail before any engine starts)
            import transformers
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise ValueError(f"outrider bench needs the dev extras (pip install -e '.[dev]'): {e}") from None

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.version = transformers.__version__
        self.device = device
        from actors.model.loader import parse_dtype

        dt = parse_dtype(dtype, device)   # the target's dtype as outrider runs it: a same-dtype comparison
        self.model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dt).to(device).eval()
        self.assistant = (AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dt).to(device).eval()
                          if draft_dir else None)

    def run(self, mode: Mode, prompt: list[int], n: int) -> Run:
        # EOS off (as outrider's ignore_eos) rather than min_new_tokens, which would mask EOS
        # out of the argmax and so change the greedy tokens wherever EOS is the top choice.
        gc = copy.deepcopy(self.model.generation_config)
        gc.eos_token_id, gc.do_sample, gc.max_new_tokens, gc.min_new_tokens = None, False, n, None
        x = torch.tensor([prompt], device=self.device)
        kw = {"assistant_model": self.assistant} if mode.kind == "hf-assisted" else {}
        with torch_threads(mode.threads), torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc, **kw)
            out = out.cpu()   # waits for the device
            seconds = time.perf_counter() - t0
        return Run(out[0, len(prompt):].tolist(), seconds)

    def schedule(self) -> dict:
        if self.assistant is None:
            return {}
        g = self.assistant.generation_config
        try:  # transformers 5 leaves unset fields None and fills them in at generate()
            defaults = g._get_default_generation_params()
        except AttributeError:
            defaults = {}
        keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
        return {k: getattr(g, k, None) if getattr(g, k, None) is not None else defaults.get(k) for k in keys}


def run_one(mode: Mode, hf: HF | None, prompt: list[int], n: int, seed: int | None = None) -> Run:
    return run_outrider(mode, prompt, n, seed) if mode.kind == "outrider" else hf.run(mode, prompt, n)


# -- engines and phases ----------------------------------------------------------------------
def plan_phases(modes: list[Mode], capacity: float, one_speculative: bool = False) -> list[list[Mode]]:
    """Pack outrider modes, in order, into groups whose engines fit the cluster at once; the HF
    modes (no Ray resources) join the first group. `one_speculative`: at most one engine with a
    drafter per group (plain-process engines: each verifier holds this process's torch.distributed
    group, of which a process has one)."""
    phases, cur, used = [], [], 0
    for m in modes:
        if m.cpus > capacity:
            raise ValueError(f"mode {m.name} needs {m.cpus} CPUs but the Ray cluster has {capacity:g} free")
        if cur and (used + m.cpus > capacity or one_speculative and _drafts(m) and any(map(_drafts, cur))):
            phases.append(cur)
            cur, used = [], 0
        cur.append(m)
        used += m.cpus
    phases.append(cur)
    hf = [m for m in modes if m.kind != "outrider"]
    return [hf + [m for m in phases[0] if m.kind == "outrider"]] + phases[1:]


def _drafts(m: Mode) -> bool:
    return m.kind == "outrider" and m.overrides["speculation.mode"] != "ar"


def start_engines(config_path: str, modes: list[Mode], quiet: bool = False) -> None:
    for m in modes:
        if m.kind == "outrider" and m.engine is None:
            t0 = time.perf_counter()
            cfg = load_config(config_path, m.overrides)
            spec = engine_spec(cfg)
            m.engine = start_engine(cfg, spec)
            m.pids = engine_pids(m.engine) if quiet else []
            if quiet and m.pids and spec.target_cpus:
                m.pinned, m.loops = set(spec.target_cpus), m.engine.loop_threads()
            log.info("engine %s up in %.1fs", m.name, time.perf_counter() - t0)


def others(phase: list[Mode], timed: Mode | None) -> list[int]:
    """The processes to keep in the background while `timed` runs (every engine's, for a run
    outside them)."""
    return [pid for m in phase if m is not timed for pid in m.pids]


@contextmanager
def timing(phase: list[Mode], m: Mode | None, cpus: set[int] | None = None):
    """While `m` (or, with None, a direct timing in this thread on `cpus`) is timed: the phase's
    other engines in the idle class, and the timed verifier's CPUs kept to it."""
    if m is not None:
        cpus, keep = m.pinned, m.loops
    else:
        keep = [threading.get_native_id()]
    with in_background(others(phase, m)), isolated(cpus, keep), on_cpus(None if m else cpus):
        yield


def stop_engines(modes: list[Mode]) -> None:
    for m in modes:
        if m.engine is not None:
            try:
                m.engine.stop()
            except Exception as e:  # keep stopping the others
                log.warning("engine %s did not stop cleanly: %s", m.name, e)
            m.engine = None


def run_phases(config_path, phases, hf, prompts, warm, n, bar, seeds=None, probe=None,
               quiet: bool = False) -> dict[str, list[Run]]:
    """Each phase: engines up, one warm-up per mode, then prompt by prompt every mode once in a
    rotating order (then `probe()`, if given); engines down. With `quiet`, the engines not being
    timed run in the idle scheduling class meanwhile (cluster/bench/quiet.py). Returns the runs
    per mode."""
    runs: dict[str, list[Run]] = {}
    for phase in phases:
        try:
            start_engines(config_path, phase, quiet)
            for m in phase:
                with timing(phase, m):
                    run_one(m, hf, warm, n, seeds[0] if seeds else None)
                runs[m.name] = []
            for i, p in enumerate(prompts):
                order = phase[i % len(phase):] + phase[:i % len(phase)]
                out = {}
                for m in order:
                    with timing(phase, m):
                        out[m.name] = run_one(m, hf, p, n, seeds[i] if seeds else None)
                for m in phase:
                    runs[m.name].append(out[m.name])
                if probe is not None:
                    with timing(phase, None, probe.cpus):
                        probe()
                bar.update(1)
                shown = [m for m in phase if m.name in ("ar", "ssd", "hf-assisted")] or phase[:3]
                bar.set_postfix({m.name: f"{out[m.name].tok_s:.0f}" for m in shown}, refresh=False)
        finally:
            stop_engines(phase)
    return runs


def _best_k(sweep: list[Mode], runs: dict[str, list[Run]], kind: str) -> int:
    """The fixed K of the sweep's fastest `kind` (sd | ssd) mode, by median tokens/s."""
    ms = [m for m in sweep if m.name.startswith(f"{kind}-k")]
    return max(ms, key=lambda m: statistics.median(r.tok_s for r in runs[m.name])).overrides["speculation.k"]


# -- the command -----------------------------------------------------------------------------
def _ray_up(cfg, need: int) -> tuple[bool, float]:
    """(whether this call started Ray, logical CPUs free for engines)."""
    import ray

    from cluster.launch.engine import init_ray

    owned = not ray.is_initialized()
    if owned:
        init_ray(cfg.cluster.address, max(16, need) if cfg.cluster.address is None else None, cfg.cluster.namespace)
    return owned, float(ray.available_resources().get("CPU", 0))


def run_bench(config_path: str, out_dir: str, quick: bool = False) -> int:
    from tqdm import tqdm

    from cluster.bench.dtype import llama_cpp_row, measure_dtypes, target_gguf
    from cluster.bench.report import check_greedy, summarize, write_report

    t_start = time.perf_counter()
    s = QUICK if quick else FULL
    cfg = load_config(config_path)
    k, n = cfg.speculation.k, s["new_tokens"]
    base = engine_spec(load_config(config_path, {"speculation.mode": "ssd"}))
    if base.draft is None:
        raise ValueError(f"{config_path}: the bench needs models.draft")
    prompts, warm = build_prompts(tokenizer_for(base), s["n_code"], s["n_text"])
    sweep, sag = sweep_modes(k, s["sweep"]) if s["sweep"] else [], saguaro_modes(k)
    sag_prompts = prompts[:s["saguaro_prompts"]]
    head = base.draft_head_layers is not None   # a draft head: HF has no assisted mode for it
    hf = HF(base.target, None if head else base.draft, base.target_device, base.target_dtype)
    # Plain-process engines (launcher: local) reserve no CPUs: all of them fit at once.
    local = cfg.cluster.launcher == "local"
    owned, capacity = (False, float("inf")) if local else _ray_up(cfg, 16)
    bar = None
    modes: list[Mode] = []
    try:
        # Phase 1, the SD K sweep (interleaved among its own K's), picks SD's best K. The main
        # comparison then runs with only the engines it needs: every idle engine still costs its
        # cores a little (Ray's background threads), which would tax the timed modes.
        sweep_runs: dict[str, list[Run]] = {}
        bar = tqdm(total=len(prompts) * (2 if sweep else 1) + len(sag_prompts), desc="bench", unit="rep",
                   file=sys.stderr)
        if sweep:
            sweep_runs = run_phases(config_path, plan_phases(sweep, capacity, local), None, prompts, warm, n, bar,
                                    quiet=owned)
        best_k, best_ssd_k = (_best_k(sweep, sweep_runs, kind) if sweep else k for kind in ("sd", "ssd"))
        # SSD at its best fixed K beside SSD as configured; with adaptive off they are one engine
        modes = build_modes(k, [best_k, k], best_ssd_k if cfg.speculation.adaptive or best_ssd_k != k else None,
                            assisted=not head)
        phases = plan_phases(modes, capacity, local)
        sag_phases = plan_phases(sag, capacity, local) if sag_prompts else []
        if len(phases) > 1 and not local:
            log.warning("the Ray cluster has %g CPUs free: engines run in %d phases, interleaved within each",
                        capacity, len(phases))
        log.info("bench: %d prompts x %d new tokens, modes %s", len(prompts), n, ", ".join(m.name for m in modes))
        bar.total = len(prompts) * (len(phases) + (1 if sweep else 0)) + len(sag_prompts) * len(sag_phases)
        # The mean context of a decode step: the mean prompt plus half the new tokens.
        ctx_len = round(statistics.mean(len(p) for p in prompts) + n / 2)
        max_len = base.max_seq_len + k + 2
        probe = VerifyProbe(base.target, [t for p in prompts for t in p][:ctx_len], k, max_len,
                            cpus=set(base.target_cpus) if owned and base.target_cpus else None,
                            device=base.target_device, dtype=base.target_dtype)
        runs = run_phases(config_path, phases, hf, prompts, warm, n, bar, probe=probe, quiet=owned)
        # SD at K's outside the main comparison keep their sweep-phase figures.
        main = {m.name for m in modes}
        modes += [m for m in sweep if m.name not in main]
        order = (["ar"] + [m.name for m in sweep if m.name.startswith("sd-")] + ["ssd"]
                 + [m.name for m in sweep if m.name.startswith("ssd-")] + ["hf", "hf-assisted", "ar-2t"])
        modes.sort(key=lambda m: order.index(m.name) if m.name in order else len(order))
        runs = {**{name: r for name, r in sweep_runs.items() if name not in main}, **runs}
        greedy = check_greedy(runs, modes)
        ks = sorted({int(m.overrides["speculation.k"]) for m in modes if m.kind == "outrider"})
        ctx = [t for p, r in zip(prompts, runs["ar"]) for t in p + r.tokens][:ctx_len]
        with timing([], None, probe.cpus):
            kernels = measure_kernels(base.target, base.draft, ctx, ks, base.max_seq_len + max(ks) + 2,
                                      target=probe.model, draft_device=base.draft_device,
                                      draft_dtype=base.draft_dtype)
            # bfloat16 against float32 (interleaved A/B), and llama.cpp where it is installed
            kernels["dtype"] = base.target_dtype
            kernels["dtypes"] = measure_dtypes(base.target, ctx, k, base.max_seq_len + k + 2, base.target_device)
            kernels["llama_cpp"] = llama_cpp_row(target_gguf(base.target), prompts[0], n)
        kernels["t_verify_interleaved_s"] = statistics.median(probe.samples)
        kernels["t_verify_interleaved_n"] = len(probe.samples)
        seeds = [1000 + i for i in range(len(sag_prompts))]
        sag_runs = run_phases(config_path, sag_phases, None, sag_prompts, warm, n, bar, seeds, quiet=owned)
    finally:
        if bar is not None:
            bar.close()
        stop_engines(modes + sweep + sag)
        if owned:
            shutdown_ray()
    ray = sys.modules.get("ray")
    env = {"torch": torch.__version__, "transformers": hf.version, "ray": ray.__version__ if ray else None,
           "launcher": cfg.cluster.launcher, "device": base.target_device,
           "python": sys.version.split()[0],
           "cpu_count": os.cpu_count(), "bench_process_threads": torch.get_num_threads(),
           "ray_cpus_free": None if capacity == float("inf") else capacity,
           "idle_engines_in_background": owned,
           "phases": [[m.name for m in sweep]] * bool(sweep) + [[m.name for m in p] for p in phases],
           "hf_assisted_schedule": hf.schedule(),
           "target": base.target, "draft": base.draft, "config_path": str(config_path),
           "config": cfg.model_dump(mode="json")}
    settings = {"quick": quick, "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
                "new_tokens": n, "k": k, "sweep": ks, "adaptive": cfg.speculation.adaptive,
                "ssd_fixed": next((m.name for m in modes if m.name.startswith("ssd-k") and m.name in main), None),
                "saguaro": {"temperature": SAGUARO_T, "c": SAGUARO_C, "prompts": len(sag_prompts)}}
    report = summarize(modes, runs, greedy, kernels, sag, sag_runs, env, settings)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_report(report, Path(out_dir))
    for line in report["summary_lines"]:
        print(line)
    print(report["summary_line"])
    sys.stdout.flush()
    return 0
