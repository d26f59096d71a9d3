"""The verifier<->drafter protocol, end to end in one process: a real Verifier and a real Drafter
(the tiny pair), the drafter's loop in a thread, the verifier's steps driven by the test, and
between them an in-memory data plane that carries every frame through the wire format (encode,
decode) and checks a posted receive's float count as the channel does. No Ray, no process group:
what is under test is who sends what when (actors/protocol/rounds.py), through a cache hit, a
miss, a stretch at K = 0, sampling and a drafter that is lost and rejoins.
(The channel itself is tests/test_channel.py; the engine on Ray is tests/test_engine.py.)"""
from __future__ import annotations

import collections
import queue
import threading
import time

import pytest

from actors.drafter import Drafter
from actors.engine_spec import EngineSpec
from actors.protocol.frame import INLINE_INTS, ChannelClosed, Frame, ProtocolError, Rec, decode, encode
from actors.sequence import Request
from actors.spec.sampling import SamplingParams
from actors.verifier import Verifier
from tests.conftest import HF_NEW, assert_matches_or_near_tie

pytestmark = pytest.mark.timeout(300)


class MemoryPlane:
    """Both ends of an in-memory data plane; closing either end closes both."""

    def __init__(self, timeout_s: float = 30.0):
        self.closed = threading.Event()
        to_drafter, to_verifier = queue.Queue(), queue.Queue()
        self.verifier = MemoryEnd(self, to_verifier, to_drafter, timeout_s)
        self.drafter = MemoryEnd(self, to_drafter, to_verifier, timeout_s)


class MemoryEnd:
    def __init__(self, plane: MemoryPlane, inbox: queue.Queue, outbox: queue.Queue, timeout_s: float):
        self.plane, self._in, self._out, self.timeout_s = plane, inbox, outbox, timeout_s
        self._posted: collections.deque[int] = collections.deque()
        self.sent: list[Frame] = []
        self.floats_posted = 0   # receives posted with their float payload (q rows due during a forward)

    def connect(self) -> MemoryEnd:
        return self

    def close(self) -> None:
        self.plane.closed.set()

    @property
    def posted(self) -> int:
        return len(self._posted)

    def send(self, frame: Frame) -> None:
        if self.plane.closed.is_set():
            raise ChannelClosed("send: the data plane is closed")
        header, ints, floats = encode(frame)
        self._out.put((header.clone(), None if ints is None else ints.clone(),
                       None if floats is None else floats.clone()))
        self.sent.append(frame)

    def post_recv(self, n_floats: int = 0) -> None:
        if self.plane.closed.is_set():
            raise ChannelClosed("recv: the data plane is closed")
        self._posted.append(n_floats)
        self.floats_posted += bool(n_floats)

    def recv(self) -> Frame:
        n_floats = self._posted.popleft() if self._posted else 0
        end = time.monotonic() + self.timeout_s
        while True:
            try:   # what was sent before a close is still delivered
                header, ints, floats = self._in.get(timeout=0.02)
                break
            except queue.Empty:
                if self.plane.closed.is_set() or time.monotonic() > end:
                    raise ChannelClosed("recv: the peer is gone") from None
        h = header.tolist()
        if n_floats and (h[4] > INLINE_INTS or h[5] != n_floats):
            raise ProtocolError(f"posted {n_floats} floats for a frame of {h[4]} ints and {h[5]} floats")
        return decode(header, ints, floats)


def _spec(tiny_pair, **kw) -> EngineSpec:
    return EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"),
                      **{"mode": "ssd", "k": 4, "adaptive": False, "max_batch": 4, "max_seq_len": 256, **kw})


def start_drafter(spec: EngineSpec, errors: list[BaseException]):
    """A Drafter on a new MemoryPlane, its loop in a thread: (plane, drafter, thread)."""
    plane, d = MemoryPlane(), Drafter(spec)
    d.channel = plane.drafter

    def run():
        try:
            d.run()
        except ChannelClosed:   # lost on purpose
            pass
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="test-drafter", daemon=True)
    t.start()
    return plane, d, t


def serve(v: Verifier, reqs: list[Request], on_step=None, max_steps: int = 20000):
    """Submit every request, step the verifier until all are done; tokens and final events."""
    for r in reqs:
        v.submit(r)
    out, finals = {r.id: [] for r in reqs}, {}
    for _ in range(max_steps):
        v.step()
        for e in v.poll(timeout=0):
            out[e["id"]] += e["tokens"]
            if e["done"]:
                finals[e["id"]] = e
        if on_step is not None:
            on_step()
        if len(finals) == len(reqs):
            return [out[r.id] for r in reqs], [finals[r.id] for r in reqs]
    raise AssertionError(f"{len(finals)} of {len(reqs)} requests done after {max_steps} steps")


class Pair:
    """A verifier joined to a drafter over a MemoryPlane; `lose` and `rejoin` swap drafters."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.v = Verifier(spec)
        self.errors: list[BaseException] = []
        self.plane, self.d, self._thread = start_drafter(spec, self.errors)
        self.v.drafter._form_channel = lambda addr, port: self.plane.verifier.connect()
        self.v.connect()

    def lose(self) -> None:
        self.plane.drafter.close()
        self._thread.join(10)

    def rejoin(self) -> None:
        self.plane, self.d, self._thread = start_drafter(self.spec, self.errors)
        self.v.reconnect("127.0.0.1", 0)

    def serve(self, reqs: list[Request], on_step=None, max_steps: int = 20000):
        return serve(self.v, reqs, on_step, max_steps)

    def close(self) -> None:
        self.v.drafter.shutdown()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the drafter did not stop on SHUTDOWN"
        assert not self.errors, self.errors


@pytest.fixture
def pair(tiny_pair):
    pairs = []

    def make(**kw) -> Pair:
        pairs.append(Pair(_spec(tiny_pair, **kw)))
        return pairs[-1]

    yield make
    for p in pairs:
        p.close()


def _exact(hf_refs, prompts, outs) -> None:
    hf, refs = hf_refs
    for p, o, r in zip(prompts, outs, refs):
        assert_matches_or_near_tie(hf, p, o, r)


def test_hits_and_misses_stay_exact_and_greedy_hits_need_no_reply(pair, hf_refs, held_out_prompts):
    p = pair()
    prompts = held_out_prompts[:2]
    outs, finals = p.serve([Request(i, list(q), HF_NEW) for i, q in enumerate(prompts)])
    _exact(hf_refs, prompts, outs)
    hits = sum(f["stats"]["cache_hits"] for f in finals)
    misses = sum(f["stats"]["cache_misses"] for f in finals)
    assert hits > 0 and misses > 0, (hits, misses)
    # every frame the verifier sent was answered as the rules say: a table for each that asked
    # for drafts, a reply for each PING or miss; rounds of greedy hits only went unanswered
    assert p.d.times.replies < p.d.times.frames
    tables = [f for f in p.plane.drafter.sent if f.kind == Rec.TABLE]
    assert tables and all(f.records[0].kind == Rec.PING for f in tables)


def test_outcomes_at_k0_wait_for_the_next_frame_that_is_due(pair, hf_refs, held_out_prompts):
    """Rounds 3..8 at K = 0: the verifier sends nothing (no reply or table is due), then the
    held outcomes go out with the next frame and the drafter drafts from the right tokens."""
    p = pair()
    v = p.v
    rounds = collections.Counter()
    held_frames = []

    def decide(sids):
        for sid in sids:
            rounds[sid] += 1
        return {sid: 0 if 3 <= rounds[sid] <= 8 else v.k for sid in sids}

    v.policy.decide = decide

    def watch():
        if 3 <= rounds[0] <= 8:
            held_frames.append(len(p.plane.verifier.sent))

    prompt = held_out_prompts[2]
    outs, finals = p.serve([Request(0, list(prompt), HF_NEW)], on_step=watch)
    hf, refs = hf_refs
    assert_matches_or_near_tie(hf, prompt, outs[0], refs[2])
    assert held_frames and held_frames[0] == held_frames[-1], held_frames   # no frame during the stretch
    assert finals[0]["stats"]["rounds_off"] == 6
    # the frame after the stretch carried the held outcomes: several OUTCOMEs of one sequence
    assert any(sum(r.kind == Rec.OUTCOME and r.seq == 0 for r in f.records) > 1 for f in p.plane.verifier.sent)


def test_sampling_sends_q_rows_and_a_seed_reproduces_its_tokens(pair, held_out_prompts):
    p = pair()
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    prompt = list(held_out_prompts[3])
    outs, finals = p.serve([Request(0, prompt, 48, params)])
    again, _ = p.serve([Request(1, prompt, 48, params)])
    assert outs == again and len(outs[0]) == 48
    assert finals[0]["stats"]["drafts"] > 0 and finals[0]["stats"]["cache_hits"] > 0
    assert p.plane.verifier.floats_posted > 0   # sampling hits whose q rows landed during the forward
    # sampling drafts travel with their q rows: DRAFT records with floats, some of them in a
    # reply the verifier posted for before its forward
    drafts = [r for f in p.plane.drafter.sent if f.kind == Rec.DRAFT for r in f.records if r.kind == Rec.DRAFT]
    assert drafts and all(r.b == len(r.tokens) and r.floats is not None for r in drafts)


def test_a_lost_drafter_and_a_rejoin_keep_the_stream_exact(pair, hf_refs, held_out_prompts):
    p = pair()
    v = p.v
    state = {"lost": False, "rejoined": False, "drafts_at_rejoin": 0}

    def fault():
        s = v.seqs.get(0)
        if s is None:
            return
        if not state["lost"] and len(s.tokens) - len(s.req.prompt) >= 12:
            p.lose()
            state["lost"] = True
        elif state["lost"] and not v.drafter_ok and not state["rejoined"] and len(s.tokens) - len(s.req.prompt) >= 24:
            assert s.draft == [] and not s.on_drafter   # decoding alone meanwhile
            state["drafts_at_rejoin"] = s.stats.drafts
            p.rejoin()
            state["rejoined"] = True

    prompt = held_out_prompts[4]
    outs, finals = p.serve([Request(0, list(prompt), HF_NEW)], on_step=fault)
    hf, refs = hf_refs
    assert_matches_or_near_tie(hf, prompt, outs[0], refs[4])
    assert state["rejoined"] and v.drafter_ok
    assert finals[0]["stats"]["drafts"] > state["drafts_at_rejoin"], "speculation did not resume"
    assert any(r.kind == Rec.ADMIT and r.seq == 0 for f in p.plane.verifier.sent for r in f.records)
