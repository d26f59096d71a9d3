"""Greedy acceptance of a drafter against its target at a fixed K, on held-out code and chat.

    .venv/bin/python -m cluster.models.acceptance --target demo:smol/target --draft demo:smol/draft --k 4

Runs synchronous speculative decoding in one process (no Ray: acceptance does not depend on the
transport) with K fixed, greedy, on held-out standard-library code prompts (corpus.prompts) and
on the hand-written held-out chat requests (chat_prompts.HELD_OUT) rendered with the target's
chat template. Prints acceptance (accepted / drafted tokens) and mean acceptance length per set.
"""
from __future__ import annotations

import argparse
import json
import sys
import logging

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def _path(spec: str):
    from cluster.launch.deployment import resolve_model

    return resolve_model(spec)


def measure(target_dir, draft_dir, k: int = 4, n: int = 12, new_tokens: int = 96) -> dict:
    from cluster.models.chat_prompts import HELD_OUT
    from cluster.models.corpus import prompts
    from actors.generate import generate_sd
    from actors.model.loader import load_model
    from actors.spec.stats import SpecStats
    from actors.spec.stopping import StopCriteria
    from actors.model.tokenizer import Tokenizer

    from actors.eagle.checkpoint import is_head_dir, load_head
    from actors.eagle.generate import generate_sd_head

    tok = Tokenizer(target_dir)
    target = load_model(target_dir)
    if is_head_dir(draft_dir):   # a draft head on the target's features
        head = load_head(draft_dir, target)
        run = lambda p, stop: generate_sd_head(target, head, p, stop, k=k)  # noqa: E731
    else:
        draft = load_model(draft_dir)
        run = lambda p, stop: generate_sd(target, draft, p, stop, k=k)  # noqa: E731
    sets = {"code": [tok.encode(t)[-96:] for t in prompts("code", n, seed=16)],
            "chat": [tok.encode_chat([{"role": "user", "content": m}]) for m in HELD_OUT[:n]]}
    stop = StopCriteria(new_tokens, frozenset(target.args.eos_token_ids))
    out = {}
    for name, ps in sets.items():
        stats = SpecStats(k=k)
        for p in tqdm(ps, desc=f"{name} k={k}", unit="prompt", mininterval=5, disable=False, leave=False):
            stats.merge(run(p, stop).stats)
        out[name] = {"prompts": len(ps), "acceptance": round(stats.acceptance_rate, 3),
                     "mean_acceptance_length": round(stats.mean_acceptance_length, 3),
                     "draft_tokens": stats.draft_tokens}
        log.info("%s: %s", name, out[name])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="demo:smol/target")
    ap.add_argument("--draft", default="demo:smol/draft", help="a drafter, or a draft head (demo:smol/head)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, default=12, help="prompts per set")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    res = measure(_path(args.target), _path(args.draft), args.k, args.n, args.new_tokens)
    sys.stdout.write(json.dumps(res, indent=2) + "\n")   # the result, on stdout for scripts


if __name__ == "__main__":
    main()
