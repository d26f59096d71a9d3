"""The data plane's frame format (actors/protocol/frame.py): pure encode / decode, no process group."""
from __future__ import annotations

import pytest
import torch

from actors.protocol.frame import HEADER_LEN, MAGIC, VERSION, Frame, ProtocolError, Rec, Record, decode, encode


def _same(a: Record, b: Record) -> bool:
    toks = a.tokens.tolist() if isinstance(a.tokens, torch.Tensor) else list(a.tokens)
    if (a.kind, a.seq, a.round, a.a, a.b, toks) != (b.kind, b.seq, b.round, b.a, b.b, list(b.tokens)):
        return False
    if a.floats is None or a.floats.numel() == 0:
        return b.floats is None
    return b.floats is not None and torch.equal(a.floats.reshape(b.floats.shape).float(), b.floats)


def _all_kinds() -> Frame:
    return Frame(Rec.OUTCOME, 41, [
        Record(Rec.ADMIT, 7, 0, 128, 0b101, [1, 2, 3, 4]),
        Record(Rec.OUTCOME, 7, 3, 2, 99),
        Record(Rec.RELEASE, 8),
        Record(Rec.DRAFT, 7, 4, 1, 3, torch.tensor([5, 6, 7]), torch.randn(3, 11)),
        Record(Rec.DRAFT, 9, 2, 0, 0, [8, 9]),  # greedy: tokens, no q rows
        Record(Rec.DRAFT, 10, 1, 1, 2, [1, 2], torch.randn(22)),  # flat rows are fine
        Record(Rec.PING, 0, 2**62, -5, 2**40),  # full int64 range survives
        Record(Rec.SHUTDOWN, 0),
    ])


def test_round_trip_every_record_kind():
    f = _all_kinds()
    header, ints, floats = encode(f)
    assert header.dtype == ints.dtype == torch.int64 and floats.dtype == torch.float32
    assert header.tolist()[:7] == [MAGIC, VERSION, Rec.OUTCOME, 8, ints.numel(), 3 * 11 + 2 * 11, 41]
    g = decode(header, ints, floats)
    assert (g.kind, g.step, len(g.records)) == (Rec.OUTCOME, 41, 8)
    for a, b in zip(f.records, g.records):
        assert _same(a, b), (a, b)
    assert g.records[3].floats.shape == (3, 11) and g.records[5].floats.shape == (2, 11)


def test_empty_frame_sends_header_only():
    header, ints, floats = encode(Frame(Rec.PING, 3, []))
    assert header.numel() == HEADER_LEN and ints is None and floats is None
    g = decode(header, ints, floats)
    assert (g.kind, g.step, g.records) == (Rec.PING, 3, [])


@pytest.mark.parametrize("field,value,match", [
    (0, 0x1234, "magic"), (1, 99, "version"), (2, 99, "frame kind"), (3, 9, "records"),
    (4, 3, "ints"), (5, 7, "floats"),
])
def test_corrupted_header_is_a_protocol_error(field, value, match):
    header, ints, floats = encode(_all_kinds())
    header[field] = value
    with pytest.raises(ProtocolError, match=match):
        decode(header, ints, floats)


def test_corrupted_body_is_a_protocol_error():
    header, ints, floats = encode(_all_kinds())
    bad = ints.clone()
    bad[0] = 77  # unknown record kind
    with pytest.raises(ProtocolError, match="unknown kind"):
        decode(header, bad, floats)
    bad = ints.clone()
    bad[5] = 10_000  # payload length past the end
    with pytest.raises(ProtocolError, match="overruns"):
        decode(header, bad, floats)
    with pytest.raises(ProtocolError, match="announces"):
        decode(header, ints[:-1], floats)
    with pytest.raises(ProtocolError, match="header has"):
        decode(header[:7], ints, floats)


def test_encode_rejects_inconsistent_floats():
    with pytest.raises(ProtocolError, match="only DRAFT"):
        encode(Frame(Rec.OUTCOME, 0, [Record(Rec.ADMIT, 1, floats=torch.ones(4))]))
    with pytest.raises(ProtocolError, match="no floats"):
        encode(Frame(Rec.DRAFT, 0, [Record(Rec.DRAFT, 1, b=2, tokens=[1, 2])]))
    with pytest.raises(ProtocolError, match="do not make"):
        encode(Frame(Rec.DRAFT, 0, [Record(Rec.DRAFT, 1, b=2, tokens=[1, 2], floats=torch.ones(5))]))
    with pytest.raises(ProtocolError, match="earlier rows"):
        encode(Frame(Rec.DRAFT, 0, [Record(Rec.DRAFT, 1, b=1, tokens=[1], floats=torch.ones(4)),
                                    Record(Rec.DRAFT, 2, b=1, tokens=[1], floats=torch.ones(5))]))


def test_a_reply_for_another_step_is_a_protocol_error():
    from actors.protocol.rounds import check_step

    reply = Frame(Rec.DRAFT, 7, [Record(Rec.DRAFT, 1, 3, 0, 0, [5, 6])])
    check_step(reply, 7)
    with pytest.raises(ProtocolError, match="answers step 7, expected 8: the data plane is out of step"):
        check_step(reply, 8)


def test_feature_rows_ride_beside_q_rows():
    """FEATS rows (the target's features for a draft head) have their own width; DRAFT q rows in
    the same frame still split evenly, and both come back in place."""
    f = Frame(Rec.OUTCOME, 3, [
        Record(Rec.FEATS, 7, 2, 40, 3, [6], torch.randn(3, 6)),
        Record(Rec.OUTCOME, 7, 2, 2, 99, [4, 8]),
        Record(Rec.DRAFT, 7, 3, 1, 2, [5, 6], torch.randn(2, 11)),
        Record(Rec.FEATS, 9, 1, 0, 1, [6], torch.randn(1, 6).to(torch.bfloat16)),   # any float dtype
    ])
    g = decode(*encode(f))
    for a, b in zip(f.records, g.records):
        assert _same(a, b), (a, b)
    assert g.records[0].floats.shape == (3, 6) and g.records[2].floats.shape == (2, 11)


@pytest.mark.parametrize("rec", [
    Record(Rec.FEATS, 7, 0, 0, 3, [6], torch.randn(2, 6)),      # fewer floats than b rows of width
    Record(Rec.FEATS, 7, 0, 0, 1, [], torch.randn(1, 6)),       # no width
    Record(Rec.OUTCOME, 7, 0, 0, 1, [], torch.randn(1, 6)),     # floats on a record that carries none
])
def test_bad_feature_records_are_refused(rec):
    with pytest.raises(ProtocolError):
        encode(Frame(Rec.OUTCOME, 0, [rec]))


def test_a_feature_width_that_overruns_the_floats_is_refused():
    header, ints, floats = encode(Frame(Rec.OUTCOME, 0, [Record(Rec.FEATS, 7, 0, 0, 2, [6], torch.randn(2, 6))]))
    ints[-1] = 7   # the width, rewritten: 14 floats announced, 12 sent
    with pytest.raises(ProtocolError):
        decode(header, ints, floats)
