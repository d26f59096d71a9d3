"""Adaptive speculation: each sequence's K (0..k_max) and the fan-out budget, from live measurements.

One pure policy for every mode (synchronous SD, SSD, the one-process SD loop). It maximises the
expected tokens per second of the whole batch, not acceptance alone:

  - a sequence whose drafts are accepted at position i with conditional probability a_i (the
    i-th token is kept given the ones before it were) commits, per round with K drafts,
    E(K) = 1 + sum_{j=1..K} prod_{i<=j} a_i tokens;
  - a round costs t_verify(n), n = the batch's tokens in the verify forward (sum of K_s + 1),
    plus what drafting exposes on the critical path:
      sync SD     K_max * t_draft_step + transport;
      SSD, hit    max(t_verify, t_prespec(K_max)) + transport (pre-speculation hides drafting);
      SSD, miss   the hit's cost plus a just-in-time draft and another round trip;
    and a round where every sequence has K = 0 costs t_verify(n) alone (no drafter on the path);
  - the batch picks the K_s that maximise sum_s E_s(K_s) / t_round(K_1..K_B), by coordinate
    ascent from "all off" and from "all at the cap" (the better of the two).

Everything it needs is measured by the caller: acceptance by position per sequence
(`Acceptance`, with the choice itself in actors/spec/adaptive_choice.py), t_verify per batch
shape (`ShapeCost`), and the drafter's costs (`Costs`), the last two in actors/spec/adaptive_costs.py.
`Controller` below keeps the policy's state for one engine and takes the measurements.
A sequence at K = 0 still keeps its drafter in sync; `Probe` asks for one small draft now and
then (backing off while speculation keeps not paying), so speculation comes back when the
drafter starts to agree again.
"""
from __future__ import annotations

import statistics
from collections import deque

from actors.spec.adaptive_costs import Costs, modelled_time, round_time
from actors.spec.adaptive_choice import (PRIOR_ALPHA, PROBE_FIRST, Acceptance, Probe, best_speculating_k, choose_ks,
                                        expected_curve, expected_tokens, fan_budget)
from actors.spec.adaptive_trace import writer_from_env

TRANSPORT_WINDOW = 15  # frame round trips the transport estimate is the median of


class Controller:
    """The policy's state for one engine: the cost model, an engine-wide acceptance (the prior of
    every new sequence, so a drafter that does not agree is known before a request's first
    round), and per sequence its acceptance, its cap (a request's own k, or the engine's) and its
    probe. The caller feeds it measurements and asks `decide` once per round."""

    def __init__(self, k_max: int, mode: str, max_budget: int = 16, prior: float | None = None):
        """`prior`: the pair's measured per-token agreement when known (a demo pair's build.json),
        else PRIOR_ALPHA: every new sequence's acceptance until the engine has measured its own."""
        self.k_max, self.mode, self.max_budget = k_max, mode, max_budget
        self.costs = Costs()
        self.pooled = Acceptance(k_max, prior=PRIOR_ALPHA if prior is None else prior, weight=4.0, decay=0.99)
        self.last: dict[int, int] = {}       # each sequence's K in the last decision
        self.acc: dict[int, Acceptance] = {}
        self.cap: dict[int, int] = {}
        self.fixed: dict[int, int] = {}      # sequences with a K of their own (no adaptation)
        self.probe: dict[int, Probe] = {}
        self.budget = max_budget
        self._lookups, self._hits = 0.0, 0.0
        self._probe_every = PROBE_FIRST   # where the last finished sequence's probe backoff stood
        # What the current round measured of its own waits, for `observe_round_time`: for the
        # drafter's reply (a just-in-time draft with its catch-up and the wire) and for the table,
        # gathered until the verify; then (tokens, verify, reply wait, table wait) of the round.
        self._step_jit, self._step_wait = 0.0, 0.0
        # the frame round trip: a median of recent samples, not a mean. One exchange that waited
        # for a descheduled drafter (another engine busy on the same cores) measured 140-180 ms
        # against a usual 0.4-1 ms, and a mean kept every K > 0 priced out for hundreds of rounds
        # (at K = 0 few exchanges come to wash it out).
        self._transport: deque[float] = deque(maxlen=TRANSPORT_WINDOW)
        self._round_parts: tuple[int, float, float, float] | None = None
        self.trace = writer_from_env({"k_max": k_max, "mode": mode, "max_budget": max_budget})

    # -- sequences ---------------------------------------------------------------------------
    def add(self, sid: int, fixed_k: int | None = None, pin: bool = False) -> int | None:
        """A new sequence: adaptive, or drafting `fixed_k` every round, or with `pin` drafting every
        round the K the policy chooses for it now (returned), from what the engine has measured so
        far. A pinned K keeps a seeded sampling request reproducible: which random draws decide
        its tokens depends on how many drafts each round verified."""
        if self.trace:
            self.trace.write({"ev": "add", "sid": sid, "fixed": fixed_k, "pin": pin})
        self.acc[sid] = Acceptance(self.k_max, prior=self.pooled.rates())
        if fixed_k is None and pin:
            fixed_k = self._pinned_k(sid)
        if fixed_k is not None:
            self.fixed[sid] = min(fixed_k, self.k_max)
            return self.fixed[sid]
        self.cap[sid] = self.k_max
        # a new sequence starts its probe backoff where the engine's last one left it: with a
        # drafter that never agrees, short requests do not each pay the first, closest probes
        self.probe[sid] = Probe(every=self._probe_every)

    def remove(self, sid: int) -> None:
        if self.trace:
            self.trace.write({"ev": "remove", "sid": sid})
            self.trace.flush()
        if sid in self.probe:
            self._probe_every = self.probe[sid].every
        for d in (self.acc, self.cap, self.fixed, self.probe, self.last):
            d.pop(sid, None)

    # -- measurements ------------------------------------------------------------------------
    def observe_round(self, sid: int, n_draft: int, accepted: int) -> None:
        if n_draft <= 0:
            return
        if self.trace:
            self.trace.write({"ev": "round", "sid": sid, "n_draft": n_draft, "accepted": accepted})
        self.pooled.update(n_draft, accepted)
        if sid in self.acc:
            self.acc[sid].update(n_draft, accepted)

    def observe_verify(self, n_tokens: int, seconds: float) -> None:
        if self.trace:
            self.trace.write({"ev": "verify", "n": n_tokens, "s": seconds})
        self.costs.verify.add(n_tokens, seconds)
        self._round_parts = (n_tokens, seconds, self._step_jit, self._step_wait)
        self._step_jit, self._step_wait = 0.0, 0.0

    def observe_draft(self, steps: int, draft_s: float, transport_s: float, catch_up_s: float = 0.0) -> None:
        """A just-in-time draft of `steps` batched steps took `draft_s` in the drafter; the frame
        and its reply spent `transport_s` on the way; before drafting, the drafter's cache caught
        up with the tokens committed at K = 0 in `catch_up_s` (a one-off, not a cost per step)."""
        if self.trace:
            self.trace.write({"ev": "draft", "steps": steps, "draft_s": draft_s, "transport_s": transport_s,
                              "catch_up_s": catch_up_s})
        self._step_jit += max(draft_s, 0.0) + max(catch_up_s, 0.0) + max(transport_s, 0.0)
        c = self.costs
        if steps > 0:
            per = draft_s / steps
            c.draft_step_s = per if c.draft_step_s is None else c.draft_step_s + 0.2 * (per - c.draft_step_s)
        self._transport.append(max(transport_s, 0.0))
        c.transport_s = statistics.median(self._transport)

    def observe_prespec(self, steps: int, seconds: float, t_verify: float, n_seqs: int = 1,
                        catch_up_s: float = 0.0) -> None:
        """One pre-speculation of `steps` draft steps for `n_seqs` sequences took `seconds`, behind
        a verify of `t_verify`, after a catch-up prefill of `catch_up_s` (a new prompt, tokens
        committed at K = 0: a one-off that the round waiting for this table pays)."""
        if self.trace:
            self.trace.write({"ev": "prespec", "steps": steps, "s": seconds, "t_verify": t_verify, "n": n_seqs,
                              "catch_up_s": catch_up_s})
        if steps <= 0:
            return
        c = self.costs
        n_seqs = max(n_seqs, 1)
        c.prespec.add(steps * n_seqs, max(seconds, 0.0))
        c.prespec_step_s = c.prespec(steps * n_seqs) / (steps * n_seqs)
        self.budget = fan_budget(self.budget, self.max_budget, t_verify, seconds,
                                 steps * c.draft_step() + c.transport_s)

    def observe_table_wait(self, seconds: float) -> None:
        """SSD: the verifier waited `seconds` for the drafter's table at the start of this round
        (pre-speculation it did not hide, and the wire)."""
        if self.trace:
            self.trace.write({"ev": "table_wait", "s": seconds})
        self._step_wait += max(seconds, 0.0)

    def observe_round_time(self, ks: list[int], seconds: float) -> None:
        """A whole round (the loop's step: exchange, verify, bookkeeping) where the batch drafted
        `ks` took `seconds`; what the model does not explain goes to its overhead (a decayed
        median-like update: steps of at most a tenth of the round, so one preempted step moves it
        little).

        The round is compared with what it measured of its own parts: its verify and its waits
        for the drafter (the table, the reply with a just-in-time draft), so the overhead is the
        verifier's own work. Compared with a modelled table wait (the pre-speculation line
        beside the verify), a probe after rounds at K = 0 (no table to wait for) or a line
        skewed by a cold pre-speculation drove the speculating overhead negative, -2 to -16 ms
        on the real pair at T = 0.7, and speculation there looked cheaper than plain decoding.
        Against the expected parts (the t_verify line, a miss priced at the hit rate) a verify
        slower than the line went into the overhead and then, once the slow times filled the
        shape's window, into the line too: counted twice. And at K = 0 the only speculating rounds
        are probes, each a miss after a catch-up, so every probe pushed the overhead up and nothing
        brought it down: that kept `outrider bench`'s SSD at K = 0 (docs/adaptive.md)."""
        if self.trace:
            self.trace.write({"ev": "step", "ks": ks, "s": seconds})
        c = self.costs
        parts, self._round_parts = self._round_parts, None
        if not c.verify.known or not ks:
            return
        if parts is None or parts[0] != sum(k + 1 for k in ks):   # no verify of this round seen
            model = modelled_time(self.mode, ks, c)
        else:
            _, tv, jit, wait = parts
            model = tv + jit + wait
        resid = min(max(seconds - model, -0.5 * model), model)
        attr = "overhead_spec_s" if max(ks) else "overhead_off_s"
        cur = getattr(c, attr)
        setattr(c, attr, cur + max(-0.1 * model, min(0.1 * model, 0.2 * (resid - cur))))

    def observe_lookup(self, hit: bool) -> None:
        if self.trace:
            self.trace.write({"ev": "lookup", "hit": hit})
        self._lookups = self._lookups * 0.98 + 1.0
        self._hits = self._hits * 0.98 + float(hit)
        self.costs.hit_rate = (self._hits + 0.9 * 2) / (self._lookups + 2)

    # -- the decision ------------------------------------------------------------------------
    def decide(self, sids: list[int]) -> dict[int, int]:
        """This round's K for each sequence in `sids` (all of the batch being verified)."""
        out = {s: self.fixed[s] for s in sids if s in self.fixed}
        free = [s for s in sids if s not in self.fixed]
        if free:
            if not self.costs.verify.known:   # nothing measured yet: speculate at the cap
                chosen = [self.cap[s] for s in free]
            else:
                curves = [expected_curve(self.acc[s].rates(), self.cap[s]) for s in free]
                fixed = [(k, expected_tokens(self.acc[s].rates(), k)) for s, k in out.items()]
                chosen = choose_ks(curves, self.mode, self.costs, fixed)
            for s, k in zip(free, chosen):
                out[s] = self.probe[s].next_k(k, lambda s=s: self._probe_k(s, out), self.cap[s])
            self._probe_together(free, chosen, out)
            if self.trace:
                self._trace_decision(free, chosen, out)
        self.last.update(out)
        return out

    def admit_k(self, sid: int) -> int:
        """A new sequence's first K (the one its admission carries), chosen beside the batch's
        last K's without moving any other sequence's state. Deciding it as if the sequence were
        alone put every sequence of a batch admitted together at the cap in its first round: at
        8 streams one such round cost as much as ten at K = 0."""
        if sid in self.fixed:
            k = self.fixed[sid]
        else:
            k = self.probe[sid].next_k(self._pinned_k(sid), lambda: self._probe_k(sid, dict(self.last)),
                                       self.cap[sid])
        self.last[sid] = k
        return k

    def _pinned_k(self, sid: int) -> int:
        """The K the policy would choose for a new sequence `sid` beside the batch's last K's."""
        cap = self.cap.get(sid, self.k_max)
        if not self.costs.verify.known:
            return cap
        a = self.acc[sid].rates()
        others = [(k, expected_tokens(self.acc[s].rates(), k)) for s, k in self.last.items() if s != sid]
        return choose_ks([expected_curve(a, cap)], self.mode, self.costs, others)[0]

    def _probe_together(self, free: list[int], chosen: list[int], out: dict[int, int]) -> None:
        """When one sequence probes, those at K = 0 whose probe is at least half due probe in the
        same round. A probe makes the whole batch wait for a just-in-time draft (no table at
        K = 0), once per round however many sequences probe: probes on separate schedules would
        put that wait into many more rounds under load."""
        if not any(k == 0 and out[s] > 0 for s, k in zip(free, chosen)):
            return
        for s, k in zip(free, chosen):
            p = self.probe[s]
            if k == 0 and out[s] == 0 and 2 * p.off >= p.every:
                p.off, p.probing = 0, True
                out[s] = max(1, self._probe_k(s, out))

    def _probe_k(self, sid: int, out: dict[int, int]) -> int:
        if not self.costs.verify.known:
            return self.cap[sid]
        curve = expected_curve(self.acc[sid].rates(), self.cap[sid])
        return best_speculating_k(curve, self.mode, self.costs, [k for s, k in out.items() if s != sid])

    def _trace_decision(self, free: list[int], chosen: list[int], out: dict[int, int]) -> None:
        """One decision with what it was made from: per free sequence its acceptance and the
        expected tokens per ms of each K with the rest of the batch as drafted."""
        c = self.costs
        seqs = {}
        for s, k in zip(free, chosen):
            a = self.acc[s].rates()
            curve = expected_curve(a, self.cap[s])
            rest = [out[o] for o in out if o != s]
            rates = [round(e / max(round_time(self.mode, [kk] + rest, c), 1e-12) / 1e3, 4)
                     for kk, e in enumerate(curve)] if c.verify.known else None
            seqs[s] = {"a": [round(x, 3) for x in a], "tok_per_ms": rates, "chosen": k}
        self.trace.write({"ev": "decide", "ks": {str(s): k for s, k in out.items()}, "seqs": seqs,
                          "t_verify_ms": [round(c.verify(n) * 1e3, 3) for n in range(1, self.k_max + 2)]
                          if c.verify.known else None,
                          **{k: v for k, v in self.snapshot().items() if k not in ("acceptance", "t_verify_ms")}})

    def snapshot(self) -> dict:
        """What the policy currently believes (for metrics and reports)."""
        c = self.costs
        a, b = c.verify.line()
        return {"fan_out_budget": self.budget, "t_verify_ms": [round(a * 1e3, 3), round(b * 1e3, 3)],
                "draft_step_ms": None if c.draft_step_s is None else round(c.draft_step_s * 1e3, 3),
                "prespec_step_ms": None if c.prespec_step_s is None else round(c.prespec_step_s * 1e3, 3),
                "prespec_ms": [round(c.prespec(k) * 1e3, 3) for k in range(1, self.k_max + 1)]
                if c.prespec.known else None,
                "transport_ms": round(c.transport_s * 1e3, 3), "hit_rate": round(c.hit_rate, 3),
                "overhead_ms": [round(c.overhead_off_s * 1e3, 3), round(c.overhead_spec_s * 1e3, 3)],
                "acceptance": [round(x, 3) for x in self.pooled.rates()]}
