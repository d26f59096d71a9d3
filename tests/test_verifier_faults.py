"""Faults inside one verifier process, without a server: a drafter join that never forms, and a
verify loop that dies. (Faults of a served deployment are in tests/test_faults.py.)"""
from __future__ import annotations

import logging
import threading
import time


def test_a_join_that_times_out_leaves_speculation_off(tiny_pair, held_out_prompts, caplog):
    """Nobody joins the port the verifier was sent to: the loop keeps decoding meanwhile, the
    join gives up after timeout_s with an error in the log, and speculation stays off."""
    from actors.protocol.ports import reserve_port
    from actors.sequence import Request
    from actors.engine_spec import EngineSpec
    from actors.verifier import Verifier

    spec = EngineSpec(target=str(tiny_pair / "target"), draft=str(tiny_pair / "draft"), mode="ssd",
                      max_batch=2, max_seq_len=256, timeout_s=1.0)
    v = Verifier(spec)
    v.submit(Request(1, list(held_out_prompts[0]), 100, ignore_eos=True))
    with caplog.at_level(logging.ERROR, logger="actors.verifier"):
        v.reconnect("127.0.0.1", reserve_port())
        steps, t0 = 0, time.perf_counter()
        while "could not join" not in caplog.text:
            assert time.perf_counter() - t0 < 30, "the join neither formed nor gave up"
            v.step()
            steps += 1
    tokens: list[int] = []
    done = _take_events(v, tokens)
    assert steps > 1 and tokens, "the loop stood still while the join waited"
    assert not v.drafter_ok and v.drafter.channel is None and v.drafter.rejoin is None
    while not done:  # the sequence finishes without drafts
        v.step()
        done = _take_events(v, tokens)
    assert len(tokens) == 100


def _take_events(v, tokens: list[int]) -> bool:
    """Append the newly committed tokens; True once the request is done."""
    done = False
    for e in v.poll(timeout=0):
        tokens += e["tokens"]
        done = done or e["done"]
    return done


def test_a_dead_local_verifier_loop_fails_open_requests(tiny_pair, held_out_prompts):
    """`launcher: local` with a bare coordinator (no supervisor: the bench, a script): when the
    verify loop dies of an exception, the open request ends with an error instead of waiting
    for events that will never come."""
    from actors.launch import LocalEngine
    from actors.spec.sampling import SamplingParams
    from actors.engine_spec import EngineSpec
    from cluster.serving.coordinator import Coordinator, GenerateArgs

    engine = LocalEngine(EngineSpec(target=str(tiny_pair / "target"), mode="ar", max_batch=2, max_seq_len=256))

    def broken(seqs, rt):   # a fault inside the round, as a bug or a device error would raise it
        raise RuntimeError("injected fault in the round")

    engine.verifier._verify = broken
    engine.start()
    coord = Coordinator(engine, None)
    try:
        h = coord.submit(GenerateArgs(list(held_out_prompts[0]), 16, SamplingParams(), ignore_eos=True))
        done = threading.Event()
        final = []
        threading.Thread(target=lambda: (final.append(h.result()), done.set()), daemon=True).start()
        assert done.wait(30), "the request still waits on a dead verify loop"
        assert final[0].finish_reason == "error" and "engine unavailable" in final[0].error
        assert not engine.verifier_alive()
    finally:
        coord.stop()
        engine.stop()
