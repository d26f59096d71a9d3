"""The engine on the check's pair: AR, SD and SSD over the local launcher (the verifier in this
process, the drafter in a spawned child, both on one device: the channel is gloo, as NCCL refuses
two ranks on one GPU), and the eager/compiled forward timings."""
from __future__ import annotations

import dataclasses
import logging
import resource
import statistics
import time

import torch

from actors.engine_spec import EngineSpec

log = logging.getLogger(__name__)


def spec_for(tdir, ddir, mode: str, device: str, dtype: str, k: int, max_seq_len: int, max_batch: int) -> EngineSpec:
    # adaptive off: every round drafts K, so identity is tested on speculated tokens, not on K = 0
    return EngineSpec(target=str(tdir), draft=str(ddir), target_dtype=dtype, draft_dtype=dtype, target_device=device,
                      draft_device=device, mode=mode, k=k, adaptive=False, fan_out_budget=2 * (k + 1),
                      max_batch=max_batch, max_seq_len=max_seq_len, timeout_s=120.0)


def plan_for(spec: EngineSpec):
    """The memory plan the deployment path would make for this spec on this machine."""
    from cluster.launch.memory_plan import plan_memory

    return plan_memory(spec, launcher="local")


def device_used(device: str) -> int | None:
    """Bytes in use on the device by every process (CUDA), or this process's and its children's
    peak resident memory (CPU)."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return total - free
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib * 1024


def run_engine(spec: EngineSpec, prompts: list[list[int]], new: int, sampling: tuple | None = None) -> dict:
    """Greedy continuations of `prompts` (and, with sampling = (prompt, n, new, params list), n
    sampled continuations) from a LocalEngine; its speculation stats, wall time and memory."""
    from actors.launch import LocalEngine
    from actors.spec.sampling import SamplingParams
    from cluster.serving.coordinator import Coordinator, GenerateArgs

    plan = plan_for(spec)
    spec = plan.apply(spec)
    t0 = time.perf_counter()
    engine = LocalEngine(spec).start()
    up_s = time.perf_counter() - t0
    coord = Coordinator(engine, None, max_queue=4096)
    channel = engine.verifier.drafter.channel
    res: dict = {"mode": spec.mode, "up_s": up_s, "plan": plan,
                 "backend": channel.backend if channel is not None else "none"}
    try:
        t0 = time.perf_counter()
        hs = [coord.submit(GenerateArgs(list(p), new, SamplingParams(), ignore_eos=True)) for p in prompts]
        finals = [h.result() for h in hs]
        res["greedy_s"] = time.perf_counter() - t0
        res["outs"] = [h.tokens for h in hs]
        res["errors"] = [f.error for f in finals if f.finish_reason != "length"]
        res["drafts"] = sum(f.stats.drafts for f in finals)
        res["accepted"] = sum(f.stats.accepted_tokens for f in finals)
        res["hits"] = sum(f.stats.cache_hits for f in finals)
        if sampling is not None:
            prompt, n_new, params = sampling
            hs = [coord.submit(GenerateArgs(list(prompt), n_new, p, ignore_eos=True)) for p in params]
            for h in hs:
                h.result()
            res["samples"] = [h.tokens for h in hs]
        res["used"] = device_used(spec.target_device)
        if spec.target_device.startswith("cuda"):
            res["peak_reserved"] = torch.cuda.max_memory_reserved()
    finally:
        coord.stop()
        engine.stop()
    return res


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_runner(runner, ctx: int, n: int, reps: int, vocab: int) -> float:
    """Median ms of one forward of n tokens after a ctx-token prefix (one sequence)."""
    cache = runner.cache
    h = cache.alloc()
    x = torch.arange(ctx + n) % vocab
    runner(x[None, :ctx], torch.arange(ctx)[None], [h], last=True)
    cache.advance(h, ctx)
    times = []
    for i in range(reps + 2):
        _sync(runner.device)
        t0 = time.perf_counter()
        logits = runner(x[None, ctx:ctx + n], torch.arange(ctx, ctx + n)[None], [h])
        logits[0, -1, :1].cpu()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    cache.free(h)
    return 1e3 * statistics.median(times)


def timings(tdir, device: str, dtype: str, k: int, ctx: int, reps: int, compile_too: bool,
            backend: str = "inductor") -> dict:
    """t_decode(1) and t_verify(K+1) eager, the HBM floor (bytes a forward streams / measured copy
    bandwidth), and with engine.compile's padded static forward: its capture time and the same
    two times."""
    from actors.model.loader import load_model
    from actors.model.runner import Runner
    from cluster.bench.kernels import copy_bandwidth, streamed_bytes

    model = load_model(tdir, dtype, device)
    spec = EngineSpec(target=str(tdir), mode="ar", k=k, max_batch=1, max_seq_len=ctx + 2 * k + 8,
                      target_dtype=dtype, target_device=device)
    vocab = model.args.vocab_size
    eager = Runner(model, spec, "timing", device, spec.target_blocks(), 1, spec.target_max_len)
    out = {"decode_ms": time_runner(eager, ctx, 1, reps, vocab),
           "verify_ms": time_runner(eager, ctx, k + 1, reps, vocab)}
    bw = copy_bandwidth(device)
    out["bytes"], out["copy_gbs"] = streamed_bytes(model), bw / 1e9
    out["floor_ms"] = 1e3 * out["bytes"] / bw   # bw counts bytes read + written: a forward only reads
    if compile_too:
        cspec = dataclasses.replace(spec, compile=True, pad_shapes=True)
        # CPU: the loader's oneDNN-packed projections are an eager-only layout; compile the plain one
        cmodel = model if device.startswith("cuda") else load_model(tdir, dtype, device, pack=False)
        comp = Runner(cmodel, cspec, "timing", device, cspec.target_blocks(), 1, cspec.target_max_len,
                      precompile=False, backend=backend)
        shapes = [comp.buckets.shape(1, 1, ctx + 1), comp.buckets.shape(1, k + 1, ctx + k + 1)]
        out["capture_s"] = comp.precompile(shapes)
        out["shapes"] = shapes
        out["c_decode_ms"] = time_runner(comp, ctx, 1, reps, vocab)
        out["c_verify_ms"] = time_runner(comp, ctx, k + 1, reps, vocab)
    return out
