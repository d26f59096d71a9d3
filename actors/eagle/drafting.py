"""The drafter's side of a draft head: the target's features as they arrive, the features each
row reads, and the per-depth catch-up that pre-speculation branches from.

Row r of the head reads token r and the feature at r - 1 (actors/eagle/drafter_model.py). For a
committed row that is the target's own (FEATS records bring them, fused on arrival); for a draft
row it is the head's hidden state at the row before, so draft rows run one at a time. When an
outcome commits draft rows, the target's real features for them arrive with it and those rows
are computed again from them (Drafter._apply_outcome cuts the cache back to the last real row).
"""
from __future__ import annotations

import torch

from actors.draft_state import DraftSeq
from actors.eagle.drafter_model import HeadModel
from actors.protocol.frame import ProtocolError
from actors.spec.sampling import probs_from_logits
from actors.engine_spec import EngineSpec


def load_head_model(spec: EngineSpec, device: str) -> HeadModel:
    from actors.eagle.checkpoint import load_head_for
    from actors.model.loader import parse_dtype

    return HeadModel(load_head_for(spec.draft, spec.target, parse_dtype(spec.draft_dtype, device), device))


def n_real(s: DraftSeq) -> int:
    return 0 if s.real is None else len(s.real)


def add_features(model: HeadModel, s: DraftSeq, start: int, rows: torch.Tensor) -> None:
    """The target's features at positions start..start+len(rows)-1, fused to the head's width."""
    if start != n_real(s):
        raise ProtocolError(f"seq {s.id}: features from position {start}, the drafter holds {n_real(s)}")
    fused = model.fuse(rows)
    s.real = fused if s.real is None else torch.cat((s.real, fused))


def row_features(model: HeadModel, s: DraftSeq, start: int, end: int) -> torch.Tensor:
    """[1, end - start, dim]: the target's features at positions start-1..end-2 (zeros for row 0,
    which has no position before it)."""
    lo = max(start - 1, 0)
    feats = s.real[lo:end - 1]
    if start == 0:
        feats = torch.cat((torch.zeros_like(s.real[:1]), feats))
    return feats[None]


def catch_up_depths(model: HeadModel, forward, cache, s: DraftSeq) -> None:
    """Give every depth 0..len(draft) of `s` a distribution and hidden state: the row after the
    committed tokens from the target's last feature, each draft row from the head's row before.
    The committed rows before are already in the cache (Drafting.prefill, actors/drafting.py)."""
    n = len(s.tokens)
    full = s.tokens + s.draft
    first = s.length - (n - 1)   # the first depth without a row
    dists = list(s.dists[:first]) if first else []
    hids = list(s.hid[:first]) if first else []
    for j in range(first, len(s.draft) + 1):
        model.feats = (s.real[n - 2] if j == 0 else hids[j - 1]).view(1, 1, -1)
        logits = forward(torch.tensor([[full[n - 1 + j]]]), torch.tensor([[n - 1 + j]]), [s.slot])[0, 0]
        dists.append(logits if s.params.greedy else probs_from_logits(logits[None], s.params)[0])
        hids.append(model.hidden[0, 0])
        s.length = n + j
        cache.advance(s.slot, s.length)
    s.dists, s.hid = torch.stack(dists), torch.stack(hids)
