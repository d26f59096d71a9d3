"""Other drafters for a built demo pair: `demo:<size>/draft-<L>x<D>` is a drafter of L layers and
width D, distilled on the pair's own target exactly as the pair's drafter was (same data, steps,
seed), so drafter sizes compare on equal terms. Built once, on first use, into
<pair>/draft-<L>x<D>/ with a build.json of its agreement and cost.

Why: a larger drafter agrees with the target more often, and SSD hides its drafting cost behind
the verification, up to the point where pre-speculation no longer fits inside a verify. Which
size wins is a measurement (`outrider bench --explore`), not a guess.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

log = logging.getLogger(__name__)
HEAD_DIM = 32
VARIANT = re.compile(r"draft-(\d+)x(\d+)")


def variant_shape(name: str):
    """`draft-<L>x<D>` -> the drafter's Shape (head dim 32, 2 KV heads, MLP 2.75x wide, as the
    pair's own drafter), or ValueError naming what is wrong."""
    from cluster.models.train import Shape

    m = VARIANT.fullmatch(name)
    if not m:
        raise ValueError(f"drafter variant {name!r}: expected draft-<layers>x<width>, e.g. draft-2x128")
    n_layers, dim = int(m[1]), int(m[2])
    if not (1 <= n_layers <= 8 and 64 <= dim <= 512 and dim % (2 * HEAD_DIM) == 0):
        raise ValueError(f"drafter variant {name!r}: layers must be 1..8 and width a multiple of "
                         f"{2 * HEAD_DIM} in 64..512")
    return Shape(n_layers, dim, dim // HEAD_DIM, 2, round(2.75 * dim / 16) * 16)


def build_drafter(pair: Path, size: str, name: str, force: bool = False) -> Path:
    """Distil drafter variant `name` for the built pair in `pair` (once, like the pair itself)."""
    from cluster.models.build import build_once

    shape = variant_shape(name)
    info = build_once(pair / name, lambda tmp: _distil(pair, size, shape, tmp), force)
    if info is not None:
        log.info("built %s/%s in %.0fs: agreement %.3f, %.3f ms per token", size, name, info["build_s"],
                 info["greedy_agreement"], info["draft_ms_per_token"])
    return pair / name


def _distil(pair: Path, size: str, shape, out: Path) -> dict:
    from cluster.models.build import SIZES, per_token_ms, training_texts
    from cluster.models.train import EOS, agreement, distill, encode_corpus, hf_config, new_model, save_hf
    from actors.model.loader import load_model

    t0 = time.perf_counter()
    spec = SIZES[size]
    torch.manual_seed(spec.seed)
    tok = Tokenizer.from_file(str(pair / "target" / "tokenizer.json"))
    texts, held_texts = training_texts(spec)
    data, held = encode_corpus(tok, texts), encode_corpus(tok, held_texts)
    target = load_model(pair / "target").requires_grad_(False)
    cfg = hf_config(shape, spec.vocab, tok.token_to_id(EOS), spec.max_pos)
    draft = new_model(cfg, spec.seed + 1)
    kl = distill(draft, target, data, spec.draft_steps, spec.draft_batch, spec.seq, spec.draft_lr, spec.seed + 1)
    save_hf(draft, cfg, tok, out)
    agree = agreement(target, draft, held, 24, spec.seq)
    d_ms = per_token_ms(out)
    info = {"size": size, "draft": asdict(shape), "build_s": round(time.perf_counter() - t0, 1),
            "draft_kl": round(kl, 3), "greedy_agreement": round(agree, 3), "draft_ms_per_token": round(d_ms, 3),
            "torch": torch.__version__}
    (out / "build.json").write_text(json.dumps(info, indent=2))
    return info
