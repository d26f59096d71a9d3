"""The coordinator: per-request state between clients and the engine.

It assigns engine ids, bounds the queue, turns committed token ids into text deltas, applies
stop strings (token-level stops are applied by the verifier, which sees them first), enforces
deadlines, and fans engine events out to one queue per request. One poller thread long-polls
the verifier for committed tokens; everything else is plain method calls, so the gRPC server,
the CLI and the benchmarks all drive the engine the same way.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from actors.spec.grammar import GrammarSpec
from actors.spec.sampling import SamplingParams
from actors.spec.stats import SpecStats
from actors.model.tokenizer import Tokenizer
from actors.engine_api import Engine
from actors.sequence import Request
from cluster.serving.textstream import TextStream

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests in flight than the server is configured to hold."""


class EngineUnavailable(RuntimeError):
    """The engine is down, draining, or lost the request."""


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    # With GenerateArgs.logprobs: one (logprob, [(id, logprob), ...top n]) per token id
    # (actors/spec/logprobs.py); None otherwise.
    logprobs: list | None = None


@dataclass
class Final:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: SpecStats
    ttft_s: float
    total_s: float
    text: str = ""
    error: str | None = None
    cached_tokens: int = 0   # prompt tokens the verifier's prefix cache held (their prefill skipped)


@dataclass
class GenerateArgs:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    speculate: bool = True
    ignore_eos: bool = False
    deadline_s: float | None = None      # seconds from submission
    request_id: str = ""
    k: int | None = None                 # the request's own K (0 = off); None: the engine's policy
    logprobs: int | None = None          # None: no logprobs; n: each token's logprob and the top n
    grammar: GrammarSpec | None = None   # structured outputs: the output matches it (actors/spec/grammar.py)


class Handle:
    """One request in flight: iterate it for Chunk objects, ending with one Final."""

    def __init__(self, coord: Coordinator, eid: int, args: GenerateArgs, tok: Tokenizer | None, events=None):
        self.coord, self.eid, self.args = coord, eid, args
        self.request_id = args.request_id or f"req-{eid}"
        # Anything with put(): a queue.Queue for threads (iterate the handle), or an asyncio bridge.
        self.events = events if events is not None else queue.Queue()
        self.stream = TextStream(tok, args.stop)
        self.text = ""                 # what the client got, stop strings cut off
        self.tokens: list[int] = []    # the tokens the client got (what usage counts)
        self.lp_pending: list = []     # logprobs of tokens the text stream still holds back
        self.t_submit = time.perf_counter()
        self.deadline = self.t_submit + args.deadline_s if args.deadline_s else None
        self.done = False
        self.sent = False              # a chunk reached the client: the request can no longer move
        self.replica = 0               # which engine replica serves it (cluster/serving/replicas.py)
        # Held while the request's events are dispatched and while a lost replica decides whether
        # to move it, so a late chunk from the lost replica never follows the move.
        self.lock = threading.Lock()

    def __iter__(self):
        while True:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())
            try:
                item = self.events.get(timeout=timeout)
            except queue.Empty:
                self.coord.abort(self.eid, reason="deadline")
                continue
            yield item
            if isinstance(item, Final):
                return

    def cancel(self) -> None:
        self.coord.abort(self.eid)

    def result(self) -> Final:
        """Block until the end; returns the Final with the full text."""
        final = None
        for item in self:
            final = item if isinstance(item, Final) else final
        final.text = self.text
        return final


class Coordinator:
    def __init__(self, engine: Engine, tokenizer: Tokenizer | None = None, max_queue: int = 64,
                 stream_interval_s: float = 0.02):
        self.engine = engine
        self.tok = tokenizer
        self.max_queue = max_queue
        # A poll lingers this long after its first event, so tokens reach clients in chunks of
        # ~stream_interval_s (fewer, larger messages); a request's final event returns at once.
        self.stream_interval_s = stream_interval_s
        self.handles: dict[int, Handle] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._abort_reasons: dict[int, str] = {}
        self.draining = False
        self.error: str | None = None
        # When the engine is lost: on_lost(handle) -> True if it moved the request elsewhere (only
        # asked for requests that have not streamed); else the request ends with an error.
        self.on_lost = None
        self._poller = threading.Thread(target=self._poll_loop, name="outrider-poller", daemon=True)
        self._poller.start()

    # -- requests ------------------------------------------------------------------------------
    def submit(self, args: GenerateArgs, events=None) -> Handle:
        """Start a request. Its Chunk and Final objects go to `events.put` (default: a queue the
        returned handle iterates)."""
        if self.draining or self._stop.is_set():
            raise EngineUnavailable("the server is draining and takes no new requests")
        if self.error:
            raise EngineUnavailable(f"the engine is down: {self.error}")
        with self._lock:
            if len(self.handles) >= self.max_queue:
                raise QueueFull(f"{len(self.handles)} requests in flight (server.max_queue={self.max_queue})")
            eid = next(self._ids)
            h = Handle(self, eid, args, self.tok, events)
            self.handles[eid] = h
        try:
            self.engine.submit(Request(eid, list(args.prompt_ids), args.max_new_tokens, args.params,
                                       tuple(args.stop_token_ids), args.speculate, args.ignore_eos, args.k,
                                       logprobs=args.logprobs, grammar=args.grammar))
        except Exception:
            with self._lock:
                self.handles.pop(eid, None)
            raise
        return h

    def adopt(self, h: Handle) -> None:
        """Take over a request another coordinator's engine lost before it streamed anything:
        same handle (the client keeps reading the same events), a new id on this engine."""
        if self.draining or self._stop.is_set() or self.error:
            raise EngineUnavailable(self.error or "the replica is draining")
        with self._lock:
            if len(self.handles) >= self.max_queue:
                raise QueueFull(f"{len(self.handles)} requests in flight (server.max_queue={self.max_queue})")
            eid = next(self._ids)
            self.handles[eid] = h
        h.coord, h.eid, h.stream, h.lp_pending = self, eid, TextStream(self.tok, h.args.stop), []
        a = h.args
        try:
            self.engine.submit(Request(eid, list(a.prompt_ids), a.max_new_tokens, a.params, tuple(a.stop_token_ids),
                                       a.speculate, a.ignore_eos, a.k, logprobs=a.logprobs, grammar=a.grammar))
        except Exception:
            with self._lock:
                self.handles.pop(eid, None)
            raise

    def generate(self, args: GenerateArgs) -> Final:
        return self.submit(args).result()

    def abort(self, eid: int, reason: str = "abort") -> bool:
        with self._lock:
            if eid not in self.handles:
                return False
            self._abort_reasons.setdefault(eid, reason)
        self.engine.abort(eid)
        return True

    def find(self, request_id: str) -> Handle | None:
        with self._lock:
            return next((h for h in self.handles.values() if h.request_id == request_id), None)

    @property
    def in_flight(self) -> int:
        return len(self.handles)

    def stop(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)

    def replace_engine(self, engine) -> None:
        """Swap in a rebuilt engine; requests are accepted again."""
        self.engine = engine
        self.error = None

    def fail_all(self, message: str) -> None:
        """The engine died: end every open stream with an error (nothing hangs)."""
        self.error = message
        with self._lock:
            handles, self.handles = list(self.handles.values()), {}
            self._abort_reasons.clear()
        for h in handles:
            with h.lock:
                if h.coord is not self or h.done:
                    continue
                if not h.sent and self.on_lost is not None:
                    try:
                        if self.on_lost(h):
                            continue
                    except Exception as e:  # moving it failed: it ends with the error below
                        log.warning("could not move request %s: %s", h.request_id, e)
                h.done = True
                h.events.put(Final("error", len(h.args.prompt_ids), len(h.tokens), SpecStats(), 0.0,
                                   time.perf_counter() - h.t_submit, error=message))

    # -- events --------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self.engine.poll(0.05, self.stream_interval_s)
            except Exception as e:  # engine gone: fail open requests, keep polling for recovery
                if not self._stop.is_set():
                    if self.error is None:
                        log.error("engine poll failed: %s", e)
                    self.fail_all(f"engine unavailable: {type(e).__name__}")
                    time.sleep(0.2)
                continue
            for ev in events:
                self._dispatch(ev)
            self._check_deadlines()

    def _check_deadlines(self) -> None:
        now = time.perf_counter()
        with self._lock:
            late = [h.eid for h in self.handles.values() if h.deadline and now > h.deadline]
        for eid in late:
            self.abort(eid, reason="deadline")

    def _dispatch(self, ev: dict) -> None:
        with self._lock:
            h = self.handles.get(ev["id"])
        if h is None:
            return
        with h.lock:
            if h.coord is self and h.eid == ev["id"] and not h.done:
                self._dispatch_to(h, ev)

    def _dispatch_to(self, h: Handle, ev: dict) -> None:
        if ev["tokens"] and not h.stream.stopped:
            if h.args.logprobs is not None:
                h.lp_pending += ev.get("logprobs") or []
            self._emit(h, h.stream.push(ev["tokens"]))
            if h.stream.stopped:
                self.abort(h.eid, reason="stop")
        if ev["done"]:
            self._emit(h, h.stream.flush())
            with self._lock:
                self.handles.pop(h.eid, None)
                reason = self._abort_reasons.pop(h.eid, None)
            finish = ev["reason"]
            if h.stream.stopped:
                finish = "stop"
            elif reason is not None and finish == "abort":
                finish = reason
            h.done = True
            h.events.put(Final(finish, ev.get("prompt_tokens", len(h.args.prompt_ids)), len(h.tokens),
                               SpecStats.from_dict(ev["stats"]) if ev.get("stats") else SpecStats(),
                               ev.get("ttft_s", 0.0), ev.get("total_s", 0.0),
                               cached_tokens=ev.get("cached_tokens", 0)))

    @staticmethod
    def _emit(h: Handle, piece) -> None:
        if piece.token_ids or piece.text:
            h.sent = True
            h.tokens += piece.token_ids
            h.text += piece.text
            lps = None
            if h.args.logprobs is not None:  # the text stream releases tokens in order: theirs come first
                n = len(piece.token_ids)
                lps, h.lp_pending = h.lp_pending[:n], h.lp_pending[n:]
            h.events.put(Chunk(piece.token_ids, piece.text, lps))
