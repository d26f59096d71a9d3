"""When a message is due on the data plane: the rules both ends follow, in one place.

The verifier leads. Each step it sends one frame (kind OUTCOME) of records; from that frame, and
the speculation table both hold for the round just verified, each side knows what comes back
without asking the other:

- a DRAFT reply (`reply_due`) answers a frame that holds a PING (a heartbeat, or an exchange that
  wants the drafter's timestamps), or any sequence at K > 0 whose outcome missed the speculation
  cache (its draft is drafted now), or any sampling sequence at K > 0 (its q rows travel only in a
  reply). A greedy hit needs none: the verifier took that draft from the table;
- a TABLE (`table_due`, SSD only) answers a frame that asks some sequence for drafts: an OUTCOME
  or ADMIT at K > 0. A frame where every sequence is at K = 0 (or a PING) gets none, so the
  verifier waits on nothing;
- the K = 0 hold (`asks_nothing`): a step whose records are all outcomes at K = 0 asks the drafter
  for nothing, no reply and no table. The verifier sends no frame then and keeps those outcomes
  for the next frame that is due (a probe, a return to speculation, or the heartbeat); the drafter
  feeds the committed tokens they carry to its cache when a draft is asked for again.

Replies and tables name the step of the frame they answer (`check_step`).

The PING records that head a reply and a table carry the drafter's clocks, in different fields
for different things: `ReplyPing` and `TablePing` name them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass

from actors.protocol.frame import Frame, ProtocolError, Rec, Record


@dataclass(frozen=True, slots=True)
class Ask:
    """What one sequence's outcome asks of the drafter this round."""
    k: int           # the draft length from now on (0: speculation off)
    hit: bool        # its outcome (k, t*) was among the pre-drafted branches
    greedy: bool


def reply_due(ping: bool, asks: Iterable[Ask]) -> bool:
    return ping or any(a.k > 0 and not (a.hit and a.greedy) for a in asks)


def asks_drafts(r: Record) -> bool:
    """An OUTCOME or ADMIT record at K > 0."""
    return (r.kind == Rec.OUTCOME and bool(r.tokens) and r.tokens[0] > 0) or (r.kind == Rec.ADMIT and r.a > 0)


def table_due(frame: Frame) -> bool:
    """SSD: a TABLE answers a frame that asks some sequence for drafts. Both sides decide it from
    the frame alone."""
    return any(asks_drafts(r) for r in frame.records)


def asks_nothing(records: Iterable[Record]) -> bool:
    """The K = 0 hold: nothing but outcomes at K = 0 (no PING, admission, release or features)."""
    return all(r.kind == Rec.OUTCOME and not r.tokens[0] for r in records)


def check_step(frame: Frame, expected: int) -> None:
    """Replies and tables name the step of the frame they answer; any other number means the two
    sides fell out of step, and using the frame would verify against the wrong draft or q."""
    if frame.step != expected:
        raise ProtocolError(f"the drafter's {Rec(frame.kind).name} frame answers step {frame.step}, "
                            f"expected {expected}: the data plane is out of step")


class _Ping:
    """A PING record's four numbers (round, a, b, tokens[0]), named by a subclass's fields in that order."""
    __slots__ = ()

    def record(self) -> Record:
        w, x, y, z = astuple(self)
        return Record(Rec.PING, 0, w, x, y, tokens=[z])

    @classmethod
    def of(cls, r: Record):
        return cls(r.round, r.a, r.b, r.tokens[0] if len(r.tokens) else 0)


@dataclass(frozen=True, slots=True)
class ReplyPing(_Ping):
    """The PING heading a DRAFT reply: the drafter's clock (perf_counter_ns) when it posted the
    receive of the frame, received it and sent the reply, and the prefill of tokens committed at
    K = 0 it ran before drafting (ns: catching up, not drafting)."""
    posted_ns: int
    received_ns: int
    sent_ns: int
    catch_up_ns: int = 0


@dataclass(frozen=True, slots=True)
class TablePing(_Ping):
    """The PING heading a TABLE: the pre-speculation's draft steps and duration (ns), the drafter's
    clock when it sent the table, and the catch-up prefill within that duration (a new prompt,
    tokens committed at K = 0: a one-off, not pre-speculation's cost per round)."""
    steps: int
    drafting_ns: int
    sent_ns: int
    catch_up_ns: int = 0
