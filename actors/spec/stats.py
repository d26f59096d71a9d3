"""Per-generation speculation statistics, with vLLM's definitions so figures compare directly.

- acceptance rate        = accepted tokens / draft tokens
- mean acceptance length = 1 + accepted tokens / drafts   (tokens committed per verify pass)
- accepted per position  = how many drafts had their i-th token accepted
SSD adds the speculation cache: a lookup happens once per round, at the depth k the verifier
accepted; it hits when the correction token t* was among the pre-drafted candidates.
Adaptive speculation adds the K each round verified (k_histogram[K], K = 0 included) and the
rounds the policy turned speculation off for the sequence (rounds_off).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    k: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    lookups_by_depth: list[int] = field(default_factory=list)
    hits_by_depth: list[int] = field(default_factory=list)
    k_histogram: list[int] = field(default_factory=list)   # rounds by draft length verified, 0..k
    rounds_off: int = 0                                     # rounds at K = 0 by the adaptive policy
    fixed_k: int | None = None   # the K drafted every round when it was fixed (own k, or pinned for a seed)

    def __post_init__(self):
        self.accepted_per_position = self.accepted_per_position or [0] * self.k
        self.lookups_by_depth = self.lookups_by_depth or [0] * (self.k + 1)
        self.hits_by_depth = self.hits_by_depth or [0] * (self.k + 1)
        self.k_histogram = self.k_histogram or [0] * (self.k + 1)

    def record_round(self, n_draft: int, accepted: int) -> None:
        """One verify pass over `n_draft` proposed tokens of which `accepted` were kept."""
        if n_draft < len(self.k_histogram):
            self.k_histogram[n_draft] += 1
        if n_draft == 0:
            return
        self.drafts += 1
        self.draft_tokens += n_draft
        self.accepted_tokens += accepted
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def record_lookup(self, depth: int, hit: bool) -> None:
        self.lookups_by_depth[depth] += 1
        if hit:
            self.cache_hits += 1
            self.hits_by_depth[depth] += 1
        else:
            self.cache_misses += 1

    @classmethod
    def total(cls, stats) -> SpecStats:
        """A fresh sum of several generations' statistics (none of them changed)."""
        out = cls()
        for st in stats:
            out.merge(st)
        return out

    def merge(self, other: SpecStats) -> None:
        if other.k > self.k:  # widen to the larger K so per-position lists line up
            pad = other.k - self.k
            self.accepted_per_position += [0] * pad
            self.lookups_by_depth += [0] * pad
            self.hits_by_depth += [0] * pad
            self.k_histogram += [0] * pad
            self.k = other.k
        self.drafts += other.drafts
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.rounds_off += other.rounds_off
        for dst, src in ((self.accepted_per_position, other.accepted_per_position),
                         (self.lookups_by_depth, other.lookups_by_depth),
                         (self.hits_by_depth, other.hits_by_depth),
                         (self.k_histogram, other.k_histogram)):
            for i, v in enumerate(src):
                dst[i] += v

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    @property
    def hit_rate(self) -> float:
        n = self.cache_hits + self.cache_misses
        return self.cache_hits / n if n else 0.0

    def to_dict(self) -> dict:
        return {
            "k": self.k, "drafts": self.drafts, "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens, "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "accepted_per_position": list(self.accepted_per_position),
            "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
            "hit_rate": round(self.hit_rate, 4),
            "lookups_by_depth": list(self.lookups_by_depth), "hits_by_depth": list(self.hits_by_depth),
            "k_histogram": list(self.k_histogram), "rounds_off": self.rounds_off, "fixed_k": self.fixed_k,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpecStats:
        keys = ("k", "drafts", "draft_tokens", "accepted_tokens", "accepted_per_position",
                "cache_hits", "cache_misses", "lookups_by_depth", "hits_by_depth", "k_histogram", "rounds_off",
                "fixed_k")
        return cls(**{k: d[k] for k in keys if k in d})

    def summary(self) -> str:
        s = (f"acceptance {self.acceptance_rate:.2f}, mean acceptance length {self.mean_acceptance_length:.2f} "
             f"({self.accepted_tokens}/{self.draft_tokens} draft tokens in {self.drafts} drafts)")
        if self.cache_hits + self.cache_misses:
            s += f", cache hit rate {self.hit_rate:.2f} ({self.cache_hits}/{self.cache_hits + self.cache_misses})"
        return s
