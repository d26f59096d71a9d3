"""Ports are bound first and handed over, never picked free and bound later: the data plane's
rank 0 serves its store on a socket that was listening before its port went to the peer."""
from __future__ import annotations

import errno
import multiprocessing as mp
import socket

import pytest
import torch

from actors.protocol import ports
from actors.protocol.channel import Channel, Frame, Rec, Record
from actors.protocol.ports import listening_socket, reserve_port

ADDR = "127.0.0.1"


def _peer(port: int, q) -> None:
    try:
        with Channel(1, ADDR, port, timeout_s=30) as c:
            f = c.recv()
            c.send(Frame(Rec.OUTCOME, f.step + 1, [Record(Rec.PING, 0)]))
        q.put("ok")
    except BaseException as e:  # reported to the parent
        q.put(repr(e))


def _bind_fails(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ADDR, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
        return False


@pytest.mark.parametrize("how", ["listen_sock", "reserve_port"])
def test_rank0_takes_over_a_socket_bound_before_the_port_was_shared(how):
    torch.set_num_threads(1)
    sock = listening_socket(ADDR) if how == "listen_sock" else None
    port = sock.getsockname()[1] if sock is not None else reserve_port(ADDR)
    assert _bind_fails(port), "the port is not held between choosing it and the group forming"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peer, args=(port, q), daemon=True)
    p.start()
    try:
        with Channel(0, ADDR, port, timeout_s=30, listen_sock=sock) as c:
            assert port not in ports._reserved, "the reserved socket was not taken over"
            c.send(Frame(Rec.OUTCOME, 7, [Record(Rec.PING, 0)]))
            assert c.recv().step == 8
        assert q.get(timeout=60) == "ok"
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0


def test_listen_sock_is_rank_0s_and_its_own_port():
    sock = listening_socket(ADDR)
    try:
        with pytest.raises(ValueError, match="listen_sock"):
            Channel(1, ADDR, sock.getsockname()[1], listen_sock=sock)
        with pytest.raises(ValueError, match="listen_sock"):
            Channel(0, ADDR, sock.getsockname()[1] + 1, listen_sock=sock)
    finally:
        sock.close()
