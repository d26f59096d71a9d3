"""`demo:smol/draft`: a small drafter distilled from SmolLM2-135M-Instruct's own predictions.

What speculative decoding rewards is agreement with the target on the text the target itself
writes. So the training data is on-policy: the target answers chat requests and continues
standard-library code greedily (batched, with the KV cache), and every forward of that
generation already yields the teacher's distribution at each position; its top-k logits are
kept as the labels. No separate teacher pass is needed.

The student starts from the target itself (layers `DistillSpec.layers`, the embedding, final norm
and the tied head, all but the head trainable): untrained, such a cut agrees with the target
almost never (FIELD-NOTES), but it starts from representations that already fit the head, which
makes the few minutes of training go far. The head is the target's and stays frozen: with the
full 49152-token vocabulary the drafter's q covers everything the verifier can propose, so no
engine support for a reduced vocabulary is needed.

Everything is seeded and step-budgeted, so a build is reproducible on one machine; build.json
records the teacher-forced agreement on held-out answers and the time taken.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.models.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillSpec:
    layers: tuple[int, ...] = (0, 1, 29)   # target layers the student starts from
    chat_requests: int = 96                 # training chat requests the target answers
    code_prompts: int = 32                  # training code prompts the target continues
    prompt_tokens: int = 96                 # a code prompt's last tokens
    new_tokens: int = 128                   # tokens the target generates per prompt
    gen_batch: int = 32
    forced_windows: int = 32                # standard-library code windows the target reads (teacher-forced)
    window: int = 256                       # tokens per window
    top_k: int = 20                         # teacher logits kept per position
    held_out: int = 12                      # generated sequences kept out of training (agreement)
    steps: int = 300
    batch: int = 8                          # sequences per step
    head_fraction: float = 0.35             # labelled positions per step that go through the head and the loss
    lr: float = 1.5e-3
    seed: int = 0

    def data_key(self) -> str:
        """What the labelled data depends on (the sizes and the request texts themselves): a
        cache of it is reused when only training changes."""
        from cluster.models.chat_prompts import training_requests

        fields = (DATA_VERSION, self.chat_requests, self.code_prompts, self.prompt_tokens, self.new_tokens,
                  self.forced_windows, self.window, self.top_k, self.seed)
        texts = "\n".join(training_requests(self.chat_requests, self.seed)).encode()
        return "-".join(map(str, fields)) + "-" + hashlib.sha1(texts).hexdigest()[:10]


DATA_VERSION = 2
SPEC = DistillSpec()


def _bar(**kw) -> Progress:
    """Progress on stderr where it is a terminal, and in the log every 30 s either way (`make demo`
    piped to a file, CI)."""
    return Progress(log=log, **kw)


def code_prompts(n: int, seed: int) -> list[str]:
    """Code prompts cut from the training split, as corpus.prompts cuts held-out ones."""
    from cluster.models.corpus import _code_prompts, split

    pool = _code_prompts(split()[0])
    random.Random(seed).shuffle(pool)
    return pool[:n]


def code_windows(tok, n: int, width: int, seed: int) -> list[list[int]]:
    """`n` windows of `width` tokens from training-split modules (one per file, seeded)."""
    from cluster.models.corpus import read, split

    files = list(split()[0])
    rng = random.Random(seed)
    rng.shuffle(files)
    out = []
    for p in files:
        ids = tok.encode(read(p))
        if len(ids) < width + 1:
            continue
        start = rng.randrange(0, len(ids) - width)
        out.append(ids[start:start + width])
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def forced_labelled(target, windows: list[list[int]], top_k: int, batch: int = 4) -> list[dict]:
    """The target's top-k logits at every position of `windows`, read in one forward each
    (teacher forcing: no generation, ~2 CPU-ms a token)."""
    out = []
    bar = _bar(total=sum(map(len, windows)), desc="teacher reads code", unit="tok")
    for start in range(0, len(windows), batch):
        group = windows[start:start + batch]
        logits = target(torch.tensor(group))
        v, i = logits.topk(top_k, -1)
        for j, w in enumerate(group):
            n = len(w) - 1
            out.append({"ids": torch.tensor(w), "val": v[j, :n].half(), "idx": i[j, :n].int(), "prompt": 1})
        bar.update(sum(map(len, group)))
    bar.close()
    return out


@torch.inference_mode()
def generate_labelled(target, prompts: list[list[int]], new_tokens: int, batch: int, top_k: int,
                      eos: set[int], desc: str) -> list[dict]:
    """Greedy continuations of `prompts` by the target, with its top-k logits at every position.

    A group's rows are prefilled together, then decode together one token per step,
    every row at its own position. A finished row (EOS) stays in the batch, fed its last token,
    until the whole group is done (the batch keeps one shape). Labels exist for every position
    whose next token the target predicted (all but the last)."""
    from actors.kv import PagedKVCache

    out = []
    bar = _bar(total=len(prompts) * new_tokens, desc=desc, unit="tok")
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        cache = PagedKVCache.for_rows(target.args, len(group), max(map(len, group)) + new_tokens + 1)
        # One prefill for the group, padded on the right: a padding key sits past its row's prompt,
        # where the causal mask hides it until decoding overwrites it.
        handles = torch.tensor([cache.alloc() for _ in group])
        width = max(map(len, group))
        x = torch.tensor([p + [p[-1]] * (width - len(p)) for p in group])
        v, i = target(x, torch.arange(width).expand(len(group), width), cache, handles).topk(top_k, -1)
        rows = [{"ids": list(p), "val": [v[j, :len(p)]], "idx": [i[j, :len(p)]], "done": False, "prompt": len(p)}
                for j, p in enumerate(group)]
        for step in range(new_tokens):
            for r in rows:
                if not r["done"]:
                    t = int(r["idx"][-1][-1, 0])
                    r["ids"].append(t)
                    r["done"] = t in eos
            bar.update(len(group))
            if all(r["done"] for r in rows) or step == new_tokens - 1:  # the last token needs no label
                break
            toks = torch.tensor([[r["ids"][-1]] for r in rows])
            pos = torch.tensor([[len(r["ids"]) - 1] for r in rows])
            logits = target(toks, pos, cache, handles)[:, 0]
            v, i = logits.topk(top_k, -1)
            for j, r in enumerate(rows):
                if not r["done"]:
                    r["val"].append(v[j:j + 1])
                    r["idx"].append(i[j:j + 1])
        for r in rows:
            n = len(r["ids"]) - 1  # positions with a label
            out.append({"ids": torch.tensor(r["ids"]), "val": torch.cat(r["val"])[:n].half(),
                        "idx": torch.cat(r["idx"])[:n].int(), "prompt": r["prompt"]})
        bar.update(len(group) * new_tokens - (bar.n - start * new_tokens))  # rows that ended early
    bar.close()
    return out


def student_from_target(target_dir: Path, layers: tuple[int, ...]):
    """The drafter before training: the target's `layers`, embedding, norm and tied head."""
    from actors.model.config import ModelArgs
    from cluster.models.smol import truncated_state
    from actors.model.model import Transformer

    cfg = json.loads((target_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = len(layers)
    model = Transformer(ModelArgs.from_hf(cfg))
    state = truncated_state(target_dir, len(layers), list(layers))
    model.load_state_dict(state, strict=False)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, cfg


def soft_ce(logits: torch.Tensor, val: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's renormalised top-k distribution (the
    KL to it up to a constant): [N, V] student logits, [N, k] teacher logits and ids."""
    logp = F.log_softmax(logits.float(), -1)
    p = F.softmax(val.float(), -1)
    return -(p * logp.gather(-1, idx.long())).sum(-1).mean()


def fit(params: list, batches, loss_of, lr: float, steps: int, desc: str) -> float:
    """`steps` AdamW steps on `loss_of(batch)` over `batches`, the learning rate warmed up over the
    first 5 % and decayed linearly to 5 %, gradients clipped at 1; progress with the loss's moving
    average, which is returned."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(
        0.05, 1 - max(0, s - warm) / max(1, steps - warm)))
    ema = None
    bar = _bar(iterable=batches, total=steps, desc=desc, unit="step")
    for batch in bar:
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    bar.close()
    return ema


def epoch_picks(n: int, batch: int, steps: int, seed: int):
    """`steps` picks of `batch` indices into n items, reshuffled every epoch (seeded)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            more = list(range(n))
            rng.shuffle(more)
            order += more
        pick, order = order[:batch], order[batch:]
        yield pick


def _batches(data: list[dict], batch: int, steps: int, seed: int):
    """`steps` batches of whole sequences, reshuffled every epoch (seeded), padded on the right.
    Yields the tokens, the mask of positions that carry a label and count (those whose next token
    the target wrote itself, or every position of a teacher-forced window), and their labels."""
    for pick in epoch_picks(len(data), batch, steps, seed):
        rows = [data[i] for i in pick]
        width = max(len(r["ids"]) - 1 for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for j, r in enumerate(rows):
            n = len(r["ids"]) - 1
            x[j, :n] = r["ids"][:n]
            mask[j, r["prompt"] - 1:n] = True
        yield (x, mask, torch.cat([r["val"][r["prompt"] - 1:] for r in rows]),
               torch.cat([r["idx"][r["prompt"] - 1:] for r in rows]))


def train(student, data: list[dict], spec: DistillSpec) -> float:
    """Train all but the (tied, frozen) embedding and head on the soft cross-entropy.

    The 49152 x 576 head costs more per position than the student's layers together, so each step
    runs the layers over whole sequences but the head and the loss over a random `head_fraction`
    of the labelled positions: more sequences per second for the same compute, and neighbouring
    positions of one sequence teach much the same thing anyway."""
    head = student.model.embed_tokens.weight
    head.requires_grad_(False)  # also the tied head
    params = [p for p in student.parameters() if p.requires_grad]
    student.lm_head = torch.nn.Identity()  # forward returns the final-normed hidden states
    g = torch.Generator().manual_seed(spec.seed)
    student.train()

    def loss_of(batch):
        x, mask, val, idx = batch
        keep = torch.rand(len(val), generator=g) < spec.head_fraction
        hidden = student(x)[mask][keep]
        return soft_ce(hidden @ head.t(), val[keep], idx[keep])

    ema = fit(params, _batches(data, spec.batch, spec.steps, spec.seed), loss_of, spec.lr, spec.steps,
              "distil drafter")
    student.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    student.lm_head.weight = head
    student.eval().requires_grad_(False)
    return ema


@torch.inference_mode()
def agreement(student, data: list[dict]) -> float:
    """Teacher-forced top-1 agreement with the target on the generated part of `data`."""
    hits = total = 0
    for r in data:
        n = len(r["ids"]) - 1
        pred = student(r["ids"][None, :n])[0].argmax(-1)
        gen = slice(r["prompt"] - 1, n)  # positions whose next token the target generated
        hits += int((pred[gen] == r["idx"][gen, 0].long()).sum())
        total += gen.stop - gen.start
    return hits / max(1, total)


def labelled_data(target_dir: Path, spec: DistillSpec) -> list[dict]:
    """The teacher's labelled sequences: its greedy answers to chat requests and continuations of
    code prompts (generated), then standard-library windows it reads (teacher-forced). Cached
    beside the target, so a killed build or a retrain reuses them."""
    from cluster.models.chat_prompts import training_requests
    from actors.model.loader import load_model
    from actors.model.tokenizer import Tokenizer

    cached = target_dir.parent / f"distill-data-{spec.data_key()}.pt"
    if cached.is_file():
        return torch.load(cached)
    tok = Tokenizer(target_dir)
    target = load_model(target_dir)
    eos = set(target.args.eos_token_ids)
    chats = [tok.encode_chat([{"role": "user", "content": m}])
             for m in training_requests(spec.chat_requests, spec.seed)]
    code = [tok.encode(t)[-spec.prompt_tokens:] for t in code_prompts(spec.code_prompts, spec.seed)]
    data = generate_labelled(target, chats + code, spec.new_tokens, spec.gen_batch, spec.top_k, eos,
                             "teacher answers")
    data += forced_labelled(target, code_windows(tok, spec.forced_windows, spec.window, spec.seed), spec.top_k)
    del target
    part = cached.with_suffix(".part")
    torch.save(data, part)
    part.rename(cached)
    return data


def distil(target_dir: Path, out: Path, spec: DistillSpec = SPEC) -> dict:
    from cluster.models.smol import write_like_target

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = labelled_data(target_dir, spec)
    t_data = time.perf_counter() - t0
    gen = [r for r in data if r["prompt"] > 1]  # held out from the generated sequences only
    random.Random(spec.seed).shuffle(gen)
    held = gen[:spec.held_out]
    data = [r for r in data if not any(r is h for h in held)]
    n_tokens = sum(len(r["ids"]) - r["prompt"] for r in data)
    log.info("smol draft: %d labelled sequences (%d labelled tokens) in %.0fs", len(data), n_tokens, t_data)
    student, _ = student_from_target(target_dir, spec.layers)
    before = agreement(student, held)
    t1 = time.perf_counter()
    loss = train(student, data, spec)
    t_train = time.perf_counter() - t1
    after = agreement(student, held)
    state = {k: v.detach() for k, v in student.state_dict().items() if k != "lm_head.weight"}
    write_like_target(target_dir, out, state, len(spec.layers))
    info = {"draft": f"target layers {list(spec.layers)}, distilled", "spec": asdict(spec),
            "train_tokens": n_tokens, "data_s": round(t_data, 1), "train_s": round(t_train, 1),
            "soft_ce": round(loss, 3), "held_out_agreement_before": round(before, 3),
            "held_out_agreement": round(after, 3), "build_s": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__}
    (out / "build.json").write_text(json.dumps(info, indent=2))
    return info


def build_draft(root: Path | None = None, force: bool = False) -> Path:
    from cluster.models.build import build_once
    from cluster.models.smol import build_target, smol_dir

    target = build_target(root)
    dest = smol_dir(root) / "draft"
    info = build_once(dest, lambda tmp: distil(target, tmp), force)
    if info is not None:
        log.info("distilled the smol drafter in %.0fs: held-out agreement %.3f (before training %.3f)",
                 info["build_s"], info["held_out_agreement"], info["held_out_agreement_before"])
    return dest
