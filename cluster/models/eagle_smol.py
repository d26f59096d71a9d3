"""`demo:smol/head`: an EAGLE-3 style draft head for SmolLM2-135M-Instruct, trained on two cores.

The teacher data is the target's own output, as for the distilled drafter (distill_smol.py: its
greedy answers to chat requests, its continuations of code, code windows it reads), and shares
that cache. One more teacher-forced pass records the target's features at every position (the
inputs of layers 2, 15 and 27), cached beside it.

The draft vocabulary is the `draft_vocab` tokens the target predicts most often in that data
(FR-Spec's frequency ranking); everything outside it has q = 0, which verification covers.

Training unrolls the head on its own outputs for `ttt_steps` steps (EAGLE-3's training-time
test, head.ttt_forward), so its drafts at depth 2..K were trained the way they are made. The
loss is the soft cross-entropy against the target's top-k distribution restricted to the
draft vocabulary, weighted 0.8^j by depth. Everything is seeded and counted in steps, so a
build is reproducible on one machine; `budget_min` sets the steps (STEPS_PER_MIN each).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.models.distill_smol import SPEC as DRAFT_DATA, DistillSpec, _bar, epoch_picks, fit, labelled_data

log = logging.getLogger(__name__)

STEPS_PER_MIN = 60   # training steps per minute of budget (measured on two cores; deterministic)
# The head's teacher data: the distilled drafter's kind (the target's own answers to chat requests,
# its continuations of code, code it reads), three times as much of it: a head overfits the
# drafter's 20k labelled positions within a few epochs.
HEAD_DATA = replace(DRAFT_DATA, chat_requests=288, code_prompts=64, forced_windows=96)


@dataclass(frozen=True)
class HeadSpec:
    draft_vocab: int = 8192
    ttt_steps: int = 4            # unroll depth of the training-time test
    depth_decay: float = 0.8
    budget_min: float = 5.0       # training minutes on two cores (STEPS_PER_MIN steps each)
    batch: int = 6                # sequences per step
    score_fraction: float = 0.35  # valid rows per step and depth that go through the head and the loss
    lr: float = 2e-3
    held_out: int = 12
    seed: int = 0
    data: DistillSpec = HEAD_DATA

    @property
    def steps(self) -> int:
        return max(1, round(self.budget_min * STEPS_PER_MIN))


SPEC = HeadSpec()


@torch.inference_mode()
def feature_data(target_dir: Path, data: list[dict], aux: tuple[int, ...], spec: DistillSpec) -> list[torch.Tensor]:
    """The target's features [n, len(aux) * dim] (float16) at every position of every sequence,
    cached beside the labelled data."""
    from actors.model.loader import load_model

    key = f"{spec.data_key()}-{'.'.join(map(str, aux))}"
    cached = target_dir.parent / f"head-feats-{key}.pt"
    if cached.is_file():
        return torch.load(cached)
    target = load_model(target_dir)
    out = []
    bar = _bar(total=sum(len(r["ids"]) for r in data), desc="teacher features", unit="tok")
    for r in data:
        _, feats = target(r["ids"][None], aux=aux)
        out.append(feats[0].half())
        bar.update(len(r["ids"]))
    bar.close()
    part = cached.with_suffix(".part")
    torch.save(out, part)
    part.rename(cached)
    return out


def draft_vocabulary(data: list[dict], vocab: int, size: int) -> torch.Tensor:
    """The `size` target ids the target predicts most often (top-1) in `data`, then by how often
    they occur as tokens, then lowest id first (a BPE vocabulary's early merges are its common
    pieces): sorted ascending, as d2t wants."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for r in data:
        counts += torch.bincount(r["idx"][:, 0].long(), minlength=vocab)
        counts += 1e-3 * torch.bincount(r["ids"].long(), minlength=vocab)
    order = sorted(range(vocab), key=lambda i: (-counts[i].item(), i))
    return torch.tensor(sorted(order[:size]))


def init_head(target, spec: HeadSpec, ids: torch.Tensor):
    """A head shaped like one of the target's layers. Its vocabulary head starts as the target's
    rows for the draft ids and its final norm as the target's; fc starts by passing the highest
    feature layer through, so the untrained head reads like the target's upper layers."""
    from actors.eagle.head import EagleHead, HeadArgs, default_aux_layers

    ta = target.args
    args = HeadArgs(replace(ta, n_layers=1), spec.draft_vocab, default_aux_layers(ta.n_layers))
    torch.manual_seed(spec.seed)
    head = EagleHead(args)
    with torch.no_grad():
        head.lm_head.weight.copy_(target.lm_head.weight[ids])
        head.norm.weight.copy_(target.model.norm.weight)
        d = ta.dim
        head.fc.weight.zero_()
        head.fc.weight[:, -d:] = torch.eye(d)
        head.d2t.copy_(ids - torch.arange(len(ids)))
        for p in (head.midlayer.self_attn.o_proj.weight, head.midlayer.mlp.down_proj.weight):
            p.mul_(0.1)   # start close to the identity: the fused feature passes through
    return head.attach(target.model.embed_tokens)


def rows(r: dict, feats: torch.Tensor, t2d: torch.Tensor):
    """A sequence x_0..x_{n-1} as training rows t = 0..n-3: features at t, token x_{t+1}, and the
    teacher's top-k at t+1 (which predicts x_{t+2}) in draft ids (-1 outside the draft set)."""
    n = len(r["ids"])
    lab = slice(1, n - 1)
    valid = torch.zeros(n - 2, dtype=torch.bool)
    valid[max(0, r["prompt"] - 2):] = True   # labels inside the target's own output (or a read window)
    return feats[:n - 2], r["ids"][1:n - 1], r["val"][lab], t2d[r["idx"][lab].long()], valid


def batches(items: list[tuple], batch: int, steps: int, seed: int):
    """`steps` batches of whole sequences, reshuffled every epoch (seeded), padded on the right."""
    for pick in epoch_picks(len(items), batch, steps, seed):
        group = [items[i] for i in pick]
        T = max(len(g[1]) for g in group)
        out = []
        for k, like in enumerate(group[0]):
            shape = (len(group), T) + tuple(like.shape[1:])
            x = torch.full(shape, -1 if k == 3 else 0, dtype=like.dtype)
            for b, g in enumerate(group):
                x[b, :len(g[k])] = g[k]
            out.append(x)
        yield out


def ttt_loss(head, batch, spec: HeadSpec, g: torch.Generator) -> torch.Tensor:
    from actors.eagle.head import ttt_forward

    feats, toks, val, idx, valid = batch
    total = 0.0
    for out, j in ttt_forward(head, feats.float(), toks, spec.ttt_steps):
        ok = valid.clone()
        ok[:, :j] = False
        ok &= torch.rand(ok.shape, generator=g) < spec.score_fraction
        logp = F.log_softmax(head.lm_head(head.norm(out[ok])), -1)
        v, i = val[ok].float(), idx[ok].long()
        v = v.masked_fill(i < 0, float("-inf"))   # the teacher's mass outside the draft set: dropped
        p = F.softmax(v, -1).nan_to_num(0.0)
        total = total + spec.depth_decay ** j * -(p * logp.gather(-1, i.clamp(min=0))).sum(-1).mean()
    return total


def train(head, items: list[tuple], spec: HeadSpec) -> float:
    params = [p for n, p in head.named_parameters() if not n.startswith("embed_tokens")]
    head.embed_tokens.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(spec.seed)
    head.train()
    ema = fit(params, batches(items, spec.batch, spec.steps, spec.seed), lambda b: ttt_loss(head, b, spec, g),
              spec.lr, spec.steps, "train head")
    head.eval().requires_grad_(False)
    return ema


@torch.inference_mode()
def agreement(head, items: list[tuple], steps: int) -> list[float]:
    """Teacher-forced top-1 agreement with the target at each unroll depth 1..steps, on `items`."""
    from actors.eagle.head import ttt_forward

    hits, total = [0] * steps, [0] * steps
    for it in items:
        feats, toks, val, idx, valid = (x[None] for x in it)
        for out, j in ttt_forward(head, feats.float(), toks, steps):
            ok = valid.clone()
            ok[:, :j] = False
            pred = head.lm_head(head.norm(out[ok])).argmax(-1)
            hits[j] += int((pred == idx[ok][:, 0]).sum())
            total[j] += int(ok.sum())
    return [round(h / max(1, t), 3) for h, t in zip(hits, total)]


def train_head(target_dir: Path, out: Path, spec: HeadSpec = SPEC) -> dict:
    from actors.eagle.checkpoint import save_head
    from actors.eagle.head import default_aux_layers
    from actors.model.loader import load_model

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = labelled_data(target_dir, spec.data)
    target = load_model(target_dir)
    aux = default_aux_layers(target.args.n_layers)
    feats = feature_data(target_dir, data, aux, spec.data)
    t_data = time.perf_counter() - t0
    ids = draft_vocabulary(data, target.args.vocab_size, spec.draft_vocab)
    t2d = torch.full((target.args.vocab_size,), -1, dtype=torch.long)
    t2d[ids] = torch.arange(len(ids))
    items = [rows(r, f, t2d) for r, f in zip(data, feats)]
    gen = [i for i, r in enumerate(data) if r["prompt"] > 1]
    random.Random(spec.seed).shuffle(gen)
    held = set(gen[:spec.held_out])
    train_items = [it for i, it in enumerate(items) if i not in held]
    held_items = [items[i] for i in sorted(held)]
    coverage = float(sum(int((it[3][it[4]][:, 0] >= 0).sum()) for it in held_items)
                     / max(1, sum(int(it[4].sum()) for it in held_items)))
    head = init_head(target, spec, ids)
    before = agreement(head, held_items, spec.ttt_steps)
    t1 = time.perf_counter()
    loss = train(head, train_items, spec)
    t_train = time.perf_counter() - t1
    after = agreement(head, held_items, spec.ttt_steps)
    info = {"draft": "EAGLE-3 style head on the target's features", "spec": asdict(spec), "aux_layers": list(aux),
            "train_sequences": len(train_items), "train_rows": sum(int(it[4].sum()) for it in train_items),
            "data_s": round(t_data, 1), "train_s": round(t_train, 1), "soft_ce": round(loss, 3),
            "held_out_vocab_coverage": round(coverage, 3),
            "held_out_agreement_before": before, "held_out_agreement": after,
            "build_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    save_head(head, out)
    (out / "build.json").write_text(json.dumps(info, indent=2))
    return info


def build_head(root: Path | None = None, force: bool = False, spec: HeadSpec = SPEC) -> Path:
    from cluster.models.build import build_once
    from cluster.models.smol import build_target, smol_dir

    target = build_target(root)
    dest = smol_dir(root) / ("head" if spec == SPEC else f"head-{spec.budget_min:g}min")
    info = build_once(dest, lambda tmp: train_head(target, tmp, spec), force)
    if info is not None:
        log.info("trained the smol draft head in %.0fs: held-out agreement by depth %s (before training %s)",
                 info["build_s"], info["held_out_agreement"], info["held_out_agreement_before"])
    return dest
