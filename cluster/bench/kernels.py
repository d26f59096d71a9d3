"""Direct kernel timings for `outrider bench`: one forward of the target (verify K+1 tokens, or
one token) and of the drafter on one thread, at the bench's mean context, in the bench's own
process; and the memory floor of a target forward: the bytes it must stream (its weights less
the embedding table, of which it reads one row per token) over the device's measured copy
bandwidth. What SSD's overlap costs the verifier in hardware is not timed here: the drafter's
round run beside this process, even flat out, cost the forward 0-0.3 ms, while the engine's own
forward runs 0.2-0.8 ms slower in SSD than in sync SD at the same K; so the report compares the
engine's forward times instead."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

KERNEL_REPS = 20
COPY_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}   # large enough to stream from DRAM / HBM, not cache


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timers time the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
    in a cache table as long as the engine's (`max_len` positions)."""
    from actors.kv import PagedKVCache

    L, dev = len(ctx), model.device
    cache = PagedKVCache.for_rows(model.args, 1, max(max_len, L + n_tokens + 1), model.dtype, dev)
    handle = [cache.alloc()]

    def run(tokens: list[int], start: int) -> None:
        pos = torch.arange(start, start + len(tokens))[None]
        cache.prepare(handle, pos, start + len(tokens))
        if hasattr(model, "feats"):   # a draft head (actors/eagle/): its rows' features
            model.feats = torch.zeros(1, len(tokens), model.dim, dtype=model.dtype, device=dev)
        model(torch.tensor([tokens], device=dev), pos.to(dev), cache, kv_len=start + len(tokens))

    run(ctx, 0)
    cache.advance(handle[0], L)
    times = []
    for i in range(reps + 3):
        sync(dev)
        t0 = time.perf_counter()
        run(ctx[-n_tokens:], L)
        sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def streamed_bytes(model) -> int:
    """Bytes one forward must read from memory: every weight, except the embedding table (a
    row per token) unless the output head shares it."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


@torch.inference_mode()
def copy_bandwidth(device: torch.device | str, reps: int = 10) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and bytes written
    (the median of `reps` copies of COPY_BYTES, on this thread's torch threads)."""
    device = torch.device(device)
    n = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times)


class VerifyProbe:
    """t_verify(K+1) sampled between the timed generations of the main phase (call it after each
    prompt), so the bound is measured on the same machine state as the modes it is compared
    with: this host's speed drifts by several percent over minutes."""

    def __init__(self, target_dir: str, ctx: list[int], k: int, max_len: int, reps: int = 5,
                 cpus: set[int] | None = None, device: str = "cpu", dtype: str = "float32"):
        from actors.model.loader import load_model

        with torch_threads(1):
            self.model = load_model(target_dir, dtype, device=device)
        self.ctx, self.k, self.max_len, self.reps = ctx, k, max_len, reps
        self.cpus = cpus   # the verifier's pinned CPUs: the probe runs there too
        self.samples: list[float] = []

    def __call__(self) -> None:
        with torch_threads(1):
            self.samples.append(time_forward(self.model, self.ctx, self.k + 1, self.max_len, self.reps))


def load_draft(draft_dir: str, target_dir: str, dtype: str, device: str):
    """The drafter as the engine runs it: a draft model, or a draft head in the drafter's seat."""
    from actors.eagle.checkpoint import is_head_dir, load_head_for
    from actors.eagle.drafter_model import HeadModel
    from actors.model.loader import load_model, parse_dtype

    if is_head_dir(draft_dir):
        return HeadModel(load_head_for(draft_dir, target_dir, parse_dtype(dtype, device), device))
    return load_model(draft_dir, dtype, device=device)


def measure_kernels(target_dir: str, draft_dir: str, ctx: list[int], ks: list[int], max_len: int,
                    target=None, device: str = "cpu", draft_device: str = "cpu", dtype: str = "float32",
                    draft_dtype: str = "float32") -> dict:
    """Direct timings on one thread. `target`: the target model already loaded in this process
    (else it is loaded here, in `dtype`)."""
    from actors.model.loader import load_model

    with torch_threads(1):
        target = target or load_model(target_dir, dtype, device=device)
        draft = load_draft(draft_dir, target_dir, draft_dtype, draft_device)
        return {"context_tokens": len(ctx), "threads": 1, "reps": KERNEL_REPS, "device": str(target.device),
                "t_target_1_s": time_forward(target, ctx, 1, max_len),
                "t_draft_1_s": time_forward(draft, ctx, 1, max_len),
                "t_verify_s": {k: time_forward(target, ctx, k + 1, max_len) for k in sorted(set(ks))},
                "target_streamed_bytes": streamed_bytes(target),
                "copy_bytes_per_s": copy_bandwidth(target.device)}
