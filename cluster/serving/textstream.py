"""Committed token ids -> streamed text, with stop strings that never reach the client.

A stop string can straddle the chunks the engine commits: `' self'`, `'.__'`, `'format_'` hides
`".__for"`. Text is therefore held back while its tail could still begin a stop string (the
longest suffix that is a proper prefix of one; vLLM holds back a fixed len(stop) - 1). When a
stop string completes, the text is cut where it begins, and the tokens returned are those that
contributed at least one character before the cut: the same tokens `usage.completion_tokens`
counts, so usage never counts a token the client did not get.
"""
from __future__ import annotations

from dataclasses import dataclass

from actors.model.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class Piece:
    token_ids: list[int]
    text: str


class TextStream:
    def __init__(self, tok: Tokenizer | None, stops: tuple[str, ...] = ()):
        self.decoder = IncrementalDecoder(tok) if tok is not None else None
        self.stops = tuple(stops) if self.decoder is not None else ()
        self.full = ""                              # all text decoded so far
        self.sent = 0                               # characters of `full` already returned
        self.pending: list[tuple[int, int]] = []    # (token, offset where its text starts)
        self.stopped = False

    def push(self, tokens: list[int]) -> Piece:
        """Add committed tokens; return what may go out now (possibly nothing)."""
        if self.stopped:
            return Piece([], "")
        if self.decoder is None:
            return Piece(list(tokens), "")
        old = len(self.full)
        for t in tokens:  # one at a time, so each token's text offset is known
            self.pending.append((t, len(self.full)))
            self.full += self.decoder.push([t])
        if self.stops:
            cut = self._find_stop(old)
            if cut is not None:
                self.stopped = True
                return self._take(cut, lambda start, end: start < cut)
        safe = len(self.full) - self._hold_back()
        return self._take(safe, lambda start, end: end <= safe, hold_partial=True)

    def flush(self) -> Piece:
        """The request ended without a stop string: everything held back goes out."""
        if self.stopped:
            return Piece([], "")
        return self._take(len(self.full), lambda start, end: True)

    def _find_stop(self, old: int) -> int | None:
        # An occurrence must end in the new text (earlier ones were found already).
        longest = max(len(s) for s in self.stops)
        start = max(0, old - longest + 1)
        hits = [i for i in (self.full.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _hold_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.full)), best, -1):
                if self.full.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int, keep, hold_partial: bool = False) -> Piece:
        ends = [start for _, start in self.pending[1:]] + [len(self.full)]
        n = 0
        while n < len(self.pending) and keep(self.pending[n][1], ends[n]):
            n += 1
        if hold_partial:
            # A token with no text of its own yet (the first bytes of a character) goes out with the
            # token that completes it, so a cut at that character can still leave both out.
            while n and self.pending[n - 1][1] == ends[n - 1]:
                n -= 1
        ids = [t for t, _ in self.pending[:n]]
        del self.pending[:n]
        text = self.full[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return Piece(ids, text)
