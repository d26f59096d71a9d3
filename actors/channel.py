"""The data plane between verifier (rank 0) and drafter (rank 1): torch.distributed point-to-point.

Strict ping-pong: each step the verifier sends one Frame and the drafter answers with one Frame.
Sends and receives therefore always pair up in the same order on both sides, which is what
NCCL needs (it ignores tags) and which can never deadlock. The verifier's send is an `isend`:
it must not block while the drafter is still pre-speculating; its buffers stay alive until the
next send waits on them.

Wire format of one Frame (all little-endian tensors, sent back to back):

| part    | dtype   | length   | content                                                        |
|---------|---------|----------|----------------------------------------------------------------|
| header  | int64   | 8        | MAGIC, VERSION, frame kind, n_records, n_ints, n_floats, step, 0 |
| ints    | int64   | n_ints   | records, each [kind, seq, round, a, b, n_tok, n_flt, tokens...] |
| floats  | float32 | n_floats | float payloads of the records, in record order (q rows)        |

ints / floats are omitted when empty.

Record kinds: ADMIT (prompt tokens), OUTCOME (a=k accepted, b=t*), RELEASE, DRAFT (a=cache hit
flag, b=rows of q attached, payload=draft tokens, floats=q rows), SHUTDOWN, PING (timing).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MAGIC, VERSION = 0x4F52, 1
HEADER_LEN, RECORD_HEAD = 8, 7


class Rec(IntEnum):
    ADMIT = 1
    OUTCOME = 2
    RELEASE = 3
    DRAFT = 4
    SHUTDOWN = 5
    PING = 6


class ProtocolError(RuntimeError):
    """A frame that does not follow the wire format."""


class ChannelClosed(RuntimeError):
    """The peer is gone or did not answer within the timeout."""


@dataclass
class Record:
    kind: int
    seq: int
    round: int = 0
    a: int = 0
    b: int = 0
    tokens: list[int] | torch.Tensor = field(default_factory=list)
    floats: torch.Tensor | None = None


@dataclass
class Frame:
    kind: int
    step: int
    records: list[Record]


def encode(frame: Frame) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Frame -> (header, ints, floats), built with one tensor() call per part (hot path)."""
    words: list[int] = []
    floats: list[torch.Tensor] = []
    for r in frame.records:
        toks = r.tokens.tolist() if isinstance(r.tokens, torch.Tensor) else r.tokens
        nf = 0 if r.floats is None else r.floats.numel()
        words += [int(r.kind), r.seq, r.round, r.a, r.b, len(toks), nf]
        words += toks
        if nf:
            floats.append(r.floats.reshape(-1).float())
    ints = torch.tensor(words, dtype=torch.int64) if words else None
    fl = torch.cat(floats) if floats else None
    header = torch.tensor([MAGIC, VERSION, int(frame.kind), len(frame.records),
                           0 if ints is None else ints.numel(), 0 if fl is None else fl.numel(),
                           frame.step, 0], dtype=torch.int64)
    return header, ints, fl


def decode(header: torch.Tensor, ints: torch.Tensor | None, floats: torch.Tensor | None) -> Frame:
    h = header.tolist()
    if len(h) != HEADER_LEN or h[0] != MAGIC:
        raise ProtocolError(f"bad frame header {h[:2]} (expected magic {MAGIC:#x})")
    if h[1] != VERSION:
        raise ProtocolError(f"frame version {h[1]} != {VERSION}")
    kind, n_rec, n_ints, n_floats, step = h[2], h[3], h[4], h[5], h[6]
    words = ints.tolist() if ints is not None else []
    if len(words) != n_ints:
        raise ProtocolError(f"frame announced {n_ints} ints, got {len(words)}")
    records, i, fo = [], 0, 0
    for _ in range(n_rec):
        if i + RECORD_HEAD > len(words):
            raise ProtocolError("frame truncated inside a record header")
        rk, seq, rnd, a, b, n, nf = words[i:i + RECORD_HEAD]
        toks = words[i + RECORD_HEAD:i + RECORD_HEAD + n]
        if len(toks) != n or fo + nf > n_floats:
            raise ProtocolError("frame truncated inside a record payload")
        fl = floats[fo:fo + nf] if nf else None
        try:
            records.append(Record(Rec(rk), seq, rnd, a, b, toks, fl))
        except ValueError as e:
            raise ProtocolError(f"unknown record kind {rk}") from e
        i += RECORD_HEAD + n
        fo += nf
    if i != len(words) or fo != n_floats:
        raise ProtocolError("frame has trailing data")
    return Frame(kind, step, records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(backend: str, device: str) -> str:
    """gloo unless asked for NCCL explicitly: NCCL needs the two roles on different GPUs
    (two ranks on one GPU are refused), which only the deployment knows."""
    if backend != "auto":
        return backend
    if device.startswith("cuda") and os.environ.get("OUTRIDER_NCCL") == "1":
        return "nccl"
    return "gloo"


class Channel:
    def __init__(self, rank: int, master_addr: str, master_port: int, backend: str = "auto",
                 device: str = "cpu", timeout_s: float = 30.0):
        if rank not in (0, 1):
            raise ValueError("the data plane has exactly two ranks: 0 (verifier) and 1 (drafter)")
        self.rank, self.peer = rank, 1 - rank
        self.addr, self.port = master_addr, master_port
        self.backend = pick_backend(backend, device)
        self.device = torch.device(device if self.backend == "nccl" else "cpu")
        self.timeout_s = timeout_s
        self._pending: list = []
        self._keep: tuple = ()
        self.open = False
        self.frames_sent = self.frames_recv = self.bytes_sent = self.bytes_recv = 0
        self.recv_wait_s = 0.0

    def connect(self) -> None:
        dist.init_process_group(self.backend, init_method=f"tcp://{self.addr}:{self.port}", rank=self.rank,
                                world_size=2, timeout=timedelta(seconds=self.timeout_s))
        self.open = True
        log.info("data plane up: rank %d, %s, %s:%d", self.rank, self.backend, self.addr, self.port)

    def _wait_pending(self) -> None:
        for w in self._pending:
            w.wait()
        self._pending, self._keep = [], ()

    def send(self, frame: Frame) -> None:
        parts = [t for t in encode(frame) if t is not None]
        try:
            self._wait_pending()
            parts = [t.to(self.device) for t in parts]
            if self.rank == 0:
                self._pending = [dist.isend(t, self.peer) for t in parts]
                self._keep = tuple(parts)
            else:
                for t in parts:
                    dist.send(t, self.peer)
        except Exception as e:
            raise ChannelClosed(f"sending to rank {self.peer} failed: {e}") from e
        self.frames_sent += 1
        self.bytes_sent += sum(t.numel() * t.element_size() for t in parts)

    def recv(self) -> Frame:
        t0 = time.perf_counter()
        try:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            dist.recv(header, self.peer)
            h = header.tolist()
            if h[0] != MAGIC:
                raise ProtocolError(f"bad frame header {h[:2]}")
            ints = floats = None
            if h[4]:
                ints = torch.empty(h[4], dtype=torch.int64, device=self.device)
                dist.recv(ints, self.peer)
            if h[5]:
                floats = torch.empty(h[5], dtype=torch.float32, device=self.device)
                dist.recv(floats, self.peer)
        except ProtocolError:
            raise
        except Exception as e:
            raise ChannelClosed(f"receiving from rank {self.peer} failed (peer dead or silent for "
                                f"{self.timeout_s:.0f}s): {e}") from e
        self.recv_wait_s += time.perf_counter() - t0
        self.frames_recv += 1
        self.bytes_recv += 8 * (HEADER_LEN + h[4]) + 4 * h[5]
        return decode(header.cpu(), None if ints is None else ints.cpu(), None if floats is None else floats.cpu())

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self._wait_pending()
        except Exception:
            pass
        try:
            dist.destroy_process_group()
        except Exception as e:
            log.debug("destroy_process_group: %s", e)

    def stats(self) -> dict:
        return {"frames_sent": self.frames_sent, "frames_recv": self.frames_recv, "bytes_sent": self.bytes_sent,
                "bytes_recv": self.bytes_recv, "recv_wait_s": self.recv_wait_s}
