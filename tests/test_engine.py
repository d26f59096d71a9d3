"""The SSD engine on a real local Ray cluster: drafter and verifier actors, a real gloo data plane.

Exactness is checked against Hugging Face transformers' greedy output (the `hf_refs` fixture),
never against outrider's own AR path.
"""
from __future__ import annotations

import time

import pytest

from actors.generate import generate_ar
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.spec.stopping import StopCriteria
from cluster.config import load_config
from cluster.serving.coordinator import Coordinator, GenerateArgs
from cluster.launch.deployment import engine_spec
from cluster.launch.engine import RayEngine
from tests.conftest import HF_NEW, assert_matches_or_near_tie, assert_same_outcome_law
from actors.spec.stats import SpecStats

pytestmark = pytest.mark.timeout(900)


def _spec(**speculation):
    overrides = {f"speculation.{k}": v for k, v in speculation.items()}
    overrides["engine.max_batch"] = 8
    return engine_spec(load_config("configs/local-cpu.yaml", overrides))


def _run_all(coord: Coordinator, prompts, max_new=HF_NEW, params=None):
    """Submit every prompt at once (several sequences in flight), collect tokens and finals."""
    handles = [coord.submit(GenerateArgs(list(p), max_new, params or SamplingParams())) for p in prompts]
    finals = [h.result() for h in handles]
    return [h.tokens for h in handles], finals


@pytest.fixture(scope="module")
def ssd(ray_local, tiny_pair):
    engine = RayEngine(_spec()).start()
    coord = Coordinator(engine, None, max_queue=1024)
    yield engine, coord
    coord.stop()
    engine.stop()


def _check_exact(hf_refs, prompts, outs):
    hf, refs = hf_refs
    exact = sum(assert_matches_or_near_tie(hf, p, o, r) for p, o, r in zip(prompts, outs, refs))
    assert exact >= len(outs) - 2, f"only {exact}/{len(outs)} identical"


def test_ssd_greedy_equals_hf(ssd, hf_refs, held_out_prompts):
    engine, coord = ssd
    assert len(held_out_prompts) >= 20
    outs, finals = _run_all(coord, held_out_prompts)
    _check_exact(hf_refs, held_out_prompts, outs)
    stats = SpecStats.total(f.stats for f in finals)
    # Speculation really happened and the cache really served drafts.
    assert stats.drafts > 0 and stats.accepted_tokens > 0
    assert stats.cache_hits > 0, stats.summary()
    assert sum(stats.hits_by_depth) == stats.cache_hits
    assert 0.0 < stats.hit_rate <= 1.0
    m = engine.metrics()
    assert m["steps"] > 0 and m["drafter"]["prespec_s"] > 0 and m["drafter"]["branches"] > 0
    # Rounds whose every outcome hit the table the drafter shipped ahead needed no reply at all
    # (with a batch of sequences, one miss or admission among them still asks for one).
    assert m["drafter"]["replies"] < m["drafter"]["frames"]


@pytest.mark.parametrize("speculation", [dict(fan_out=[0, 0, 0, 0, 0]), dict(k=1), dict(mode="sd", k=3)],
                         ids=["fan_out_0", "k1", "sync_sd"])
def test_other_schedules_stay_exact(ray_local, hf_refs, held_out_prompts, speculation):
    engine = RayEngine(_spec(**speculation)).start()
    coord = Coordinator(engine, None, max_queue=256)
    try:
        outs, finals = _run_all(coord, held_out_prompts)
    finally:
        coord.stop()
        engine.stop()
    _check_exact(hf_refs, held_out_prompts, outs)
    hits = sum(f.stats.cache_hits for f in finals)
    if speculation.get("fan_out") or speculation.get("mode") == "sd":
        assert hits == 0  # nothing pre-drafted: every round drafted on demand
    assert sum(f.stats.drafts for f in finals) > 0


def test_ssd_sampling_matches_ar_distribution(ssd, tiny_pair, held_out_prompts):
    """Tokens 2 and 3 of a continuation pass through speculation; their joint law must be the
    target's. AR samples with one seed stream, SSD with another: compare the histograms."""
    _, coord = ssd
    prompt = held_out_prompts[3][-32:]
    n, new = 400, 3
    # A warped distribution (temperature, top-k) keeps enough mass on few outcomes to test.
    params = [SamplingParams(temperature=0.8, top_k=6, seed=10_000 + i) for i in range(n)]
    handles = [coord.submit(GenerateArgs(list(prompt), new, p)) for p in params]
    for h in handles:
        h.result()
    ssd_tokens = [tuple(h.tokens[1:new]) for h in handles]
    target = load_model(tiny_pair / "target")
    ar_tokens = [tuple(generate_ar(target, prompt, StopCriteria(new), SamplingParams(0.8, 6, seed=i)).tokens[1:new])
                 for i in range(n)]
    assert_same_outcome_law(ar_tokens, ssd_tokens, "SSD sampling")


def test_concurrent_mixed_lengths_and_aborts(ssd, hf_refs, held_out_prompts):
    """Requests of different lengths interleave; aborted ones free their slots; the rest stay exact."""
    _, coord = ssd
    hf, refs = hf_refs
    lens = [HF_NEW if i % 3 else 7 + i for i in range(12)]
    victims = [coord.submit(GenerateArgs(list(held_out_prompts[i]), 500, ignore_eos=True)) for i in range(3)]
    handles = [coord.submit(GenerateArgs(list(held_out_prompts[i]), lens[i])) for i in range(12)]
    for v in victims:
        v.cancel()
    for v in victims:
        assert v.result().finish_reason == "abort"
    for i, h in enumerate(handles):
        f = h.result()
        assert f.finish_reason == "length" and len(h.tokens) == lens[i]
        assert_matches_or_near_tie(hf, held_out_prompts[i], h.tokens, refs[i][:lens[i]])
    assert coord.in_flight == 0


def test_plain_processes_without_ray(tiny_pair, hf_refs, held_out_prompts):
    """The same actor classes, launched as a thread + a spawned process (a GPU box has no Ray)."""
    from actors.launch import LocalEngine

    spec = _spec()
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None)
    try:
        outs, finals = _run_all(coord, held_out_prompts[:8])
    finally:
        coord.stop()
        engine.stop()
    _check_exact(hf_refs, held_out_prompts[:8], outs)
    assert sum(f.stats.cache_hits for f in finals) > 0
    assert not engine.proc.is_alive()


def test_poll_lingers_for_a_chunk_but_returns_a_final_event_at_once(tiny_pair, held_out_prompts):
    """The coordinator's long-poll: collect tokens for up to linger_s (fewer calls into the
    verifier's process), but never sit on a request's final event."""
    from actors.launch import LocalEngine
    from actors.sequence import Request

    engine = LocalEngine(_spec(mode="ar")).start()
    try:
        engine.submit(Request(1, list(held_out_prompts[0]), 400, ignore_eos=True))
        first = engine.poll(5.0)  # no linger: whatever is there once the first token is out
        assert first and not first[-1]["done"]
        engine.submit(Request(2, list(held_out_prompts[1]), 40, ignore_eos=True))
        events, t0 = [], time.perf_counter()
        while not any(e["done"] and e["id"] == 2 for e in events):
            events += engine.poll(5.0, linger_s=30.0)
        assert time.perf_counter() - t0 < 20.0, "a final event waited for the linger to run out"
        assert sum(len(e["tokens"]) for e in events if e["id"] == 2) == 40
    finally:
        engine.stop()


def test_an_engine_in_the_idle_scheduling_class_still_serves_exactly(ssd, held_out_prompts):
    """What `outrider bench` does to the engines it is not timing (cluster/bench/quiet.py): the
    engine's processes are found by pid, and demoted to SCHED_IDLE they keep serving, exactly."""
    from cluster.bench.quiet import engine_pids, in_background

    engine, coord = ssd
    pids = engine_pids(engine)
    assert pids == [engine.verifier_pid(), engine.drafter_pid()]
    (ref,), _ = _run_all(coord, held_out_prompts[:1], max_new=16)
    with in_background(pids):
        (out,), finals = _run_all(coord, held_out_prompts[:1], max_new=16)
    assert out == ref and finals[0].finish_reason == "length"


def test_pinned_loops_serve_exactly_with_the_target_core_kept_to_them(ray_local, tiny_pair, hf_refs,
                                                                      held_out_prompts):
    """models.*.cpus pins each role's loop thread (actors/affinity.py); `outrider bench` then keeps
    every other thread of its process tree off the target's core while the engine is timed
    (cluster.bench.quiet.isolated), and gives each thread its own affinity back afterwards."""
    import os

    import psutil

    from cluster.bench.quiet import isolated

    usable = os.sched_getaffinity(0)
    if len(usable) < 2:
        pytest.skip("needs two usable CPUs")
    a, b = sorted(usable)[:2]
    spec = engine_spec(load_config("configs/local-cpu.yaml", {
        "models.target.cpus": [a], "models.draft.cpus": [b], "engine.max_batch": 8}))
    engine = RayEngine(spec).start()
    coord = Coordinator(engine, None)
    try:
        loops = engine.loop_threads()
        assert [os.sched_getaffinity(t) for t in loops] == [{a}, {b}]
        me = psutil.Process()
        tree = [me.pid] + [c.pid for c in me.children(recursive=True)]
        with isolated({a}, loops):
            moved = []
            for pid in tree:
                for t in os.listdir(f"/proc/{pid}/task"):
                    try:
                        moved.append(os.sched_getaffinity(int(t)))
                    except OSError:   # a thread that ended meanwhile
                        pass
            assert moved and all(a not in m for m in moved if m != {a}), "a thread was left on the target's core"
            assert [os.sched_getaffinity(t) for t in loops] == [{a}, {b}]
            outs, finals = _run_all(coord, held_out_prompts[:4])
        assert os.sched_getaffinity(0) == usable and [os.sched_getaffinity(t) for t in loops] == [{a}, {b}]
    finally:
        coord.stop()
        engine.stop()
    _check_exact(hf_refs, held_out_prompts[:4], outs)
    assert sum(f.stats.cache_hits for f in finals) > 0


def test_a_cpu_the_node_lacks_is_a_config_error_before_any_actor_starts(tiny_pair):
    """On the embedded cluster every actor runs on this node, so its CPUs are checked up front
    (an actor that failed its own check would die in a Ray traceback)."""
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match=r"models.draft.cpus: CPUs \[4096\] are not available"):
        engine_spec(load_config("configs/local-cpu.yaml", {"models.draft.cpus": [0, 4096]}))


@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_a_gpu_the_machine_lacks_is_a_config_error_before_any_process_starts(tiny_pair, launcher):
    """Embedded or local, every role runs on this machine: a CUDA device it lacks is named up
    front, not found by torch inside a process (or by a placement group that waits forever)."""
    from cluster.config import ConfigError

    over = {"cluster.launcher": launcher, "models.draft.device": "cuda:63"}
    with pytest.raises(ConfigError, match=r"models.draft.device: 'cuda:63', but this machine has \d+ CUDA device"):
        engine_spec(load_config("configs/local-cpu.yaml", over))
