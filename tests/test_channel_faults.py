"""The data plane when a peer fails: a dead drafter (with or without floats posted) breaks the
channel at once and for good, a silent one times out, and the verifier forms a new channel with
a late one on a fresh port. Real two-process gloo groups, bounded as in tests/test_channel.py,
whose process helpers these tests share.
"""
from __future__ import annotations

import logging
import os
import time

from actors.protocol.channel import Channel, ChannelClosed, Frame, Rec, Record
from tests.test_channel import ADDR, CTX, V, _bound, _echo_peer, _master, _ok, _run, _step_frame

log = logging.getLogger(__name__)


def _master_sees_dead_peer(sock, timeout_s: float) -> dict:
    ch = _master(sock, timeout_s)
    ch.connect()
    ch.send(Frame(Rec.OUTCOME, 0, [Record(Rec.PING, 0)]))
    t0 = time.perf_counter()
    try:
        ch.recv()
        raise AssertionError("recv from a dead peer returned")
    except ChannelClosed as e:
        elapsed, err = time.perf_counter() - t0, e
    # A broken channel refuses further traffic at once instead of touching the dead group.
    t1 = time.perf_counter()
    for op in (lambda: ch.send(Frame(Rec.PING, 1, [])), ch.recv):
        try:
            op()
            raise AssertionError("a broken channel accepted traffic")
        except ChannelClosed:
            pass
    refused_s = time.perf_counter() - t1
    ch.close()
    ch.close()
    return {"elapsed": elapsed, "refused_s": refused_s, "msg": str(err), "cause": type(err.__cause__).__name__}


def _peer_dies(port: int, timeout_s: float) -> None:
    ch = Channel(1, ADDR, port, timeout_s=timeout_s)
    ch.connect()
    ch.recv()
    os._exit(3)  # no reply, no teardown: what a crash looks like to the verifier


def test_dead_peer_raises_channel_closed():
    sock, port = _bound()
    results, codes = _run({"master": (_master_sees_dead_peer, sock, 3.0), "peer": (_peer_dies, port, 3.0)})
    m = _ok(results, "master")
    assert codes == {"master": 0, "peer": 3}
    assert m["elapsed"] < 15 and m["refused_s"] < 1
    assert "peer rank 1" in m["msg"]
    log.info("dead peer noticed after %.3fs (%s): %s", m["elapsed"], m["cause"], m["msg"])


def _master_posted_floats_dead_peer(sock, timeout_s: float) -> dict:
    """As the verifier during a sampling round: the reply's floats are posted ahead, then the
    drafter dies. The failure comes from the control group, and both groups are aborted at once:
    nothing stays posted (under NCCL a pending receive would trip its watchdog later)."""
    ch = _master(sock, timeout_s)
    ch.connect()
    ch.send(Frame(Rec.OUTCOME, 0, [Record(Rec.PING, 0)]))
    ch.post_recv(n_floats=3 * V)
    assert ch.posted == 1
    t0 = time.perf_counter()
    try:
        ch.recv()
        raise AssertionError("recv from a dead peer returned")
    except ChannelClosed as e:
        out = {"elapsed": time.perf_counter() - t0, "msg": str(e)}
    out["aborted"] = ch._ctl is None and ch._bulk is None and ch.posted == 0
    ch.close()
    return out


def test_a_dead_peer_with_floats_posted_aborts_the_groups_at_once():
    from actors.protocol.channel import bulk_timeout_s

    sock, port = _bound()
    results, codes = _run({"master": (_master_posted_floats_dead_peer, sock, 3.0), "peer": (_peer_dies, port, 3.0)})
    m = _ok(results, "master")
    assert codes == {"master": 0, "peer": 3}
    assert m["aborted"] and m["elapsed"] < 15 and "peer rank 1" in m["msg"]
    # NCCL's bulk group outwaits the control group: gloo always reports a lost peer first
    assert bulk_timeout_s(30.0) > 2 * 30.0


def _survivor(socks: list, go: list, timeout_s: float) -> dict:
    """The verifier outlives two drafters: one goes silent (timeout), then a healthy one joins."""
    out = {}
    go[0].set()
    ch = _master(socks[0], timeout_s)
    ch.connect()
    ch.send(Frame(Rec.OUTCOME, 0, [Record(Rec.PING, 0)]))
    t0 = time.perf_counter()
    try:
        ch.recv()
        raise AssertionError("a silent peer answered")
    except ChannelClosed as e:
        out["timeout_elapsed"], out["timeout_msg"] = time.perf_counter() - t0, str(e)
    ch.close()

    go[1].set()
    with _master(socks[1], timeout_s) as ch:
        for i in range(20):
            ch.send(_step_frame(i))
            assert ch.recv().records[0].seq == i
        ch.send(Frame(Rec.SHUTDOWN, 20, [Record(Rec.SHUTDOWN, 0)]))
    return out


def _silent_peer(port: int, go, timeout_s: float) -> dict:
    """Connects, takes one frame, then stalls past the verifier's timeout. Once the verifier has
    given up and torn its side down, this side's next operation must fail too, not hang."""
    assert go.wait(30)
    ch = Channel(1, ADDR, port, timeout_s=timeout_s)
    ch.connect()
    ch.recv()
    time.sleep(timeout_s + 1.5)
    t0 = time.perf_counter()
    try:
        ch.send(Frame(Rec.DRAFT, 0, []))
        ch.recv()
        raise AssertionError("the abandoned peer kept talking")
    except ChannelClosed as e:
        return {"elapsed": time.perf_counter() - t0, "msg": str(e)}
    finally:
        ch.close()


def _late_peer(port: int, go, timeout_s: float) -> dict:
    assert go.wait(30)  # imported torch already; joins only when the verifier is ready for it
    return _echo_peer(port, timeout_s)


def test_reform_after_timeout_on_fresh_port():
    timeout_s = 3.0
    (s0, p0), (s1, p1) = _bound(), _bound()
    ports, go = [p0, p1], [CTX.Event(), CTX.Event()]
    results, codes = _run({"survivor": (_survivor, [s0, s1], go, timeout_s),
                           "silent": (_silent_peer, ports[0], go[0], timeout_s),
                           "late": (_late_peer, ports[1], go[1], timeout_s)}, deadline_s=35)
    s, silent, late = _ok(results, "survivor"), _ok(results, "silent"), _ok(results, "late")
    assert codes == {"survivor": 0, "silent": 0, "late": 0}
    assert timeout_s - 0.5 < s["timeout_elapsed"] < 15 and "peer rank 1" in s["timeout_msg"]
    assert silent["elapsed"] < timeout_s + 1 and "peer rank 0" in silent["msg"]
    assert late["frames_recv"] == 21
    log.info("silent peer timed out after %.2fs: %s", s["timeout_elapsed"], s["timeout_msg"])
