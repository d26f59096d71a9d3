"""The verifier's clocks: one step's (`RoundTiming`, filled by its phases) and their running sums
(`VerifierTimes`, what `metrics` reports).

A step's timings are control inputs as much as metrics: the adaptive policy prices each K with the
verify forward's device time by batch tokens and with the whole round's time. So the phases only
fill in a `RoundTiming`; at the end of the step the verifier hands it over once, to the sums and to
the policy (`Verifier._record`). The drafter client keeps its own wait accounts (the exchange,
the table, the q rows), since they are measured against the drafter's timestamps.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VerifierTimes:
    steps: int = 0
    verify_s: float = 0.0       # batched target forward + verification math
    forward_s: float = 0.0      # the target forward alone, within verify_s
    verify_cpu_s: float = 0.0   # this thread's CPU time in verify_s: the rest it was descheduled or blocked
    prefill_s: float = 0.0
    wait_s: float = 0.0         # blocked on the drafter's reply (verifier idle on the hot path)
    table_wait_s: float = 0.0   # within wait_s: collecting the speculation table (late pre-speculation + wire)
    transport_s: float = 0.0    # estimated wire time inside wait_s
    control_s: float = 0.0      # admission, aborts, stop checks, streaming out
    idle_s: float = 0.0         # nothing to do
    rounds: int = 0
    tokens: int = 0


@dataclass
class RoundTiming:
    t0: float                   # perf_counter at the step's start
    control_s: float = 0.0      # aborts and admissions, then the bookkeeping after verification
    idle_s: float = 0.0         # a step with nothing to do
    prefill_s: float = 0.0
    verify_s: float = 0.0       # the verify phase, less the wait for q rows the drafter still owed
    verify_cpu_s: float = 0.0   # this thread's CPU time in the verify phase
    forward_s: float = 0.0      # the verify forward's device time
    forward_tokens: int = 0     # its batch tokens (rows x positions); 0: no verify this step
    rounds: int = 0             # sequences verified
    ks: list[int] = field(default_factory=list)   # the drafts verified, one per sequence
    round_s: float | None = None   # the step up to its verification's end, when it was a whole round
    #                                (speculative, no prefill in it): the policy's round time
    steps: int = 0              # 1: a working step (0: idle)

    def add_to(self, times: VerifierTimes) -> None:
        for name in SUMMED:
            setattr(times, name, getattr(times, name) + getattr(self, name))


SUMMED = ("control_s", "idle_s", "prefill_s", "verify_s", "verify_cpu_s", "forward_s", "rounds", "steps")
