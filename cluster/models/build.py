"""`outrider models build`: build (once) and cache the demo target/drafter pair.

Layout: $OUTRIDER_MODELS_DIR (default ~/.cache/outrider/models)/<size>-v1/{target,draft}/ in
Hugging Face format, plus build.json with the spec and measured figures. A build happens in a
temporary directory renamed into place at the end, under a file lock, so a killed build never
leaves half a pair and parallel callers build only once. YAML configs name the models
`demo:<size>/target` and `demo:<size>/draft`.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.models import corpus
from cluster.models.train import (
    EOS,
    Shape,
    agreement,
    distill,
    encode_corpus,
    hf_config,
    new_model,
    pretrain,
    save_hf,
    train_tokenizer,
)

log = logging.getLogger(__name__)
VERSION = "v1"


@dataclass(frozen=True)
class PairSpec:
    vocab: int
    max_pos: int
    seq: int
    target: Shape
    draft: Shape
    target_steps: int
    target_batch: int
    target_lr: float
    draft_steps: int
    draft_batch: int
    draft_lr: float
    train_files: int | None  # None = the whole training split
    seed: int = 0


SIZES = {
    # Builds in well under a minute: for tests, where only exactness and mechanics matter.
    "tiny": PairSpec(vocab=512, max_pos=1024, seq=128, target=Shape(2, 64, 4, 2, 176), draft=Shape(1, 32, 2, 1, 96),
                     target_steps=150, target_batch=16, target_lr=3e-3, draft_steps=150, draft_batch=16,
                     draft_lr=3e-3, train_files=40),
    # For benchmarks: target >= 10x the drafter's per-token cost on one core.
    "bench": PairSpec(vocab=4096, max_pos=2048, seq=256, target=Shape(8, 384, 6, 2, 1024),
                      draft=Shape(1, 128, 4, 2, 352), target_steps=400, target_batch=8, target_lr=2e-3,
                      draft_steps=500, draft_batch=8, draft_lr=3e-3, train_files=None),
}


def models_root() -> Path:
    return Path(os.environ.get("OUTRIDER_MODELS_DIR") or Path.home() / ".cache" / "outrider" / "models")


def pair_dir(size: str, root: Path | None = None) -> Path:
    return (root or models_root()) / f"{size}-{VERSION}"


def resolve_demo(spec: str) -> Path:
    """`demo:<size>/<target|draft>` -> checkpoint directory, building the pair if needed."""
    body = spec.removeprefix("demo:")
    size, _, role = body.partition("/")
    if size == "smol":  # the real pretrained pair: imported and distilled, not trained here
        from cluster.models.smol import resolve_smol

        return resolve_smol(role)
    if size not in SIZES or not (role in ("target", "draft") or role.startswith("draft-")):
        raise ValueError(f"demo model {spec!r}: expected demo:<{'|'.join(SIZES)}>/<target|draft|draft-LxD> "
                         "or demo:smol/<target|draft|head|cheap>")
    if role.startswith("draft-"):  # another drafter size, distilled on the same target
        from cluster.models.drafters import build_drafter, variant_shape

        variant_shape(role)  # a bad name fails before any pair is built
        return build_drafter(build_pair(size), size, role)
    return build_pair(size) / role


@torch.inference_mode()
def per_token_ms(model_dir: Path, ctx: int = 200, n: int = 20) -> float:
    """One-core, batch-1 decode cost at a `ctx`-token context, with the KV cache."""
    from actors.kv import PagedKVCache
    from actors.model.loader import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = load_model(model_dir)
        cache = PagedKVCache.for_rows(m.args, 1, ctx + n + 1)
        handle = torch.tensor([cache.alloc()])
        m(torch.zeros(1, ctx, dtype=torch.long), torch.arange(ctx)[None], cache, handle)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            m(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[ctx + i]]), cache, handle)
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(threads)


def training_texts(spec: PairSpec) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of a pair: the same split for every model built on it."""
    train_files, held_files = corpus.split()
    if spec.train_files is not None:
        train_files = train_files[:spec.train_files]
    return [corpus.read(p) for p in train_files], [corpus.read(p) for p in held_files]


def _build(size: str, spec: PairSpec, out: Path) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    texts, held_texts = training_texts(spec)
    log.info("%s: training a %d-token BPE tokenizer on %d files", size, spec.vocab, len(texts))
    tok = train_tokenizer(texts, spec.vocab)
    data = encode_corpus(tok, texts)
    held = encode_corpus(tok, held_texts)
    eos = tok.token_to_id(EOS)
    log.info("%s: %d training tokens, %d held-out", size, len(data), len(held))
    t_cfg = hf_config(spec.target, spec.vocab, eos, spec.max_pos)
    d_cfg = hf_config(spec.draft, spec.vocab, eos, spec.max_pos)
    target = new_model(t_cfg, spec.seed)
    t_loss = pretrain(target, data, spec.target_steps, spec.target_batch, spec.seq, spec.target_lr, spec.seed)
    target.requires_grad_(False)
    draft = new_model(d_cfg, spec.seed + 1)
    d_loss = distill(draft, target, data, spec.draft_steps, spec.draft_batch, spec.seq, spec.draft_lr, spec.seed + 1)
    save_hf(target, t_cfg, tok, out / "target")
    save_hf(draft, d_cfg, tok, out / "draft")
    agree = agreement(target, draft, held, 24, spec.seq)
    t_ms, d_ms = per_token_ms(out / "target"), per_token_ms(out / "draft")
    info = {"size": size, "version": VERSION, "spec": asdict(spec), "build_s": round(time.perf_counter() - t0, 1),
            "train_tokens": len(data), "target_loss": round(t_loss, 3), "draft_kl": round(d_loss, 3),
            "greedy_agreement": round(agree, 3), "target_ms_per_token": round(t_ms, 3),
            "draft_ms_per_token": round(d_ms, 3), "cost_ratio": round(t_ms / d_ms, 2),
            "torch": torch.__version__}
    (out / "build.json").write_text(json.dumps(info, indent=2))
    return info


def build_pair(size: str, root: Path | None = None, force: bool = False) -> Path:
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    dest = pair_dir(size, root)
    info = build_once(dest, lambda tmp: _build(size, SIZES[size], tmp), force)
    if info is not None:
        log.info("built %s pair in %.0fs: agreement %.2f, cost ratio %.1fx -> %s", size, info["build_s"],
                 info["greedy_agreement"], info["cost_ratio"], dest)
    return dest


def build_once(dest: Path, build, force: bool = False) -> dict | None:
    """Build into a temporary directory beside `dest` (`build(tmp)` writes tmp/build.json and
    returns its contents) and rename it into place, under a file lock, so a killed build never
    leaves half a directory and parallel callers build once. None when `dest` was already built."""
    if (dest / "build.json").is_file() and not force:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel builder finishes first; then we reuse its build
        if (dest / "build.json").is_file() and not force:
            return None
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            info = build(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def cli_build(size: str, out: str | None = None, force: bool = False, budget: float | None = None,
              head: bool = False) -> Path:
    if size == "smol":
        from cluster.models.smol import cli_build_smol

        return cli_build_smol(out, force, budget, head)
    path = build_pair(size, Path(out) if out else None, force)
    info = json.loads((path / "build.json").read_text())
    keys = ("build_s", "greedy_agreement", "target_ms_per_token", "draft_ms_per_token", "cost_ratio")
    log.info("%s: %s", path, ", ".join(f"{k}={info[k]}" for k in keys))
    return path
