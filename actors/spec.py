"""The plain settings an engine process needs. cluster/ builds this from the YAML deployment;
actors never read YAML or import Ray, so the same classes also run as bare processes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EngineSpec:
    target: str                     # checkpoint directory (already resolved)
    draft: str | None = None
    target_dtype: str = "float32"
    draft_dtype: str = "float32"
    target_device: str = "cpu"
    draft_device: str = "cpu"
    mode: str = "ssd"               # ar | sd | ssd
    k: int = 4                      # the largest K; adaptive picks each sequence's K in 0..k
    adaptive: bool = True           # K per sequence and round from live measurements (actors/adaptive.py)
    fan_out: list[int] | None = None  # explicit per-depth list (length k+1), else geometric
    fan_out_budget: int = 16
    backup: str = "jit"             # jit | ngram | none
    saguaro_c: float = 1.0
    max_batch: int = 8
    max_seq_len: int = 1024
    timeout_s: float = 30.0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    backend: str = "auto"
    num_threads: int = 1            # the verifier's torch threads (and Ray CPUs)
    draft_num_threads: int = 1      # the drafter's
    target_cpus: tuple[int, ...] | None = None  # pin the verifier's loop thread to these CPUs (Linux)
    draft_cpus: tuple[int, ...] | None = None   # the drafter's
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("ar", "sd", "ssd"):
            raise ValueError(f"mode must be ar, sd or ssd, got {self.mode!r}")
        if self.mode != "ar" and not self.draft:
            raise ValueError(f"mode {self.mode} needs a draft model")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.fan_out is not None and len(self.fan_out) != self.k + 1:
            raise ValueError(f"fan_out needs k+1 = {self.k + 1} entries, got {len(self.fan_out)}")
        if self.backup not in ("jit", "ngram", "none"):
            raise ValueError(f"backup must be jit, ngram or none, got {self.backup!r}")
        if not 0.0 < self.saguaro_c <= 1.0:
            raise ValueError(f"saguaro_c must be in (0, 1], got {self.saguaro_c}")

    @property
    def speculative(self) -> bool:
        return self.mode != "ar"

    @property
    def max_branches(self) -> int:
        """Upper bound on pre-drafted branches per sequence (sizes the drafter's cache)."""
        return sum(self.fan_out) if self.fan_out is not None else self.fan_out_budget

    def to_dict(self) -> dict:
        return asdict(self)
