"""Several drafters per verifier (models.draft.replicas): each sequence belongs to one drafter,
the verify stays one batched forward, a lost drafter's sequences go on exactly.

In one process first (a real Verifier and two real Drafters over in-memory data planes, as in
tests/test_protocol.py), then served on a real Ray cluster with a real gloo data plane per
drafter, one of them SIGKILLed mid-load; then the config's checks."""
from __future__ import annotations

import os
import signal

import pytest

from actors.engine_spec import EngineSpec
from actors.protocol.frame import Rec
from actors.sequence import Request
from actors.spec.sampling import SamplingParams
from actors.verifier import Verifier
from cluster.config import ConfigError, parse_config
from tests.conftest import HF_NEW, assert_matches_or_near_tie, wait_for
from tests.test_faults import _run_streams
from tests.test_protocol import serve, start_drafter

pytestmark = pytest.mark.timeout(300)
NEW = 160   # of the AR_NEW tokens `ar_refs` holds


class Drafters:
    """A verifier joined to M drafters, each over a MemoryPlane of its own, each loop in a thread."""

    def __init__(self, spec: EngineSpec):
        self.spec, self.v = spec, Verifier(spec)
        self.errors: list[BaseException] = []
        self.ends = [self._start_drafter(i) for i in range(spec.draft_replicas)]
        for i, c in enumerate(self.v.drafters):
            c._form_channel = lambda addr, port, i=i: self.ends[i][0].verifier.connect()
            self.v.connect(index=i)

    def _start_drafter(self, i: int):
        return start_drafter(self.spec.for_drafter(i), self.errors)

    def lose(self, i: int) -> None:
        plane, _, thread = self.ends[i]
        plane.drafter.close()
        thread.join(10)

    def rejoin(self, i: int) -> None:
        self.ends[i] = self._start_drafter(i)
        self.v.reconnect("127.0.0.1", 0, index=i)

    def admitted(self, i: int) -> list[int]:
        """The sequences drafter i was sent ADMITs for, in order."""
        return [r.seq for f in self.ends[i][0].verifier.sent for r in f.records if r.kind == Rec.ADMIT]

    def serve(self, reqs: list[Request], on_step=None):
        return serve(self.v, reqs, on_step)

    def close(self) -> None:
        for c in self.v.drafters:
            c.shutdown()
        for _, _, t in self.ends:
            t.join(10)
            assert not t.is_alive(), "a drafter did not stop on SHUTDOWN"
        assert not self.errors, self.errors


@pytest.fixture
def drafters(tiny_pair):
    made = []

    def make(**kw) -> Drafters:
        made.append(Drafters(EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"),
                                        **{"mode": "ssd", "k": 4, "adaptive": False, "max_batch": 4,
                                           "max_seq_len": 256, "draft_replicas": 2, **kw})))
        return made[-1]

    yield make
    for d in made:
        d.close()


def _exact(hf_refs, prompts, outs, idx) -> None:
    hf, refs = hf_refs
    for p, o, i in zip(prompts, outs, idx):
        assert_matches_or_near_tie(hf, p, o, refs[i])


def test_two_drafters_share_the_batch_and_the_policy_decides_once(drafters, hf_refs, held_out_prompts):
    p = drafters()
    decided: list[list[int]] = []
    decide = p.v.policy.decide
    p.v.policy.decide = lambda sids: decided.append(list(sids)) or decide(sids)
    prompts = held_out_prompts[:4]
    outs, finals = p.serve([Request(i, list(q), HF_NEW) for i, q in enumerate(prompts)])
    _exact(hf_refs, prompts, outs, range(4))
    # admitted in turn to the drafter holding fewer (ties: the lower index)
    assert p.admitted(0) == [0, 2] and p.admitted(1) == [1, 3]
    for _, d, _ in p.ends:
        assert d.times.frames > 0 and d.times.branches > 0
    # both drafters' sequences were decided together, for the one batched verify
    assert any({0, 1} <= set(s) for s in decided)
    assert all(f["stats"]["cache_hits"] > 0 for f in finals)


def test_sampling_q_rows_come_from_each_drafter_and_a_seed_reproduces(drafters, held_out_prompts):
    p = drafters()
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=1234 + i) for i in range(2)]
    prompts = [list(q) for q in held_out_prompts[3:5]]
    outs, finals = p.serve([Request(i, prompts[i], 48, params[i]) for i in range(2)])
    again, _ = p.serve([Request(2 + i, prompts[i], 48, params[i]) for i in range(2)])
    assert outs == again and all(len(o) == 48 for o in outs)
    assert p.admitted(0) == [0, 2] and p.admitted(1) == [1, 3]
    for plane, _, _ in p.ends:   # each drafter's sampling drafts came with their q rows
        drafts = [r for f in plane.drafter.sent if f.kind == Rec.DRAFT for r in f.records if r.kind == Rec.DRAFT]
        assert drafts and all(r.b == len(r.tokens) and r.floats is not None for r in drafts)
    assert all(f["stats"]["cache_hits"] > 0 for f in finals)


def test_a_lost_drafter_leaves_its_sequences_to_the_other_and_rejoins(drafters, hf_refs, held_out_prompts):
    p = drafters()
    v = p.v
    state = {"lost": False, "rejoined": False}

    def fault():
        s = v.seqs.get(1)
        if s is None:
            return
        if not state["lost"] and s.n_generated >= 12:
            p.lose(1)
            state["lost"] = True
        elif state["lost"] and not state["rejoined"] and s.drafter == 0 and s.n_generated >= 40:
            p.rejoin(1)
            state["rejoined"] = True

    prompts = held_out_prompts[:2]
    outs, finals = p.serve([Request(i, list(q), HF_NEW) for i, q in enumerate(prompts)], on_step=fault)
    _exact(hf_refs, prompts, outs, range(2))
    assert state["rejoined"]
    assert 1 in p.admitted(0), "the lost drafter's sequence did not move to the live one"
    assert v.drafters[0].ok and finals[0]["stats"]["cache_hits"] > 0
    wait_for(lambda: (v.step(), v.drafter_ok)[1], 30, "drafter 1 rejoined")
    # the rejoined drafter serves new requests: of two, the second (a tie goes to drafter 0)
    outs, finals = p.serve([Request(i, list(held_out_prompts[i]), HF_NEW) for i in (7, 8)])
    _exact(hf_refs, [held_out_prompts[7], held_out_prompts[8]], outs, [7, 8])
    assert p.admitted(1) == [8] and finals[1]["stats"]["cache_hits"] > 0


# -- on Ray, served ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(serve_tiny):
    # a verifier and two drafters: three CPUs of the test cluster's four
    server, client = serve_tiny({"metrics.enabled": False, "models.draft.replicas": 2, "cluster.num_cpus": 4})
    yield server, client
    client.close()
    server.stop(grace_s=1)


def _exact_all(results: dict, refs: list) -> None:
    for i, ref in enumerate(refs):
        ids, final = results[i]   # an RpcError here fails the test: nothing may be lost
        assert final.finish_reason == "length" and ids == ref[:NEW], f"stream {i} differs from plain decoding"


def _streams(client, prompts) -> dict:
    results: dict = {}
    for t in _run_streams(client, prompts, results, NEW):
        t.join(180)
    return results


def test_ray_two_drafters_stay_exact_and_both_serve(served, ar_refs, held_out_prompts):
    server, client = served
    before = server.engine.metrics()["drafters"]
    _exact_all(_streams(client, held_out_prompts[:6]), ar_refs)
    m = server.engine.metrics()
    assert m["drafters_ok"] == [True, True]
    for b, a in zip(before, m["drafters"]):
        assert a["frames"] > b["frames"] and a["branches"] > b["branches"], (before, m["drafters"])


def test_ray_a_killed_drafter_is_restarted_and_the_other_keeps_speculating(served, ar_refs, held_out_prompts):
    server, client = served
    engine, sup = server.engine, server.supervisor
    old_pid, restarts = engine.drafter_pid(1), sup.drafter_restarts
    tokens, frames0 = engine.metrics()["tokens"], engine.metrics()["drafters"][0]["frames"]
    results: dict = {}
    threads = _run_streams(client, held_out_prompts[:6], results, NEW)
    wait_for(lambda: engine.metrics()["tokens"] > tokens + 50, what="streaming")
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(180)
    _exact_all(results, ar_refs)
    m = engine.metrics()
    assert m["drafters"][0]["frames"] > frames0 and m["drafters_ok"][0]
    wait_for(lambda: sup.drafter_restarts > restarts and engine.metrics()["drafters_ok"] == [True, True],
             120, "drafter 1 restarted and rejoined")
    assert engine.drafter_pid(1) != old_pid
    frames1 = engine.metrics()["drafters"][1]["frames"]
    _exact_all(_streams(client, held_out_prompts[:6]), ar_refs)
    assert engine.metrics()["drafters"][1]["frames"] > frames1, "the restarted drafter served nothing"


# -- config ---------------------------------------------------------------------------------------

def _cfg(draft: dict, **sections) -> dict:
    return {**sections, "models": {"target": {"path": "t"}, "draft": {"path": "d", **draft}}}


@pytest.mark.parametrize("draft, sections, match", [
    ({"replicas": 0}, {}, r"models\.draft\.replicas: .*greater than or equal to 1"),
    ({"replicas": "two"}, {}, r"models\.draft\.replicas: .*integer"),
    ({"replicas": 2}, {"cluster": {"launcher": "local"}}, r"models\.draft\.replicas: 2 .*cluster\.launcher: local"),
    ({"replicas": 2}, {"cluster": {"num_cpus": 2}}, r"models\.draft\.replicas: .*need 3.*num_cpus=2"),
    ({"replicas": 2, "cpus": [1]}, {}, r"models\.draft\.cpus: lists 1 CPU\(s\), but replicas: 2"),
], ids=["zero", "not_int", "local", "num_cpus", "cpus"])
def test_bad_draft_replicas_are_config_errors(draft, sections, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_cfg(draft, **sections))


def test_the_target_has_no_replicas_key_and_good_values_reach_the_spec():
    with pytest.raises(ConfigError, match=r"models\.target\.replicas: unknown key"):
        parse_config({"models": {"target": {"path": "t", "replicas": 2}, "draft": {"path": "d"}}})
    cfg = parse_config(_cfg({"replicas": 3, "cpus": [2, 3, 4]}, cluster={"replicas": 2}))
    assert cfg.models.draft.replicas == 3 and cfg.cluster.replicas == 2


def test_placement_and_memory_count_every_drafter(tiny_pair):
    from cluster.launch.memory_plan import plan_memory
    from cluster.launch.placement import drafter_bundle, placement_bundles

    def spec(m, device="cpu", **kw):
        return EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), target_device=device,
                          draft_device=device, draft_replicas=m, max_seq_len=256, **kw)

    s = spec(3, tensor_parallel_size=2, draft_cpus=(4, 5, 6))
    assert len(placement_bundles(s)) == 5 and [drafter_bundle(s, i) for i in range(3)] == [2, 3, 4]
    assert [s.for_drafter(i).draft_cpus for i in range(3)] == [(4,), (5,), (6,)]
    one, two = plan_memory(spec(1), memory={"cpu": 1 << 34}), plan_memory(spec(2), memory={"cpu": 1 << 34})
    drafter = next(r.total for r in one.roles if r.role == "draft")
    assert two.used("cpu") == one.used("cpu") + drafter   # on the shared host: a second drafter's all
    gpus = plan_memory(spec(2, "cuda"), memory={"cuda": 80 << 30})
    assert [r.key for r in gpus.roles] == ["cuda (target bundle)", "cuda (draft bundle) #0",
                                           "cuda (draft bundle) #1"]
