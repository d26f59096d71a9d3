"""The bench's modes (an outrider engine at a mode, K and thread count, or transformers), what one
timed generation of a mode gave (`Run`), the sets of modes a bench compares and its prompts
(cluster/bench/run.py runs them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.spec.sampling import SamplingParams
from actors.spec.stats import SpecStats

PROMPT_TOKENS = 128
SAGUARO_T, SAGUARO_C = 0.7, 0.8


@dataclass
class Mode:
    name: str
    kind: str                        # outrider | hf | hf-assisted
    overrides: dict = field(default_factory=dict)
    threads: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    engine: object = None
    pids: list[int] = field(default_factory=list)   # its engine's local processes (idle class while others run)
    pinned: set[int] | None = None                  # its verifier's pinned CPUs, kept to it while it is timed
    loops: list[int] = field(default_factory=list)  # its verifier's and drafter's loop threads

    @property
    def cpus(self) -> int:
        if self.kind != "outrider":
            return 0
        return self.threads * (1 if self.overrides["speculation.mode"] == "ar" else 2)


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    stats: SpecStats | None = None
    verifier: dict | None = None     # counter deltas over the run
    drafter: dict | None = None
    ttft: float | None = None        # the verifier's time to first token (outrider only)

    @property
    def tok_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def _outrider(name, mode, k, threads=1, fixed=False, **extra) -> Mode:
    """An outrider engine; `fixed`: K = k every round (adaptive off), else the config's setting."""
    ov = {"speculation.mode": mode, "speculation.k": k, "models.target.num_threads": threads, "engine.max_batch": 1}
    if fixed:
        ov["speculation.adaptive"] = False
    if threads > 1:   # the whole machine: no core of its own to pin to
        ov["models.target.cpus"] = None
    if mode == "ar":
        ov["models.draft"] = None
    if mode != "ssd":
        ov["speculation.fan_out"] = None
    params = extra.pop("params", SamplingParams())
    ov.update(extra)
    return Mode(name, "outrider", ov, threads, params)


def sweep_modes(k: int, sweep: tuple[int, ...]) -> list[Mode]:
    """Sync SD and SSD at each fixed K of the sweep (adaptive off): their best K's, and what the
    adaptive policy is measured against."""
    ks = sorted(set(sweep) | {k})
    return [_outrider(f"sd-k{kk}", "sd", kk, fixed=True) for kk in ks] + [
        _outrider(f"ssd-k{kk}", "ssd", kk, fixed=True) for kk in ks]


def build_modes(k: int, sd_ks: list[int], ssd_k: int | None = None, assisted: bool = True) -> list[Mode]:
    """The main comparison: AR, SD at the given fixed K's (the sweep's best and the SSD's K), SSD
    as configured (adaptive K by default: the engine as shipped), SSD at the fixed K `ssd_k`
    (the sweep's best), HF (and HF's assisted generation with the drafter, unless `assisted` is
    off: a draft head is no model transformers can assist with)."""
    fixed_ssd = [] if ssd_k is None else [_outrider(f"ssd-k{ssd_k}", "ssd", ssd_k, fixed=True)]
    return ([_outrider("ar", "ar", k)] + [_outrider(f"sd-k{kk}", "sd", kk, fixed=True) for kk in sorted(set(sd_ks))]
            + [_outrider("ssd", "ssd", k)] + fixed_ssd
            + [Mode("hf", "hf", threads=2)] + ([Mode("hf-assisted", "hf-assisted", threads=2)] if assisted else [])
            + [_outrider("ar-2t", "ar", k, threads=2)])


def saguaro_modes(k: int) -> list[Mode]:
    return [_outrider(f"ssd-t{SAGUARO_T}-c{c}", "ssd", k, params=SamplingParams(temperature=SAGUARO_T),
                      **{"speculation.saguaro_c": c}) for c in (1.0, SAGUARO_C)]


def build_prompts(tok, n_code: int, n_text: int) -> tuple[list[list[int]], list[int]]:
    """(timed prompts, warm-up prompt): held-out code and docstring prompts, last 128 tokens."""
    from cluster.models.corpus import prompts

    texts = prompts("code", n_code + 1) + prompts("text", n_text)
    ids = [tok.encode(t)[-PROMPT_TOKENS:] for t in texts]
    return ids[:n_code] + ids[n_code + 1:], ids[n_code]
