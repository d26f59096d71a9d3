"""The verifier<->drafter data plane: real two-process gloo groups (the wire format itself is
tests/test_frame.py; a lost, silent or late peer is tests/test_channel_faults.py).

The process tests spawn fresh interpreters (torch.distributed state is process-global) and bound
every wait: channels use a short timeout_s and the parent joins children with a deadline, so a
bug fails the test instead of hanging the suite.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
import traceback

import pytest
import torch

from actors.protocol.channel import (
    Channel,
    ChannelClosed,
    Frame,
    ProtocolError,
    Rec,
    Record,
)
from actors.protocol.frame import INLINE_INTS
from actors.protocol.ports import listening_socket, reserve_port

log = logging.getLogger(__name__)
CTX = mp.get_context("spawn")
ADDR = "127.0.0.1"
V = 5  # float row width in the process tests


def test_channel_rejects_bad_use():
    with pytest.raises(ValueError):
        Channel(2, ADDR, 1)
    ch = Channel(0, ADDR, reserve_port())
    assert ch.backend == "gloo"
    with pytest.raises(ChannelClosed, match="not connected"):
        ch.recv()
    ch.close()
    ch.close()


# ---------------------------------------------------------------------------------------------
# process helpers


def _bound():
    """A listening socket for the master's process (handed over, not re-bound: no other process
    can take the port meanwhile) and its port for the peer."""
    sock = listening_socket()
    return sock, sock.getsockname()[1]


def _master(sock, timeout_s: float) -> Channel:
    return Channel(0, ADDR, sock.getsockname()[1], timeout_s=timeout_s, listen_sock=sock)


def _child(q, name: str, fn, *args) -> None:
    """Run fn in a spawned process and report ("ok", result) or ("err", traceback) to the parent."""
    torch.set_num_threads(1)  # two shared cores: keep the peers from fighting over OpenMP threads
    try:
        q.put((name, "ok", fn(*args)))
    except BaseException:
        q.put((name, "err", traceback.format_exc()))
        raise


def _run(procs: dict[str, tuple], deadline_s: float = 30.0) -> tuple[dict, dict]:
    """Start named children, collect their results and exit codes; kill anything past the deadline."""
    q = CTX.Queue()
    ps = {name: CTX.Process(target=_child, args=(q, name, fn, *args), daemon=True)
          for name, (fn, *args) in procs.items()}
    for p in ps.values():
        p.start()
    results: dict = {}
    end = time.monotonic() + deadline_s
    try:
        while len(results) < len(ps) and time.monotonic() < end:
            try:
                name, status, value = q.get(timeout=0.2)
                results[name] = (status, value)
            except queue.Empty:
                if all(not p.is_alive() for p in ps.values()):
                    break  # whoever did not report died on purpose (os._exit) or crashed
        for p in ps.values():
            p.join(max(0.1, end - time.monotonic()))
    finally:
        for p in ps.values():
            if p.is_alive():
                p.kill()
                p.join(5)
    return results, {name: p.exitcode for name, p in ps.items()}


def _ok(results: dict, name: str):
    assert name in results, f"{name} reported nothing"
    status, value = results[name]
    assert status == "ok", f"{name} failed:\n{value}"
    return value


def _q_rows(step: int, rows: int) -> torch.Tensor:
    return torch.arange(rows * V, dtype=torch.float32).view(rows, V) + step


def _step_frame(i: int) -> Frame:
    # Every 10th admission carries a prompt too long for the inline part of the first message.
    n_prompt = INLINE_INTS + 50 if i % 10 == 5 else i % 37
    recs = [Record(Rec.ADMIT, 1000 + i, 0, 64, i, list(range(n_prompt)))] if i % 5 == 0 else []
    recs += [Record(Rec.OUTCOME, s, i, s % 4, 100 + s) for s in range(i % 9)]
    if i % 7 == 3:
        recs.append(Record(Rec.RELEASE, i))
    return Frame(Rec.OUTCOME, i, recs)


def _echo_peer(port: int, timeout_s: float) -> dict:
    """Drafter side: answer every frame with a DRAFT echoing its content, until SHUTDOWN."""
    with Channel(1, ADDR, port, timeout_s=timeout_s) as ch:
        while True:
            f = ch.recv()
            if any(r.kind == Rec.SHUTDOWN for r in f.records):
                return ch.stats()
            toks = [len(f.records)] + [x for r in f.records for x in (r.kind, r.seq, r.a, r.b, *r.tokens)]
            rows = f.step % 4 if f.step % 3 == 0 else 0
            reply = [Record(Rec.DRAFT, f.step, f.step, f.step % 2, rows, toks,
                            _q_rows(f.step, rows) if rows else None)]
            if f.step % 2:  # a second float-carrying record, so replies mix widths of payload
                reply.append(Record(Rec.DRAFT, -f.step, 0, 0, 1, [], _q_rows(-f.step, 1)))
            ch.send(Frame(Rec.DRAFT, f.step, reply))


def _echo_master(sock, n: int, n_ping: int, timeout_s: float) -> dict:
    with _master(sock, timeout_s) as ch:
        for i in range(n):
            sent = _step_frame(i)
            ch.send(sent)
            got = ch.recv()
            assert (got.kind, got.step) == (Rec.DRAFT, i)
            d = got.records[0]
            want = [len(sent.records)] + [x for r in sent.records for x in (r.kind, r.seq, r.a, r.b, *r.tokens)]
            assert (d.kind, d.seq, d.round, d.a, d.tokens) == (Rec.DRAFT, i, i, i % 2, want), i
            rows = i % 4 if i % 3 == 0 else 0
            assert d.b == rows and (d.floats is None if not rows else torch.equal(d.floats, _q_rows(i, rows)))
            assert len(got.records) == 1 + i % 2
            if i % 2:
                assert torch.equal(got.records[1].floats, _q_rows(-i, 1))
        t0 = time.perf_counter()
        for i in range(n_ping):
            ch.send(Frame(Rec.PING, n + i, [Record(Rec.PING, 0)]))
            ch.recv()
        ping_us = (time.perf_counter() - t0) / n_ping * 1e6
        # The drafter exits on SHUTDOWN without replying; close() still waits for the isend.
        ch.send(Frame(Rec.SHUTDOWN, n + n_ping, [Record(Rec.SHUTDOWN, 0)]))
        return {**ch.stats(), "ping_us": ping_us}


# ---------------------------------------------------------------------------------------------
# process tests


def test_echo_200_frames():
    (sock, port), n, n_ping = _bound(), 200, 200
    results, codes = _run({"master": (_echo_master, sock, n, n_ping, 10.0), "peer": (_echo_peer, port, 10.0)})
    m, p = _ok(results, "master"), _ok(results, "peer")
    assert codes == {"master": 0, "peer": 0}
    assert m["frames_sent"] == n + n_ping + 1 and m["frames_recv"] == n + n_ping
    assert p["frames_recv"] == n + n_ping + 1 and p["frames_sent"] == n + n_ping
    assert m["bytes_sent"] == p["bytes_recv"] and m["bytes_recv"] == p["bytes_sent"]
    assert 0 < m["recv_wait_s"] < 30
    log.info("ping-pong %.0f us/round trip; master waited %.2fs in recv", m["ping_us"], m["recv_wait_s"])


def _table_peer(port: int, n: int, timeout_s: float) -> None:
    """The SSD pattern: per frame, a DRAFT reply (with q rows on every third step) only on odd
    steps, then always a TABLE frame, some too long for the first message."""
    with Channel(1, ADDR, port, timeout_s=timeout_s) as ch:
        for i in range(n):
            f = ch.recv()
            assert f.step == i
            if i % 2:
                rows = 2 if i % 3 == 0 else 0
                q = _q_rows(i, rows) if rows else None
                ch.send(Frame(Rec.DRAFT, i, [Record(Rec.DRAFT, 1, i, 0, rows, [i, i], q)]))
            width = INLINE_INTS + 7 if i % 5 == 4 else 14
            ch.send(Frame(Rec.TABLE, i, [Record(Rec.TABLE, 1, i, 2, 5, list(range(i, i + width)))]))


def _table_master(sock, n: int, timeout_s: float) -> int:
    """Replies with q rows are posted ahead (their size is known), then the table behind them;
    plain replies are received at once. Everything arrives whole and in order."""
    with _master(sock, timeout_s) as ch:
        for i in range(n):
            if ch.posted:
                time.sleep(0.002 * (i % 3))  # "verifying": the frames land meanwhile (or not yet)
                if (i - 1) % 2 and (i - 1) % 3 == 0:
                    d = ch.recv()
                    assert (d.kind, d.step, d.records[0].tokens) == (Rec.DRAFT, i - 1, [i - 1, i - 1])
                    assert torch.equal(d.records[0].floats, _q_rows(i - 1, 2))
                t = ch.recv()
                width = INLINE_INTS + 7 if (i - 1) % 5 == 4 else 14
                assert (t.kind, t.step, t.records[0].tokens) == (Rec.TABLE, i - 1, list(range(i - 1, i - 1 + width)))
            ch.send(Frame(Rec.OUTCOME, i, [Record(Rec.OUTCOME, 1, i, 1, 2)]))
            if i % 2 and i % 3 == 0:
                ch.post_recv(n_floats=2 * V)
            elif i % 2:
                d = ch.recv()
                assert (d.kind, d.step, d.records[0].tokens, d.records[0].floats) == (Rec.DRAFT, i, [i, i], None)
            ch.post_recv()
        last = ch.recv()
        assert not ch.posted and (last.kind, last.step) == (Rec.TABLE, n - 1)
        return ch.frames_recv


def _wrong_size_master(sock, timeout_s: float) -> str:
    with _master(sock, timeout_s) as ch:
        ch.send(Frame(Rec.OUTCOME, 0, [Record(Rec.OUTCOME, 1, 0, 1, 2)]))
        ch.post_recv(n_floats=3 * V)  # the peer's next frame is a table, without floats
        try:
            ch.recv()
        except ProtocolError as e:
            with pytest.raises(ChannelClosed, match="broken"):
                ch.recv()
            return str(e)
        return "no error"


def test_posted_receive_keeps_the_order_of_frames():
    (sock, port), n = _bound(), 60
    results, codes = _run({"master": (_table_master, sock, n, 10.0), "peer": (_table_peer, port, n, 10.0)})
    assert _ok(results, "master") == n + n // 2
    assert codes == {"master": 0, "peer": 0}


def test_posted_floats_of_the_wrong_size_are_a_protocol_error():
    sock, port = _bound()
    results, _ = _run({"master": (_wrong_size_master, sock, 5.0), "peer": (_table_peer, port, 1, 5.0)}, deadline_s=30)
    assert "posted" in _ok(results, "master")


# ---------------------------------------------------------------------------------------------
# a Channel is its own groups: beside a default group, beside another Channel


def _beside_default_group(store_path: str, fn, *args):
    """fn with a default process group of this process's own in place (world size 1, gloo): what a
    tensor-parallel verifier holds for its TP ranks. The Channel must neither need nor touch it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
    try:
        out = fn(*args)
        t = torch.ones(2)
        dist.all_reduce(t)  # still the process's own group after the Channel came and went
        assert dist.is_initialized() and dist.get_world_size() == 1 and t.tolist() == [1.0, 1.0]
        return out
    finally:
        dist.destroy_process_group()


def test_channel_beside_a_default_group(tmp_path):
    (sock, port), n = _bound(), 30
    results, codes = _run({"master": (_beside_default_group, str(tmp_path / "m"), _echo_master, sock, n, 5, 10.0),
                           "peer": (_beside_default_group, str(tmp_path / "p"), _echo_peer, port, 10.0)})
    assert _ok(results, "master")["frames_recv"] == n + 5
    assert _ok(results, "peer")["frames_recv"] == n + 5 + 1
    assert codes == {"master": 0, "peer": 0}


def _two_channels(socks: list, n: int, timeout_s: float) -> list[int]:
    """One process, two Channels: the second formed while the first is open, frames interleaved
    on both, then the first closed and the second still carrying frames."""
    a = _master(socks[0], timeout_s).connect()
    b = _master(socks[1], timeout_s).connect()
    for i in range(n):
        for ch in (a, b):
            ch.send(_step_frame(i))
            assert ch.recv().records[0].seq == i
    a.send(Frame(Rec.SHUTDOWN, n, [Record(Rec.SHUTDOWN, 0)]))
    a.close()
    for i in range(n, 2 * n):
        b.send(_step_frame(i))
        got = b.recv()
        assert got.step == i and got.records[0].seq == i
    b.send(Frame(Rec.SHUTDOWN, 2 * n, [Record(Rec.SHUTDOWN, 0)]))
    b.close()
    return [a.frames_recv, b.frames_recv]


def test_two_channels_in_one_process():
    (s0, p0), (s1, p1), n = _bound(), _bound(), 20
    results, codes = _run({"master": (_two_channels, [s0, s1], n, 10.0),
                           "a": (_echo_peer, p0, 10.0), "b": (_echo_peer, p1, 10.0)})
    assert _ok(results, "master") == [n, 2 * n]
    assert _ok(results, "a")["frames_recv"] == n + 1 and _ok(results, "b")["frames_recv"] == 2 * n + 1
    assert codes == {"master": 0, "a": 0, "b": 0}
