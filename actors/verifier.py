"""The verifier: owns the target model and the authoritative state of every sequence.

Its loop is the engine's critical path. One step, top to bottom:

  1. apply aborts and take queued requests in (actors/scheduler.py);
  2. exchange with the drafter (with each of them, when there are several: below): send
     ADMIT / OUTCOME (k, t*) / RELEASE records, then prefill the
     admitted prompts (the last logits give the first token). The ADMIT goes out first, so the
     drafter reads the prompt meanwhile and, in SSD mode, pre-drafts for the likely first
     tokens: a prefill is a round with an empty draft and outcome (0, first token). In SSD mode
     the drafter has already sent its speculation table for the round just verified (drafted
     during step 3 of the last round): a greedy outcome found in it is the next draft at once,
     with no round trip (a sampling hit's q rows come in a reply posted ahead, collected after
     the forward). Otherwise (a miss, an admission, sd mode) wait for the DRAFT reply;
  3. verify every sequence's draft in one batched target forward over K+1 positions, apply the
     lossless rule (verify.py), commit the accepted prefix plus t*, roll the KV cache back to it,
     apply stop conditions and stream the new tokens out.

Each round's K per sequence comes from the adaptive policy (actors/spec/adaptive.py), fed here with
what this loop measures: acceptance by position, the verify forward's time by batch tokens, the
drafter's just-in-time drafting and pre-speculation times (from its timestamps), hit rate. The
K travels with the outcome, and a draft from the table is cut to it (a prefix of a draft is a
draft), so both sides always hold the same draft. At K = 0 a sequence verifies no draft and waits
for no reply; its outcomes still go to the drafter, with the next frame that is due anyway (a
round where every sequence is at K = 0 sends none, up to a heartbeat a second); the drafter
feeds the committed tokens to its cache when a draft is asked for again. The policy probes with a
one-token draft now and then, so speculation comes back when it pays.

Several drafters (models.draft.replicas): each sequence belongs to one (actors/scheduler.py picks
it at admission), and the verifier holds one client, with its own channel, per drafter. A step
collects every live drafter's table, has the policy decide the K's once for the whole batch (it
prices the one batched verify), then sends each drafter the frame of its own sequences: per
drafter, exactly the protocol of a single one. The verify stays one forward over all sequences.

Without a drafter (mode `ar`, a request that disabled speculation, or a drafter that died) a
sequence simply has an empty draft, so step 3 is a plain decode step: output stays exact. A dead
drafter's sequences move to the live ones at their re-admission, and new ones go to live ones.
Other threads only touch the queues (submit, abort, poll), never torch or the channel in use; a
rejoining drafter's new channel is formed by a thread of its own and handed to the loop, which
swaps it in between two steps (actors/drafter_client.py).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import torch

from actors.spec.adaptive import Controller
from actors.affinity import check_cpus, pin_this_thread
from actors.model.devtime import DeviceTimer
from actors.protocol.events import Outbox
from actors.protocol.frame import Rec, Record
from actors.model.loader import load_model
from actors.spec.logprobs import token_logprobs
from actors.spec.sampling import TOKEN, keyed_uniforms, probs_from_logits, sample
from actors.engine_spec import EngineSpec
from actors.model.runner import Runner
from actors.scheduler import Scheduler
from actors.sequence import Request, Seq, apply_stops, held_per_drafter
from actors.model.tp.group import TPLead, group_timeout_s
from actors.spec.verify import round_outcomes
from actors.timing import RoundTiming, VerifierTimes
from actors.drafter_client import DrafterClient

log = logging.getLogger(__name__)


def pair_agreement(spec: EngineSpec) -> float | None:
    """The drafter's measured greedy agreement with its target when the pair says so (a demo
    pair's build.json, beside both checkpoints): the adaptive policy's prior acceptance."""
    if spec.draft is None:
        return None
    try:
        pair = Path(spec.draft).parent
        if Path(spec.target).parent != pair:
            return None
        value = json.loads((pair / "build.json").read_text()).get("greedy_agreement")
    except (OSError, ValueError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and 0 < value < 1 else None


class Verifier:
    def __init__(self, spec: EngineSpec):
        check_cpus(spec.target_cpus, "models.target.cpus")
        torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.k = spec.k
        self.device = spec.target_device
        n_tp = spec.tensor_parallel_size   # > 1: this is rank 0 and holds 1/N of every layer (actors/model/tp/)
        self.model = load_model(spec.target, spec.target_dtype, self.device, tp=(0, n_tp))
        self.vocab, self.eos = self.model.args.vocab_size, frozenset(self.model.args.eos_token_ids)
        # Paged KV (actors/kv/): a request is admitted when the blocks for everything it can ever
        # write (prompt + max_new_tokens + K) can be reserved, so it never runs out halfway.
        self._forward = Runner(self.model, spec, "verifier", self.device, spec.target_blocks(), spec.max_batch,
                               spec.target_max_len, prefix=spec.target_prefix_caching)
        self.cache = self._forward.cache
        self.tp = self._forward.tp = TPLead(n_tp, self.device, group_timeout_s(spec.timeout_s, spec.compile),
                                                    self.cache.pool) if n_tp > 1 else None
        self.seqs: dict[int, Seq] = {}
        self.times = VerifierTimes()
        self.events = Outbox()   # committed tokens, to the host's stream or to poll()
        self._stop = threading.Event()
        self.loop_tid: int | None = None           # the OS id of the thread running the loop
        self.policy = Controller(spec.k, spec.mode, spec.max_branches, prior=pair_agreement(spec))
        self.drafters = [DrafterClient(spec, self.device, self.vocab, self.seqs, self.times, self.policy, index=i)
                         for i in range(spec.draft_replicas)]
        self._last_verify_s = 0.0
        self._timer = DeviceTimer(self.device)   # the verify forward's device time
        # a draft head reads the target's features at these layers: each forward also returns
        # them, and they go to the drafter beside each outcome (FEATS records)
        self.aux: tuple[int, ...] = tuple(spec.draft_head_layers or ())
        self.scheduler = Scheduler(spec, self.vocab, self.cache, self.policy, self.events, self.seqs,
                                   readmit=not self.aux, eos=tuple(sorted(self.eos)))

    # -- lifecycle (called by cluster/ or a launcher) ---------------------------------------
    @property
    def drafter(self) -> DrafterClient:
        """The first drafter's client (the only one unless models.draft.replicas > 1)."""
        return self.drafters[0]

    def connect(self, master_addr: str | None = None, master_port: int | None = None, index: int = 0) -> None:
        """Form the data plane with drafter `index` and wait for it: the bring-up, before the loop runs."""
        if not self.spec.speculative:
            return
        self.drafters[index].connect(master_addr or self.spec.master_addr, master_port or self.spec.master_port)

    def reconnect(self, master_addr: str, master_port: int, index: int = 0) -> None:
        """Join a restarted drafter `index` without stopping the loop (any thread may ask): its Channel
        forms in a background thread and the loop swaps it in between two steps (drafter_client.py)."""
        if self.spec.speculative:
            self.drafters[index].join_in_background(master_addr, master_port)

    def join_tp(self, addr: str, port: int) -> None:
        """Form the tensor-parallel group with ranks 1..N-1 (TPWorkers joining on addr:port), before the loop;
        with engine.compile, then compile the bucket shapes on every rank in step (actors/model/runner.py)."""
        self.tp.connect(addr, port, self.model)
        self._forward.precompile()

    def ready(self) -> bool:
        return True

    @property
    def drafter_ok(self) -> bool:
        """Every drafter is on the data plane."""
        return all(c.ok for c in self.drafters)

    def run(self) -> None:
        pin_this_thread(self.spec.target_cpus)
        self.loop_tid = threading.get_native_id()
        try:
            self._calibrate()
            while not self._stop.is_set():
                self.step()
        finally:
            for c in self.drafters:
                c.shutdown()
            if self.tp is not None:
                self.tp.close()
            self.events.close()

    def stop(self) -> None:
        self._stop.set()

    # -- thread-safe API ---------------------------------------------------------------------
    def submit(self, req: Request | dict) -> None:
        self.scheduler.submit(req)

    def abort(self, request_id: int) -> None:
        self.scheduler.abort(request_id)

    def poll(self, timeout: float = 0.1, linger_s: float = 0.0) -> list[dict]:
        """Events since the last poll: new tokens per request, and a final event per request
        (long-poll semantics: events.poll_queue). Empty once a host has opened a stream."""
        return self.events.poll(timeout, linger_s)

    def open_events(self, token: str, local_only: bool = False) -> int:
        """Listen for the host's event stream (events.py), on 127.0.0.1 only when the host is
        on this node; the port to connect to."""
        return self.events.listen(token, "127.0.0.1" if local_only else "")

    def metrics(self) -> dict:
        pool = self.cache.pool
        # (a copy of the sequences: the loop thread admits and finishes meanwhile)
        held = held_per_drafter(list(self.seqs.values()), len(self.drafters))
        # kv_blocks_used: held by sequences; parked prefix-cache blocks are reclaimable, not used
        return {**vars(self.times), "active": len(self.seqs), "waiting": self.scheduler.n_waiting(),
                "drafter_ok": self.drafter_ok, "drafters_ok": [c.ok for c in self.drafters],
                "drafter_seqs": held,
                "mode": self.spec.mode, "adaptive": self.policy.snapshot(),
                "kv_blocks": pool.n_blocks, "kv_blocks_used": pool.n_used,
                "kv_blocks_reserved": self.cache.n_reserved, **(pool.prefix.stats() if pool.prefix else {})}

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> None:
        rt = RoundTiming(time.perf_counter())
        for c in self.drafters:
            if c.rejoin is not None:
                c.take_over()
        records, admitted = self.scheduler.control([c.ok for c in self.drafters])
        self.events.flush()
        rt.control_s = time.perf_counter() - rt.t0
        if not self.seqs and not any(records):
            rt.idle_s = self._idle()
            self._record(rt)
            return
        self._exchange(records)
        for s in admitted:
            rt.prefill_s += self._prefill(s)
        self.events.flush()  # first tokens out before the verify
        # A sequence whose outcome the drafter has not heard yet (just prefilled) waits for its draft.
        ready = [s for s in self.seqs.values() if s.outcome is None]
        if ready:
            rt.ks = [len(s.draft) for s in ready]
            self._verify(ready, rt)
            if self.spec.speculative and not admitted:   # a whole round, no prefill in it
                rt.round_s = time.perf_counter() - rt.t0
        self.events.flush()
        rt.steps = 1
        self._record(rt)

    def _exchange(self, records: list[list[Record]]) -> None:
        """Every live drafter's table first, then one K decision for the whole verify batch, then
        each drafter's frame (`records[i]` and its own sequences' outcomes)."""
        live = [c for c in self.drafters if c.ok]
        for c in live:
            c.take_table(self._last_verify_s)
        live = [c for c in live if c.ok]
        going = [s.req.id for c in live for s in c.going()]
        ks = self.policy.decide(going) if going else {}
        for c in live:
            c.exchange(records[c.index], ks)

    def _record(self, rt: RoundTiming) -> None:
        """One step's clocks, handed over once: to the running sums and to the adaptive policy."""
        rt.add_to(self.times)
        if rt.forward_tokens:
            self._last_verify_s = rt.forward_s   # what the next table was pre-drafted behind
            self.policy.observe_verify(rt.forward_tokens, rt.forward_s)
        if rt.round_s is not None:
            self.policy.observe_round_time(rt.ks, rt.round_s)

    def _calibrate(self, reps: int = 5, context: int = 128) -> None:
        """Time the verify forward at 1 and k + 1 tokens, on this loop's thread and core, before
        the first request: the adaptive policy's cost model then starts from this engine's own
        t_verify line. Without it the first request's rounds taught it one shape at a time, the
        first forward at each shape (allocations, kernel choice) many times slower than the rest,
        and the shapes it then stopped choosing were never measured again."""
        if not (self.spec.speculative and self.spec.adaptive):
            return
        ctx = min(context, self.spec.max_seq_len - self.k - 2)
        if ctx < 1 or not self.cache.can_reserve(ctx + self.k + 1):
            return
        slot = self.cache.alloc(reserve_tokens=ctx + self.k + 1)
        try:
            x = torch.arange(ctx + self.k + 1) % self.vocab
            self._forward(x[None, :ctx], torch.arange(ctx)[None], [slot], last=True)
            self.cache.advance(slot, ctx)
            for i in range(reps + 1):
                for n in (1, self.k + 1):
                    self._timer.start()
                    logits = self._forward(x[None, ctx:ctx + n], torch.arange(ctx, ctx + n)[None], [slot])
                    self._timer.stop()
                    logits[0, -1, :1].cpu()   # waits for the device
                    if i:   # the first of each shape is its warm-up
                        self.policy.observe_verify(n, self._timer.seconds())
        finally:
            self.cache.free(slot)

    def _prefill(self, s: Seq) -> float:
        """Feed the prompt past its cached prefix; its last logits give the first token. Returns
        the seconds it took."""
        t0 = time.perf_counter()
        n, params, step = len(s.req.prompt), s.req.params, self.spec.prefill_chunk
        for a in range(s.cached, n, step):  # in chunks, and only the last row's logits
            b = min(n, a + step)
            logits = self._forward(torch.tensor([s.req.prompt[a:b]]), torch.arange(a, b)[None], [s.slot],
                                   last=True, aux=self.aux)
            if self.aux:
                logits, feats = logits
                if s.on_drafter:
                    s.feats.append((a, feats[0]))
            logits = logits[0, -1]
            self.cache.advance(s.slot, b)
            self.cache.publish(s.slot, s.req.prompt, b)
        s.length = n
        if s.matcher is not None:
            s.matcher.mask_rows(logits[None], [])
        tok = int(logits.argmax()) if params.greedy else int(
            sample(probs_from_logits(logits, params), uniforms=keyed_uniforms(s.seed, [len(s.tokens)], TOKEN)))
        seconds = time.perf_counter() - t0
        s.t_first = time.perf_counter()
        lps = None if s.req.logprobs is None else token_logprobs(logits[None], [tok], s.req.logprobs)
        if s.matcher is not None:
            s.matcher.settle(0, [tok])
        if not self._commit(s, [tok], lps) and s.on_drafter:
            s.outcome = (0, tok)
            s.round += 1
        return seconds

    def _idle(self) -> float:
        """Nothing to do: wait a little for a request, keep the drafter's heartbeat; the seconds it took."""
        t0 = time.perf_counter()
        self.scheduler.wait(0.05)
        for c in self.drafters:
            if c.heartbeat_due():
                c.take_table(self._last_verify_s)
                if c.ok:
                    c.exchange([Record(Rec.PING, 0)], {})
        return time.perf_counter() - t0

    # -- verification ------------------------------------------------------------------------
    def _verify(self, seqs: list[Seq], rt: RoundTiming) -> None:
        t0, c0, q_wait = time.perf_counter(), time.thread_time(), 0.0
        rows = [s.tokens[s.length:] + s.draft for s in seqs]
        T = max(len(r) for r in rows)
        x = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        pos = torch.tensor([list(range(s.length, s.length + T)) for s in seqs])
        self._timer.start()
        logits = self._forward(x, pos, [s.slot for s in seqs], aux=self.aux)
        if self.aux:
            logits, feats = logits
        self._timer.stop()
        waiting = [c for c in self.drafters if c.awaiting_q_rows]
        if waiting:
            tq = time.perf_counter()
            arrived = [c.q_rows_arrived() for c in waiting]
            q_wait = time.perf_counter() - tq   # the drafters' wait, not verification
            if not all(arrived):   # a drafter lost before its q rows came voided its sequences' drafts
                # (off_drafter): commit the target's token only for them
                rows = [r if s.draft else r[:len(s.tokens) - s.length] for r, s in zip(rows, seqs)]
        advanced = self._mask(seqs, logits)
        outcomes = round_outcomes(seqs, rows, logits, self.vocab)
        rt.forward_s = self._timer.seconds()   # the read-back above waited for the forward
        rt.forward_tokens = x.numel()
        t1 = time.perf_counter()
        rt.verify_s = t1 - t0 - q_wait
        rt.verify_cpu_s = time.thread_time() - c0
        rt.rounds = len(seqs)
        for i, (s, (k, t)) in enumerate(zip(seqs, outcomes)):
            n_draft = len(s.draft)
            s.stats.record_round(n_draft, k)
            self.policy.observe_round(s.req.id, n_draft, k)
            new = s.draft[:k] + [t]
            if s.matcher is not None and not s.matcher.settle(advanced[i], new):
                log.error("request %d: the grammar refused token %d, which its mask allowed", s.req.id, t)
            lps = None
            if s.req.logprobs is not None:  # only for requests that asked: the rows that emitted `new`
                at = len(rows[i]) - n_draft - 1   # the last pending token's row scores the first new one
                lps = token_logprobs(logits[i, at:at + k + 1], new, s.req.logprobs)
            if self.aux and s.on_drafter:   # the rows now committed: pending tokens and accepted drafts
                s.feats.append((s.length, feats[i, :len(rows[i]) - n_draft + k]))
            s.length = len(s.tokens) + k
            self.cache.advance(s.slot, s.length)
            self.cache.publish(s.slot, s.tokens + new, s.length)   # before _commit, which may free the slot
            s.draft, s.q, s.last_k = [], None, k
            if not self._commit(s, new, lps) and s.on_drafter:
                s.outcome = (k, t)
                s.round += 1
        rt.control_s += time.perf_counter() - t1

    def _mask(self, seqs: list[Seq], logits: torch.Tensor) -> list[int]:
        """Constrained sequences: mask the rows this round verifies with their grammar, in place
        (row i of a draft after draft[:i]), before the acceptance rule reads them; per sequence
        the draft tokens its matcher advanced through (actors/spec/grammar.py)."""
        advanced = [0] * len(seqs)
        for i, s in enumerate(seqs):
            if s.matcher is not None:
                at = len(s.tokens) - s.length - 1   # the last pending token's row scores the first new one
                advanced[i] = s.matcher.mask_rows(logits[i, at:at + len(s.draft) + 1], s.draft)
        return advanced

    def _commit(self, s: Seq, new: list[int], logprobs: list | None = None) -> bool:
        """Append newly committed tokens (with their logprobs when asked), apply token-level stops,
        stream; True when finished (a grammar that is complete and took its stop token: "stop")."""
        new, reason = apply_stops(s, new, self.eos)
        if reason is None and s.matcher is not None and s.matcher.terminated:
            reason = "stop"
        s.tokens += new
        self.times.tokens += len(new)
        ev = {"id": s.req.id, "tokens": new, "done": False}
        if logprobs is not None:
            ev["logprobs"] = logprobs[:len(new)]   # stops only cut the end
        self.events.put(ev)
        if reason is None:
            return False
        self.scheduler.finish(s, reason)
        return True
