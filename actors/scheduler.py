"""The verifier's scheduler: requests in and out of the batch.

It takes submitted requests (checked against the whole KV cache), applies aborts, admits waiting
requests while the batch has room and the KV blocks for everything a request can ever write
(prompt + max_new_tokens + K) can be reserved, so a sequence never runs out halfway, and finishes
sequences: their blocks go back, the drafter is told, the final event goes out. What the drafters
must hear of it comes back as records, one list per drafter: RELEASE for its finished sequences,
ADMIT for new ones and for live ones no drafter holds (after a drafter was lost or rejoined).

With several drafters (models.draft.replicas) each sequence belongs to one. An admission goes to
the live drafter that owns the fewest live sequences (ties: the lowest index), so a dead one gets
no new work and the sequences it held move to the others at their re-admission.

Other threads call `submit` and `abort` only; everything else runs on the verifier's loop thread.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

from actors.engine_spec import EngineSpec
from actors.kv import PagedKVCache, blocks_for
from actors.protocol.events import Outbox
from actors.protocol.frame import Rec, Record
from actors.protocol.wire import encode_params, grammar_record
from actors.sequence import Request, Seq, held_per_drafter
from actors.spec.adaptive import Controller
from actors.spec.grammar import Grammars
from actors.spec.stats import SpecStats


class Scheduler:
    def __init__(self, spec: EngineSpec, vocab: int, cache: PagedKVCache, policy: Controller, events: Outbox,
                 seqs: dict[int, Seq], readmit: bool = True, eos: tuple[int, ...] = ()):
        self.spec, self.k, self.vocab = spec, spec.k, vocab
        self.cache, self.policy, self.events = cache, policy, events
        self.seqs = seqs               # the verifier's live sequences
        self.readmit = readmit         # a live sequence can join a (re)joined drafter (not with a draft head,
        #                                which would need the features of everything before)
        self._inbox: queue.Queue[tuple[Request, float]] = queue.Queue()
        self._waiting: list[tuple[Request, float]] = []
        self._aborts: set[int] = set()
        self._lock = threading.Lock()
        self._release: list[tuple[int, int]] = []   # (drafter, sequence) finished since the last control
        self.eos = eos                 # the model's stop tokens: a complete grammar allows them
        self._grammars: Grammars | None = None   # made on the first constrained request (actors/spec/grammar.py)
        self._grammars_lock = threading.Lock()

    # -- thread-safe -------------------------------------------------------------------------
    def submit(self, req: Request | dict) -> None:
        req = req if isinstance(req, Request) else Request(**req)
        req.validate(self.vocab, self.spec.max_seq_len)
        if req.k is not None and req.k > self.k:
            raise ValueError(f"k must be at most speculation.k = {self.k}, got {req.k}")
        need = blocks_for(self.spec.reserve_tokens(len(req.prompt), req.max_new_tokens), self.spec.kv_block_size)
        if need > self.cache.capacity:
            raise ValueError(f"prompt + max_new_tokens needs {need} KV blocks; the whole cache has "
                             f"{self.cache.capacity} (engine.kv_cache_memory)")
        if req.grammar is not None:   # compiled here, off the loop: the loop's matcher finds it cached
            self.grammars().compile(req.grammar)
        self._inbox.put((req, time.perf_counter()))

    def grammars(self) -> Grammars:
        with self._grammars_lock:
            if self._grammars is None:
                # rows per round: K drafts + 1; rollback: back over a whole draft
                self._grammars = Grammars(self.spec.target, self.vocab, self.eos, self.k + 1)
            return self._grammars

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def n_waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    # -- the loop thread ---------------------------------------------------------------------
    def wait(self, timeout: float) -> None:
        """Idle: wait up to `timeout` for a request."""
        with contextlib.suppress(queue.Empty):
            self._waiting.append(self._inbox.get(timeout=timeout))

    def control(self, live: list[bool]) -> tuple[list[list[Record]], list[Seq]]:
        """Aborts, admissions, releases as records for each drafter (`live`: which drafters are on
        the data plane); the admitted, to prefill next."""
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            if rid in self.seqs:
                self.finish(self.seqs[rid], "abort")
            elif any(w[0].id == rid for w in self._waiting):
                self._waiting = [w for w in self._waiting if w[0].id != rid]
                self.events.put({"id": rid, "tokens": [], "done": True, "reason": "abort"})
        records: list[list[Record]] = [[] for _ in live]
        for owner, sid in self._release:
            records[owner].append(Record(Rec.RELEASE, sid))
        self._release = []
        for s in self.seqs.values():  # re-admit after a drafter (re)join, or a lost one's to the others
            if s.req.speculate and not s.on_drafter and self.readmit and (owner := self._owner(live)) is not None:
                # Its last committed token plays the first token's part: the outcome of an empty draft.
                records[owner] += self._admit_records(s, s.tokens[:-1], owner)
                s.outcome, s.round = (0, s.tokens[-1]), s.round + 1
        admitted = []
        while (self._waiting and len(self.seqs) < self.spec.max_batch
               and self.cache.can_reserve(self.spec.reserve_tokens(len(self._waiting[0][0].prompt),
                                                                   self._waiting[0][0].max_new_tokens))):
            req, t_submit = self._waiting.pop(0)
            s = self._admit(req, t_submit)
            admitted.append(s)
            if req.speculate and (owner := self._owner(live)) is not None:
                records[owner] += self._admit_records(s, s.tokens, owner)
        return records, admitted

    def _owner(self, live: list[bool]) -> int | None:
        """The live drafter holding the fewest sequences (ties: the lowest index); None if none is live."""
        held = held_per_drafter(self.seqs.values(), len(live))
        return min((i for i, ok in enumerate(live) if ok), key=lambda i: (held[i], i), default=None)

    def finish(self, s: Seq, reason: str) -> None:
        now = time.perf_counter()
        self.seqs.pop(s.req.id, None)
        self.policy.remove(s.req.id)
        self.cache.free(s.slot)
        if s.on_drafter:
            self._release.append((s.drafter, s.req.id))
        self.events.put({
            "id": s.req.id, "tokens": [], "done": True, "reason": reason,
            "prompt_tokens": len(s.req.prompt), "completion_tokens": s.n_generated, "cached_tokens": s.cached,
            "stats": s.stats.to_dict(), "ttft_s": s.t_first - s.t_submit, "total_s": now - s.t_submit,
        })

    def _admit_records(self, s: Seq, tokens: list[int], owner: int) -> list[Record]:
        """ADMIT, after a constrained request's GRAMMAR: the drafter drafts under the same mask."""
        s.on_drafter, s.drafter, s.outcome = True, owner, None
        s.k = self.policy.admit_k(s.req.id)
        grammar = [] if s.req.grammar is None else [grammar_record(s.req.id, s.req.grammar,
                                                                   len(tokens) - len(s.req.prompt))]
        return grammar + [Record(Rec.ADMIT, s.req.id, s.round, s.k, self.policy.budget,
                                 tokens=encode_params(s.req.params, s.seed, tokens))]

    def _admit(self, req: Request, t_submit: float) -> Seq:
        seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(6), "little")
        slot = self.cache.alloc(reserve_tokens=self.spec.reserve_tokens(len(req.prompt), req.max_new_tokens))
        s = Seq(req, slot, list(req.prompt), seed, SpecStats(k=self.k), t_submit)
        # a cached prefix's blocks join the table: prefill starts after them (one token at least
        # is left to compute, for the first token's logits)
        s.length = s.cached = self.cache.reuse(slot, req.prompt, len(req.prompt) - 1)
        if req.grammar is not None:
            s.matcher = self.grammars().matcher(req.grammar)
        self.seqs[req.id] = s
        if self.spec.speculative:
            # reported: a seeded request's pinned K, so the same seed with this `k` gives the same tokens
            s.stats.fixed_k = self.policy.add(req.id, self._fixed_k(req), pin=self._pinned(req))
        return s

    def _fixed_k(self, req: Request) -> int | None:
        """The K this request drafts every round when it is not the policy's to choose: its own
        `k` (0 = off), or `speculation.k` with adaptive off."""
        if req.k is not None:
            return req.k
        if not self.spec.adaptive:
            return self.k
        return None

    def _pinned(self, req: Request) -> bool:
        """A seeded sampling request drafts one K throughout, chosen by the policy at admission:
        which random draws decide its tokens depends on how many drafts each round verified, and
        a K that followed timings round by round would not give the same text twice. Its final
        stats report that K; the same seed with `k` set to it reproduces the output."""
        return req.params.seed is not None and req.params.temperature > 0
