"""The verifier's drafter client: its side of the data plane to one drafter. Each step it collects
the drafter's speculation table (`take_table`), sends the frame of ADMIT / FEATS / OUTCOME /
RELEASE records (`exchange`), collects DRAFT replies (checking they answer the frame just sent),
and loses, rejoins and shuts down the drafter. The verifier (actors/verifier.py) owns one per
drafter (models.draft.replicas) and hands each what it works on: the live sequences (a client
speaks only of those whose `drafter` is its index), the verifier's time accounts and the
adaptive policy. A client's protocol is the same whether it is one of one or one of several.

Rejoining never stops the loop. A restarted drafter's Channel is formed in a background thread
(`_join`): the store rendezvous and the groups' construction are what wait for the new process to
start, load its model and connect. The loop decodes without drafts meanwhile, as it does whenever
the drafter is lost, and between two steps takes the formed Channel over (`take_over`); from
then on only the loop thread drives it. A join that fails or times out is logged and leaves
speculation off, until the supervisor's next restart.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from actors.engine_spec import EngineSpec
from actors.protocol.channel import Channel, ChannelClosed
from actors.protocol.frame import INLINE_INTS, RECORD_FIXED, Frame, ProtocolError, Rec, Record
from actors.protocol.rounds import (Ask, ReplyPing, TablePing, asks_drafts, asks_nothing, check_step, reply_due,
                                    table_due)
from actors.protocol.wire import HIT, MISS, decode_table
from actors.sequence import Seq
from actors.spec.adaptive import Controller
from actors.timing import VerifierTimes

log = logging.getLogger("actors.verifier")
PING_EVERY_S = 1.0


class DrafterClient:
    def __init__(self, spec: EngineSpec, device: str, vocab: int, seqs: dict[int, Seq], times: VerifierTimes,
                 policy: Controller, index: int = 0):
        self.spec, self.device, self.vocab, self.index = spec, device, vocab, index
        self.seqs, self.times, self.policy = seqs, times, policy   # the verifier's own
        self.channel: Channel | None = None
        self.ok = False                            # a drafter is on the data plane
        self.step_no = 0
        self.last_exchange = time.perf_counter()
        self._sent_step = -1   # the step number of the last frame sent: replies and tables must name it
        self._deferred: set[int] | None = None   # sequences whose q rows come with a reply posted ahead
        self._jit_steps = 0                        # draft steps the reply due now waits for
        self._table_seqs = 1                       # sequences the table due now was pre-drafted for
        self._held: list[Record] = []              # K = 0 outcomes not sent yet (no frame was due)
        # joining a drafter
        self._join_lock = threading.Lock()     # guards the handoff between the join thread and the loop
        self._join_gen = 0                     # the latest join asked for; an older one that ends late is dropped
        self._joined: Channel | None = None    # formed by the join thread, not yet taken over by the loop
        self.rejoin: tuple[str, int] | None = None   # set with _joined: the loop takes it over between steps

    @property
    def awaiting_q_rows(self) -> bool:
        """Sampling hits' q rows come with a reply posted before the forward (`q_rows_arrived`)."""
        return self._deferred is not None

    def owned(self) -> list[Seq]:
        return [s for s in self.seqs.values() if s.drafter == self.index]

    def going(self) -> list[Seq]:
        """Its sequences with an outcome to send this step: the ones the policy decides a K for."""
        return [s for s in self.seqs.values() if s.drafter == self.index and s.outcome is not None and s.on_drafter]

    def _mine(self, sid: int) -> Seq | None:
        s = self.seqs.get(sid)
        return s if s is not None and s.drafter == self.index else None

    def heartbeat_due(self) -> bool:
        return self.ok and time.perf_counter() - self.last_exchange > PING_EVERY_S

    def connect(self, addr: str, port: int) -> None:
        """Form the data plane with the drafter and wait for it: the bring-up, before the loop runs."""
        self._use_channel(self._form_channel(addr, port))

    # -- one round ----------------------------------------------------------------------------
    def take_table(self, last_verify_s: float) -> None:
        """The step's first half: collect the table of the round just verified, before the policy
        decides this step's K's (its pre-drafting time informs them). `last_verify_s`: the verify
        forward the table was drafted behind."""
        t0 = time.perf_counter_ns()
        try:
            self._take_table(t0, last_verify_s)
        except (ChannelClosed, ProtocolError) as e:
            self.lost(e)
            return
        self.times.wait_s += (time.perf_counter_ns() - t0) / 1e9

    def exchange(self, records: list[Record], ks: dict[int, int]) -> None:
        """The step's second half: send this step's frame (the records, then each going sequence's
        FEATS and OUTCOME with its K from `ks`, the policy's decision for the whole batch) and take
        what is due back now: a DRAFT reply."""
        t0 = time.perf_counter_ns()
        try:
            ping = any(r.kind == Rec.PING for r in records)
            asks: list[Ask] = []
            sampled: list[Seq] = []  # hits whose q rows still come with the drafter's reply
            going = self.going()
            budget, self._jit_steps = self.policy.budget, 0
            for s in going:
                k, t = s.outcome
                s.k = kn = ks[s.req.id]
                if s.feats:   # the features of the positions this outcome committed, first
                    rows = torch.cat([f for _, f in s.feats])
                    records.append(Record(Rec.FEATS, s.req.id, s.round - 1, s.feats[0][0], len(rows),
                                          tokens=[rows.shape[1]], floats=rows))
                    s.feats = []
                records.append(Record(Rec.OUTCOME, s.req.id, s.round - 1, k, t, tokens=[kn, budget]))
                s.outcome = None
                table, s.table = s.table, None
                if kn == 0:  # speculation off this round: decode alone, nothing to wait for
                    s.stats.rounds_off += 1
                    continue
                draft = table.get((k, t)) if table is not None else None
                asks.append(Ask(kn, draft is not None, s.req.params.greedy))
                if draft is None:
                    self._jit_steps = max(self._jit_steps, kn)
                    continue
                s.draft, s.q = list(draft[:kn]), None
                if s.stats.drafts:  # the first token's lookup is not a verification outcome
                    s.stats.record_lookup(s.last_k, True)
                    self.policy.observe_lookup(True)
                if not s.req.params.greedy:
                    sampled.append(s)
            if asks_nothing(records) and time.perf_counter() - self.last_exchange < PING_EVERY_S:
                # Every sequence is at K = 0: nothing to ask the drafter, so no frame this round.
                # The outcomes go with the next frame (a probe, a return, or the heartbeat).
                self._held += records
                return
            records, self._held = self._held + records, []
            t1 = time.perf_counter_ns()
            frame = Frame(Rec.OUTCOME, self.step_no, records)
            self.channel.send(frame)
            self._sent_step = self.step_no
            if reply_due(ping, asks):
                n_ints = RECORD_FIXED + 1 + sum(RECORD_FIXED + len(s.draft) for s in sampled)  # PING (+ catch-up ns)
                if ping or not all(a.hit for a in asks) or n_ints > INLINE_INTS:   # drafts to wait for, or a long reply
                    self._take_reply(self.channel.recv(), t1, from_table={s.req.id for s in sampled})
                else:  # only q rows are missing: they land during the target forward
                    self.channel.post_recv(n_floats=sum(len(s.draft) for s in sampled) * self.vocab)
                    self._deferred = {s.req.id for s in sampled}
            if self.spec.mode == "ssd" and table_due(frame):
                self.channel.post_recv()  # the table for this round lands while we verify it
                # the sequences it pre-drafts for (its cost grows with them: each fans out)
                self._table_seqs = sum(1 for r in frame.records if asks_drafts(r))
        except (ChannelClosed, ProtocolError) as e:
            self.lost(e)
            return
        self.step_no += 1
        self.last_exchange = time.perf_counter()
        self.times.wait_s += (time.perf_counter_ns() - t0) / 1e9

    def _take_table(self, t0: int, last_verify_s: float) -> None:
        """Collect the pre-posted speculation table of the round just verified. Time the drafter
        was still drafting it is exposed drafting; the rest of the wait is transport."""
        if not self.channel.posted:
            return
        frame = self.channel.recv()
        t1 = time.perf_counter_ns()
        if frame.kind != Rec.TABLE:
            raise ProtocolError(f"expected the drafter's TABLE frame, got {frame.kind!r}")
        check_step(frame, self._sent_step)
        for r in frame.records:
            if r.kind == Rec.PING:
                p = TablePing.of(r)
                self.times.transport_s += (t1 - max(t0, p.sent_ns)) / 1e9
                self.times.table_wait_s += (t1 - t0) / 1e9
                self.policy.observe_table_wait((t1 - t0) / 1e9)
                self.policy.observe_prespec(p.steps, (p.drafting_ns - p.catch_up_ns) / 1e9, last_verify_s,
                                            self._table_seqs, p.catch_up_ns / 1e9)
            elif r.kind == Rec.TABLE and (s := self._mine(r.seq)) is not None:
                s.table = decode_table(r.tokens, r.a, r.b)

    def _take_reply(self, reply: Frame, t0: int | None, from_table: set[int] = frozenset()) -> None:
        """Apply a DRAFT reply; with `t0` (when the frame it answers was sent) also estimate its
        wire time from the drafter's timestamps."""
        t1 = time.perf_counter_ns()
        if reply.kind != Rec.DRAFT:
            raise ProtocolError(f"expected the drafter's DRAFT frame, got {reply.kind!r}")
        check_step(reply, self._sent_step)
        for r in reply.records:
            # An idle heartbeat's round trip (no sequence in flight; the drafter may sleep behind
            # another process) prices nothing.
            if r.kind == Rec.PING and t0 is not None and self.owned():
                p = ReplyPing.of(r)
                wire = (max(0, p.received_ns - max(t0, p.posted_ns)) + max(0, t1 - p.sent_ns)) / 1e9
                self.times.transport_s += wire
                self.policy.observe_draft(self._jit_steps, (p.sent_ns - p.received_ns - p.catch_up_ns) / 1e9, wire,
                                          p.catch_up_ns / 1e9)
            elif r.kind == Rec.DRAFT and (s := self._mine(r.seq)) is not None:
                if r.round != s.round:  # a draft for another round would be verified against the wrong q
                    raise ProtocolError(f"sequence {r.seq}: a draft for round {r.round}, expected {s.round}")
                s.draft = [int(t) for t in r.tokens]
                s.q = r.floats.view(len(s.draft), self.vocab) if r.b else None
                if r.a in (HIT, MISS) and s.stats.drafts and r.seq not in from_table:
                    s.stats.record_lookup(s.last_k, r.a == HIT)
                    self.policy.observe_lookup(r.a == HIT)

    def lost(self, err: Exception) -> None:
        log.error("drafter lost (%s; drafter %d); its sequences continue without drafts", err, self.index)
        self.ok, self._deferred, self._held = False, None, []
        if self.channel is not None:
            self.channel.close()
        for s in self.owned():
            s.off_drafter()

    # -- joining a drafter ---------------------------------------------------------------------
    def _form_channel(self, addr: str, port: int) -> Channel:
        return Channel(0, addr, port, backend=self.spec.backend, device=self.device,
                       timeout_s=self.spec.timeout_s).connect()

    def _use_channel(self, channel: Channel) -> None:
        """The loop thread (or the bring-up, before it runs): talk to the drafter over `channel` from
        the next step on."""
        if self.channel is not None:
            self.channel.close()
        self.channel = channel
        self.ok, self._deferred, self._held = True, None, []
        for s in self.owned():  # re-admitted by the next step's control
            s.off_drafter()

    def join_in_background(self, addr: str, port: int) -> None:
        with self._join_lock:
            self._join_gen = gen = self._join_gen + 1
        threading.Thread(target=self._join, args=(gen, addr, port), name="outrider-drafter-join",
                         daemon=True).start()

    def _join(self, gen: int, addr: str, port: int) -> None:
        """The join thread: form the Channel, then leave it for the loop (it only constructs)."""
        t0 = time.perf_counter()
        try:
            channel = self._form_channel(addr, port)
        except Exception as e:  # keep serving without a drafter rather than dying
            with self._join_lock:
                superseded = gen != self._join_gen
            if superseded:   # a newer restart's join is under way: this one's failure changes nothing
                log.info("an earlier join of the drafter on %s:%d gave up (a newer one is under way): %s",
                         addr, port, e)
            else:
                log.error("could not join the drafter on %s:%d: %s; speculation stays off", addr, port, e)
            return
        with self._join_lock:
            current = gen == self._join_gen
            if current:
                channel, self._joined = self._joined, channel   # one formed earlier but never taken: drop it
                self.rejoin = (addr, port)   # the loop looks for this between two steps
        if channel is not None:
            channel.close()   # stale: never handed to the loop, so this thread may close it
        if current:
            log.info("drafter on %s:%d joined in %.2fs, in the background", addr, port, time.perf_counter() - t0)

    def take_over(self) -> None:
        """The loop thread, between two steps: take over the Channel the join thread formed."""
        with self._join_lock:
            (addr, port), self.rejoin = self.rejoin, None
            channel, self._joined = self._joined, None
        if channel is not None:
            self._use_channel(channel)
            log.info("drafter rejoined on %s:%d; speculation resumes", addr, port)

    def _cancel_joins(self) -> None:
        with self._join_lock:
            self._join_gen += 1   # a join still running closes what it forms
            channel, self._joined, self.rejoin = self._joined, None, None
        if channel is not None:
            channel.close()

    def shutdown(self) -> None:
        self._cancel_joins()
        if self.ok and self.channel is not None:
            try:
                while self.channel.posted:  # the drafter sends what is due before it listens again
                    self.channel.recv()
                self.channel.send(Frame(Rec.SHUTDOWN, self.step_no, [Record(Rec.SHUTDOWN, 0)]))
            except ChannelClosed:
                pass
        if self.channel is not None:
            self.channel.close()
        self.ok = False

    def q_rows_arrived(self) -> bool:
        """Collect the sampling hits' q rows, in a reply posted before the forward: it landed during
        the forward, so only the time still spent blocked here counts (as transport). False if the
        drafter is lost."""
        from_table, self._deferred = self._deferred, None
        t0 = time.perf_counter()
        try:
            reply = self.channel.recv()
            self.times.transport_s += time.perf_counter() - t0
            self._take_reply(reply, None, from_table)
        except (ChannelClosed, ProtocolError) as e:
            self.lost(e)
            return False
        finally:
            self.times.wait_s += time.perf_counter() - t0
        return True

