"""Direct kernel timings for `outrider bench`: one forward of the target (verify K+1 tokens, or
one token) and of the drafter on one thread, at the bench's mean context, in the bench's own
process — and t_verify again while another process runs the drafter's own SSD round (paced to
one per verify) on the other core, which is what SSD's overlap costs the verifier in hardware."""
from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)
KERNEL_REPS = 20


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def time_forward(model, ctx: list[int], n_tokens: int, max_len: int, reps: int = KERNEL_REPS) -> float:
    """Median seconds of one forward of `n_tokens` tokens after a `len(ctx)`-token cached prefix,
    in a cache slot as long as the engine's (`max_len` positions)."""
    from actors.kv_cache import KVCache

    L = len(ctx)
    cache = KVCache.for_model(model.args, 1, max(max_len, L + n_tokens + 1), model.dtype, model.device)
    slot = torch.tensor([cache.alloc()])
    model(torch.tensor([ctx]), torch.arange(L)[None], cache, slot)
    x, pos = torch.tensor([ctx[-n_tokens:]]), torch.arange(L, L + n_tokens)[None]
    times = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        model(x, pos, cache, slot)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class VerifyProbe:
    """t_verify(K+1) sampled between the timed generations of the main phase (call it after each
    prompt), so the bound is measured on the same machine state as the modes it is compared
    with: this host's speed drifts by several percent over minutes."""

    def __init__(self, target_dir: str, ctx: list[int], k: int, max_len: int, reps: int = 5):
        from actors.loader import load_model

        with torch_threads(1):
            self.model = load_model(target_dir)
        self.ctx, self.k, self.max_len, self.reps = ctx, k, max_len, reps
        self.samples: list[float] = []

    def __call__(self) -> None:
        with torch_threads(1):
            self.samples.append(time_forward(self.model, self.ctx, self.k + 1, self.max_len, self.reps))


def _draft_load(draft_dir: str, ctx: list[int], k: int, branches: int, max_len: int, period_s: float,
                stop, started) -> None:
    """Another process: the drafter's own round, as in SSD — pre-speculate `branches` branches
    of K tokens, build the table, adopt the deepest branch as the outcome — once per
    `period_s` (one verify), until `stop` is set. The sequence restarts every 128 tokens, so
    the context stays near the bench's."""
    from actors.drafter import Drafter
    from actors.frame import Frame, Rec, Record
    from actors.sampling import SamplingParams
    from actors.spec import EngineSpec
    from actors.wire import encode_params

    torch.set_num_threads(1)
    d = Drafter(EngineSpec(target=draft_dir, draft=draft_dir, mode="ssd", k=k, fan_out_budget=branches,
                           max_batch=1, max_seq_len=max_len))
    sid, step = 0, 0
    while not stop.is_set():
        sid += 1
        d.handle(Frame(Rec.ADMIT, step, [Record(Rec.ADMIT, sid, 0, tokens=encode_params(SamplingParams(), 0, ctx))]))
        s = d.seqs[sid]
        while len(s.tokens) < len(ctx) + 128 and not stop.is_set():
            t0 = time.perf_counter()
            d.prespeculate()
            d.table_frame(step)
            kk, t = max(s.branches)
            step += 1
            d.handle(Frame(Rec.OUTCOME, step, [Record(Rec.OUTCOME, sid, s.round, kk, t)]))
            started.set()
            time.sleep(max(0.0, period_s - (time.perf_counter() - t0)))
        d.handle(Frame(Rec.RELEASE, step, [Record(Rec.RELEASE, sid)]))


def measure_kernels(target_dir: str, draft_dir: str, ctx: list[int], ks: list[int], max_len: int,
                    branches: int = 16, target=None, k_ssd: int | None = None) -> dict:
    """Direct timings on one thread. t_verify is also measured while a second process runs the
    drafter's own SSD round (K = `k_ssd`, `branches` branches, one round per t_verify) on the
    other core: what SSD's overlap costs the verifier in hardware (shared caches and memory
    bandwidth), separate from any software overhead. `target`: the target model already loaded
    in this process (else it is loaded here)."""
    import multiprocessing as mp

    from actors.loader import load_model

    with torch_threads(1):
        target, draft = target or load_model(target_dir), load_model(draft_dir)
        t_verify = {k: time_forward(target, ctx, k + 1, max_len) for k in sorted(set(ks))}
        out = {"context_tokens": len(ctx), "threads": 1, "reps": KERNEL_REPS,
               "t_target_1_s": time_forward(target, ctx, 1, max_len),
               "t_draft_1_s": time_forward(draft, ctx, 1, max_len), "t_verify_s": t_verify}
        spawn = mp.get_context("spawn")
        kb = k_ssd or max(ks)
        stop, started = spawn.Event(), spawn.Event()
        load = spawn.Process(target=_draft_load, daemon=True, args=(
            draft_dir, ctx, kb, branches, max_len, t_verify[kb], stop, started))
        load.start()
        try:
            if started.wait(60):  # its model loaded and its first round done
                out["t_verify_drafter_busy_s"] = {k: time_forward(target, ctx, k + 1, max_len)
                                                  for k in sorted(set(ks))}
                out["drafter_load_branches"], out["drafter_load_k"] = branches, kb
            else:
                log.warning("the drafter load process did not start (exit code %s): no busy t_verify",
                            load.exitcode)
        finally:
            stop.set()
            load.join(10)
        return out
