"""Committed tokens from the verifier to the engine's host, pushed over one TCP stream.

The coordinator used to long-poll the verifier through Ray. Each poll is an actor call into the
verifier's process — gRPC threads, task dispatch, pickling under the GIL — and that work runs
beside the verify loop: in an interleaved A/B (SSD, bench pair, 24 runs per arm) polling every
20 ms slowed the target forward by 0.45 ms and the whole round by 0.6 ms against one poll per
request. So the engine's host opens a stream instead: the verifier listens (`EventListener`,
token-checked), the host connects (`EventReader`), and the verify loop itself writes each step's
events as JSON lines with one send; nothing else in the verifier's process wakes up for them.

The events are the ones `Verifier.poll` returns ({"id", "tokens", "done", ...}); `poll_queue`
gives both ends the same long-poll semantics, so the coordinator cannot tell them apart.

Nothing is lost or doubled when the stream breaks. Every event carries a serial number ("n"); a
reconnecting host says the last one it saw, and the verifier sends it again whatever came after:
events it had sent (a send into a broken connection can succeed locally and still never arrive:
it keeps the last HISTORY of them), then those it could not send. The reader drops repeats.
"""
from __future__ import annotations

import collections
import contextlib
import hmac
import json
import logging
import queue
import socket
import threading
import time

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 5.0    # a host that stops reading must not stall the verify loop for longer
HISTORY = 16384         # sent events kept for a host that reconnects (~30 s of 8 busy sequences)


class EventStreamClosed(ConnectionError):
    """The verifier's end of the stream is gone (its process died or it shut down)."""


def poll_queue(q: queue.Queue, timeout: float, linger_s: float = 0.0) -> list:
    """Events from `q`: waits up to `timeout` for the first, then keeps collecting for up to
    `linger_s` (fewer, larger chunks), but returns at once after a request's final event."""
    try:
        out = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    end = time.perf_counter() + linger_s
    while not out[-1]["done"]:
        try:  # once the linger is over, timeout 0 still drains what is already queued
            out.append(q.get(timeout=max(0.0, end - time.perf_counter())))
        except queue.Empty:
            break
    return out


def encode_events(events: list[dict]) -> bytes:
    return b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)


class EventListener:
    """The verifier's end: accepts the host's connection on `port` (first line: the token and
    the last event number the host has seen). The verify loop takes the authenticated socket
    with `take()`; a later valid connection (a host that reconnected) replaces it."""

    def __init__(self, token: str, host: str = ""):
        self._token = token.encode()
        self._srv = socket.create_server((host, 0))
        self.port: int = self._srv.getsockname()[1]
        self._ready: tuple[socket.socket, int] | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="outrider-events-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._srv.accept()
            except OSError:
                return   # closed
            try:
                conn.settimeout(SEND_TIMEOUT_S)
                with conn.makefile("rb") as f:
                    line = f.readline(256).rstrip(b"\n")
            except OSError:
                conn.close()
                continue
            token, _, after = line.partition(b" ")
            if not hmac.compare_digest(token, self._token) or not after.isdigit():
                log.warning("event stream: rejected a connection from %s (wrong token)", peer)
                conn.close()
                continue
            with self._lock:
                old, self._ready = self._ready, (conn, int(after))
            if old is not None:
                old[0].close()

    def take(self) -> tuple[socket.socket, int] | None:
        """The newly authenticated connection and the last event its host saw, once."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def close(self) -> None:
        self._srv.close()


class Outbox:
    """The verifier's outgoing events. The verify loop `put`s them during a step and `flush`es
    at its milestones: one send on the host's stream once it is open, else into the queue that
    `poll` serves. Only the loop calls put/flush/close; poll and listen may come from any thread."""

    def __init__(self):
        self._q: queue.Queue[dict] = queue.Queue()
        self._out: list[dict] = []
        self._listener: EventListener | None = None
        self._stream: socket.socket | None = None
        self._sent: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self._n = 0

    def put(self, event: dict) -> None:
        self._n += 1
        event["n"] = self._n
        self._out.append(event)

    def poll(self, timeout: float, linger_s: float = 0.0) -> list[dict]:
        return poll_queue(self._q, timeout, linger_s)

    def listen(self, token: str, host: str = "") -> int:
        if self._listener is None:
            self._listener = EventListener(token, host)
        return self._listener.port

    def flush(self) -> None:
        if self._listener is not None and (ready := self._listener.take()) is not None:
            self._switch(*ready)
        if not self._out:
            return
        out, self._out = self._out, []
        if self._stream is not None and self._send(out):
            self._sent.extend(out)
            return
        for ev in out:  # no stream: poll() serves them, or the next stream gets them first
            self._q.put(ev)

    def _send(self, events: list[dict]) -> bool:
        try:
            self._stream.sendall(encode_events(events))
            return True
        except OSError as e:  # the host is gone or stuck
            log.error("event stream lost (%s); events wait for the host to reconnect", e)
            self._stream.close()
            self._stream = None
            return False

    def _switch(self, conn: socket.socket, after: int) -> None:
        """Take a (re)connected host's stream: first what it missed of the sent events, then
        the queued ones (never sent, or not collected by poll())."""
        conn.settimeout(SEND_TIMEOUT_S)
        if self._stream is not None:
            self._stream.close()
        self._stream = conn
        if len(self._sent) == HISTORY and self._sent[0]["n"] > after + 1:
            log.error("event stream: events %d-%d are too old to send again", after + 1, self._sent[0]["n"] - 1)
        again = [ev for ev in self._sent if ev["n"] > after]
        if again and not self._send(again):
            return
        pending = []
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(self._q.get_nowait())
        self._out[:0] = pending

    def close(self) -> None:
        self.flush()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class EventReader:
    """The host's end: connects, authenticates, and reads events into a local queue on a
    thread of its own; `poll` has the verifier's long-poll semantics and raises
    EventStreamClosed once the stream has ended and nothing is left to read. Events numbered
    `after` or lower (already seen on an earlier stream) are dropped."""

    def __init__(self, addr: str, port: int, token: str, timeout_s: float = 30.0, after: int = 0):
        self.last_n = after
        self._sock = socket.create_connection((addr, port), timeout=timeout_s)
        self._sock.sendall(f"{token} {after}\n".encode())
        self._sock.settimeout(None)
        self._q: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="outrider-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._sock.makefile("rb"):
                ev = json.loads(line)
                if ev["n"] > self.last_n:   # else a repeat of what an earlier stream delivered
                    self.last_n = ev["n"]
                    self._q.put(ev)
        except (OSError, ValueError) as e:
            log.warning("event stream ended: %s", e)
        finally:
            self.closed.set()

    def poll(self, timeout: float = 0.05, linger_s: float = 0.0) -> list[dict]:
        events = poll_queue(self._q, timeout, linger_s)
        if not events and self.closed.is_set() and self._q.empty():
            raise EventStreamClosed("the verifier's event stream closed")
        return events

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
