"""The drafter's forwards: feeding committed tokens (prefill), drafting K tokens for a batch of
rows, and the two callers of that batch: the backup for sequences without a cached draft
(`jit`, `ngram`) and pre-speculation, which drafts the SSD branches for the likely outcomes
of the round being verified (actors/drafter.py's step 4).

The Drafter owns one and keeps the sequences; this object keeps the model, its runner and
cache, and the costs the next PING reports."""
from __future__ import annotations

import time

import torch

from actors.draft_state import Branch, DrafterTimes, DraftSeq
from actors.eagle.drafting import catch_up_depths, n_real, row_features
from actors.engine_spec import EngineSpec
from actors.model.runner import Runner
from actors.spec.fanout import split_budget, top_candidates
from actors.spec.grammar import Matcher
from actors.spec.ngram import propose_ngram
from actors.spec.sampling import DRAFT, keyed_uniforms, probs_from_logits, saguaro_scale, sample


class Drafting:
    def __init__(self, spec: EngineSpec, model, forward: Runner, times: DrafterTimes, head: bool):
        self.spec = spec
        self.model = model
        self.device = spec.draft_device
        self.head = head                 # a draft head on the target's features (actors/eagle/)
        self._forward = forward
        self.cache = forward.cache
        self.times = times
        self.prespec_steps = 0           # the last pre-speculation's draft steps, for the table's PING
        self.prespec_ns = 0              # and its time (set by the loop, which times the whole)
        self.prespec_catch_up_ns = 0     # of which a prefill of tokens committed at K = 0 or a new prompt

    def prefill(self, s: DraftSeq, upto: int) -> None:
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

    # -- just in time ----------------------------------------------------------------------
    def backup(self, seqs: list[DraftSeq]) -> int:
        """Draft for sequences that have no cached draft this round. Returns the ns spent on
        the catch-up prefill before just-in-time drafts (the reply's PING reports it)."""
        if not seqs:
            return 0
        catch_up_ns = 0
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
                self.prefill(s, len(s.tokens) - 1)
            catch_up_ns = time.perf_counter_ns() - t0
            for K, group in _by_k(jit):
                rows = [(s, s.slot, s.length, s.tokens[-1], None, self._first_feature(s),
                         None if s.matcher is None else s.matcher.fork()) for s in group]
                for (s, *_), (toks, q, dists, hid, length) in zip(rows, self._draft_rows(rows, K)):
                    s.draft, s.q, s.dists, s.hid, s.length = toks, q, dists, hid, length
        return catch_up_ns

    def _first_feature(self, s: DraftSeq) -> torch.Tensor | None:
        """A draft head's feature for the row after the committed tokens: the target's last."""
        return s.real[len(s.tokens) - 2] if self.head else None

    # -- one batch of rows -----------------------------------------------------------------
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


    # -- pre-speculation (SSD) -------------------------------------------------------------
    def _catch_up(self, s: DraftSeq) -> None:
        """Feed the cache whatever it lacks of tokens + draft, so every depth has a distribution."""
        full = s.tokens + s.draft
        if s.length >= len(full):
            return
        if self.head:
            t0 = time.perf_counter_ns()
            self.prefill(s, len(s.tokens) - 1)
            self.prespec_catch_up_ns += time.perf_counter_ns() - t0
            catch_up_depths(self.model, self._forward, self.cache, s)
            return
        if s.length < len(s.tokens) - 1:  # rows before depth 0 give no distribution: prefill them in chunks
            t0 = time.perf_counter_ns()
            self.prefill(s, len(s.tokens) - 1)
            self.prespec_catch_up_ns += time.perf_counter_ns() - t0
        new = full[s.length:]
        logits = self._forward(torch.tensor([new]), torch.arange(s.length, len(full))[None], [s.slot])[0]
        first_depth = s.length - (len(s.tokens) - 1)   # the depth of logits[0]
        if first_depth < 0:  # a new prompt: only its last row is a depth (0)
            logits, first_depth = logits[-first_depth:], 0
        ok, m = branch_matcher(s, s.draft[:first_depth])
        if m is not None and ok:   # the depths' candidates are the ones the grammar allows
            m.mask_rows(logits, s.draft[first_depth:])
        rows = logits if s.params.greedy else probs_from_logits(logits, s.params)
        s.dists = rows if s.dists is None or first_depth == 0 else torch.cat([s.dists[:first_depth], rows])
        s.length = len(full)
        self.cache.advance(s.slot, s.length)

    def prespeculate(self, seqs) -> None:
        """Pre-draft the next round for the likely outcomes of the round being verified."""
        rows, keys = [], []
        self.prespec_catch_up_ns = 0
        depth_rows, dists, drafted, fans = [], [], [], []   # every (sequence, depth) to branch from
        for s in seqs:
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
                ok, m = branch_matcher(s, s.draft[:j] + [t])
                if not ok:
                    continue
                rows.append((s, self.cache.fork(s.slot, n + j), n + j, t, j, s.hid[j] if self.head else None, m))
                keys.append((s, (j, t)))
        self.prespec_steps, self.prespec_ns = max((r[0].k for r in rows), default=0), 0
        if not rows:
            return
        for K, group in _by_k(list(zip(keys, rows)), k_of=lambda kr: kr[0][0].k):
            for ((s, key), row), (toks, q, dists, _, length) in zip(group, self._draft_rows([r for _, r in group], K)):
                s.branches[key] = Branch(row[1], row[2], length, toks, q, dists)
        self.times.branches += len(rows)


def branch_matcher(s: DraftSeq, tokens: list[int]) -> tuple[bool, Matcher | None]:
    """A branch's own matcher: the sequence's, forked and advanced through `tokens` (the draft
    prefix and the correction token it starts from). (False, None) when the grammar refuses
    them: the verifier's mask never lets that outcome happen, so the branch is not drafted."""
    if s.matcher is None:
        return True, None
    m = s.matcher.fork()
    return (True, m) if m.advance(tokens) else (False, None)


def _by_k(items, k_of=lambda s: s.k):
    """Group by draft length (one batched draft per K)."""
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(k_of(it), []).append(it)
    return sorted(groups.items())
