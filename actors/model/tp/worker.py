"""Tensor-parallel ranks 1..N-1: a shard of the target and a KV pool of its own heads.

A TPWorker does nothing but what rank 0 asks: it waits for a call (actors/model/tp/group.py), makes the
copy-on-write block copies rank 0's prepare made, runs the same forward over its shard with rank
0's write/read plan (its pool has rank 0's n_blocks and block_size, so the same rows hold the same
positions), and waits again, until told to stop. It holds no sequences and samples nothing, so it
loads no vocabulary head. If rank 0 goes away the next receive fails and the loop ends with an
error; if a worker goes away, rank 0's next collective fails and the verifier is rebuilt whole.

`spawn_workers` starts them as processes for `launcher: local`; cluster/launch/engine.py starts them as
Ray actors.
"""
from __future__ import annotations

import logging
import multiprocessing as mp

import torch
import torch.distributed as dist

from actors.protocol.ports import reserve_port
from actors.model.compiled import compile_forward
from actors.kv import BlockPool
from actors.kv.paged import read_kv, write_kv
from actors.model.loader import load_model
from actors.engine_spec import EngineSpec
from actors.model.tp.group import HEADER, STOP, close_group, decode, form_group, group_timeout_s
from actors.model.tp.shard import attach, rank_device

log = logging.getLogger(__name__)


class PlannedCache:
    """The cache interface the model calls, over a plan received from rank 0."""

    def __init__(self, pool: BlockPool, call):
        self.pool, self.plan, self.aligned, self.causal = pool, call.plan, call.aligned, call.causal

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        write_kv(self.pool, layer, k, v, self.plan)
        return read_kv(self.pool, layer, self.plan)


class TPWorker:
    def __init__(self, spec: EngineSpec, rank: int, device: str | None = None):
        torch.set_num_threads(spec.num_threads)
        self.spec, self.rank, self.n = spec, rank, spec.tensor_parallel_size
        self.device = device or spec.target_device
        self.model = load_model(spec.target, spec.target_dtype, self.device, tp=(rank, self.n), head=False)
        if spec.compile:   # as rank 0's: every rank runs the same forward
            compile_forward(self.model, f"tensor-parallel rank {rank}")
        a = self.model.args
        self.pool = BlockPool(a.n_layers, spec.target_blocks(), spec.kv_block_size, a.n_kv_heads, a.head_dim,
                              self.model.dtype, self.device)
        self.ctl = None
        self.calls = 0

    def connect(self, addr: str, port: int) -> None:
        self.ctl = form_group(self.rank, self.n, addr, port, self.device,
                              group_timeout_s(self.spec.timeout_s, self.spec.compile))
        attach(self.model, dist.group.WORLD)

    def run(self) -> None:
        """Serve rank 0's calls until it says stop (returns) or goes away (raises)."""
        try:
            while self.step():
                pass
        finally:
            close_group()

    def step(self) -> bool:
        header = torch.zeros(HEADER, dtype=torch.long)
        dist.broadcast(header, 0, group=self.ctl)
        h = header.tolist()
        if h[0] == STOP:
            return False
        payload = torch.empty(h[12], dtype=torch.long, device=self.device)
        dist.broadcast(payload, 0)
        call = decode(h, payload)
        with torch.inference_mode():
            if call.copies.numel():
                src, dst = call.copies
                self.pool.k[:, dst] = self.pool.k[:, src]
                self.pool.v[:, dst] = self.pool.v[:, src]
            self.model(call.tokens, call.pos, PlannedCache(self.pool, call), kv_len=call.kv_len, last=call.last)
        self.calls += 1
        return True


def _worker_main(spec: EngineSpec, rank: int, addr: str, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    w = TPWorker(spec, rank, rank_device(spec.target_device, rank))
    w.connect(addr, port)
    w.run()


def spawn_workers(spec: EngineSpec) -> tuple[int, list[mp.Process]]:
    """Ranks 1..N-1 as processes on this host (spawn: a forked child would inherit torch's threads
    and CUDA), loading their shards while rank 0 loads its own; they join rank 0 on the port
    returned, reserved here for rank 0's join_tp."""
    port = reserve_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(spec, r, "127.0.0.1", port), daemon=True,
                         name=f"outrider-tp{r}") for r in range(1, spec.tensor_parallel_size)]
    for p in procs:
        p.start()
    return port, procs


def end_workers(procs: list[mp.Process], timeout_s: float) -> None:
    """Wait for worker processes told to stop; kill any still there after timeout_s."""
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join(timeout_s)
