"""Time one round's verification on the host: `round_outcomes` on a batch's logits, after the
forward (`python -m cluster.bench.verify`). Sampling only: an all-greedy batch takes one argmax.

Each case is a batch of B sequences with K draft tokens each (q rows as the drafter sends them),
one torch thread, as the verifier's loop runs. The figures are the median thread CPU time of a
call and its minor page faults: with glibc's default malloc, buffers as large as the logits are
mapped afresh on every call (its mmap threshold follows the largest block freed), which can cost
more than the arithmetic; MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ change that.
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time
from types import SimpleNamespace

import torch

from actors.spec.sampling import SamplingParams
from actors.spec.verify import round_outcomes

log = logging.getLogger(__name__)

SETTINGS = {
    "temperature 0.8": SamplingParams(temperature=0.8),
    "temperature 0.8, top-k 50": SamplingParams(temperature=0.8, top_k=50),
    "temperature 0.8, top-p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
}


def batch(B: int, K: int, V: int, params: SamplingParams, seed: int = 0):
    """(seqs, rows, logits): one pending token then K drafts per sequence, drafts drawn from q."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, K + 1, V, generator=g)
    seqs, rows = [], []
    for b in range(B):
        q = torch.softmax(3 * torch.randn(K, V, generator=g) / params.temperature, -1)
        draft = torch.multinomial(q, 1, generator=g).flatten().tolist()
        seqs.append(SimpleNamespace(draft=draft, q=q, seed=b, tokens=[0] * 100, req=SimpleNamespace(params=params)))
        rows.append([0] + draft)
    return seqs, rows, logits


def time_round(B: int, K: int, V: int, params: SamplingParams, calls: int = 30,
               batched: bool | None = None) -> tuple[float, float]:
    """(median milliseconds, median minor page faults) per call of round_outcomes (`batched`:
    force its path; None: the one it picks on this device)."""
    seqs, rows, logits = batch(B, K, V, params)
    round_outcomes(seqs, rows, logits, V, batched=batched)
    ms, faults = [], []
    for _ in range(calls):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time_ns()
        round_outcomes(seqs, rows, logits, V, batched=batched)
        ms.append((time.thread_time_ns() - t0) / 1e6)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return statistics.median(ms), statistics.median(faults)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 49152])
    ap.add_argument("--batched", action="store_true",
                    help="time the batched rule (a GPU's path) instead of the one this device picks")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    for V in args.vocab:
        for name, params in SETTINGS.items():
            ms, faults = time_round(args.batch, args.k, V, params, calls=5 if "top-p" in name and V > 10_000 else 30,
                                    batched=True if args.batched else None)
            log.info("B=%d K=%d V=%d %-28s %8.3f ms/round %6.0f page faults", args.batch, args.k, V, name, ms, faults)


if __name__ == "__main__":
    main()
