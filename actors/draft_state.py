"""What the drafter keeps: per sequence its committed prefix, current draft and pre-drafted
branches (the speculation cache), and its loop's time accounts.
The verifier's counterpart is actors/sequence.py."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actors.spec.fanout import AcceptanceTracker
from actors.spec.grammar import GrammarSpec, Matcher
from actors.spec.sampling import SamplingParams


@dataclass
class Branch:
    slot: int
    start: int                   # the position it forked at: its correction token's
    length: int
    tokens: list[int]
    q: torch.Tensor | None       # [K, V] probabilities the tokens were drawn from (sampling)
    dists: torch.Tensor          # [K, V] unscaled drafter distributions, depth 0..K-1


@dataclass
class DraftSeq:
    id: int
    params: SamplingParams
    tokens: list[int]            # committed prefix (prompt + generated)
    slot: int
    length: int = 0              # valid positions in `slot`
    round: int = 0
    draft: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None
    dists: torch.Tensor | None = None   # row j: drafter distribution after tokens + draft[:j]
    branches: dict[tuple[int, int], Branch] = field(default_factory=dict)
    tracker: AcceptanceTracker = field(default_factory=AcceptanceTracker)
    k: int = 0                   # the draft length the verifier asked for (0: speculation off)
    budget: int = 0              # fan-out budget for pre-speculation
    speculated: bool = False     # pre-speculation ran for this round (a lookup follows)
    kv_steps: int = 0            # online learning: optimizer steps when its KV was last computed from scratch
    # a draft head (actors/eagle/): the target's features at positions 0..n-1 (fused, [n, dim])
    # and the head's hidden state after tokens + draft[:j] (row j, as `dists`)
    real: torch.Tensor | None = None
    hid: torch.Tensor | None = None
    # a constrained request's grammar state after `tokens`: drafts are masked as the verifier
    # masks the target (None: drafted unmasked, still exact: the verifier's mask decides)
    matcher: Matcher | None = None
    # its grammar and where its output starts in `tokens`, until the matcher is made
    grammar: tuple[GrammarSpec, int] | None = None


@dataclass
class DrafterTimes:
    wait_s: float = 0.0          # blocked waiting for the verifier's next frame (idle)
    reply_s: float = 0.0         # from frame received to reply sent (on the critical path)
    prespec_s: float = 0.0       # pre-speculation and its table (hidden behind verification)
    prespec_cpu_s: float = 0.0   # the loop thread's CPU time in it (the rest: descheduled)
    branches: int = 0
    frames: int = 0
    replies: int = 0             # DRAFT replies; SSD greedy hits need none (the verifier has the table)

