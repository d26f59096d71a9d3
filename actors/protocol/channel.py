"""The data plane between the verifier (rank 0) and the drafter (rank 1).

Two processes form a link of world size 2 and exchange *frames*: each step the verifier sends one
frame and the drafter answers with the frames the engine's protocol says are due (a DRAFT reply
when one is needed, a TABLE in SSD mode; see actors/drafter.py). Both sides know that sequence, so
every message has exactly one matching receive posted in the same order on both sides: the
protocol cannot deadlock and behaves identically under gloo (tagged matching; the tag is always 0,
so in order) and NCCL (tags ignored, in-order matching). The verifier's sends are asynchronous so
the master never stalls behind a drafter that is still computing; the drafter's sends block.

Groups. A Channel builds its own process groups from its own TCPStore and talks through the group
objects; it never touches torch.distributed's process-global default group. So a process may hold
a default group of its own (a tensor-parallel verifier uses it for its TP ranks), and a new Channel
can be formed while an old one still exists (a restarted drafter is joined beside the dead one's).
Two groups, each rendezvousing under its own prefix of the one store:

- `ctl`, always gloo on CPU tensors: every frame's header and ints. Control never syncs a device;
- `bulk`, the float payload (q rows) alone: an NCCL group when the backend is nccl, else the ctl
  group itself. The floats of a frame are the only NCCL traffic, so NCCL's in-order matching
  holds within it as gloo's does within ctl: each group carries its messages in frame order.

A dead or silent peer is reported by `ctl` first: at once when its socket closes, else within
timeout_s (the bulk group waits longer, bulk_timeout_s). The channel then aborts both groups, so
no float receive stays posted on NCCL, whose watchdog would otherwise find it timed out later and,
by default, end the whole process; the bulk group is also built to abort its communicator rather
than the process on any NCCL error (_nccl_group). The verifier then serves without drafts (its
drafter-lost path) while a new drafter joins on a fresh channel.

Received floats land on `device`, the device of the math that uses them (the verifier's model
device): NCCL receives them there; gloo receives on the CPU and copies them over when the frame is
collected. The NCCL path is untested on real GPUs (CI has none): it is kept to the group's
construction, one warm-up message and the float send/recv.

`post_recv()` posts the receive of the peer's next frame ahead of time: its first message (and,
when the caller knows their count, its floats) then lands while this side computes, and the
`recv()` that follows only collects it. The verifier uses this for the drafter's speculation
table and for the q rows of sampling hits, both of which arrive during verification. Posted
frames are collected first in, first out, in the order they are sent; a frame may be posted
behind another only when everything of the one before it is posted too (its ints fit the first
message), or the later frame's first message would be matched to the earlier one's ints.

The frame format is in actors/protocol/frame.py.

Backends: `backend="auto"` picks NCCL iff `device` starts with "cuda", CUDA is available and
OUTRIDER_SAME_GPU != "1" (NCCL refuses two ranks on one device); otherwise gloo, which also serves
a GPU verifier whose drafter shares its GPU (the floats cross through host memory).

Threads: a group is not thread-safe, so one thread at a time drives a Channel. It may be formed
(connect) in one thread and used in another after a handoff: the verifier joins a restarted
drafter in a background thread and its loop takes the formed Channel over between two steps.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.protocol.frame import (  # noqa: F401 (re-exported: the channel speaks frames)
    HEADER_LEN, INLINE_INTS, MAGIC, ChannelClosed, Frame, ProtocolError, Rec, Record, check_header, decode,
    decode_parts, encode,
)
from actors.protocol.ports import take_reserved

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the channel


def pick_backend(device: str) -> str:
    """NCCL iff the tensors live on CUDA and the two roles are on different GPUs (NCCL refuses two
    ranks on one device); OUTRIDER_SAME_GPU=1 declares the shared-GPU case. Otherwise gloo."""
    if device.startswith("cuda") and torch.cuda.is_available() and os.environ.get("OUTRIDER_SAME_GPU") != "1":
        return "nccl"
    return "gloo"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bulk_timeout_s(ctl_timeout_s: float) -> float:
    """The NCCL bulk group's timeout: well past the control group's, so a dead or silent peer is
    always reported by gloo first (every frame's header crosses ctl before its floats), and the
    channel aborts the bulk group (Channel._fail) before NCCL's watchdog sees a timeout at all."""
    return 2 * ctl_timeout_s + 10.0


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _nccl_group(store: dist.Store, rank: int, device: torch.device, timeout: timedelta):
    """The bulk group for NCCL, connected now by one float from rank 0 to rank 1 (the first
    point-to-point operation creates the communicator: better in connect, which may run in a
    background thread, than on the loop's first sampling round). Untested on real GPUs.

    A drafter that dies while the verifier has a float receive posted must cost the verifier its
    drafts, not its process. NCCL's default error handling (TORCH_NCCL_ASYNC_ERROR_HANDLING=3)
    tears the whole process down when its watchdog finds a timed-out operation; this group is
    built with 2 (abort the communicator, keep the process: the op's wait then raises), read by
    ProcessGroupNCCL at construction, so a tensor-parallel default group keeps its own setting."""
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = timedelta(seconds=bulk_timeout_s(timeout.total_seconds()))
    with torch.cuda.device(device), _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"):
        pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
        one = torch.zeros(1, device=device)
        (pg.send([one], 1, 0) if rank == 0 else pg.recv([one], 0, 0)).wait()
        torch.cuda.synchronize(device)   # wait() only orders streams: finish here, not in the loop
    return pg


class Channel:
    """One end of the verifier<->drafter link. One thread at a time drives it (see the module)."""

    def __init__(self, rank: int, master_addr: str, master_port: int, backend: str = "auto",
                 device: str = "cpu", timeout_s: float = 30.0, listen_sock: socket.socket | None = None):
        if rank not in (0, 1):
            raise ValueError(f"rank must be 0 (verifier) or 1 (drafter), got {rank}")
        if listen_sock is not None and (rank != 0 or listen_sock.getsockname()[1] != master_port):
            raise ValueError("listen_sock: only rank 0 serves the store, on the socket's own port")
        self._listen_sock = listen_sock   # rank 0: the store's bound socket (else reserve_port's, or bind now)
        self.rank = rank
        self.peer = 1 - rank
        self.master_addr = master_addr
        self.master_port = master_port
        self.backend = pick_backend(device) if backend == "auto" else backend
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, got {backend!r}")
        self.device = torch.device(device)   # where received floats land
        # The floats travel on the GPU under NCCL, through host memory under gloo.
        self._wire = self.device if self.backend == "nccl" else torch.device("cpu")
        self.timeout_s = timeout_s
        self._store: dist.TCPStore | None = None
        self._ctl = self._bulk = None   # the groups (see the module); bulk is ctl under gloo
        self._first = torch.empty(HEADER_LEN + INLINE_INTS, dtype=torch.int64)
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []  # isends and the buffers they read
        # pre-posted receives, oldest first: (first-message buffer, its work, (floats work, buffer) | None)
        self._posted: deque[tuple[torch.Tensor, dist.Work, tuple[dist.Work, torch.Tensor] | None]] = deque()
        self._connected = False
        self._closed = False
        self._broken: str | None = None
        # counters, reported by the engine as transport / idle time
        self.frames_sent = 0
        self.frames_recv = 0
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.recv_wait_s = 0.0  # blocked in recv, mostly waiting for the peer to answer
        self.send_wait_s = 0.0  # blocked completing earlier isends / plain sends

    # -- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> Channel:
        """Rendezvous with the peer and build the groups; blocks until the peer has done the same
        (or raises ChannelClosed after timeout_s)."""
        if self._connected or self._closed:
            raise RuntimeError("a Channel connects once; make a new one (fresh port) to re-form")
        t0 = time.perf_counter()
        timeout = timedelta(seconds=self.timeout_s)
        try:
            # Rank 0 serves the rendezvous store on a socket bound before its port was handed out
            # (listen_sock or reserve_port); the store takes the descriptor over.
            sock = self._listen_sock if self.rank == 0 else None
            sock = sock or (take_reserved(self.master_port) if self.rank == 0 else None)
            self._listen_sock = None
            fd = sock.detach() if sock is not None else None
            self._store = dist.TCPStore(self.master_addr, self.master_port, 2, self.rank == 0, timeout,
                                        master_listen_fd=fd)
            self._ctl = dist.ProcessGroupGloo(dist.PrefixStore("ctl", self._store), self.rank, 2, timeout)
            self._bulk = self._ctl if self.backend == "gloo" else _nccl_group(
                dist.PrefixStore("bulk", self._store), self.rank, self.device, timeout)
        except (RuntimeError, ValueError) as e:  # store timeouts surface as DistStoreError/RuntimeError
            self._closed = True
            self._drop_groups()
            raise ChannelClosed(f"rank {self.rank}: peer rank {self.peer} did not join "
                                f"tcp://{self.master_addr}:{self.master_port} within {self.timeout_s}s: {e}") from e
        self._connected = True
        log.info("rank %d: %s group on %s:%d formed in %.2fs", self.rank, self.backend,
                 self.master_addr, self.master_port, time.perf_counter() - t0)
        return self

    def close(self) -> None:
        """Finish pending sends (best effort) and tear the groups down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._connected:
            return
        if self._broken is None:
            try:
                self._wait_pending()
            except ChannelClosed as e:
                log.warning("rank %d: dropping unfinished sends on close: %s", self.rank, e)
        self._pending.clear()
        self._posted.clear()
        self._drop_groups()

    def _abort_groups(self) -> None:
        """Abort both groups without waiting on the peer (pending operations are cancelled)."""
        for pg in {id(g): g for g in (self._bulk, self._ctl) if g is not None}.values():
            try:
                pg.abort()
            except RuntimeError as e:
                log.warning("rank %d: aborting the %s group: %s", self.rank, pg.name(), e)
        self._ctl = self._bulk = None
        self._pending.clear()
        self._posted.clear()

    def _drop_groups(self) -> None:
        for pg in {id(g): g for g in (self._bulk, self._ctl) if g is not None}.values():
            try:
                pg.shutdown()
            except RuntimeError as e:  # a group whose peer died may fail to tear down cleanly
                log.warning("rank %d: shutting the %s group down: %s", self.rank, pg.name(), e)
        self._ctl = self._bulk = self._store = None

    def __enter__(self) -> Channel:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- data --------------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Rank 0: isend and return at once; the previous frame's sends are waited first, and until
        then the frame's float payload (sent without a copy when there is one DRAFT part already
        where it travels) must not be modified. Rank 1: blocking send."""
        self._check_usable("send")
        header, ints, floats = encode(frame)
        first = torch.zeros(HEADER_LEN + INLINE_INTS, dtype=torch.int64)
        first[:HEADER_LEN] = header
        msgs = [(self._ctl, first)]
        if ints is not None and ints.numel() <= INLINE_INTS:
            first[HEADER_LEN:HEADER_LEN + ints.numel()] = ints
        elif ints is not None:
            msgs.append((self._ctl, ints.cpu()))
        if floats is not None:
            msgs.append((self._bulk, floats.to(self._wire)))
        self._wait_pending()
        try:
            self._pending = [(pg.send([t], self.peer, 0), t) for pg, t in msgs]
        except RuntimeError as e:
            raise self._fail("send", e) from e
        if self.rank == 1:   # the drafter's sends block
            self._wait_pending()
        self.frames_sent += 1
        self.bytes_sent += sum(_nbytes(t) for _, t in msgs)

    @property
    def posted(self) -> int:
        """How many frames posted by post_recv() wait to be collected by recv()."""
        return len(self._posted)

    def post_recv(self, n_floats: int = 0) -> None:
        """Post the receive of the peer's next frame now; a later recv() collects it. With
        `n_floats`, the frame's float payload (exactly that many) is posted too."""
        self._check_usable("recv")
        first = torch.empty(HEADER_LEN + INLINE_INTS, dtype=torch.int64)
        try:
            work = self._ctl.recv([first], self.peer, 0)
            floats = None
            if n_floats:
                buf = torch.empty(n_floats, dtype=torch.float32, device=self._wire)
                floats = (self._bulk.recv([buf], self.peer, 0), buf)
        except RuntimeError as e:
            raise self._fail("recv", e) from e
        self._posted.append((first, work, floats))

    def recv(self) -> Frame:
        """Block until the peer's next frame arrives (or raise ChannelClosed within timeout_s);
        its floats are on `device`."""
        self._check_usable("recv")
        t0 = time.perf_counter()
        try:
            first, posted_floats = self._first, None
            if self._posted:
                first, work, posted_floats = self._posted.popleft()
                work.wait()
            else:
                self._ctl.recv([first], self.peer, 0).wait()
            h = first[:HEADER_LEN].tolist()
            try:
                check_header(h)
            except ProtocolError:
                self._broken = "protocol error"  # the stream is out of step: nothing after is trustworthy
                raise
            ints = floats = None
            if posted_floats is not None and (h[4] > INLINE_INTS or h[5] != posted_floats[1].numel()):
                self._broken = "protocol error"
                raise ProtocolError(f"posted {posted_floats[1].numel()} floats (and inline ints) for a frame "
                                    f"of {h[4]} ints and {h[5]} floats")
            if 0 < h[4] <= INLINE_INTS:
                ints = first[HEADER_LEN:HEADER_LEN + h[4]].clone()
            elif h[4]:
                ints = torch.empty(h[4], dtype=torch.int64)
                self._ctl.recv([ints], self.peer, 0).wait()
            if posted_floats is not None:
                posted_floats[0].wait()
                floats = posted_floats[1]
            elif h[5]:
                floats = torch.empty(h[5], dtype=torch.float32, device=self._wire)
                self._bulk.recv([floats], self.peer, 0).wait()
        except RuntimeError as e:
            raise self._fail("recv", e) from e
        finally:
            self.recv_wait_s += time.perf_counter() - t0
        self.frames_recv += 1
        extra = [t for t in (ints, floats) if t is not None and (t is floats or h[4] > INLINE_INTS)]
        self.bytes_recv += _nbytes(first) + sum(_nbytes(t) for t in extra)
        return decode_parts(h, ints, None if floats is None else floats.to(self.device))

    def stats(self) -> dict[str, float]:
        return {"frames_sent": self.frames_sent, "frames_recv": self.frames_recv,
                "bytes_sent": self.bytes_sent, "bytes_recv": self.bytes_recv,
                "recv_wait_s": self.recv_wait_s, "send_wait_s": self.send_wait_s}

    # -- internals ---------------------------------------------------------------------------

    def _wait_pending(self) -> None:
        if not self._pending:
            return
        t0 = time.perf_counter()
        try:
            for work, _ in self._pending:
                work.wait()
        except RuntimeError as e:
            raise self._fail("send", e) from e
        finally:
            self._pending = []
            self.send_wait_s += time.perf_counter() - t0

    def _check_usable(self, op: str) -> None:
        if self._closed or not self._connected:
            raise ChannelClosed(f"rank {self.rank}: {op} on a channel that is not connected "
                                f"(peer rank {self.peer})")
        if self._broken is not None:
            raise ChannelClosed(f"rank {self.rank}: {op} on a broken channel to peer rank {self.peer}: "
                                f"{self._broken}")

    def _fail(self, op: str, e: BaseException) -> ChannelClosed:
        # After any transport error the two sides are out of step; refuse further traffic, and
        # abort the groups now: a float receive posted on NCCL would otherwise stay pending until
        # its watchdog fires (see _nccl_group), long after the caller has moved on without a peer.
        self._broken = f"{type(e).__name__}: {e}"
        self._abort_groups()
        return ChannelClosed(f"rank {self.rank}: {op} failed, peer rank {self.peer} is gone or silent "
                             f"(timeout {self.timeout_s}s): {self._broken}")
