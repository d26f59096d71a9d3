"""The verifier's side of the data plane, apart from the round itself: collecting the drafter's
speculation table and DRAFT replies (checking they answer the frame just sent), and losing,
rejoining and shutting down the drafter. `Verifier` (actors/verifier.py) mixes it in; its step
sends the frames (`_exchange`) and calls these to take what comes back.

Rejoining never stops the loop. A restarted drafter's Channel is formed in a background thread
(`_join`): the store rendezvous and the groups' construction are what wait for the new process to
start, load its model and connect. The loop decodes without drafts meanwhile, as it does whenever
the drafter is lost, and between two steps takes the formed Channel over (`_do_reconnect`); from
then on only the loop thread drives it. A join that fails or times out is logged and leaves
speculation off, until the supervisor's next restart.
"""
from __future__ import annotations

import logging
import threading
import time

from actors.protocol.channel import Channel, ChannelClosed
from actors.protocol.frame import Frame, ProtocolError, Rec, Record
from actors.protocol.wire import HIT, MISS, decode_table

log = logging.getLogger("actors.verifier")


class DrafterLink:
    def _take_table(self, t0: int) -> None:
        """Collect the pre-posted speculation table of the round just verified. Time the drafter
        was still drafting it is exposed drafting; the rest of the wait is transport."""
        if not self.channel.posted:
            return
        frame = self.channel.recv()
        t1 = time.perf_counter_ns()
        if frame.kind != Rec.TABLE:
            raise ProtocolError(f"expected the drafter's TABLE frame, got {frame.kind!r}")
        _check_step(frame, self._sent_step)
        for r in frame.records:
            if r.kind == Rec.PING:  # b: when the drafter sent the table; round, a: its draft steps, ns
                self.times.transport_s += (t1 - max(t0, r.b)) / 1e9
                self.times.table_wait_s += (t1 - t0) / 1e9
                self.policy.observe_table_wait((t1 - t0) / 1e9)
                catch_up = r.tokens[0] if len(r.tokens) else 0   # a prefill after a prompt or K = 0
                self.policy.observe_prespec(r.round, (r.a - catch_up) / 1e9, self._last_verify_s,
                                            self._table_seqs, catch_up / 1e9)
            elif r.kind == Rec.TABLE and r.seq in self.seqs:
                self.seqs[r.seq].table = decode_table(r.tokens, r.a, r.b)

    def _take_reply(self, reply: Frame, t0: int | None, from_table: set[int] = frozenset()) -> None:
        """Apply a DRAFT reply; with `t0` (when the frame it answers was sent) also estimate its
        wire time from the drafter's timestamps."""
        t1 = time.perf_counter_ns()
        if reply.kind != Rec.DRAFT:
            raise ProtocolError(f"expected the drafter's DRAFT frame, got {reply.kind!r}")
        _check_step(reply, self._sent_step)
        for r in reply.records:
            # drafter: posted recv, got frame, sent reply. An idle heartbeat's round trip (no
            # sequence in flight; the drafter may sleep behind another process) prices nothing.
            if r.kind == Rec.PING and t0 is not None and self.seqs:
                wire = (max(0, r.a - max(t0, r.round)) + max(0, t1 - r.b)) / 1e9
                self.times.transport_s += wire
                catch_up = r.tokens[0] if r.tokens else 0   # a prefill after K = 0, not drafting
                self.policy.observe_draft(self._jit_steps, (r.b - r.a - catch_up) / 1e9, wire, catch_up / 1e9)
            elif r.kind == Rec.DRAFT and r.seq in self.seqs:
                s = self.seqs[r.seq]
                if r.round != s.round:  # a draft for another round would be verified against the wrong q
                    raise ProtocolError(f"sequence {r.seq}: a draft for round {r.round}, expected {s.round}")
                s.draft = [int(t) for t in r.tokens]
                s.q = r.floats.view(len(s.draft), self.vocab) if r.b else None
                if r.a in (HIT, MISS) and s.stats.drafts and r.seq not in from_table:
                    s.stats.record_lookup(s.last_k, r.a == HIT)
                    self.policy.observe_lookup(r.a == HIT)

    def _drafter_lost(self, err: Exception) -> None:
        log.error("drafter lost (%s); continuing without speculation", err)
        self.drafter_ok, self._deferred, self._held = False, None, []
        if self.channel is not None:
            self.channel.close()
        for s in self.seqs.values():
            s.off_drafter()

    # -- joining a drafter ---------------------------------------------------------------------
    _join_lock = threading.Lock()     # guards the handoff below (shared by instances: it is brief)
    _join_gen = 0                     # the latest join asked for; an older one that ends late is dropped
    _joined: Channel | None = None    # formed by the join thread, not yet taken over by the loop

    def _form_channel(self, addr: str, port: int) -> Channel:
        return Channel(0, addr, port, backend=self.spec.backend, device=self.device,
                       timeout_s=self.spec.timeout_s).connect()

    def _use_channel(self, channel: Channel) -> None:
        """The loop thread (or the bring-up, before it runs): talk to the drafter over `channel` from
        the next step on."""
        if self.channel is not None:
            self.channel.close()
        self.channel = channel
        self.drafter_ok, self._deferred, self._held = True, None, []
        for s in self.seqs.values():  # re-admitted to the new drafter by the next step's _control
            s.off_drafter()

    def _join_in_background(self, addr: str, port: int) -> None:
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
                self._reconnect = (addr, port)   # the loop looks for this between two steps
        if channel is not None:
            channel.close()   # stale: never handed to the loop, so this thread may close it
        if current:
            log.info("drafter on %s:%d joined in %.2fs, in the background", addr, port, time.perf_counter() - t0)

    def _do_reconnect(self) -> None:
        """The loop thread, between two steps: take over the Channel the join thread formed."""
        with self._join_lock:
            (addr, port), self._reconnect = self._reconnect, None
            channel, self._joined = self._joined, None
        if channel is not None:
            self._use_channel(channel)
            log.info("drafter rejoined on %s:%d; speculation resumes", addr, port)

    def _cancel_joins(self) -> None:
        with self._join_lock:
            self._join_gen += 1   # a join still running closes what it forms
            channel, self._joined, self._reconnect = self._joined, None, None
        if channel is not None:
            channel.close()

    def _shutdown_drafter(self) -> None:
        self._cancel_joins()
        if self.drafter_ok and self.channel is not None:
            try:
                while self.channel.posted:  # the drafter sends what is due before it listens again
                    self.channel.recv()
                self.channel.send(Frame(Rec.SHUTDOWN, self._step_no, [Record(Rec.SHUTDOWN, 0)]))
            except ChannelClosed:
                pass
        if self.channel is not None:
            self.channel.close()
        self.drafter_ok = False

    def _q_rows_arrived(self) -> bool:
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
            self._drafter_lost(e)
            return False
        finally:
            self.times.wait_s += time.perf_counter() - t0
            self.times.verify_s -= time.perf_counter() - t0
        return True

    # -- output ------------------------------------------------------------------------------


def _check_step(frame: Frame, expected: int) -> None:
    """Replies and tables name the step of the frame they answer; any other number means the two
    sides fell out of step, and using the frame would verify against the wrong draft or q."""
    if frame.step != expected:
        raise ProtocolError(f"the drafter's {Rec(frame.kind).name} frame answers step {frame.step}, "
                            f"expected {expected}: the data plane is out of step")
