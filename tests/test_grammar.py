"""actors/spec/grammar.py on the tiny pair's tokenizer: parsing errors, the mask, rollback."""
from __future__ import annotations

import json

import pytest
import torch

from actors.spec.grammar import GrammarError, Grammars, GrammarSpec, check, choice_spec

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False}
PAD = 8   # the model's vocabulary, larger than the tokenizer's: the mask must cover and refuse it


@pytest.fixture(scope="module")
def grammars(tiny_pair, tiny_tok):
    return Grammars(tiny_pair / "target", tiny_tok.vocab_size + PAD, tiny_tok.eos_token_ids, max_rollback=5)


def walk(grammars, spec: GrammarSpec, pick, limit: int = 80) -> list[int]:
    """Decode under the mask, one token at a time, choosing with `pick(masked row)`."""
    m = grammars.matcher(spec)
    out: list[int] = []
    gen = torch.Generator().manual_seed(0)
    while not m.terminated and len(out) < limit:
        row = torch.randn(grammars.vocab_size, generator=gen)
        m.mask_rows(row[None], [])
        t = pick(row)
        assert m.settle(0, [t])
        out.append(t)
    return out


def sampler(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda row: int(torch.multinomial(torch.softmax(row, -1), 1, generator=gen))


def test_bad_constraints_name_the_problem():
    bad = [(GrammarSpec("regex", "[a-"), "regex"), (GrammarSpec("json_schema", '{"type": "nope"}'), "nope"),
           (GrammarSpec("json_schema", "{"), "not valid JSON"), (GrammarSpec("json_schema", "[1]"), "object"),
           (GrammarSpec("ebnf", "root ::= foo"), "foo")]
    for spec, word in bad:
        with pytest.raises(GrammarError, match=word) as e:
            check(spec)
        assert ".cc:" not in str(e.value)
    with pytest.raises(GrammarError, match="kind"):
        GrammarSpec("xml", "x")
    with pytest.raises(GrammarError, match="choice"):
        choice_spec([])


def test_random_walks_stay_inside_the_grammar(grammars, tiny_tok):
    eos = set(tiny_tok.eos_token_ids)
    for seed in range(3):
        out = walk(grammars, GrammarSpec("json_schema", json.dumps(SCHEMA)), sampler(seed), limit=400)
        assert out[-1] in eos and all(t < tiny_tok.vocab_size for t in out)
        doc = json.loads(tiny_tok.decode(out[:-1]))
        assert set(doc) == {"ok", "n"} and isinstance(doc["ok"], bool) and doc["n"] in (1, 2, 3)
    options = ['say "hi"', "no", "caf\u00e9"]
    out = walk(grammars, choice_spec(options), lambda row: int(row.argmax()))
    assert tiny_tok.decode(out[:-1]) in options


def test_draft_rows_and_rollback(grammars, tiny_tok):
    """Row i is masked after draft[:i]; the matcher stops at a refused token and rolls back."""
    spec = GrammarSpec("regex", "a[bc]+d")
    a, b, c, d = (tiny_tok.encode(x)[0] for x in "abcd")
    m = grammars.matcher(spec)
    rows = torch.zeros(4, grammars.vocab_size)
    assert m.mask_rows(rows, [a, b, a]) == 2   # the second a is refused
    allowed = [set(torch.isfinite(r).nonzero()[:, 0].tolist()) for r in rows]
    assert a in allowed[0] and not {b, c, d} & allowed[0]
    assert {b, c} <= allowed[1] and not {a, d} & allowed[1] and {b, c, d} <= allowed[2] and a not in allowed[2]
    assert torch.isinf(rows[:3, -PAD:]).all()
    assert torch.equal(rows[3], torch.zeros(grammars.vocab_size))   # past the refusal: untouched
    assert not m.settle(2, [a, d])   # after a alone, d is refused (b was rolled back)
    assert m.settle(0, [c]) and m.settle(0, [d])
    assert m.settle(0, [tiny_tok.eos_token_ids[0]]) and m.terminated
    assert grammars.compile(spec) is grammars.compile(GrammarSpec("regex", "a[bc]+d"))   # compiled once


def test_a_grammar_that_allows_nothing_leaves_the_stop_tokens(grammars, tiny_tok):
    m = grammars.matcher(GrammarSpec("regex", r"[^\x00-\U0010FFFF]"))
    row = torch.zeros(1, grammars.vocab_size)
    m.mask_rows(row, [])
    assert torch.isfinite(row[0]).nonzero()[:, 0].tolist() == sorted(tiny_tok.eos_token_ids)


def test_grammar_records_cross_the_data_plane():
    from actors.protocol.frame import Frame, ProtocolError, Rec, decode, encode
    from actors.protocol.wire import decode_grammar, grammar_record

    spec = choice_spec(['caf\u00e9 "x"', "no"])
    (rec,) = decode(*encode(Frame(Rec.OUTCOME, 3, [grammar_record(7, spec, 5)]))).records
    assert rec.kind == Rec.GRAMMAR and rec.seq == 7 and decode_grammar(rec) == (spec, 5)
    rec.a = 99
    with pytest.raises(ProtocolError, match="GRAMMAR"):
        decode_grammar(rec)


def test_accepted_drafts_past_a_stop_token(grammars, tiny_tok):
    """Rows after a drafted stop token are not masked, so the target may accept drafts past it:
    the request ends at the stop token, and the matcher says the grammar is complete."""
    a, b = (tiny_tok.encode(x)[0] for x in "ab")
    eos = tiny_tok.eos_token_ids[0]
    m = grammars.matcher(GrammarSpec("regex", "ab"))
    assert m.advance([a]) and m.mask_rows(torch.zeros(4, grammars.vocab_size), [b, eos, a]) == 2
    assert m.settle(2, [b, eos, a, b]) and m.terminated
    assert not m.advance([a])   # nothing after the end
