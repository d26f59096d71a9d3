"""What the verifier keeps per request: the request as submitted, and its live sequence state."""
from __future__ import annotations


from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from actors.spec.grammar import GrammarSpec, Matcher
from actors.spec.logprobs import MAX_TOP_LOGPROBS
from actors.spec.sampling import SamplingParams
from actors.spec.stats import SpecStats
from actors.spec.stopping import token_stop


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    speculate: bool = True
    ignore_eos: bool = False           # benchmarks: always generate max_new_tokens
    k: int | None = None               # this request's own K (0 = no speculation); None: the engine's policy
    logprobs: int | None = None        # None: none; n: each emitted token's logprob and the top n
                                       # (actors/spec/logprobs.py)
    grammar: GrammarSpec | None = None  # structured outputs: what the output must match (actors/spec/grammar.py)

    def __post_init__(self):
        if self.k == 0:
            self.speculate = False

    def validate(self, vocab: int, max_seq_len: int) -> None:
        self.params.validate()
        if not self.prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in self.prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:3]}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.k is not None and self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if len(self.prompt) + self.max_new_tokens > max_seq_len:
            raise ValueError(f"prompt ({len(self.prompt)} tokens) + max_new_tokens ({self.max_new_tokens}) "
                             f"exceeds max_seq_len {max_seq_len}")


@dataclass
class Seq:
    req: Request
    slot: int
    tokens: list[int]
    seed: int                          # keys the sequence's random draws (actors/spec/sampling.py)
    stats: SpecStats
    t_submit: float
    length: int = 0                    # valid positions in the target's KV slot
    cached: int = 0                    # prompt positions found in the prefix cache (prefill skipped them)
    round: int = 0
    draft: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None
    table: dict[tuple[int, int], list[int]] | None = None  # drafter's branches for this round
    outcome: tuple[int, int] | None = None   # (k, t*) not yet sent to the drafter
    last_k: int = 0                          # depth of the last outcome (for hit-by-depth)
    k: int = 0                               # the draft length asked of the drafter (policy's K)
    on_drafter: bool = False                 # its drafter (`drafter`) holds it and drafts for it
    drafter: int = 0                         # which of the verifier's drafters owns it (models.draft.replicas)
    t_first: float = 0.0
    # a draft head's input (actors/eagle/): the target's features at committed positions the
    # drafter has not received yet, as (first position, rows [n, width]) pieces
    feats: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    matcher: Matcher | None = None     # the grammar's state after `tokens`, for a constrained request

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - len(self.req.prompt)

    def off_drafter(self) -> None:
        """Forget every piece of drafter state: the drafter is gone, or a new one joins."""
        self.on_drafter, self.outcome, self.draft, self.q, self.table = False, None, [], None, None
        self.feats = []


def held_per_drafter(seqs: Iterable[Seq], n: int) -> list[int]:
    """How many of `seqs` each of n drafters holds."""
    held = [0] * n
    for s in seqs:
        held[s.drafter] += s.on_drafter
    return held


def apply_stops(s: Seq, new: list[int], eos: frozenset[int]) -> tuple[list[int], str | None]:
    """Newly committed tokens cut at the first stop token or at the length limit, and the finish
    reason ("stop" for a stop token id, "eos", "length") when either ends the request: the one
    token-level stop rule (actors/spec/stopping.py), with the request's stop ids and, unless it
    ignores EOS, the model's EOS ids."""
    keep, reason = token_stop(new, s.req.max_new_tokens - s.n_generated, frozenset(s.req.stop_token_ids),
                              frozenset() if s.req.ignore_eos else eos)
    return new[:keep], reason
