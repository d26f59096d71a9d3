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
"""
from __future__ import annotations

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
    """The verifier's end: accepts the host's connection (first line: the token) on `port`.
    The verify loop takes the authenticated socket with `take()`; a later valid connection
    (a host that reconnected) replaces it."""

    def __init__(self, token: str, host: str = ""):
        self._token = token.encode()
        self._srv = socket.create_server((host, 0))
        self.port: int = self._srv.getsockname()[1]
        self._ready: socket.socket | None = None
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
                line = conn.makefile("rb").readline(256).rstrip(b"\n")
            except OSError:
                conn.close()
                continue
            if not hmac.compare_digest(line, self._token):
                log.warning("event stream: rejected a connection from %s (wrong token)", peer)
                conn.close()
                continue
            with self._lock:
                old, self._ready = self._ready, conn
            if old is not None:
                old.close()

    def take(self) -> socket.socket | None:
        """The newly authenticated connection, once (None if there is none)."""
        with self._lock:
            conn, self._ready = self._ready, None
        return conn

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

    def put(self, event: dict) -> None:
        self._out.append(event)

    def poll(self, timeout: float, linger_s: float = 0.0) -> list[dict]:
        return poll_queue(self._q, timeout, linger_s)

    def listen(self, token: str) -> int:
        if self._listener is None:
            self._listener = EventListener(token)
        return self._listener.port

    def flush(self) -> None:
        if self._listener is not None and (conn := self._listener.take()) is not None:
            self._switch(conn)
        if not self._out:
            return
        out, self._out = self._out, []
        if self._stream is not None:
            try:
                self._stream.sendall(encode_events(out))
                return
            except OSError as e:  # the host is gone or stuck: poll() serves whoever asks next
                log.error("event stream lost (%s); events go to poll() again", e)
                self._stream.close()
                self._stream = None
        for ev in out:
            self._q.put(ev)

    def _switch(self, conn: socket.socket) -> None:
        conn.settimeout(SEND_TIMEOUT_S)
        pending = []
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(self._q.get_nowait())
        self._out[:0] = pending   # what poll() has not collected goes first, in order
        if self._stream is not None:
            self._stream.close()
        self._stream = conn

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
    EventStreamClosed once the stream has ended and nothing is left to read."""

    def __init__(self, addr: str, port: int, token: str, timeout_s: float = 30.0):
        self._sock = socket.create_connection((addr, port), timeout=timeout_s)
        self._sock.sendall(token.encode() + b"\n")
        self._sock.settimeout(None)
        self._q: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="outrider-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._sock.makefile("rb"):
                self._q.put(json.loads(line))
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
