"""The drafter: proposes K tokens per round and, in SSD mode, pre-drafts the next round for the
likely verification outcomes while the verifier is busy.

A step, as the drafter sees it (the verifier leads, see channel.py):

  1. receive a frame: ADMIT (a prompt, sent while the verifier prefills it: its first outcome,
     (0, first token), comes with the next frame), OUTCOME (k, t*) per sequence, RELEASE. The
     verifier decides each sequence's K (actors/spec/adaptive.py): ADMIT and OUTCOME carry the K and
     fan-out budget this side drafts with from then on. A draft adopted from the cache is cut
     to the new K exactly as the verifier cuts its copy; at K = 0 nothing is drafted, no reply
     is due for the sequence, and its committed tokens are still fed (the cache stays in sync,
     so a probe or a return to speculation costs one draft, not a prefill);
  2. per OUTCOME, look (k, t*) up in the speculation cache: a hit adopts the pre-drafted branch
     (its tokens, q rows and KV slot) at no drafting cost; a miss runs the backup (`jit`: draft K
     now; `ngram`: prompt lookup; `none`: no draft, the verifier decodes one token);
  3. reply with one DRAFT per sequence — unless every outcome was a greedy hit: the verifier
     already holds those drafts (step 5) and is verifying them, so a reply would only be noise;
  4. SSD only: pre-speculate — for every depth j in 0..len(draft) take the top-F_j candidate
     correction tokens (the drafted token d_{j+1} masked out: a rejected token is never the
     correction) and draft K tokens after tokens + d_1..d_j + t*, all branches of all sequences
     as one batch. The KV cache is paged (actors/kv/): a branch is a block table forked from
     its sequence's, sharing every committed block and owning only the blocks its K positions
     write (a partly filled shared block is copied on its first write). A hit makes the
     branch's table the sequence's own; every other branch's blocks go back to the pool.
     This runs while the verifier verifies;
  5. SSD only, when the frame asked some sequence for drafts (table_due): send the speculation
     cache itself (a TABLE of branch tokens keyed by (k, t*)).
     It reaches the verifier before its verification ends, so on a hit the verifier starts the
     next round at once, with no round trip to this process on its critical path.

Both sides decide "reply or not" and "table or not" with the same rules (actors/protocol/rounds.py),
from facts both hold (a PING in the frame, a sampling sequence, a miss in the table), so the
message sequence stays in step. In sync SD mode every outcome misses (there is no table), so
each frame with outcomes gets its reply.
"""
from __future__ import annotations

import logging
import threading
import time
import torch

from actors.affinity import check_cpus, pin_this_thread
from actors.protocol.channel import Channel
from actors.draft_state import DrafterTimes, DraftSeq
from actors.drafting import Drafting
from actors.eagle.drafting import add_features, load_head_model
from actors.protocol.frame import Frame, Rec, Record
from actors.protocol.rounds import Ask, ReplyPing, TablePing, reply_due, table_due
from actors.spec.grammar import GrammarSpec, Grammars
from actors.model.loader import load_model
from actors.spec.online import OnlineLearner, TrainWhileWaiting
from actors.model.runner import Runner
from actors.engine_spec import EngineSpec
from actors.protocol.wire import HIT, MISS, NO_LOOKUP, decode_grammar, decode_params, encode_table

log = logging.getLogger(__name__)


class Drafter:
    def __init__(self, spec: EngineSpec):
        check_cpus(spec.draft_cpus, "models.draft.cpus")
        torch.set_num_threads(spec.draft_num_threads)
        self.spec = spec
        self.k = spec.k
        self.device = spec.draft_device
        self.head = spec.draft_head_layers is not None   # a draft head on the target's features (actors/eagle/)
        self.model = load_head_model(spec, self.device) if self.head else load_model(spec.draft, spec.draft_dtype,
                                                                                      self.device)
        self.seqs: dict[int, DraftSeq] = {}
        self.channel: Channel | None = None
        self.times = DrafterTimes()
        self.loop_tid: int | None = None   # the OS id of the thread running the loop
        self.online = None       # online learning (actors/spec/online.py): None unless the spec turns it on
        self._waiter = None      # with online learning: receives frames while the loop trains
        if spec.online_learning is not None:
            self.online = OnlineLearner(self.model, spec.online_learning, spec.draft)
        # A learning drafter trains through the plain forward: it is never compiled.
        self._forward = Runner(self.model, spec, "drafter", self.device, spec.draft_blocks(), spec.draft_rows(),
                               spec.draft_max_len, compile_ok=self.online is None and not self.head,
                               prefix=spec.draft_prefix_caching)
        self.cache = self._forward.cache
        # the forwards: just-in-time drafts and pre-speculation (actors/drafting.py)
        self.drafting = Drafting(spec, self.model, self._forward, self.times, self.head)
        self._grammars: Grammars | None = None   # made in the background on the first constrained request
        self._grammars_thread: threading.Thread | None = None
        self._grammar_of: dict[int, tuple[GrammarSpec, int]] = {}   # GRAMMAR records awaiting their ADMIT

    # -- lifecycle -------------------------------------------------------------------------
    def connect(self, master_addr: str | None = None, master_port: int | None = None) -> None:
        self.channel = Channel(1, master_addr or self.spec.master_addr, master_port or self.spec.master_port,
                               backend=self.spec.backend, device=self.device, timeout_s=self.spec.timeout_s)
        self.channel.connect()

    def run(self) -> None:
        """Serve the verifier until it sends SHUTDOWN (or the channel breaks)."""
        pin_this_thread(self.spec.draft_cpus)
        self.loop_tid = threading.get_native_id()
        try:
            while True:
                t0 = time.perf_counter()
                frame = self.channel.recv() if self.online is None else self._train_until_frame()
                t1 = time.perf_counter()
                self.times.wait_s += t1 - t0
                self.times.frames += 1
                if any(r.kind == Rec.SHUTDOWN for r in frame.records):
                    return
                reply = self.handle(frame, recv_posted_ns=int(t0 * 1e9), recv_done_ns=int(t1 * 1e9))
                if reply is not None:
                    self.channel.send(reply)
                    self.times.replies += 1
                t2, c2 = time.perf_counter(), time.thread_time()
                self.times.reply_s += t2 - t1
                if self.spec.mode == "ssd" and table_due(frame):
                    self.prespeculate()
                    self.drafting.prespec_ns = int((time.perf_counter() - t2) * 1e9)
                    self.channel.send(self.table_frame(frame.step))
                    self.times.prespec_s += time.perf_counter() - t2
                    self.times.prespec_cpu_s += time.thread_time() - c2
                elif self.spec.mode != "ssd" and not self.head:  # read new prompts while the verifier prefills them
                    for s in self.seqs.values():   # (a head waits for the prompt's features)
                        if s.k:  # at K = 0 the cache catches up when a draft is asked for
                            self.drafting.prefill(s, len(s.tokens))
        finally:
            self.close()

    def close(self) -> None:
        if self.online is not None and self.online.spec.save_path is not None and self.online.steps:
            try:
                self.online.save()
            except Exception:  # shutting down either way: say so, keep closing
                log.exception("online learning: saving the drafter failed")
        if self.channel is not None:
            self.channel.close()

    def stats(self) -> dict:
        prefix = self.cache.pool.prefix.stats() if self.cache.pool.prefix is not None else {}
        # grammars: constrained requests draft under their mask (the engine is up)
        own = dict(vars(self.times), seqs=len(self.seqs), grammars=self._grammars is not None, **prefix)
        return own if self.online is None else dict(own, **self.online.stats())

    def _train_until_frame(self) -> Frame:
        if self._waiter is None:
            self._waiter = TrainWhileWaiting(self.channel, self.online)
        return self._waiter.next_frame(active=bool(self.seqs))

    # -- one frame -------------------------------------------------------------------------
    def handle(self, frame: Frame, recv_posted_ns: int = 0, recv_done_ns: int = 0) -> Frame | None:
        """Apply one frame; the DRAFT reply, or None when every outcome was a greedy hit."""
        need_draft: list[DraftSeq] = []
        replies: dict[int, int] = {}
        must_reply = False
        for rec in frame.records:
            if rec.kind == Rec.PING:
                must_reply = True
            elif rec.kind == Rec.GRAMMAR:   # just before its ADMIT
                self._grammar_of[rec.seq] = decode_grammar(rec)
            elif rec.kind == Rec.ADMIT:  # nothing to draft before the first token is known
                self._admit(rec)
            elif rec.kind == Rec.FEATS:   # before its OUTCOME: the positions that outcome committed
                s = self.seqs.get(rec.seq)
                if s is not None:
                    add_features(self.model, s, rec.a, rec.floats)
            elif rec.kind == Rec.OUTCOME:
                s = self.seqs.get(rec.seq)
                if s is None:  # admitted before this drafter (re)joined: the verifier decodes alone
                    continue
                s.round = rec.round + 1
                if rec.tokens:  # the K and fan-out budget from now on
                    s.k, s.budget = min(int(rec.tokens[0]), self.k), min(int(rec.tokens[1]), self.spec.max_branches)
                hit = self._apply_outcome(s, rec.a, rec.b)
                self._attach_grammar(s)
                if self.online is not None:
                    self.online.progress(s.id, s.tokens)
                    self._refresh_kv(s)
                self._cut_draft(s, s.k)
                if s.k == 0:  # off: nothing to draft, nothing to reply
                    continue
                replies[s.id] = hit
                if hit != HIT:
                    need_draft.append(s)
            elif rec.kind == Rec.RELEASE:
                self._release(rec.seq)
        catch_up_ns = self.drafting.backup(need_draft)   # the drafts no cached branch gave
        if not reply_due(must_reply, (Ask(self.seqs[sid].k, hit == HIT, self.seqs[sid].params.greedy)
                                      for sid, hit in replies.items())):
            return None
        records = [ReplyPing(recv_posted_ns, recv_done_ns, time.perf_counter_ns(), catch_up_ns).record()]
        for sid, hit in replies.items():
            s = self.seqs[sid]
            if hit == HIT and s.params.greedy:  # the verifier took this draft from the table
                continue
            q = s.q if not s.params.greedy else None
            records.append(Record(Rec.DRAFT, sid, s.round, hit, 0 if q is None else len(s.draft),
                                  tokens=list(s.draft), floats=None if q is None else q.reshape(-1)))
        return Frame(Rec.DRAFT, frame.step, records)

    def prespeculate(self) -> None:
        """Pre-draft the next round for the likely outcomes of the round being verified."""
        self.drafting.prespeculate(self.seqs.values())

    def table_frame(self, step: int) -> Frame:
        """The speculation cache as the verifier needs it: per sequence, its branches' tokens."""
        d = self.drafting
        # the catch-up prefill is not pre-speculation's cost per round (it comes once, after a
        # prompt or a stretch at K = 0): the verifier's policy must not price every round with it
        records = [TablePing(d.prespec_steps, d.prespec_ns, time.perf_counter_ns(), d.prespec_catch_up_ns).record()]
        for s in self.seqs.values():
            if s.branches:
                table = {key: br.tokens for key, br in s.branches.items()}
                records.append(Record(Rec.TABLE, s.id, s.round, len(table), s.k, encode_table(table)))
        return Frame(Rec.TABLE, step, records)

    def _admit(self, rec: Record) -> DraftSeq:
        params, _, tokens = decode_params(rec.tokens)   # params.seed keys its draws (sampling.py)
        s = DraftSeq(rec.seq, params, list(tokens), self.cache.alloc(),
                     k=min(rec.a, self.k), budget=min(rec.b, self.spec.max_branches))
        # the cached prefix's blocks (the verifier skips the same part of its prefill); the last
        # prompt token is always fed, for the depth-0 distribution
        s.length = self.cache.reuse(s.slot, s.tokens, len(s.tokens) - 1)
        grammar = self._grammar_of.pop(s.id, None)
        if grammar is not None and not self.head:   # (a draft head drafts unmasked)
            spec, n_generated = grammar
            s.grammar = (spec, len(s.tokens) - n_generated)
            self._attach_grammar(s)
        self.seqs[s.id] = s
        if self.online is not None:
            self.online.admit(s.id, len(s.tokens))
            s.kv_steps = self.online.steps
        return s

    def _attach_grammar(self, s: DraftSeq) -> None:
        """Give a constrained sequence its matcher, through the output so far, once the grammar
        engine is up: it is built in a thread of its own on first use (xgrammar's import takes
        seconds, and the verifier waits on this loop), and until then the sequence drafts
        unmasked. That costs acceptance, never exactness; so does a grammar that fails here."""
        if s.grammar is None:
            return
        if self._grammars is None:
            if self._grammars_thread is None:
                self._grammars_thread = threading.Thread(target=self._start_grammars, name="grammars", daemon=True)
                self._grammars_thread.start()
            return
        (spec, start), s.grammar = s.grammar, None
        try:
            m = self._grammars.matcher(spec)
        except Exception:
            log.exception("drafter: no grammar for request %d; drafting it unmasked", s.id)
            return
        s.matcher = m if m.advance(s.tokens[start:]) else None

    def _start_grammars(self) -> None:
        args = self.model.args
        try:
            self._grammars = Grammars(self.spec.draft, args.vocab_size, tuple(args.eos_token_ids), self.k + 1)
        except Exception:
            log.exception("drafter: the grammar engine did not start; constrained requests draft unmasked")

    def _release(self, sid: int) -> None:
        s = self.seqs.pop(sid, None)
        if s is None:
            return
        if self.online is not None:
            self.online.release(sid, s.tokens)
        for h in [s.slot, *(br.slot for br in s.branches.values())]:
            self.cache.free(h)

    def _apply_outcome(self, s: DraftSeq, k: int, t_star: int) -> int:
        """Commit (k, t*) and adopt the matching pre-drafted branch if there is one."""
        n_old = len(s.tokens)
        s.tracker.update(k, len(s.draft))
        s.tokens += s.draft[:k] + [t_star]
        if s.matcher is not None and not s.matcher.advance(s.draft[:k] + [t_star]):
            s.matcher = None   # (a stop token ended the grammar) unmasked from here on
        br = s.branches.pop((k, t_star), None)
        for other in s.branches.values():
            self.cache.free(other.slot)
        s.branches = {}
        looked_up, s.speculated = s.speculated, False
        if br is not None:  # the branch's table (shared prefix + its own tail) becomes the sequence's
            self.cache.free(s.slot)
            s.slot = br.slot
            # copies: the branches' rows are views of one [rows, K, V] tensor, freed with them
            s.length, s.draft = br.length, br.tokens
            s.q, s.dists = (br.q.clone() if br.q is not None else None), br.dists.clone()
            if self.head:   # rows from n_old on ran on predicted features: the real ones replace them
                s.length, s.dists, s.hid = min(s.length, n_old), None, None
                self.cache.truncate(s.slot, s.length)
            self.cache.publish(s.slot, s.tokens, s.length)   # positions past the committed tokens hold drafts
            return HIT
        s.length = min(s.length, n_old if self.head else n_old + k)
        self.cache.truncate(s.slot, s.length)
        self.cache.publish(s.slot, s.tokens, s.length)
        s.draft, s.q, s.dists = [], None, None
        return MISS if self.spec.mode == "ssd" and looked_up else NO_LOOKUP

    def _refresh_kv(self, s: DraftSeq) -> None:
        """online_learning.recompute_kv: once optimizer steps ran since this sequence's KV was
        (re)computed, drop it all, so the next catch-up (the backup's prefill, or the catch-up in
        pre-speculation) recomputes it, and the depth distributions the next fan-out picks from,
        with the current weights. The adopted draft's tokens (and q rows) stay: the verifier
        already holds them."""
        ol = self.online
        if ol.spec.recompute_kv and s.kv_steps != ol.steps:
            s.kv_steps = ol.steps
            if s.length:   # (at K = 0 the cache may hold nothing yet)
                ol.kv_recomputes += 1
                ol.kv_recompute_tokens += s.length
                s.length = 0
                self.cache.truncate(s.slot, 0)

    def _cut_draft(self, s: DraftSeq, k: int) -> None:
        """Keep the first k tokens of the adopted draft (any prefix of a draft is a draft: the
        verifier cuts its copy the same way). The cache keeps what those k tokens need."""
        if len(s.draft) <= k:
            return
        s.draft = s.draft[:k]
        s.q = s.q[:k] if s.q is not None else None
        s.dists = s.dists[:k] if s.dists is not None and k else None
        s.hid = s.hid[:k] if s.hid is not None and k else None
        s.length = min(s.length, len(s.tokens) - 1 + k)
        self.cache.truncate(s.slot, s.length)
