"""Record payload conventions shared by verifier and drafter (the frame itself is channel.py).

ADMIT carries the request's sampling settings ahead of its tokens, as int64 words: floats travel
as the bit pattern of a float64, so both sides see exactly the same temperature and top-p.
GRAMMAR carries a constrained request's grammar to the drafter, which drafts under the same mask.
DRAFT's `a` says what the speculation cache did for this round. TABLE ships the speculation
cache itself: every pre-drafted branch of one sequence as its outcome key (k, t*) and its tokens.
"""
from __future__ import annotations

import struct

from actors.protocol.frame import ProtocolError, Rec, Record
from actors.spec.grammar import KINDS, GrammarError, GrammarSpec
from actors.spec.sampling import SamplingParams

MISS, HIT, NO_LOOKUP = 0, 1, 2   # DRAFT.a: cache miss, cache hit, no lookup (sync SD)
_N_PARAMS = 4


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _i2f(i: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(i)))[0]


def encode_params(params: SamplingParams, seed: int, tokens: list[int]) -> list[int]:
    return [_f2i(params.temperature), params.top_k, _f2i(params.top_p), seed] + list(tokens)


def decode_params(payload) -> tuple[SamplingParams, int, list[int]]:
    words = payload.tolist() if hasattr(payload, "tolist") else list(payload)
    temp, top_k, top_p, seed = words[:_N_PARAMS]
    params = SamplingParams(temperature=_i2f(temp), top_k=int(top_k), top_p=_i2f(top_p), seed=int(seed))
    return params, int(seed), [int(t) for t in words[_N_PARAMS:]]


def encode_table(branches: dict[tuple[int, int], list[int]]) -> list[int]:
    """{(k, t*): K draft tokens} -> flat [k, t*, d_1..d_K] per branch (every branch has K tokens)."""
    out: list[int] = []
    for (k, t), toks in branches.items():
        out += (k, t)
        out += toks
    return out


def decode_table(payload: list[int], n: int, k: int) -> dict[tuple[int, int], list[int]]:
    width = k + 2
    if len(payload) != n * width:
        raise ProtocolError(f"a table of {n} branches of {k} tokens needs {n * width} ints, got {len(payload)}")
    return {(payload[i], payload[i + 1]): payload[i + 2:i + width] for i in range(0, len(payload), width)}


def grammar_record(seq: int, spec: GrammarSpec, n_generated: int) -> Record:
    """The grammar of sequence `seq`, whose ADMIT (next) holds `n_generated` tokens already
    generated (a sequence joining a new drafter): the drafter's matcher advances through them."""
    return Record(Rec.GRAMMAR, seq, 0, KINDS.index(spec.kind), n_generated, tokens=list(spec.text.encode()))


def decode_grammar(rec: Record) -> tuple[GrammarSpec, int]:
    if not 0 <= rec.a < len(KINDS) or rec.b < 0:
        raise ProtocolError(f"GRAMMAR seq {rec.seq}: kind {rec.a}, {rec.b} tokens generated")
    try:
        return GrammarSpec(KINDS[rec.a], bytes(rec.tokens).decode()), rec.b
    except (ValueError, GrammarError) as e:
        raise ProtocolError(f"GRAMMAR seq {rec.seq}: {e}") from None
