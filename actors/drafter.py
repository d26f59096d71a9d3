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
from actors.draft_state import Branch, DrafterTimes, DraftSeq
from actors.eagle.drafting import add_features, catch_up_depths, load_head_model, n_real, row_features
from actors.protocol.frame import Frame, Rec, Record
from actors.protocol.rounds import Ask, ReplyPing, TablePing, reply_due, table_due
from actors.spec.fanout import split_budget, top_candidates
from actors.spec.grammar import GrammarSpec, Grammars, Matcher
from actors.model.loader import load_model
from actors.spec.ngram import propose_ngram
from actors.spec.online import OnlineLearner, TrainWhileWaiting
from actors.model.runner import Runner
from actors.spec.sampling import DRAFT, keyed_uniforms, probs_from_logits, saguaro_scale, sample
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
        self._prespec = (0, 0)   # the last pre-speculation: (draft steps, ns), for the table's PING
        self._prespec_catch_up_ns = 0   # of which a prefill of tokens committed at K = 0 or a new prompt
        self._catch_up_ns = 0    # this frame's catch-up prefill before just-in-time drafts (in the reply's PING)
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
                    self._prespec = (self._prespec[0], int((time.perf_counter() - t2) * 1e9))
                    self.channel.send(self.table_frame(frame.step))
                    self.times.prespec_s += time.perf_counter() - t2
                    self.times.prespec_cpu_s += time.thread_time() - c2
                elif self.spec.mode != "ssd" and not self.head:  # read new prompts while the verifier prefills them
                    for s in self.seqs.values():   # (a head waits for the prompt's features)
                        if s.k:  # at K = 0 the cache catches up when a draft is asked for
                            self._prefill(s, len(s.tokens))
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
        self._catch_up_ns = 0
        self._backup(need_draft)
        if not reply_due(must_reply, (Ask(self.seqs[sid].k, hit == HIT, self.seqs[sid].params.greedy)
                                      for sid, hit in replies.items())):
            return None
        records = [ReplyPing(recv_posted_ns, recv_done_ns, time.perf_counter_ns(), self._catch_up_ns).record()]
        for sid, hit in replies.items():
            s = self.seqs[sid]
            if hit == HIT and s.params.greedy:  # the verifier took this draft from the table
                continue
            q = s.q if not s.params.greedy else None
            records.append(Record(Rec.DRAFT, sid, s.round, hit, 0 if q is None else len(s.draft),
                                  tokens=list(s.draft), floats=None if q is None else q.reshape(-1)))
        return Frame(Rec.DRAFT, frame.step, records)

    def table_frame(self, step: int) -> Frame:
        """The speculation cache as the verifier needs it: per sequence, its branches' tokens."""
        steps, ns = self._prespec
        # the catch-up prefill is not pre-speculation's cost per round (it comes once, after a
        # prompt or a stretch at K = 0): the verifier's policy must not price every round with it
        records = [TablePing(steps, ns, time.perf_counter_ns(), self._prespec_catch_up_ns).record()]
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

    def _branch_matcher(self, s: DraftSeq, tokens: list[int]) -> tuple[bool, Matcher | None]:
        """A branch's own matcher: the sequence's, forked and advanced through `tokens` (the draft
        prefix and the correction token it starts from). (False, None) when the grammar refuses
        them: the verifier's mask never lets that outcome happen, so the branch is not drafted."""
        if s.matcher is None:
            return True, None
        m = s.matcher.fork()
        return (True, m) if m.advance(tokens) else (False, None)

    def _prefill(self, s: DraftSeq, upto: int) -> None:
        """Feed committed tokens the cache has not seen, up to (not including) index `upto`."""
        step = self.spec.prefill_chunk
        if self.head:   # rows the target's features reach (row r reads the feature at r - 1)
            upto = min(upto, n_real(s) + 1)
        while s.length < upto:
            end = min(upto, s.length + step)
            if self.head:
                self.model.feats = row_features(self.model, s, s.length, end)
            self._forward(torch.tensor([s.tokens[s.length:end]]), torch.arange(s.length, end)[None], [s.slot],
                          last=True)   # only the cache matters here: skip the vocabulary head for all but one row
            s.length = end
            self.cache.advance(s.slot, end)
            self.cache.publish(s.slot, s.tokens, end)

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
        (re)computed, drop it all, so the next catch-up (`_backup`'s prefill, or `_catch_up` in
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

    # -- drafting --------------------------------------------------------------------------
    def _backup(self, seqs: list[DraftSeq]) -> None:
        """Draft for sequences that have no cached draft this round."""
        if not seqs:
            return
        backup = self.spec.backup if self.spec.mode == "ssd" else "jit"
        jit = seqs if backup == "jit" else []
        if backup == "ngram":
            for s in seqs:
                s.draft = propose_ngram(s.tokens, s.k)
                s.q = torch.nn.functional.one_hot(torch.tensor(s.draft, dtype=torch.long, device=self.device),
                                                  self.model.args.vocab_size).float() if s.draft else None
        if jit:
            t0 = time.perf_counter_ns()
            for s in jit:  # tokens committed while at K = 0: a prefill, not drafting cost
                self._prefill(s, len(s.tokens) - 1)
            self._catch_up_ns = time.perf_counter_ns() - t0
            for K, group in self._by_k(jit):
                rows = [(s, s.slot, s.length, s.tokens[-1], None, self._first_feature(s),
                         None if s.matcher is None else s.matcher.fork()) for s in group]
                for (s, *_), (toks, q, dists, hid, length) in zip(rows, self._draft_rows(rows, K)):
                    s.draft, s.q, s.dists, s.hid, s.length = toks, q, dists, hid, length

    @staticmethod
    def _by_k(items, k_of=lambda s: s.k):
        """Group by draft length (one batched draft per K)."""
        groups: dict[int, list] = {}
        for it in items:
            groups.setdefault(k_of(it), []).append(it)
        return sorted(groups.items())

    def _first_feature(self, s: DraftSeq) -> torch.Tensor | None:
        """A draft head's feature for the row after the committed tokens: the target's last."""
        return s.real[len(s.tokens) - 2] if self.head else None

    def _draft_rows(self, rows, K: int) -> list[tuple]:
        """Draft K tokens for each row (seq, slot, start position, first token, depth-fan-out,
        a draft head's feature for the first step, a matcher after the first token or None), one
        batched forward per step; a row with a matcher drafts under its grammar's mask, the
        verifier's. Returns per row
        (tokens, q rows, dists, a head's hidden states, cache length); the rows' q and dists are
        views into one [B, K, V] tensor each (no per-row copies)."""
        B, V, dev = len(rows), self.model.args.vocab_size, self.device
        slots = [r[1] for r in rows]
        pos = torch.tensor([r[2] for r in rows])         # host bookkeeping (the cache's plan)
        cur = torch.tensor([r[3] for r in rows], device=dev)
        toks = torch.empty(B, K, dtype=torch.long, device=dev)   # every step stays on the device
        sampled: dict[int, list[int]] = {}   # sampling sequences' rows; greedy rows take the argmax
        for i, r in enumerate(rows):
            if not r[0].params.greedy:
                sampled.setdefault(r[0].id, []).append(i)
        dists = torch.empty(B, K, V, device=dev)
        qs = torch.empty(B, K, V, device=dev) if sampled else None
        hids = feats = None
        if self.head:   # step 0 reads the given features, each later step the head's last output
            feats = torch.stack([r[5] for r in rows])[:, None]
            hids = torch.empty(B, K, self.model.dim, dtype=self.model.dtype, device=dev)
        matchers = {i: r[6] for i, r in enumerate(rows) if r[6] is not None}
        for step in range(K):
            self.model.feats = feats
            logits = self._forward(cur[:, None], pos[:, None], slots)[:, 0]
            if self.head:
                feats = self.model.hidden
                hids[:, step] = feats[:, 0]
            for i, m in matchers.items():   # (a row whose grammar ended at a drafted stop token: left as is)
                m.mask_rows(logits[i:i + 1], [])
            nxt = logits.argmax(-1)
            dists[:, step] = logits
            for idx in sampled.values():
                s = rows[idx[0]][0]
                p = probs_from_logits(logits[idx], s.params)
                q = p
                if self.spec.saguaro_c < 1.0:
                    # Next round pre-drafts the top-F_step tokens of this very distribution at
                    # depth `step`: those are the ones Saguaro scales by c.
                    q = saguaro_scale(p, self._fan_out(s, K)[step], self.spec.saguaro_c)
                # keyed by the drafted token's position: a branch and a just-in-time draft of the
                # same context draw the same token (actors/spec/sampling.py)
                nxt[idx] = sample(q, uniforms=keyed_uniforms(s.params.seed, (pos[idx] + 1).tolist(), DRAFT))
                dists[idx, step] = p
                qs[idx, step] = q
            toks[:, step] = nxt
            cur, pos = nxt, pos + 1
            if matchers:   # each masked row's matcher takes the token it drafted
                drafted = nxt.tolist()
                for i, m in matchers.items():
                    m.advance([drafted[i]])
        sampled_rows = {i for idx in sampled.values() for i in idx}
        out = []
        for i, (r, t) in enumerate(zip(rows, toks.tolist())):   # the one read back: the drafted tokens
            length = r[2] + K
            self.cache.advance(slots[i], length)
            out.append((t, qs[i] if i in sampled_rows else None, dists[i], None if hids is None else hids[i], length))
        return out

    def _fan_out(self, s: DraftSeq, depth_max: int) -> list[int]:
        if self.spec.fan_out is not None:
            return list(self.spec.fan_out[:depth_max + 1])
        return split_budget(s.budget, s.tracker.odds(depth_max))

    def _catch_up(self, s: DraftSeq) -> None:
        """Feed the cache whatever it lacks of tokens + draft, so every depth has a distribution."""
        full = s.tokens + s.draft
        if s.length >= len(full):
            return
        if self.head:
            t0 = time.perf_counter_ns()
            self._prefill(s, len(s.tokens) - 1)
            self._prespec_catch_up_ns += time.perf_counter_ns() - t0
            catch_up_depths(self.model, self._forward, self.cache, s)
            return
        if s.length < len(s.tokens) - 1:  # rows before depth 0 give no distribution: prefill them in chunks
            t0 = time.perf_counter_ns()
            self._prefill(s, len(s.tokens) - 1)
            self._prespec_catch_up_ns += time.perf_counter_ns() - t0
        new = full[s.length:]
        logits = self._forward(torch.tensor([new]), torch.arange(s.length, len(full))[None], [s.slot])[0]
        first_depth = s.length - (len(s.tokens) - 1)   # the depth of logits[0]
        if first_depth < 0:  # a new prompt: only its last row is a depth (0)
            logits, first_depth = logits[-first_depth:], 0
        ok, m = self._branch_matcher(s, s.draft[:first_depth])
        if m is not None and ok:   # the depths' candidates are the ones the grammar allows
            m.mask_rows(logits, s.draft[first_depth:])
        rows = logits if s.params.greedy else probs_from_logits(logits, s.params)
        s.dists = rows if s.dists is None or first_depth == 0 else torch.cat([s.dists[:first_depth], rows])
        s.length = len(full)
        self.cache.advance(s.slot, s.length)

    def prespeculate(self) -> None:
        """Pre-draft the next round for the likely outcomes of the round being verified."""
        rows, keys = [], []
        self._prespec_catch_up_ns = 0
        depth_rows, dists, drafted, fans = [], [], [], []   # every (sequence, depth) to branch from
        for s in self.seqs.values():
            if s.branches or s.speculated:  # already pre-drafted for this round (a frame that moved nothing on)
                continue
            if s.k == 0:  # speculation off: its cache catches up when a draft is asked for
                continue
            if self.head and n_real(s) < len(s.tokens) - 1:   # a new prompt: its features come with its
                continue                                      # first outcome (its first draft is drafted then)
            s.speculated = True
            self._catch_up(s)
            n, depths = len(s.tokens), len(s.draft)
            fan = self._fan_out(s, depths)
            for j in range(depths + 1):
                if fan[j] > 0:
                    depth_rows.append((s, n, j))
                    dists.append(s.dists[j])
                    drafted.append(s.draft[j] if j < depths else None)
                    fans.append(fan[j])
        # the candidates of every sequence and depth in one topk and one read-back
        for (s, n, j), cands in zip(depth_rows, top_candidates(dists, drafted, fans)):
            for t in cands:
                ok, m = self._branch_matcher(s, s.draft[:j] + [t])
                if not ok:
                    continue
                rows.append((s, self.cache.fork(s.slot, n + j), n + j, t, j, s.hid[j] if self.head else None, m))
                keys.append((s, (j, t)))
        self._prespec = (max((r[0].k for r in rows), default=0), 0)
        if not rows:
            return
        for K, group in self._by_k(list(zip(keys, rows)), k_of=lambda kr: kr[0][0].k):
            for ((s, key), row), (toks, q, dists, _, length) in zip(group, self._draft_rows([r for _, r in group], K)):
                s.branches[key] = Branch(row[1], row[2], length, toks, q, dists)
        self.times.branches += len(rows)
