"""The verifier's event stream (actors/protocol/events.py) over real sockets on 127.0.0.1, and on Ray."""
from __future__ import annotations

import socket
import time

import pytest

from actors.protocol.events import EventReader, EventStreamClosed, Outbox

TOKEN = "4f1d0c2a9e"


def _ev(i: int, done: bool = False) -> dict:
    return {"id": 1, "tokens": [i], "done": done, **({"reason": "length", "stats": {"k": 4}} if done else {})}


def _toks(events: list[dict]) -> list[int]:
    return [t for e in events for t in e["tokens"]]


def _connected(box: Outbox, token: str = TOKEN, after: int = 0) -> EventReader:
    reader = EventReader("127.0.0.1", box.listen(TOKEN), token, timeout_s=5, after=after)
    deadline = time.perf_counter() + 5
    while box._listener._ready is None and time.perf_counter() < deadline:  # the accept thread's hand-off
        time.sleep(0.01)
    return reader


def _collect(reader: EventReader, n: int) -> list[dict]:
    out, deadline = [], time.perf_counter() + 10
    while len(out) < n and time.perf_counter() < deadline:
        out += reader.poll(0.5)
    return out


def test_events_put_before_and_after_the_stream_opens_arrive_once_in_order():
    box = Outbox()
    box.put(_ev(0))
    box.flush()                      # no stream yet: poll() serves it ...
    box.put(_ev(1))
    box.flush()
    assert _toks(box.poll(1.0)) == [0, 1]
    box.put(_ev(2))
    box.flush()                      # ... and what poll() has not taken moves to the stream first
    reader = _connected(box)
    box.put(_ev(3))
    box.put(_ev(4, done=True))
    box.flush()
    try:
        got = _collect(reader, 3)
        assert _toks(got) == [2, 3, 4] and got[-1]["done"] and got[-1]["stats"] == {"k": 4}
        assert box.poll(0.05) == []  # nothing went both ways
    finally:
        box.close()
        reader.close()


def test_the_reader_long_polls_like_the_verifier_and_raises_once_the_verifier_is_gone():
    box = Outbox()
    reader = _connected(box)
    try:
        for i in range(3):
            box.put(_ev(i))
            box.flush()
        time.sleep(0.2)
        t0 = time.perf_counter()
        got = reader.poll(1.0, linger_s=0.3)   # everything queued, then waits out the linger
        assert _toks(got) == [0, 1, 2] and time.perf_counter() - t0 >= 0.25
        box.put(_ev(3, done=True))
        box.flush()
        t0 = time.perf_counter()
        assert _toks(reader.poll(1.0, linger_s=30.0)) == [3]
        assert time.perf_counter() - t0 < 5.0, "a final event waited for the linger"
        box.close()                   # the verifier's loop ended
        with pytest.raises(EventStreamClosed):
            for _ in range(50):
                reader.poll(0.1)
    finally:
        reader.close()


def test_a_connection_with_the_wrong_token_gets_nothing():
    box = Outbox()
    port = box.listen(TOKEN)
    intruder = socket.create_connection(("127.0.0.1", port), timeout=5)
    intruder.sendall(b"guess\n")
    try:
        assert intruder.recv(1) == b"", "the listener must hang up on a wrong token"
        reader = _connected(box)
        box.put(_ev(7, done=True))
        box.flush()
        assert _toks(_collect(reader, 1)) == [7]
        reader.close()
    finally:
        intruder.close()
        box.close()


def test_a_broken_stream_loses_and_doubles_nothing_once_the_host_reconnects():
    box = Outbox()
    reader = _connected(box)
    box.put(_ev(0))
    box.flush()
    assert _toks(_collect(reader, 1)) == [0]
    reader.close()                   # the host's end breaks
    time.sleep(0.1)
    for i in range(1, 5):  # the first sends after the hang-up may still be taken by the kernel
        box.put(_ev(i))
        box.flush()
        time.sleep(0.05)
    assert box._stream is None, "the verifier noticed the break and queues again"
    reader = _connected(box, after=reader.last_n)   # what RayEngine.poll does after a break
    box.put(_ev(5, done=True))
    box.flush()
    try:
        assert _toks(_collect(reader, 5)) == [1, 2, 3, 4, 5]
    finally:
        reader.close()
        box.close()


def test_a_ray_engine_streams_its_tokens_and_reopens_a_broken_stream_without_loss(ray_local, held_out_prompts):
    import ray

    from actors.sequence import Request
    from cluster.config import load_config
    from cluster.launch.deployment import engine_spec
    from cluster.launch.engine import RayEngine

    engine = RayEngine(engine_spec(load_config("configs/local-cpu.yaml"))).start()
    try:
        engine.submit(Request(1, list(held_out_prompts[0]), 300, ignore_eos=True))
        events = engine.poll(10.0)
        first = engine.events
        first.close()                # the stream breaks mid-generation; the verifier lives on
        deadline = time.perf_counter() + 60
        while not any(e["done"] for e in events) and time.perf_counter() < deadline:
            events += engine.poll(1.0, 0.02)
        assert engine.events is not first, "the engine reopened the stream"
        assert sum(len(e["tokens"]) for e in events) == 300 and events[-1]["reason"] == "length"
        assert [e["n"] for e in events] == sorted({e["n"] for e in events}), "an event came twice"
        assert ray.get(engine.verifier.poll.remote(0.2)) == []   # they came over the stream
        # The verifier shares this node with the host: its listener is on 127.0.0.1 only.
        port = engine.events._sock.getpeername()[1]
        node_ip = ray.util.get_node_ip_address()
        if not node_ip.startswith("127."):   # (a node known only as 127.0.0.1 has no other address to try)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((node_ip, port), timeout=5)
            box = Outbox()   # the control: a listener for another node's host takes it
            try:
                socket.create_connection((node_ip, box.listen(TOKEN)), timeout=5).close()
            finally:
                box.close()
    finally:
        engine.stop()
