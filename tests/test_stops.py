"""Stop strings never reach the client, and usage counts exactly the tokens the client got; the
one token-level stop rule (actors/spec/stopping.py) serves the verifier and the generators alike.

The expected text and token count come from decoding the unstopped continuation with the
tokenizer directly (not from the streaming code under test): the text is cut where the first stop
string begins, and the tokens returned are those whose text starts before the cut.
"""
from __future__ import annotations

import random

import pytest

from cluster.serving.textstream import TextStream

ISSUE_PROMPT = 'def read_config(path):\n    """Read a configuration file and return a dict."""\n    with'


def expected(tok, ids: list[int], stops: list[str]) -> tuple[str, list[int]] | None:
    """(text, tokens) a client must get for `ids` under `stops`, or None if no stop occurs."""
    full = tok.decode(ids)
    hits = [i for i in (full.find(s) for s in stops) if i >= 0]
    if not hits:
        return None
    cut = min(hits)
    # a prefix ending inside a character decodes with U+FFFD for the partial bytes: not text yet
    n = sum(1 for i in range(len(ids)) if len(tok.decode(ids[:i]).rstrip("\ufffd")) < cut)
    return full[:cut], ids[:n]


@pytest.mark.parametrize("new, room, want", [
    ([5, 6, 7], 5, (3, None)),          # nothing stops: keep all
    ([5, 1, 7], 5, (2, "stop")),        # a stop id is kept and ends it
    ([5, 2, 7], 5, (2, "eos")),
    ([5, 6, 7], 3, (3, "length")),      # exactly the room left
    ([5, 6, 1], 3, (3, "stop")),        # a stop id on the last allowed token: a stop
    ([5, 6, 7, 1], 3, (3, "length")),   # the limit comes before the stop id
    ([1, 2], 5, (1, "stop")),           # the first stop wins
])
def test_token_stop_rule(new, room, want):
    from actors.spec.stopping import token_stop

    assert token_stop(new, room, {1}, {2}) == want


def test_verifier_and_generator_stops_are_one_rule():
    """apply_stops (the verifier's) and StopCriteria.check_tokens (the in-process generators')
    cut the same commits at the same place, for the same reasons (EOS counted as a stop id)."""
    from types import SimpleNamespace

    from actors.sequence import Request, apply_stops
    from actors.spec.stopping import StopCriteria

    rng = random.Random(0)
    for _ in range(2000):
        limit, done = rng.randint(1, 8), rng.randint(0, 7)
        done = min(done, limit - 1)
        new = [rng.randrange(8) for _ in range(rng.randint(1, 6))]
        req = Request(0, [1], limit, stop_token_ids=(3,))
        got, reason = apply_stops(SimpleNamespace(req=req, n_generated=done), new, frozenset({4}))
        hit = StopCriteria(limit, frozenset({3, 4})).check_tokens([0] * done + new, done)
        want = (done + len(got), {"eos": "stop"}.get(reason, reason)) if reason else None
        assert hit == want, (limit, done, new)
        assert reason != "stop" or got[-1] == 3


def run_stream(tok, ids: list[int], stops: tuple[str, ...], splits: list[int]):
    ts, got_text, got_ids, seen = TextStream(tok, stops), "", [], ""
    bounds = [0, *sorted(splits), len(ids)]
    for a, b in zip(bounds, bounds[1:]):
        piece = ts.push(ids[a:b])
        got_text += piece.text
        got_ids += piece.token_ids
        seen += piece.text
        assert not any(s in seen for s in stops), f"a stop string went out: {seen!r}"
        if ts.stopped:
            break
    if not ts.stopped:
        piece = ts.flush()
        got_text, got_ids = got_text + piece.text, got_ids + piece.token_ids
    return got_text, got_ids, ts.stopped


@pytest.mark.parametrize("seed", range(6))
def test_stream_cuts_at_stop_for_any_chunking(tiny_tok, seed):
    rng = random.Random(seed)
    text = 'def read_config(path):\n    with open(path) as f:\n        return {k: v for k, v in parse(f)}\n'
    ids = tiny_tok.encode(text)
    full = tiny_tok.decode(ids)
    a = rng.randrange(1, len(full) - 8)
    stop = full[a:a + rng.randrange(2, 7)]
    splits = rng.sample(range(1, len(ids)), k=min(len(ids) - 1, rng.randrange(1, 12)))
    want = expected(tiny_tok, ids, [stop])
    got_text, got_ids, stopped = run_stream(tiny_tok, ids, (stop,), splits)
    assert stopped and (got_text, got_ids) == want


def test_stream_without_stop_returns_everything(tiny_tok):
    ids = tiny_tok.encode("import os\nprint(os.getcwd())\n")
    got_text, got_ids, stopped = run_stream(tiny_tok, ids, ("@@never@@",), [2, 5, 9])
    assert not stopped and got_ids == ids and got_text == tiny_tok.decode(ids)


def test_stream_multibyte_stop_token_by_token(tiny_tok):
    # Byte-level BPE splits these characters across tokens: the stop must still match whole characters.
    text = "x = 'naïve café ☕ déjà vu'\n"
    ids = tiny_tok.encode(text)
    assert len(ids) > len(text.encode()) // 3
    for stop in ("é ☕", "☕", "àvu", "ï"):
        want = expected(tiny_tok, ids, [stop])
        got = run_stream(tiny_tok, ids, (stop,), list(range(1, len(ids))))
        if want is None:
            assert not got[2]
        else:
            assert got[2] and got[:2] == want, stop


def test_stream_earliest_of_several_stops(tiny_tok):
    ids = tiny_tok.encode("alpha beta gamma delta\n")
    got_text, got_ids, stopped = run_stream(tiny_tok, ids, ("delta", "beta", "gamma"), [3])
    assert stopped and (got_text, got_ids) == expected(tiny_tok, ids, ["delta", "beta", "gamma"])
    assert got_text == "alpha "


# -- through the real server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(serve_tiny):
    server, client = serve_tiny()
    yield server, client
    client.close()
    server.stop(grace_s=1)


def _stream(client, prompt, **kw):
    chunks, final = [], None
    for item in client.generate(prompt, **kw):
        if item.HasField("chunk"):
            chunks.append((list(item.chunk.token_ids), item.chunk.text))
        else:
            final = item.final
    return chunks, final


def _check_stopped(tiny_tok, client, prompt, stops, n=48, **kw):
    """Generate without stops, then with them; the stopped stream must be exactly the cut prefix."""
    ref_chunks, ref_final = _stream(client, prompt, max_new_tokens=n, **kw)
    ref_ids = [t for ids, _ in ref_chunks for t in ids]
    assert ref_final.usage.completion_tokens == len(ref_ids) == n
    want = expected(tiny_tok, ref_ids, stops)
    assert want is not None, f"no stop in {tiny_tok.decode(ref_ids)!r}"
    chunks, final = _stream(client, prompt, max_new_tokens=n, stop=stops, **kw)
    text = "".join(t for _, t in chunks)
    ids = [t for i, _ in chunks for t in i]
    assert (text, ids) == want
    assert final.finish_reason == "stop"
    assert final.usage.completion_tokens == len(ids)
    return ref_chunks, text


def test_server_stop_straddling_chunks(served, tiny_tok):
    _, client = served
    ref_chunks, text = _check_stopped(tiny_tok, client, ISSUE_PROMPT, [".__for"])
    # The stop string begins after the first token: the text before it goes out, nothing of the stop.
    assert text == tiny_tok.decode([t for ids, _ in ref_chunks for t in ids]).split(".__for")[0]
    assert ".__" not in text


def test_server_several_stops_first_wins(served, tiny_tok):
    _, client = served
    full_ids = [t for ids, _ in _stream(client, ISSUE_PROMPT, max_new_tokens=48)[0] for t in ids]
    full = tiny_tok.decode(full_ids)
    late, early = full[30:34], full[12:15]
    _check_stopped(tiny_tok, client, ISSUE_PROMPT, [late, early])


def test_server_stop_at_first_token(served, tiny_tok):
    _, client = served
    first = tiny_tok.decode([t for ids, _ in _stream(client, ISSUE_PROMPT, max_new_tokens=1)[0] for t in ids])
    chunks, final = _stream(client, ISSUE_PROMPT, max_new_tokens=48, stop=[first[:2]])
    assert "".join(t for _, t in chunks) == ""
    assert [t for i, _ in chunks for t in i] == []
    assert final.finish_reason == "stop" and final.usage.completion_tokens == 0


def test_server_multibyte_stop(served, tiny_tok):
    """Seeded hot sampling wanders into non-ASCII bytes; a stop on such a character cuts there."""
    _, client = served
    for seed in range(40):
        kw = dict(temperature=3.0, seed=seed)
        ref_ids = [t for ids, _ in _stream(client, "s = '", max_new_tokens=48, **kw)[0] for t in ids]
        full = tiny_tok.decode(ref_ids)
        wide = [c for c in full if len(c.encode()) > 1 and c != "\ufffd"]
        if wide:
            break
    else:
        pytest.fail("no multi-byte character in 40 seeded samples")
    i = full.index(wide[0])
    _check_stopped(tiny_tok, client, "s = '", [full[max(0, i - 1):i + 1]], **kw)
