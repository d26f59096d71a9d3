"""Synchronous speculative decoding with a draft head, one sequence, in one process: the plain
reference for the head (as actors/generate.py's generate_sd is for a draft model).

Each round the target verifies K drafted tokens in one forward that also yields its features;
the accepted positions' features become the head's next real rows (actors/eagle/draft.py), so
the head drafts the next round from exactly what the target computed."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from actors.eagle.draft import HeadStream
from actors.eagle.head import EagleHead
from actors.generate import Generation, Stream, _finish, _generator, _pick, _result, check_context
from actors.model.model import Transformer
from actors.spec.sampling import SamplingParams, probs_from_logits, sample
from actors.spec.stats import SpecStats
from actors.spec.stopping import StopCriteria
from actors.spec.verify import verify_greedy, verify_sampling


def draft_tokens(head: EagleHead, hs: HeadStream, logits: torch.Tensor, hidden: torch.Tensor, k: int,
                 params: SamplingParams, gen: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
    """K tokens (target ids) from the head, starting from its last real row's output; with
    sampling, each token's q over the target's vocabulary (zero outside the draft set)."""
    drafts, qs = [], []
    for depth in range(1, k + 1):
        if params.greedy:
            tok = int(head.to_target(logits.argmax()))
        else:
            q = head.full_probs(probs_from_logits(logits, params))
            tok = int(sample(q, gen))
            qs.append(q)
        drafts.append(tok)
        if depth < k:
            logits, hidden = hs.step(hidden, tok, depth)
    return drafts, qs


def generate_sd_head(target: Transformer, head: EagleHead, prompt: list[int], stop: StopCriteria, k: int,
                     params: SamplingParams = SamplingParams(),
                     decode: Callable[[list[int]], str] | None = None) -> Generation:
    params.validate()
    if k < 1:
        raise ValueError(f"k must be at least 1 for speculative decoding, got {k}")
    t0 = time.perf_counter()
    need = check_context(target, len(prompt), stop.max_new_tokens, k)
    aux = head.args.aux_layers
    tgt, hs = Stream(target, need), HeadStream(head, need)
    gen = _generator(params)
    stats = SpecStats(k=k)
    seq = list(prompt)
    logits, feats = tgt.feed(seq, aux)
    seq.append(_pick(logits[-1], params, gen))
    generated = [seq[-1]]
    done = _finish(generated, 0, stop, decode)
    dl, dh = hs.feed(feats, seq[1:])   # real rows 0..n-1: features at t, token t+1
    while not done:
        drafts, qs = draft_tokens(head, hs, dl, dh, k, params, gen)
        logits, feats = tgt.feed(seq[tgt.length:] + drafts, aux)
        d = torch.tensor(drafts, dtype=torch.long)
        if params.greedy:
            out = verify_greedy(d, logits)
        else:
            out = verify_sampling(d, torch.stack(qs), probs_from_logits(logits, params), gen)
        stats.record_round(k, out.accepted)
        new = drafts[:out.accepted] + [out.token]
        seq += new
        tgt.rollback(len(seq) - 1)
        hs.rollback(len(seq) - 1 - len(new))   # the real rows before this round
        dl, dh = hs.feed(feats[:out.accepted + 1], new)
        start = len(generated)
        generated += new
        done = _finish(generated, start, stop, decode)
    return _result(generated[:done[0]], done[1], stats, t0, stop, decode)
