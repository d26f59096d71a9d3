"""Online drafter adaptation: the drafter keeps learning from the target's own outputs.

The data is what the drafter already receives: every committed token of a sequence (the accepted
draft prefix plus t*) is the target's greedy choice, or its sample, at that position. A replay
buffer of bounded size keeps windows of recent committed context; a window's loss is the
cross-entropy of the drafter's next-token distribution against the committed tokens after the
prompt (the prompt is context only: the user wrote it, not the target). With sampled tokens the
cross-entropy is an unbiased estimate of the forward KL to the target's (warped) distribution.

When: only in the drafter's own loop, while it would otherwise wait for the verifier's next frame
(the table it owes has already gone out), at most `max_steps_per_s` optimizer steps a second
(`TrainWhileWaiting` below, in the drafter's loop). The optimizer (AdamW) updates the drafting weights in
place: the loop is one thread, so a step lands whole between two frames, i.e. between two
pre-speculations, never inside a draft. The drafter's KV cache computed with older weights is
kept by default: a step moves the weights by about lr, and recomputing costs a prefill per active
sequence after every round that had steps. With `recompute_kv` the drafter drops it and its
catch-up prefill recomputes it before the sequence's next draft (Drafter._refresh_kv);
docs/online-learning.md measures both.

Exactness does not depend on any of this: the verifier tests every draft against the target with
the q the drafter drew it from, whatever the weights were.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import torch
from safetensors.torch import save_file

from actors.engine_spec import OnlineLearningSpec

log = logging.getLogger(__name__)
IGNORE = -100
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class ReplayBuffer:
    """Windows of committed context, each with the index of its first scored token; the oldest
    go first once the buffer holds more than `max_tokens` tokens."""

    def __init__(self, max_tokens: int, window: int, seed: int = 0):
        self.max_tokens, self.window = max_tokens, window
        self.items: deque[tuple[list[int], int]] = deque()
        self.tokens = 0
        self.added = 0                      # windows ever added
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, tokens: list[int], first_scored: int) -> None:
        """Cut tokens[first_scored:] (scored) with their preceding context into windows of at most
        `window` tokens; every scored token is scored in exactly one window, after at least half a
        window of context (or the whole prefix)."""
        first_scored = max(first_scored, 1)   # token 0 has no context to predict it from
        end, cut = len(tokens), []
        while end > first_scored:
            start = max(0, end - self.window)
            # absolute index of the window's first scored token: after half a window of context
            first = max(first_scored, start + 1 if start == 0 else start + self.window // 2)
            cut.append((start, end, first))
            end = first
        for start, end, first in reversed(cut):   # oldest first, so the newest are evicted last
            self._push(tokens[start:end], first - start)

    def _push(self, window: list[int], first: int) -> None:
        if len(window) < 2:
            return
        self.items.append((list(window), first))
        self.tokens += len(window)
        self.added += 1
        while self.tokens > self.max_tokens and self.items:
            old, _ = self.items.popleft()
            self.tokens -= len(old)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, T], targets [B, T]): right-padded; targets are IGNORE where not scored."""
        idx = torch.randint(len(self.items), (min(size, len(self.items)),), generator=self._gen).tolist()
        chosen = [self.items[i] for i in idx]
        T = max(len(w) for w, _ in chosen) - 1
        inputs = torch.zeros(len(chosen), T, dtype=torch.long)
        targets = torch.full((len(chosen), T), IGNORE, dtype=torch.long)
        for b, (w, first) in enumerate(chosen):
            t = torch.tensor(w)
            inputs[b, :len(w) - 1] = t[:-1]
            targets[b, first - 1:len(w) - 1] = t[first:]
        return inputs, targets


class OnlineLearner:
    """Trains `model` (the drafter's live model) in place on committed tokens."""

    def __init__(self, model: torch.nn.Module, spec: OnlineLearningSpec, source_dir: str | None = None):
        self.model, self.spec, self.source_dir = model, spec, source_dir
        self.params = [p for p in model.parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.params, lr=spec.lr, weight_decay=0.0)
        self.buffer = ReplayBuffer(spec.buffer_tokens, spec.window_tokens)
        self._prompt_len: dict[int, int] = {}
        self._pushed: dict[int, int] = {}     # per sequence: committed tokens already in the buffer
        self._next_step = 0.0                 # perf_counter time of the next allowed step
        self._last_save = time.perf_counter()
        self.steps = 0
        self.loss = float("nan")              # the last step's loss
        self.loss_ema = float("nan")
        self.train_s = 0.0
        self.late_s = 0.0                     # upper bound of frame delay: steps/saves a frame arrived during
        self.saves = 0
        self.scored_tokens = 0                # target tokens the steps trained on
        self.step_ema: float | None = None    # seconds per step (None until one ran)
        self.gap_ema = 0.0                    # seconds from a table sent to the next frame, sequences active
        self.kv_recomputes = 0                # recompute_kv: sequences whose KV was dropped to be recomputed
        self.kv_recompute_tokens = 0          # ... and the positions dropped

    # -- data ------------------------------------------------------------------------------
    def admit(self, sid: int, prompt_len: int) -> None:
        self._prompt_len[sid] = prompt_len
        self._pushed[sid] = prompt_len

    def progress(self, sid: int, tokens: list[int]) -> None:
        """A long generation gives a window as soon as it has one window of new tokens."""
        done = self._pushed.get(sid)
        if done is not None and len(tokens) - done >= self.spec.window_tokens:
            self._push(sid, tokens)

    def release(self, sid: int, tokens: list[int]) -> None:
        if sid in self._pushed:
            if len(tokens) > self._pushed[sid]:
                self._push(sid, tokens)
            del self._pushed[sid], self._prompt_len[sid]

    def _push(self, sid: int, tokens: list[int]) -> None:
        start = self._pushed[sid]
        ctx = max(0, start - self.spec.window_tokens // 2)   # half a window of context before the new tokens
        self.buffer.add(tokens[ctx:], start - ctx)
        self._pushed[sid] = len(tokens)

    # -- training --------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        return len(self.buffer) > 0 and now >= self._next_step

    def has_data(self) -> bool:
        return len(self.buffer) > 0

    def fits(self, elapsed: float) -> bool:
        """A step (its measured duration) fits in what is left of the usual gap between the table
        this side sent and the verifier's next frame."""
        return self.step_ema is not None and elapsed + self.step_ema <= self.gap_ema

    def observe_gap(self, gap: float) -> None:
        self.gap_ema = gap if self.gap_ema == 0.0 else 0.9 * self.gap_ema + 0.1 * gap

    def wait_hint(self, now: float) -> float:
        return max(0.0, self._next_step - now)

    def step(self) -> float:
        t0 = time.perf_counter()
        self._next_step = t0 + 1.0 / self.spec.max_steps_per_s
        inputs, targets = self.buffer.batch(self.spec.batch_size)
        dev = self.model.device
        was_training = self.model.training
        self.model.train()
        with torch.enable_grad():
            logits = self.model(inputs.to(dev))
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     targets.to(dev).reshape(-1), ignore_index=IGNORE)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        self.model.train(was_training)
        self.loss = loss.detach().item()
        self.loss_ema = self.loss if self.steps == 0 else 0.95 * self.loss_ema + 0.05 * self.loss
        self.steps += 1
        self.scored_tokens += int((targets != IGNORE).sum())
        dt = time.perf_counter() - t0
        self.train_s += dt
        self.step_ema = dt if self.step_ema is None else 0.9 * self.step_ema + 0.1 * dt
        return self.loss

    # -- checkpoints -----------------------------------------------------------------------
    def save_due(self, now: float) -> bool:
        return self.spec.save_path is not None and self.steps > 0 and now - self._last_save >= self.spec.save_every_s

    def save(self, path: str | None = None) -> Path | None:
        """Write the drafter as an HF checkpoint (config.json and tokenizer files copied from the
        source checkpoint, model.safetensors from the live weights), replacing `path` whole."""
        path = path or self.spec.save_path
        self._last_save = time.perf_counter()
        if path is None:
            return None
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            if self.source_dir is not None:
                for f in Path(self.source_dir).iterdir():
                    if f.is_file() and f.name not in WEIGHT_FILES and not f.name.startswith("model-"):
                        shutil.copy2(f, tmp / f.name)
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            if getattr(self.model.args, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)   # shared with the embedding (the loader re-ties it)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "online.json").write_text(json.dumps(self.stats(), indent=2))
            old = None
            if dest.exists():
                old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
                dest.rename(old)
            tmp.rename(dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.saves += 1
        log.info("online learning: %d steps, loss %.3f, saved the drafter to %s", self.steps, self.loss_ema, dest)
        return dest

    def stats(self) -> dict:
        return {"train_steps": self.steps, "train_loss": self.loss, "train_loss_ema": self.loss_ema,
                "train_s": self.train_s, "train_late_s": self.late_s, "train_saves": self.saves,
                "train_scored_tokens": self.scored_tokens, "train_buffer_tokens": self.buffer.tokens,
                "train_windows": self.buffer.added,
                "train_step_s": self.step_ema or 0.0, "train_gap_s": self.gap_ema,
                "train_kv_recomputes": self.kv_recomputes, "train_kv_recompute_tokens": self.kv_recompute_tokens}

class TrainWhileWaiting:
    """Online learning in the drafter's loop: optimizer steps while the verifier's next frame has
    not come. The frame is received by a helper thread (gloo's posted receive cannot be polled),
    so the loop thread trains meanwhile. The table the drafter owed has already gone out; while
    sequences are active a step is taken only if its measured duration fits in what is left of
    the measured gap between a table and the next frame, so frames are rarely kept waiting
    (late_s sums the steps a frame landed during: an upper bound of the delay). With no sequence
    active, steps run at up to max_steps_per_s. The weights change only here, between two frames:
    never inside a draft or a pre-speculation."""

    def __init__(self, channel, learner: OnlineLearner):
        self.channel, self.learner = channel, learner
        self.go, self.got = queue.SimpleQueue(), queue.SimpleQueue()
        threading.Thread(target=self._receive, name="outrider-drafter-rx", daemon=True).start()

    def next_frame(self, active: bool):
        ol, go, got = self.learner, self.go, self.got
        start = time.perf_counter()
        go.put(True)
        while got.empty():
            now = time.perf_counter()
            if ol.due(now) and (not active or ol.fits(now - start)):
                ol.step()
            elif ol.save_due(now) and not active:
                ol.save()
            else:  # nothing due now: wait for the frame (idle: or until the next step is allowed)
                try:
                    item = got.get(timeout=ol.wait_hint(now) if ol.has_data() and not active else None)
                except queue.Empty:
                    continue
                got.put(item)
                break
            if not got.empty():
                ol.late_s += time.perf_counter() - now
        frame, err, arrived = got.get()
        if err is not None:
            raise err
        if active:
            ol.observe_gap(arrived - start)
        return frame

    def _receive(self) -> None:
        while self.go.get():
            try:
                self.got.put((self.channel.recv(), None, time.perf_counter()))
            except BaseException as e:  # handed to the loop thread, which raises it
                self.got.put((None, e, time.perf_counter()))
