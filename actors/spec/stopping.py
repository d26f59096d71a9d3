"""Stop conditions shared by every decoding mode.

Token-level stops (EOS, stop token ids, max_new_tokens) are checked on ids, by one rule,
`token_stop`: the verifier (actors/sequence.py's apply_stops) and the in-process generators
(StopCriteria.check_tokens) both call it. Stop strings need text: the generated ids are decoded
and the earliest occurrence of any stop string ends the generation; the returned text excludes
the stop string (OpenAI semantics) while the token list keeps the token that completed it. (In
the engine the coordinator applies stop strings to the streamed text: cluster/serving/textstream.py.)
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


def token_stop(new: list[int], room: int, stop_ids: Collection[int],
               eos_ids: Collection[int] = ()) -> tuple[int, str | None]:
    """The token-level stop rule for `new`, tokens just committed to a sequence that has `room`
    tokens left before its length limit. Returns (how many of `new` to keep, finish reason):
    the first token in `stop_ids` ("stop") or in `eos_ids` ("eos") is kept and ends the
    sequence, unless the limit comes first; reaching the limit ends it ("length"); else all of
    `new` is kept and the reason is None."""
    room = max(room, 0)
    for i, t in enumerate(new[:room]):
        if t in stop_ids:
            return i + 1, "stop"
        if t in eos_ids:
            return i + 1, "eos"
    if len(new) >= room:
        return room, "length"
    return len(new), None


@dataclass
class StopCriteria:
    max_new_tokens: int
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")

    def check_tokens(self, generated: list[int], start: int = 0) -> tuple[int, str] | None:
        """Scan generated[start:] (generated[:start] went on) for a token-level stop (token_stop).
        Returns (tokens of `generated` to keep, reason), or None when generation goes on."""
        keep, reason = token_stop(generated[start:], self.max_new_tokens - start, self.stop_token_ids)
        return (start + keep, reason) if reason is not None else None

    def check_text(self, text: str) -> int | None:
        """Index where the earliest stop string starts in `text`, or None."""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None
