"""The tensor-parallel group and rank 0's calls to its workers.

Groups. The TP ranks form the process's default group (NCCL on GPUs, gloo on CPU): the row-
parallel all-reduces and each call's index payload run on it. The drafter's channel never uses
the default group (actors/protocol/channel.py builds its own), so both live in rank 0's process. Each
call's small header goes over a second, gloo group (`dist.new_group(backend="gloo")`): on GPUs,
announcing a call then costs no device sync. The default group's timeout is the data plane's
(a collective with a dead rank fails within it, or at once when its socket closes); the header
group's is long, because a worker waits on it for as long as the server idles.

A call. Rank 0 prepares its KV cache from host bookkeeping (PagedKVCache.prepare), then sends
what its workers need to run exactly the same forward: the header (batch shape, kv_len, last, the
mask flags, the plan's kinds and offsets, sizes) and one int64 payload on the model's device
(tokens, positions, the plan's write and read rows, the copy-on-write block copies prepare made,
logged in the pool). A worker never sees block tables: its pool holds its own KV heads in the
same blocks as rank 0's, kept identical by replaying the plan.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.protocol.ports import take_reserved
from actors.model.tp.shard import attach

log = logging.getLogger(__name__)

RENDEZVOUS_S = 600.0      # ranks load their shards before joining: a 70B shard takes minutes
IDLE_S = 7 * 24 * 3600.0  # a worker's wait for rank 0's next call (a dead rank 0 closes the socket)
COMPILE_S = 900.0         # the longest one bucket's compile may take (tens of seconds measured; 70B TP slower)
STOP, FORWARD = 0, 1
HEADER = 14   # op, B, T, kv_len, last, aligned, causal, write kind, write start, read kind, read start,
              # copies, payload length, spare


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def indexed_device(device: str, env: dict[str, str] | None = None, current: int | None = None) -> torch.device:
    """`device` with a CUDA index, as torch.cuda.set_device and init_process_group(device_id=)
    require: an explicit "cuda:N" stays; a bare "cuda" is LOCAL_RANK's GPU when a launcher set it
    (torchrun), else this process's current device. Under Ray that is index 0: Ray narrows
    CUDA_VISIBLE_DEVICES to the actor's own GPU, so each rank's "cuda" is its bundle's GPU."""
    d = torch.device(device)
    if d.type != "cuda" or d.index is not None:
        return d
    local = (os.environ if env is None else env).get("LOCAL_RANK")
    if local is not None:
        return torch.device("cuda", int(local))
    if current is None:
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return torch.device("cuda", current)


def group_timeout_s(data_plane_s: float, compiles: bool) -> float:
    """The default group's timeout. A collective with a dead rank should fail within the data
    plane's timeout; but with engine.compile a rank that meets a new bucket compiles it while the
    others already wait in the step's all-reduce, and NCCL's watchdog would abort them after the
    timeout. So a compiling group waits longer than any one compile (buckets are precompiled at
    start-up, actors/model/buckets.py, which leaves only the rare shape outside the set)."""
    return max(data_plane_s, COMPILE_S) if compiles else data_plane_s


def form_group(rank: int, n: int, addr: str, port: int, device: str, timeout_s: float):
    """Join the N ranks' default group and their header group; returns the header group. Rank 0
    serves the rendezvous store on `port`, taken over from reserve_port() when it was reserved."""
    backend = backend_for(device)
    sock: socket.socket | None = take_reserved(port) if rank == 0 else None
    store = dist.TCPStore(addr, port, n, rank == 0, timedelta(seconds=RENDEZVOUS_S),
                          master_listen_fd=sock.detach() if sock is not None else None)
    kw = {}
    if backend == "nccl":   # torch refuses an index-less "cuda" for both calls
        dev = indexed_device(device)
        torch.cuda.set_device(dev)
        kw["device_id"] = dev
    dist.init_process_group(backend, store=dist.PrefixStore("tp", store), rank=rank, world_size=n,
                            timeout=timedelta(seconds=timeout_s), **kw)
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=IDLE_S))


def close_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError as e:  # a group whose peer died may not tear down cleanly
            log.warning("tensor-parallel group teardown: %s", e)


@dataclass
class Call:
    """One forward, as a worker runs it."""
    tokens: torch.Tensor   # [B, T]
    pos: torch.Tensor      # [B, T]
    kv_len: int
    last: bool
    aligned: bool
    causal: bool
    plan: tuple            # (write, read) as actors/kv/paged.py builds them
    copies: torch.Tensor   # [2, n]: src blocks, dst blocks


def encode(tokens: torch.Tensor, pos: torch.Tensor, kv_len: int, last: bool, cache,
           copies: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [HEADER] on the CPU, payload on `device`) for a forward over a prepared cache."""
    (B, T), (write, read) = tokens.shape, cache.plan
    host = [tokens.reshape(-1), pos.reshape(-1), torch.tensor(copies, dtype=torch.long).reshape(-1)]
    parts = [torch.cat([t.long() for t in host]).to(device, non_blocking=True)]
    w_slice = isinstance(write, tuple)
    if not w_slice:
        parts.append(write)
    if read[0] == "gather":
        parts.append(read[1])
    payload = torch.cat(parts) if len(parts) > 1 else parts[0]
    header = torch.tensor([FORWARD, B, T, kv_len, int(last), int(cache.aligned), int(cache.causal),
                           int(w_slice), write[1] if w_slice else 0, int(read[0] == "view"),
                           read[1] if read[0] == "view" else 0, len(copies), payload.numel(), 0])
    return header, payload


def decode(h: list[int], payload: torch.Tensor) -> Call:
    _, B, T, kv_len, last, aligned, causal, w_slice, w_at, r_view, r_at, n_copies, _, _ = h
    n = B * T
    tokens, pos = payload[:n].view(B, T), payload[n:2 * n].view(B, T)
    at = 2 * n + 2 * n_copies
    copies = payload[2 * n:at].view(-1, 2).t()
    if w_slice:
        write = ("slice", w_at, T)
    else:
        write, at = payload[at:at + n], at + n
    read = ("view", r_at, kv_len) if r_view else ("gather", payload[at:at + B * kv_len], kv_len)
    return Call(tokens, pos, kv_len, bool(last), bool(aligned), bool(causal), (write, read), copies)


class TPLead:
    """Rank 0's end: forms the group with ranks 1..N-1 (TPWorker) and sends them every forward."""

    def __init__(self, n: int, device: str, timeout_s: float, pool):
        self.n, self.device, self.timeout_s = n, torch.device(device), timeout_s
        self.pool = pool
        self.ctl = None
        self.calls = 0

    def connect(self, addr: str, port: int, model) -> None:
        """Blocks until every worker has joined; then the model's all-reduces run over the group."""
        self.ctl = form_group(0, self.n, addr, port, str(self.device), self.timeout_s)
        attach(model, dist.group.WORLD)
        self.pool.copy_log = []
        log.info("tensor-parallel group of %d ranks formed on %s:%d", self.n, addr, port)

    def call(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int, last: bool, cache) -> None:
        """Start this forward on every worker; called after cache.prepare, before the model runs."""
        if self.ctl is None:
            raise RuntimeError(f"the target is split {self.n} ways but its tensor-parallel workers have not "
                               "joined (Verifier.join_tp)")
        copies, self.pool.copy_log = self.pool.copy_log, []
        header, payload = encode(tokens, pos, kv_len, last, cache, copies, self.device)
        dist.broadcast(header, 0, group=self.ctl)
        dist.broadcast(payload, 0)
        self.calls += 1

    def close(self) -> None:
        """Tell the workers to stop (best effort: one may be dead) and leave the group."""
        if self.ctl is None:
            return
        try:
            dist.broadcast(torch.tensor([STOP] + [0] * (HEADER - 1)), 0, group=self.ctl)
        except RuntimeError as e:
            log.warning("could not tell the tensor-parallel workers to stop: %s", e)
        self.ctl = None
        close_group()
