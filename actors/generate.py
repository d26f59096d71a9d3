"""In-process decoding, one sequence: autoregressive (AR) and synchronous speculative (SD).

This is the plain, serial reference for the distributed engine, in the shape of gpt-fast's
decode loop. Both models keep a KV cache; `Stream.feed` runs whatever committed tokens the
cache has not seen yet plus any extra (draft) tokens, so one primitive serves prefill, decode,
draft and verify, and a rollback is just moving the cache length back.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.spec.adaptive import Controller
from actors.kv import PagedKVCache
from actors.model.model import Transformer
from actors.spec.sampling import SamplingParams, probs_from_logits, sample
from actors.spec.stats import SpecStats
from actors.spec.stopping import StopCriteria
from actors.spec.verify import verify_greedy, verify_sampling


@dataclass
class Generation:
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    stats: SpecStats
    elapsed_s: float
    text: str | None = None


class Stream:
    """One sequence's view of a model: its KV table and how many positions it holds."""

    def __init__(self, model: Transformer, max_len: int):
        self.model = model
        self.cache = PagedKVCache.for_rows(model.args, 1, max_len, model.dtype, model.device)
        self.handle = self.cache.alloc()
        self.length = 0

    @torch.inference_mode()
    def feed(self, tokens: list[int], aux: tuple[int, ...] = ()):
        """Run `tokens` at the next positions; returns float32 logits [len(tokens), V] (with `aux`,
        and the features of those layers [len(tokens), len(aux) * dim]: Transformer.forward)."""
        n = len(tokens)
        dev = self.model.device
        pos = torch.arange(self.length, self.length + n)[None]
        self.cache.prepare([self.handle], pos, self.length + n)   # host bookkeeping: no device reads
        out = self.model(torch.tensor([tokens], device=dev), pos.to(dev), self.cache, kv_len=self.length + n, aux=aux)
        self.length += n
        self.cache.advance(self.handle, self.length)
        if aux:
            return out[0][0].float(), out[1][0]
        return out[0].float()

    def rollback(self, length: int) -> None:
        self.length = min(self.length, length)
        self.cache.truncate(self.handle, self.length)


def check_context(model: Transformer, n_prompt: int, max_new_tokens: int, k: int = 0) -> int:
    """The cache length a request needs; a clear error if the model cannot hold it."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    need = n_prompt + max_new_tokens + k + 1
    limit = model.args.max_position_embeddings
    if n_prompt + max_new_tokens > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} tokens")
    return need


def _finish(generated: list[int], start: int, stop: StopCriteria,
            decode: Callable[[list[int]], str] | None) -> tuple[int, str] | None:
    hit = stop.check_tokens(generated, start)
    if stop.stop_strings and decode is not None:
        upto = hit[0] if hit else len(generated)
        # Only the tail can newly contain a stop string; re-decode a window that covers it.
        if stop.check_text(decode(generated[:upto])) is not None:
            for n in range(max(start, 1), upto + 1):
                if stop.check_text(decode(generated[:n])) is not None:
                    return n, "stop"
    return hit


def _result(generated, reason, stats, t0, stop, decode) -> Generation:
    text = None
    if decode is not None:
        text = decode(generated)
        cut = stop.check_text(text) if stop.stop_strings else None
        text = text[:cut] if cut is not None else text
    return Generation(generated, reason, stats, time.perf_counter() - t0, text)


def _pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.greedy:
        return int(logits.argmax())
    return int(sample(probs_from_logits(logits, params), gen))


def _generator(params: SamplingParams) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else torch.seed())
    return g


def generate_ar(target: Transformer, prompt: list[int], stop: StopCriteria,
                params: SamplingParams = SamplingParams(),
                decode: Callable[[list[int]], str] | None = None) -> Generation:
    params.validate()
    t0 = time.perf_counter()
    tgt = Stream(target, check_context(target, len(prompt), stop.max_new_tokens))
    gen = _generator(params)
    seq, generated = list(prompt), []
    while True:
        tok = _pick(tgt.feed(seq[tgt.length:])[-1], params, gen)
        seq.append(tok)
        generated.append(tok)
        done = _finish(generated, len(generated) - 1, stop, decode)
        if done:
            return _result(generated[:done[0]], done[1], SpecStats(), t0, stop, decode)


def generate_sd(target: Transformer, draft: Transformer, prompt: list[int], stop: StopCriteria, k: int,
                params: SamplingParams = SamplingParams(),
                decode: Callable[[list[int]], str] | None = None, adaptive: bool = False) -> Generation:
    """Synchronous speculative decoding: draft k tokens, verify them in one target pass. With
    `adaptive`, each round's K (0..k) comes from the engine's policy (actors/spec/adaptive.py), fed
    with this loop's own measurements; at K = 0 a round is a plain decode step and the draft
    cache catches up when drafting resumes."""
    params.validate()
    if k < 1:
        raise ValueError(f"k must be at least 1 for speculative decoding, got {k}")
    if draft.args.vocab_size != target.args.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.args.vocab_size}) differs from the target's "
                         f"({target.args.vocab_size})")
    t0 = time.perf_counter()
    need = check_context(target, len(prompt), stop.max_new_tokens, k)
    tgt, dft = Stream(target, need), Stream(draft, need)
    gen = _generator(params)
    stats = SpecStats(k=k)
    policy = Controller(k, "sd") if adaptive else None
    if policy:
        policy.add(0)
    seq = list(prompt)
    seq.append(_pick(tgt.feed(seq)[-1], params, gen))
    generated = [seq[-1]]
    done = _finish(generated, 0, stop, decode)
    full_k = k
    while not done:
        k = policy.decide([0])[0] if policy else full_k
        drafts, qs = [], []
        pending = seq[dft.length:]
        if k and len(pending) > 1:  # tokens committed while at K = 0: a prefill, not drafting cost
            dft.feed(pending[:-1])
            pending = pending[-1:]
        td = time.perf_counter()
        for _ in range(k):
            logits = dft.feed(pending)[-1]
            if params.greedy:
                tok = int(logits.argmax())
            else:
                q = probs_from_logits(logits, params)
                tok = int(sample(q, gen))
                qs.append(q)
            drafts.append(tok)
            pending = [tok]
        tv = time.perf_counter()
        fed = seq[tgt.length:] + drafts
        logits = tgt.feed(fed)[-(k + 1):]
        if policy:
            policy.observe_verify(len(fed), time.perf_counter() - tv)
            policy.observe_draft(k, tv - td, 0.0)
        d = torch.tensor(drafts, dtype=torch.long)
        if params.greedy:
            out = verify_greedy(d, logits)
        elif k == 0:  # a plain decode step: the target's own distribution
            out = verify_sampling(d, torch.empty(0, logits.shape[-1]), probs_from_logits(logits, params), gen)
        else:
            out = verify_sampling(d, torch.stack(qs), probs_from_logits(logits, params), gen)
        stats.record_round(k, out.accepted)
        if policy:
            policy.observe_round(0, k, out.accepted)
            stats.rounds_off += k == 0
        new = drafts[:out.accepted] + [out.token]
        seq += new
        tgt.rollback(len(seq) - 1)
        dft.rollback(len(seq) - 1)
        start = len(generated)
        generated += new
        done = _finish(generated, start, stop, decode)
    return _result(generated[:done[0]], done[1], stats, t0, stop, decode)
